"""Step previews: decode the latents after each denoising step to a PNG.

The pipeline frees its DiTs only after the loop, so a preview loads the VAE next to both DiTs:
peak memory during denoising grows by the VAE and one decode, and each preview costs one
full VAE decode.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image

from ideogram4_mlx.pipeline import Ideogram4Pipeline, check_size
from ideogram4_mlx.vae import decode


def save_step_preview(
    pipe: Ideogram4Pipeline,
    latents: mx.array | np.ndarray,
    grid_h: int,
    grid_w: int,
    path: Path | str,
) -> Path:
    """Decode packed latents (1, grid_h * grid_w, 128) with the pipeline's VAE; save a PNG."""
    pixels = decode(pipe.vae(), latents, grid_h, grid_w)
    Image.fromarray(pixels[0]).save(path, format="PNG")
    return Path(path)


def preview_callback(
    pipe: Ideogram4Pipeline, folder: Path | str, width: int, height: int
) -> Callable[[int, int, mx.array], None]:
    """A ``generate`` callback writing ``folder/step_001.png``, ... (1-based) after each step.

    The last preview is the final image. ``folder`` is created if missing.
    """
    grid_h, grid_w = check_size(width, height)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def callback(step: int, num_steps: int, latents: mx.array) -> None:
        save_step_preview(pipe, latents, grid_h, grid_w, folder / f"step_{step + 1:03d}.png")

    return callback
