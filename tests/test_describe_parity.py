"""Describe (Qwen3-VL with an image) against transformers' Qwen3-VL on the same synthetic
weights, fp32 on both sides: the processor's patches, the vision tower with its DeepStack
features, the image-conditioned hidden states and greedy tokens."""

import mlx.core as mx
import numpy as np
import pytest
from helpers import rel_l2, require_describe, require_reference
from PIL import Image

from ideogram4_mlx.describe.vision import MIN_PIXELS, prepare_image

SYSTEM = "You describe images."
USER = "Describe this image."
GREEDY_TOKENS = 32


@pytest.fixture(scope="module")
def pair(magic_checkpoint):
    """(our fp32 describe model, diffusers' Qwen3VLForConditionalGeneration in fp32)."""
    require_reference()
    require_describe()
    from ideogram4_mlx.describe.model import load_describe_model
    from ideogram4_mlx.reference.magic import load_reference_enhancer

    head = magic_checkpoint / "prompt_enhancer_head"
    ours = load_describe_model(magic_checkpoint, mx.float32, head)
    return ours, load_reference_enhancer(magic_checkpoint, head)


def picture(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "size, bounds",
    [((70, 100), (64 * 64, 128 * 128)), ((300, 90), (MIN_PIXELS, 512 * 512)), ((33, 33), None)],
)
def test_patches_match_transformers_image_processor(size, bounds):
    require_reference()
    from ideogram4_mlx.reference.describe import reference_pixels

    image = picture(*size)
    low, high = bounds or (MIN_PIXELS, 1024 * 1024)
    patches, grid = prepare_image(image, high, low)
    expected, expected_grid = reference_pixels(image, low, high)
    assert grid == tuple(expected_grid[0]) and patches.shape == expected.shape
    # Same PIL bicubic resize; only the 1/255 scaling's rounding may differ (one fp32 ulp).
    np.testing.assert_allclose(np.array(patches), expected, atol=1e-6)


def test_vision_tower_and_deepstack_match(pair):
    from ideogram4_mlx.reference.describe import reference_image_features, reference_pixels

    ours, reference = pair
    image = picture(70, 100)
    patches, grid = prepare_image(image, 128 * 128, 64 * 64)
    features, deepstack = ours.image_features(patches, grid)
    expected, expected_deepstack = reference_image_features(
        reference.model, *reference_pixels(image, 64 * 64, 128 * 128)
    )
    # fp32 both sides, same weights; summation order and fast kernels (LayerNorm, SDPA, GELU)
    # differ by ~1e-7 relative (measured 7e-7); 1e-5 leaves room while a wrong patch order,
    # position grid or RoPE axis is off by O(1).
    assert features.shape == expected.shape
    assert rel_l2(np.array(features), expected) < 1e-5
    assert len(deepstack) == len(expected_deepstack) >= 1
    for got, want in zip(deepstack, expected_deepstack, strict=True):
        assert rel_l2(np.array(got), want) < 1e-5


def test_image_conditioned_hidden_states_match(pair):
    from ideogram4_mlx.reference.describe import (
        reference_hidden,
        reference_pixels,
    )

    ours, reference = pair
    image = picture(70, 100)
    patches, grid = prepare_image(image, 128 * 128, 64 * 64)
    ids = ours.prompt_ids(SYSTEM, USER, grid)
    assert ids.count(ours.ids.image) == grid[1] * grid[2] // 4
    features, deepstack = ours.image_features(patches, grid)
    hidden, delta = ours.forward(ids, features, deepstack, grid)
    pixels, thw = reference_pixels(image, 64 * 64, 128 * 128)
    expected = reference_hidden(reference.model, ids, pixels, thw, ours.ids.image)
    # 36 decoder layers on top of the tower (measured 8e-7); MRoPE or DeepStack mistakes
    # (wrong axis order, positions, injection layer) are O(1e-1) or more.
    assert hidden.shape == expected.shape
    assert rel_l2(np.array(hidden), expected) < 1e-5
    assert delta < 0  # the image's grid spans fewer positions than its tokens
    # and the image matters: a different picture moves the hidden states
    other = ours.image_features(*prepare_image(picture(70, 100, seed=1), 128 * 128, 64 * 64))
    moved = ours.forward(ids, *other, grid)[0]
    assert rel_l2(np.array(moved), expected) > 1e-3


def test_greedy_tokens_match(pair):
    from ideogram4_mlx.reference.describe import reference_greedy, reference_pixels

    ours, reference = pair
    image = picture(70, 100)
    tokens = list(ours.tokens(image, SYSTEM, USER, max_tokens=GREEDY_TOKENS))
    pixels, thw = reference_pixels(image, MIN_PIXELS, 1024 * 1024)
    ids = ours.prompt_ids(SYSTEM, USER, tuple(int(v) for v in thw[0]))
    expected = reference_greedy(reference, ids, pixels, thw, ours.ids.image, GREEDY_TOKENS)
    assert tokens == expected
