"""Qwen3-VL's vision side without the model code: its config, the checkpoint's ``visual.*``
keys in MLX layout, and the image processor (MODEL_NOTES#vision-tower, #vision-processor).

No mlx-vlm import here, so ``ideo4-mlx convert`` can carry the vision tower without the
``describe`` extra.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import mlx.core as mx
import numpy as np
from PIL import Image

from ideogram4_mlx.config import BaseConfig, CheckpointError, HeaderCheck
from ideogram4_mlx.errors import InputError
from ideogram4_mlx.weights import DtypeRule, dequantize_fp8_weights, strip_prefixes

VISION_PREFIXES = ("model.visual.", "visual.")
VISION_PREFIX = "visual."
PATCH_EMBED = "patch_embed.proj.weight"
# A raw snapshot's vision tower: fp8 linears + F32 scales like the LM, float elsewhere; its
# dtypes are [?] (MODEL_NOTES#vision-tower), so F32 is accepted next to BF16.
VISION_DTYPE_RULE = DtypeRule(
    floats=("BF16", "F32"), skip=("language_model.", "model.language_model.", "lm_head.")
)

# Qwen3-VL's image processor (transformers Qwen2VLImageProcessor with Qwen3-VL's
# preprocessor_config): mean = std = 0.5 per channel, bicubic resize, sides a multiple of
# patch 16 x merge 2 = 32 (MODEL_NOTES#vision-processor).
IMAGE_MEAN = 0.5
IMAGE_STD = 0.5
# 65536 is the processor's shortest_edge (min pixels); the max is ours: 1024 x 1024 pixels =
# 4096 patches = 1024 image tokens by default, 2048 x 2048 (4096 tokens) at most.
MIN_PIXELS = 256 * 256
MAX_PIXELS = 1024 * 1024
MAX_PIXELS_LIMIT = 2048 * 2048
MAX_ASPECT = 200  # the processor's limit on the longer/shorter side ratio


@dataclass(frozen=True)
class VisionConfig(BaseConfig):
    """The ``vision_config`` of ``text_encoder/config.json``; the defaults are Qwen3-VL-8B."""

    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 4096
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)

    layer_fields: ClassVar[tuple[str, ...]] = ("depth",)
    weight_prefixes: ClassVar[tuple[str, ...]] = VISION_PREFIXES

    def __post_init__(self):
        side = math.isqrt(self.num_position_embeddings)
        if side * side != self.num_position_embeddings:
            raise CheckpointError(
                f"vision num_position_embeddings {self.num_position_embeddings} is not a square"
            )
        if self.hidden_size % self.num_heads:
            raise CheckpointError(
                f"vision hidden_size {self.hidden_size} is not a multiple of num_heads "
                f"{self.num_heads}"
            )

    @property
    def factor(self) -> int:
        """Image sides are multiples of this: one merged token is factor x factor pixels."""
        return self.patch_size * self.spatial_merge_size

    def header_checks(self) -> list[HeaderCheck]:
        return [
            HeaderCheck("depth", self.depth, "blocks."),
            HeaderCheck("hidden_size", self.hidden_size, "patch_embed.proj.bias"),
            HeaderCheck(
                "num_position_embeddings", self.num_position_embeddings, "pos_embed.weight"
            ),
            HeaderCheck(
                "intermediate_size", self.intermediate_size, "blocks.0.mlp.linear_fc1.weight"
            ),
            HeaderCheck("out_hidden_size", self.out_hidden_size, "merger.linear_fc2.weight"),
            HeaderCheck(
                "deepstack_visual_indexes",
                len(self.deepstack_visual_indexes),
                "deepstack_merger_list.",
            ),
        ]

    @classmethod
    def from_dict(cls, d: dict) -> VisionConfig:
        """From a whole ``Qwen3VLConfig`` dict or its ``vision_config``; unknown keys ignored."""
        vision = d.get("vision_config", d)
        if not isinstance(vision, dict):
            raise CheckpointError(f"vision_config is {type(vision).__name__}, expected an object")
        # Block indexes start at 0, which the shared integer check (1..N) refuses.
        indexes = vision.get("deepstack_visual_indexes", cls.deepstack_visual_indexes)
        rest = {k: v for k, v in vision.items() if k != "deepstack_visual_indexes"}
        config = super().from_dict(rest)
        if not (
            isinstance(indexes, (list, tuple))
            and all(type(i) is int and 0 <= i < config.depth for i in indexes)
        ):
            raise CheckpointError(
                f"vision_config.deepstack_visual_indexes is {indexes!r}, expected a list of "
                f"blocks 0..{config.depth - 1}"
            )
        return replace(config, deepstack_visual_indexes=tuple(indexes))


def sanitize_visual(weights: dict[str, mx.array], in_channels: int = 3) -> dict[str, mx.array]:
    """Checkpoint ``visual.*`` tensors -> MLX layout, pure and idempotent: other keys dropped,
    the prefix kept as ``visual.``, fp8 linears dequantized like the LM's
    (MODEL_NOTES#fp8-dequantization) and the Conv3d kernel (out, C, T, P, P) moved to MLX's
    (out, T, P, P, C)."""
    kept = {
        VISION_PREFIX + k: v
        for k, v in strip_prefixes(
            {k: v for k, v in weights.items() if k.startswith(VISION_PREFIXES)}, VISION_PREFIXES
        ).items()
    }
    kept = dequantize_fp8_weights(kept)
    key = VISION_PREFIX + PATCH_EMBED
    if key in kept and kept[key].ndim == 5 and kept[key].shape[-1] != in_channels:
        kept[key] = kept[key].transpose(0, 2, 3, 4, 1)
    return kept


def vision_parameters(headers: dict) -> int:
    """Parameter count of the ``visual.*`` tensors among ``{key: (dtype, shape, ...)}``
    headers (fp8 scales fold into their weights)."""
    return sum(
        math.prod(shape)
        for key, (_, shape, *_) in headers.items()
        if key.startswith(VISION_PREFIXES) and not key.endswith(".weight_scale")
    )


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int):
    """Qwen2-VL's ``smart_resize``: sides multiples of ``factor``, area within the bounds,
    aspect ratio kept as nearly as possible (transformers ``image_processing_qwen2_vl``)."""
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise InputError(
            f"image {width}x{height}: the longer side is over {MAX_ASPECT} times the shorter; "
            "crop it first"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def prepare_image(
    image: Image.Image,
    max_pixels: int = MAX_PIXELS,
    min_pixels: int = MIN_PIXELS,
    config: VisionConfig | None = None,
) -> tuple[mx.array, tuple[int, int, int]]:
    """An image as the vision tower's input, as Qwen3-VL's processor makes it.

    RGB, bicubic-resized by :func:`smart_resize` (sides multiples of 32, area in
    [``min_pixels``, ``max_pixels``]), scaled to [0, 1] and normalized with mean = std = 0.5;
    the one frame is repeated over the temporal patch (2).

    Returns ``(patches, (t, h, w))``: patches (t*h*w, C*T*P*P) float32 = (h*w, 1536) for
    Qwen3-VL, rows grouped 2x2 per merged token; the grid in patches (t = 1). The language
    model sees h*w/4 image tokens.
    """
    config = config or VisionConfig()
    if not 0 < min_pixels <= max_pixels <= MAX_PIXELS_LIMIT:
        raise InputError(
            f"max_pixels {max_pixels} / min_pixels {min_pixels}: need 0 < min <= max <= "
            f"{MAX_PIXELS_LIMIT} (2048 x 2048)"
        )
    width, height = image.size
    if width < 1 or height < 1:
        raise InputError(f"image is {width}x{height}: it has no pixels")
    factor, p, m = config.factor, config.patch_size, config.spatial_merge_size
    h_bar, w_bar = smart_resize(height, width, factor, min_pixels, max_pixels)
    rgb = image.convert("RGB").resize((w_bar, h_bar), Image.Resampling.BICUBIC)
    x = (np.asarray(rgb, np.float32) / 255.0 - IMAGE_MEAN) / IMAGE_STD  # (H, W, C)
    gh, gw, c, t = h_bar // p, w_bar // p, x.shape[-1], config.temporal_patch_size
    x = x.transpose(2, 0, 1).reshape(c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, P, P)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))
    return mx.array(x.reshape(gh * gw, c * t * p * p)), (1, gh, gw)
