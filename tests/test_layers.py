"""Shared primitives and the config base (the models' own tests cover their numerics)."""

import json
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import pytest

from ideogram4_mlx.layers import BaseConfig, apply_rope, rope_cos_sin, silu
from ideogram4_mlx.weights import CheckpointError


@dataclass(frozen=True)
class Example(BaseConfig):
    width: int = 8
    section: tuple[int, int] = (1, 2)
    channels: tuple[int, ...] | None = None
    extra: object = None


def test_from_dict_keeps_known_fields_ignores_others_and_makes_tuples():
    config = Example.from_dict(
        {"width": 4, "section": [3, 4], "channels": [5], "extra": [6], "unknown": 1}
    )
    assert config == Example(width=4, section=(3, 4), channels=(5,), extra=[6])
    assert Example.from_dict({"channels": None}) == Example()


def test_from_file_reads_json_and_names_a_missing_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"section": [7, 8], "_class_name": "X"}))
    assert Example.from_file(path).section == (7, 8)
    with pytest.raises(CheckpointError, match="nope.json: file not found"):
        Example.from_file(tmp_path / "nope.json")


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
