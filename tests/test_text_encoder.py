"""Text encoder: config, sanitize, tap stacking, padding, chat template, cache (no torch needed)."""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import CAPTION_TEXT, rel_l2
from mlx.utils import tree_flatten

from ideogram4_mlx.config import CheckpointError
from ideogram4_mlx.prompt import pad_left, prompt_token_ids
from ideogram4_mlx.text_encoder import (
    TAP_LAYERS,
    Qwen3VLTextEncoder,
    TextEncoderConfig,
    left_padding,
    position_ids,
    stack_taps,
)

TINY = TextEncoderConfig(
    hidden_size=16, intermediate_size=32, num_hidden_layers=36, num_attention_heads=2,
    num_key_value_heads=1, head_dim=8, vocab_size=32,
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Config and weights


def test_config_reads_the_nested_text_config_and_ignores_unknown_keys():
    d = {
        "model_type": "qwen3_vl",
        "ideogram_fp8_weight_only": True,
        "text_config": {
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "hidden_act": "silu",
            "unknown_key": 1,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1234, "mrope_section": [4]},
        },
        "vision_config": {"hidden_size": 32},
    }
    config = TextEncoderConfig.from_dict(d)
    assert (config.hidden_size, config.head_dim, config.rope_theta) == (64, 16, 1234)
    assert config.num_hidden_layers == 36 and config.features_dim == 13 * 64


@pytest.mark.parametrize(
    "d",
    [
        {"text_config": {"rope_theta": 777}},  # transformers 4.x: theta inside text_config
        {"rope_theta": 777, "text_config": {}},  # or at the top level
        {"rope_theta": 777},  # a flat (text-only) config
    ],
)
def test_config_accepts_older_rope_theta_locations(d):
    assert TextEncoderConfig.from_dict(d).rope_theta == 777


def test_config_defaults_are_the_real_model():
    config = TextEncoderConfig.from_dict({})
    assert config.rope_theta == 5_000_000 and config.features_dim == 53248


def test_config_errors_name_the_problem():
    with pytest.raises(CheckpointError, match="at least 36"):
        TextEncoderConfig.from_dict({"text_config": {"num_hidden_layers": 28}})
    with pytest.raises(CheckpointError, match="yarn"):
        TextEncoderConfig.from_dict({"text_config": {"rope_parameters": {"rope_type": "yarn"}}})


def test_config_of_the_synthetic_checkpoint(tiny_checkpoint):
    config = TextEncoderConfig.from_file(tiny_checkpoint / "text_encoder" / "config.json")
    assert (config.hidden_size, config.num_hidden_layers, config.head_dim) == (64, 36, 16)
    assert config.rope_theta == 5_000_000


def test_sanitize_on_a_hand_built_dict():
    fp8_one = mx.full((2, 3), 0x38, dtype=mx.uint8)  # E4M3 0x38 = 1.0
    weights = {
        "language_model.layers.0.mlp.up_proj.weight": fp8_one,
        "language_model.layers.0.mlp.up_proj.weight_scale": mx.array([0.5, 3.0], mx.float32),
        "language_model.embed_tokens.weight": mx.ones((4, 3), mx.bfloat16),
        "language_model.norm.weight": mx.ones((3,), mx.bfloat16),
        "visual.blocks.0.attn.qkv.weight": fp8_one,
        "visual.blocks.0.attn.qkv.weight_scale": mx.ones((2,)),
        "lm_head.weight": mx.ones((4, 3), mx.bfloat16),
    }
    sanitize = Qwen3VLTextEncoder(TINY).sanitize
    out = sanitize(weights)
    assert sorted(out) == ["embed_tokens.weight", "layers.0.mlp.up_proj.weight"]
    up = out["layers.0.mlp.up_proj.weight"]
    assert up.dtype == mx.bfloat16
    np.testing.assert_array_equal(np.array(up.astype(mx.float32)), [[0.5] * 3, [3.0] * 3])
    again = sanitize(out)  # idempotent: already-converted input passes unchanged
    assert sorted(again) == sorted(out)
    assert all(mx.array_equal(again[k], out[k]) for k in out)
    # transformers' Qwen3VLForConditionalGeneration naming also works.
    nested = sanitize({"model.language_model.embed_tokens.weight": mx.ones((4, 3))})
    assert list(nested) == ["embed_tokens.weight"]


