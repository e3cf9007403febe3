"""Describe's model: image preparation, positions, sanitize, loading errors, generation, and a
converted (quantized) folder. Parity with transformers is test_describe_parity.py."""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import rel_l2, require_describe
from PIL import Image

from ideogram4_mlx.config import CheckpointError
from ideogram4_mlx.convert import convert
from ideogram4_mlx.describe.vision import (
    MAX_PIXELS_LIMIT,
    VisionConfig,
    prepare_image,
    sanitize_visual,
    smart_resize,
)
from ideogram4_mlx.errors import InputError
from ideogram4_mlx.weights import read_header

HEAD = "prompt_enhancer_head"


@pytest.fixture(scope="module")
def describe(magic_checkpoint):
    require_describe()
    from ideogram4_mlx.describe.model import load_describe_model

    return load_describe_model(magic_checkpoint, mx.float32, magic_checkpoint / HEAD)


def picture(height=70, width=100, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_prepare_image_is_bounded_and_in_whole_merged_tokens():
    patches, (t, h, w) = prepare_image(picture(1000, 3000), max_pixels=512 * 512)
    assert t == 1 and h % 2 == 0 and w % 2 == 0
    assert (h * 16) * (w * 16) <= 512 * 512
    assert patches.shape == (h * w, 3 * 2 * 16 * 16) and patches.dtype == mx.float32
    # the one frame is repeated over the temporal patch: (C, T, P, P) rows, T halves equal
    rows = np.array(patches).reshape(-1, 3, 2, 256)
    np.testing.assert_array_equal(rows[:, :, 0], rows[:, :, 1])
    assert np.abs(np.array(patches)).max() <= 1.0  # mean = std = 0.5
    _, small = prepare_image(picture(20, 20))  # upscaled to the processor's minimum area
    assert small[1] * small[2] * 256 >= 256 * 256


def test_prepare_image_refuses_what_it_cannot_bound():
    with pytest.raises(InputError, match="2048 x 2048"):
        prepare_image(picture(), max_pixels=MAX_PIXELS_LIMIT + 1)
    with pytest.raises(InputError, match="200 times"):
        smart_resize(10, 2500, 32, 64, 1 << 20)


def test_vision_config_reads_block_zero_and_checks_indexes():
    raw = {"vision_config": {"depth": 2, "deepstack_visual_indexes": [0]}}
    config = VisionConfig.from_dict(raw)
    assert config.deepstack_visual_indexes == (0,) and config.factor == 32
    assert VisionConfig().deepstack_visual_indexes == (8, 16, 24)  # Qwen3-VL-8B
    with pytest.raises(CheckpointError, match="deepstack_visual_indexes"):
        VisionConfig.from_dict({"depth": 2, "deepstack_visual_indexes": [2]})


def test_sanitize_visual_is_idempotent():
    fp8_one = mx.array(np.full((6, 4), 0x38, np.uint8))  # E4M3 1.0
    weights = {
        "visual.blocks.0.attn.qkv.weight": fp8_one,
        "visual.blocks.0.attn.qkv.weight_scale": mx.full((6,), 0.5),
        "model.visual.patch_embed.proj.weight": mx.zeros((8, 3, 2, 16, 16), mx.bfloat16),
        "language_model.norm.weight": mx.ones(4),
    }
    once = sanitize_visual(weights)
    assert set(once) == {"visual.blocks.0.attn.qkv.weight", "visual.patch_embed.proj.weight"}
    assert once["visual.patch_embed.proj.weight"].shape == (8, 2, 16, 16, 3)
    qkv = once["visual.blocks.0.attn.qkv.weight"]
    np.testing.assert_array_equal(np.array(qkv.astype(mx.float32)), 0.5)
    twice = sanitize_visual(once)
    assert {k: v.shape for k, v in twice.items()} == {k: v.shape for k, v in once.items()}


def test_mrope_positions_for_one_image():
    require_describe()
    from ideogram4_mlx.describe.model import mrope_positions

    image = 9
    ids = [1, 2, image, image, image, image, image, image, 3, 4]  # a 2x3 merged grid
    positions, delta = mrope_positions(ids, image, (1, 4, 6), merge=2)
    np.testing.assert_array_equal(positions[:, :2], [[0, 1]] * 3)
    np.testing.assert_array_equal(positions[0, 2:8], [2] * 6)  # time
    np.testing.assert_array_equal(positions[1, 2:8], [2, 2, 2, 3, 3, 3])  # rows
    np.testing.assert_array_equal(positions[2, 2:8], [2, 3, 4, 2, 3, 4])  # columns
    np.testing.assert_array_equal(positions[:, 8:], [[5, 6]] * 3)
    assert delta == 7 - len(ids)
    with pytest.raises(InputError, match="image tokens"):
        mrope_positions(ids[:-3], image, (1, 4, 6), merge=2)


def test_generate_streams_text_and_stops_at_the_end_token(describe):
    im_end = describe.tokenizer.convert_tokens_to_ids("<|im_end|>")
    seen = []

    def end_after_five(tokens, logits):
        seen.append(tokens.size)
        if len(seen) <= 5:
            return logits
        return mx.where(mx.arange(logits.shape[-1]) == im_end, 0.0, -mx.inf)[None]

    pieces = []
    text = describe.generate(
        picture(),
        "sys",
        "Describe.",
        max_tokens=20,
        logits_processors=[end_after_five],
        on_text=pieces.append,
    )
    greedy = list(describe.tokens(picture(), "sys", "Describe.", max_tokens=5))
    # (mlx-lm's streaming detokenizer drops the reply's leading space)
    assert text == "".join(pieces) == describe.tokenizer.decode(greedy).lstrip(" ")
    assert len(seen) == 6 and seen[1] == seen[0] + 1  # the prompt, then one more per token
    sampled = [
        describe.generate(picture(), "", "Describe.", max_tokens=8, temperature=1.0, seed=3)
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]
    with pytest.raises(InputError, match="max_tokens"):
        describe.generate(picture(), "", "x", max_tokens=0)


def test_errors_name_the_missing_vision_tower_or_head(magic_checkpoint, tmp_path):
    require_describe()
    from ideogram4_mlx.describe.model import load_describe_model
    from ideogram4_mlx.magic.model import MissingHeadError

    root = tmp_path / "novision"
    shutil.copytree(magic_checkpoint / "text_encoder", root / "text_encoder")
    (root / "tokenizer").symlink_to(magic_checkpoint / "tokenizer", target_is_directory=True)
    path = root / "text_encoder" / "model.safetensors"
    tensors = {k: v for k, v in mx.load(str(path)).items() if not k.startswith("visual.")}
    mx.save_safetensors(str(path), tensors)
    with pytest.raises(CheckpointError, match="model.safetensors: the text encoder has no vision"):
        load_describe_model(root, mx.float32, magic_checkpoint / HEAD)
    with pytest.raises(MissingHeadError):
        load_describe_model(magic_checkpoint, mx.float32, tmp_path / "no-head-here")


def test_quantized_conversion_keeps_the_vision_tower_float(describe, magic_checkpoint, tmp_path):
    from ideogram4_mlx.describe.model import load_describe_model

    dst = convert(
        magic_checkpoint, tmp_path / "q8", quantize=8, components=("text_encoder",), progress=False
    )
    (dst / "tokenizer").symlink_to(magic_checkpoint / "tokenizer", target_is_directory=True)
    index = json.loads((dst / "text_encoder" / "model.safetensors.index.json").read_text())
    shard = dst / "text_encoder" / index["weight_map"]["visual.blocks.0.attn.qkv.weight"]
    assert read_header(shard)["visual.blocks.0.attn.qkv.weight"][0] == "BF16"
    converted = load_describe_model(dst, mx.float32, magic_checkpoint / HEAD)
    assert isinstance(converted.body.layers[0].mlp.up_proj, nn.QuantizedLinear)
    assert isinstance(converted.vision.blocks[0].attn.qkv, nn.Linear)
    assert not isinstance(converted.vision.blocks[0].attn.qkv, nn.QuantizedLinear)
    patches, grid = prepare_image(picture(), 128 * 128, 64 * 64)
    # the fp8 tower dequantizes to bf16 exactly as convert writes it: identical features
    want = describe.image_features(patches, grid)[0]
    got = converted.image_features(patches, grid)[0]
    np.testing.assert_array_equal(np.array(got), np.array(want))
    ids = describe.prompt_ids("", "Describe.", grid)
    hidden = converted.forward(ids, *converted.image_features(patches, grid), grid)[0]
    expected = describe.forward(ids, *describe.image_features(patches, grid), grid)[0]
    # 8-bit LM linears (group 64): the tiny model's hidden states move by a few percent
    assert rel_l2(np.array(hidden), np.array(expected)) < 0.1
