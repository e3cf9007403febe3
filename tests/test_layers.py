"""Shared primitives (the models' own tests cover their numerics)."""

import mlx.core as mx
import numpy as np

from ideogram4_mlx.layers import apply_rope, rope_cos_sin, silu


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
