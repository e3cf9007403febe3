"""transformers' Qwen3-VL with an image: the reference for ``ideogram4_mlx.describe``.

The model is the feature reference's ``Qwen3VLModel`` (vision tower included, fp8 dequantized
in PyTorch) grafted with the prompt-enhancer head by diffusers (``reference.magic``); the
pixel patches and grid come from transformers' own Qwen2-VL image processor with Qwen3-VL's
settings. Nothing here imports the MLX code under test.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

# Qwen3-VL-8B-Instruct's preprocessor_config (MODEL_NOTES#vision-processor), written out here
# on purpose: the reference does not read the constants of the code it checks.
PROCESSOR_SETTINGS = dict(
    patch_size=16,
    temporal_patch_size=2,
    merge_size=2,
    image_mean=[0.5, 0.5, 0.5],
    image_std=[0.5, 0.5, 0.5],
)


def reference_pixels(
    image: Image.Image, min_pixels: int, max_pixels: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(pixel_values (N, 1536) float32, image_grid_thw (1, 3) int64)`` from transformers'
    image processor."""
    processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, **PROCESSOR_SETTINGS
    )
    out = processor(images=[image.convert("RGB")], return_tensors="np")
    return out["pixel_values"].astype(np.float32), out["image_grid_thw"]


def token_types(ids: list[int], image_id: int) -> torch.Tensor:
    """(1, T) ``mm_token_type_ids`` as the processor returns them: 1 at image tokens, else 0."""
    return torch.tensor([[int(i == image_id) for i in ids]])


@torch.no_grad()
def reference_image_features(model, pixel_values: np.ndarray, grid: np.ndarray):
    """``Qwen3VLModel.get_image_features``: ``(features (N, D), [deepstack (N, D), ...])``."""
    out = model.get_image_features(torch.from_numpy(pixel_values), torch.from_numpy(grid))
    features = torch.cat(out.pooler_output).float().numpy()
    deepstack = [torch.cat(f).float().numpy() for f in out.deepstack_features]
    return features, deepstack


@torch.no_grad()
def reference_hidden(
    model, ids: list[int], pixel_values: np.ndarray, grid: np.ndarray, image_id: int
) -> np.ndarray:
    """``Qwen3VLModel`` forward with the image: the last hidden states (1, T, D) float32."""
    out = model(
        input_ids=torch.tensor([ids]),
        mm_token_type_ids=token_types(ids, image_id),
        pixel_values=torch.from_numpy(pixel_values),
        image_grid_thw=torch.from_numpy(grid),
    )
    return out.last_hidden_state.float().numpy()


@torch.no_grad()
def reference_greedy(
    enhancer, ids: list[int], pixel_values, grid, image_id: int, max_new_tokens: int
) -> list[int]:
    """Greedy tokens of ``Qwen3VLForConditionalGeneration.generate`` (no stop on end tokens)."""
    enhancer.generation_config.eos_token_id = None
    out = enhancer.generate(
        input_ids=torch.tensor([ids]),
        mm_token_type_ids=token_types(ids, image_id),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        pixel_values=torch.from_numpy(pixel_values),
        image_grid_thw=torch.from_numpy(grid),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return out[0, len(ids) :].tolist()
