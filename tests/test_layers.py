"""Shared primitives (the models' own tests cover their numerics)."""

import mlx.core as mx
import numpy as np
import pytest

from ideogram4_mlx.layers import apply_rope, group_moments, rope_cos_sin, silu, tree_sum


def test_silu_is_evaluated_in_fp32_and_rounded_once():
    x = mx.array(np.linspace(-6, 6, 101), dtype=mx.bfloat16)
    xf = x.astype(mx.float32)
    expected = (xf * mx.sigmoid(xf)).astype(mx.bfloat16)
    assert silu(x).dtype == mx.bfloat16 and mx.array_equal(silu(x), expected).item()


def test_rope_rotates_halves_and_is_the_identity_at_position_0():
    x = mx.array(np.arange(8, dtype=np.float32).reshape(1, 1, 1, 8))
    quarter = mx.zeros((1, 1, 1, 8)), mx.ones((1, 1, 1, 8))  # cos 0, sin 1
    np.testing.assert_array_equal(
        np.array(apply_rope(x, *quarter))[0, 0, 0], [-4, -5, -6, -7, 0, 1, 2, 3]
    )
    cos, sin = rope_cos_sin(np.array([[0, 3]]), 8, 10_000)
    assert cos.shape == sin.shape == (1, 2, 8) and cos.dtype == np.float32
    assert (cos[0, 0] == 1).all() and (sin[0, 0] == 0).all()
    np.testing.assert_array_equal(cos[..., :4], cos[..., 4:])


def test_group_moments_match_float64():
    rng = np.random.default_rng(0)
    x = (1.0 + 0.5 * rng.standard_normal((1, 512, 512, 32))).astype(np.float32)
    mean, m2 = group_moments(mx.array(x), 8)
    x64 = x.astype(np.float64).reshape(1, -1, 8, 4)
    std = x64.std(axis=(1, 3))
    assert np.abs(np.array(mean) - x64.mean(axis=(1, 3))).max() <= 1e-6 * std.min()
    var = np.array(m2, np.float64) / (x64.shape[1] * 4)
    np.testing.assert_allclose(var, std**2, rtol=1e-6)


@pytest.mark.parametrize("n", [1, 15, 16, 17, 255, 4097])
def test_tree_sum_pads_any_length(n):
    x = (mx.arange(2 * n * 3) % 7).astype(mx.float32).reshape(2, n, 3)  # exact sums
    np.testing.assert_array_equal(np.array(tree_sum(x)), np.array(x).sum(axis=1))
