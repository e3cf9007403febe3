"""Step previews: decode the latents after each denoising step to a PNG.

The pipeline frees its DiTs only after the loop, so a preview loads the VAE next to both DiTs:
peak memory during denoising grows by the VAE and one decode, and each preview costs one
full VAE decode.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from ideogram4_mlx.generation import Step
from ideogram4_mlx.metadata import save_png
from ideogram4_mlx.pipeline import Ideogram4Pipeline
from ideogram4_mlx.vae import decode


class StepPreviews:
    """Writes ``folder/step_001.png``, ... (1-based) for the steps it is given; the last
    preview is the final image.

    ``folder`` is created if missing; one that already holds files is refused unless
    ``force`` (then its ``step_*.png`` are replaced). Each preview is written like the output
    image: a temporary file renamed into place, never through a link.
    """

    def __init__(self, folder: Path | str, grid_h: int, grid_w: int, force: bool = False):
        self.folder = Path(folder)
        if self.folder.is_symlink() or (self.folder.exists() and not self.folder.is_dir()):
            raise FileExistsError(f"{self.folder} is not a folder; choose another previews folder")
        if self.folder.is_dir() and any(self.folder.iterdir()) and not force:
            raise FileExistsError(
                f"{self.folder} is not empty; pass --force to write previews into it "
                "(its step_*.png files are replaced)"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        self.grid_h, self.grid_w = grid_h, grid_w

    def save(self, pipe: Ideogram4Pipeline, step: Step) -> Path:
        """Decode ``step.latents`` with the pipeline's VAE and write its PNG."""
        pixels = decode(pipe.vae(), step.latents, self.grid_h, self.grid_w)
        path = self.folder / f"step_{step.index + 1:03d}.png"
        return save_png(Image.fromarray(pixels[0]), path, force=True)
