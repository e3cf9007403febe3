"""diffusers' prompt enhancer (``build_prompt_enhancer``) built from an Ideogram 4 checkpoint.

The reference for the MLX magic-prompt LM: transformers' ``Qwen3VLModel`` read from
``text_encoder/`` as the feature reference reads it, diffusers' ``Ideogram4PromptEnhancerHead``
read with its own ``from_pretrained``, grafted by diffusers into
``Qwen3VLForConditionalGeneration``. Needs ``accelerate`` (imported by diffusers' function).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.pipelines.ideogram4.prompt_enhancer import (
    Ideogram4PromptEnhancerHead,
    build_prompt_enhancer,
)

from ideogram4_mlx.reference.text_encoder import load_reference_text_encoder


def load_reference_enhancer(
    checkpoint_dir: Path | str,
    head_dir: Path | str,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """``Qwen3VLForConditionalGeneration``: the checkpoint's body plus the head, in ``dtype``."""
    encoder = load_reference_text_encoder(Path(checkpoint_dir) / "text_encoder", device, dtype)
    head = Ideogram4PromptEnhancerHead.from_pretrained(str(head_dir), torch_dtype=dtype)
    return build_prompt_enhancer(encoder, head.to(device))