def save_as_bf16_shards(model, src_dir, dst_dir):
    """A converted checkpoint: plain bf16 tensors in two shards with an index, plus the unused
    final norm and one vision tensor, as a repack of the real folder would have."""
    dst_dir.mkdir()
    shutil.copy(src_dir / "config.json", dst_dir / "config.json")
    params = {f"language_model.{k}": v for k, v in tree_flatten(model.parameters())}
    params["language_model.norm.weight"] = mx.ones((model.config.hidden_size,), mx.bfloat16)
    params["visual.patch_embed.proj.bias"] = mx.zeros((8,), mx.bfloat16)
    keys = sorted(params)
    shards = {"model-00001-of-00002.safetensors": keys[::2]}
    shards["model-00002-of-00002.safetensors"] = keys[1::2]
    weight_map = {}
    for name, shard_keys in shards.items():
        mx.save_safetensors(str(dst_dir / name), {k: params[k] for k in shard_keys})
        weight_map |= {k: name for k in shard_keys}
    index = {"metadata": {}, "weight_map": weight_map}
    (dst_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    return params


@pytest.fixture(scope="module")
def converted(tiny_checkpoint, tmp_path_factory):
    src = tiny_checkpoint / "text_encoder"
    model = Qwen3VLTextEncoder.from_pretrained(src, dtype=mx.bfloat16)
    dst = tmp_path_factory.mktemp("converted") / "text_encoder"
    return model, dst, save_as_bf16_shards(model, src, dst)


def test_plain_bf16_sharded_checkpoint_loads_to_the_same_model(converted, tokenizer):
    model, path, _ = converted
    again = Qwen3VLTextEncoder.from_pretrained(path, dtype=mx.bfloat16)
    ids = np.array([prompt_token_ids(tokenizer, "a red fox in fresh snow")])
    assert mx.array_equal(again(ids), model(ids))


def write_variant(converted, tmp_path, edit):
    _, path, params = converted
    params = edit(dict(params))
    dst = tmp_path / "text_encoder"
    dst.mkdir()
    shutil.copy(path / "config.json", dst / "config.json")
    mx.save_safetensors(str(dst / "model.safetensors"), params)
    return dst


def test_missing_key_is_an_error_naming_it(converted, tmp_path):
    key = "language_model.layers.35.mlp.down_proj.weight"
    path = write_variant(converted, tmp_path, lambda p: {k: v for k, v in p.items() if k != key})
    with pytest.raises(CheckpointError, match="layers.35.mlp.down_proj.weight"):
        Qwen3VLTextEncoder.from_pretrained(path)


def test_misshaped_key_is_an_error_naming_it(converted, tmp_path):
    key = "language_model.layers.7.self_attn.k_proj.weight"

    def edit(p):
        p[key] = p[key][:-1]
        return p

    with pytest.raises(CheckpointError, match="layers.7.self_attn.k_proj.weight"):
        Qwen3VLTextEncoder.from_pretrained(write_variant(converted, tmp_path, edit))


# ---------------------------------------------------------------------------------------------
# Taps, stacking, padding


def test_stack_taps_is_interleaved_and_zeroes_padding_rows():
    b, t, d = 2, 3, 4
    # tap s holds 1000*s + 10*d + b at (b, ., d); row (1, 0) is padding and holds NaN.
    taps = [
        mx.broadcast_to(
            mx.array(1000.0 * s + 10 * np.arange(d)[None, None] + np.arange(b)[:, None, None]),
            (b, t, d),
        )
        for s in range(13)
    ]
    taps[5] = mx.where(mx.array([[[False]] * t, [[True]] + [[False]] * (t - 1)]), np.nan, taps[5])
    mask = np.array([[1, 1, 1], [0, 1, 1]])
    out = np.array(stack_taps(taps, mask))
    assert out.shape == (b, t, 13 * d)
    for dd in range(d):
        for s in range(13):
            np.testing.assert_array_equal(out[0, :, dd * 13 + s], 1000 * s + 10 * dd)
    assert np.isfinite(out).all() and not out[1, 0].any()
    np.testing.assert_array_equal(out[1, 1:, 13 * 2 + 4], 1000 * 4 + 20 + 1)


def test_left_padding_is_the_only_accepted_layout():
    np.testing.assert_array_equal(left_padding(np.array([[0, 0, 1], [1, 1, 1]])), [2, 0])
    with pytest.raises(ValueError, match="left-padded"):
        left_padding(np.array([[1, 1, 0]]))


def test_positions_count_from_the_first_real_token():
    """RoPE is shift-invariant, so only this test (not parity) pins the positions of
    MODEL_NOTES#text-encoder-forward."""
    pad = left_padding(np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]))
    np.testing.assert_array_equal(position_ids(pad, 5), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])


def test_features_shape_dtype_and_bf16_values(tiny_checkpoint, tokenizer):
    model = Qwen3VLTextEncoder.from_pretrained(tiny_checkpoint / "text_encoder")
    ids = np.array([prompt_token_ids(tokenizer, "a retro robot toy")])
    out = model(ids)
    assert out.shape == (1, ids.shape[1], 13 * 64) and out.dtype == mx.float32
    assert mx.array_equal(out, out.astype(mx.bfloat16).astype(mx.float32))
    assert np.isfinite(np.array(out)).all()
    taps = model.hidden_taps(ids)
    assert len(taps) == len(TAP_LAYERS) and taps[0].dtype == mx.bfloat16


def test_batch_rows_equal_each_prompt_alone(model32, tokenizer):
    """Left padding does not change real rows beyond fp32 noise; padding rows are exactly 0 and
    their pre-mask hidden states are finite (padding queries attend to themselves)."""
    rows = [prompt_token_ids(tokenizer, p) for p in (CAPTION_TEXT, "a quiet lake")]
    ids, mask = pad_left(rows)
    assert mask[1].sum() < mask[0].sum()
    batch = np.array(model32(ids, mask))
    for b, row in enumerate(rows):
        alone = np.array(model32(np.array([row])))[0]
        assert rel_l2(batch[b, -len(row) :], alone) <= 1e-5
    assert not batch[1, : -len(rows[1])].any()
    assert all(np.isfinite(np.array(t)).all() for t in model32.hidden_taps(ids, mask))


def test_layers_after_the_last_tap_are_never_run():
    config = TextEncoderConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=38, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, vocab_size=32,
    )  # fmt: skip
    model = Qwen3VLTextEncoder(config)

    class Boom(nn.Module):
        def __call__(self, *args):
            raise AssertionError("a layer after the last tap was run")

    model.layers[36] = model.layers[37] = Boom()
    assert model(np.array([[1, 2, 3]])).shape == (1, 3, 13 * 16)
