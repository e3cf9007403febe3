"""Write the sample edit inputs beside this file: ``photo.jpg`` (256x256, a drawn landscape at
sunset) and ``mask.png`` (white: the sky patch that ``caption.json`` fills with a balloon).

The committed files came from this script; run it to make them again:
``python examples/edit_inputs.py [FOLDER]``. Pure numpy, so the same pixels everywhere (the JPEG
bytes may differ between libjpeg versions).
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 256
# Rows and columns of the regenerated patch: whole 16x16 tokens, in the sky, left of the sun.
MASK_BOX = (32, 112, 48, 128)  # top, bottom, left, right


def photo_pixels() -> np.ndarray:
    """(256, 256, 3) uint8: a sky from deep blue to orange, a pale sun, two green hills."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    fade = (y / 150.0).clip(0, 1)[..., None]
    image = (1 - fade) * np.array([40, 70, 150]) + fade * np.array([240, 150, 80])
    sun = (x - 184) ** 2 + (y - 118) ** 2 <= 18**2
    image[sun] = [255, 236, 180]
    far = y > 150 + 12 * np.sin(x / 40.0)
    near = y > 190 + 18 * np.sin(x / 29.0 + 1.0)
    image[far] = [70, 130, 60]
    image[near] = [40, 95, 40]
    image *= 1 + 0.02 * np.sin(x / 3.0 + y / 5.0)[..., None]  # a little texture for the VAE
    return image.round().clip(0, 255).astype(np.uint8)


def mask_pixels() -> np.ndarray:
    """(256, 256) uint8: 255 inside ``MASK_BOX`` (regenerate), 0 elsewhere (keep)."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    top, bottom, left, right = MASK_BOX
    mask[top:bottom, left:right] = 255
    return mask


def write(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    photo, mask = folder / "photo.jpg", folder / "mask.png"
    Image.fromarray(photo_pixels()).save(photo, quality=90)
    Image.fromarray(mask_pixels()).save(mask, optimize=True)
    return photo, mask


if __name__ == "__main__":
    for path in write(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent):
        print(path)
