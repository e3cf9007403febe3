"""Step previews: decode the latents after each denoising step to a PNG.

A generation frees its DiTs only after the loop, so a preview loads the VAE next to both DiTs:
peak memory during denoising grows by the VAE and one decode, and each preview costs one
full VAE decode.
"""

from __future__ import annotations

from pathlib import Path

from ideogram4_mlx.generation import Generation, Step
from ideogram4_mlx.metadata import save_png


class StepPreviews:
    """Writes ``folder/step_001.png``, ... (1-based) for the steps it is given; the last
    preview is the final image (an edit's canvas, before it is pasted back).

    ``folder`` is created if missing; one that already holds files is refused unless
    ``force`` (then its ``step_*.png`` are replaced). Each preview is written like the output
    image: a temporary file renamed into place, never through a link.
    """

    def __init__(self, folder: Path | str, force: bool = False):
        self.folder = Path(folder)
        if self.folder.is_symlink() or (self.folder.exists() and not self.folder.is_dir()):
            raise FileExistsError(f"{self.folder} is not a folder; choose another previews folder")
        if self.folder.is_dir() and any(self.folder.iterdir()) and not force:
            raise FileExistsError(
                f"{self.folder} is not empty; pass --force to write previews into it "
                "(its step_*.png files are replaced)"
            )
        self.folder.mkdir(parents=True, exist_ok=True)

    def save(self, generation: Generation, step: Step) -> Path:
        """Write ``step``'s PNG: its latents decoded by ``generation.preview``."""
        path = self.folder / f"step_{step.index + 1:03d}.png"
        return save_png(generation.preview(step.latents), path, force=True)
