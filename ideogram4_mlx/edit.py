"""The inputs of image-to-image, inpainting and outpainting, prepared without any model.

An edit starts from an input image placed on the canvas (the output size): fitted to it
(resize, centre crop), or, for outpainting, fitted inside it with a border to fill. A mask
(white = regenerate) goes to the token grid, where the sampler pins the kept tokens to the
input (``sampler.KnownLatents``). Everything here is numpy and Pillow: bad input fails
before any model loads.

Pillow conventions for inputs: the EXIF orientation is applied; transparent pixels are
composited on white; grey, palette and CMYK images are converted to RGB. A mask is read as
luminance (``convert("L")``) and must have the input image's size.
"""

from __future__ import annotations

import hashlib
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ideogram4_mlx.constants import PIXELS_PER_TOKEN
from ideogram4_mlx.errors import InputError

ImageInput = str | os.PathLike | Image.Image | np.ndarray

# A bound on what an input file can make us decode (PIL's own bomb limit is ~179 MP).
MAX_INPUT_PIXELS = 64 * 2**20
# Mask pixels at or above this luminance are regenerated.
MASK_THRESHOLD = 128
# mask_grow and mask_feather, in tokens (16 px each): 64 tokens is 1024 px.
MAX_MASK_TOKENS = 64
# Image-to-image without a mask: at 1024^2 with V4_DEFAULT_20 the run starts at t = 0.24
# (S(0.6)), which keeps the composition and redraws the details. Masks and outpainting
# regenerate their region from noise (1.0) unless told otherwise.
DEFAULT_STRENGTH = 0.6
# A remix (describe, then image-to-image from the description): 0.7 starts that run at
# t = 0.17, late enough that the layout, the large shapes and the colours come from the input, early
# enough that the description (and the idea steering it) redraws what is in them.
REMIX_STRENGTH = 0.7
DEFAULT_SIZE = 1024


@dataclass(frozen=True)
class InputImage:
    """An input as loaded: EXIF orientation applied, its own mode, and its fingerprint."""

    image: Image.Image
    sha256: str  # of the mode, size and decoded pixels (not the file bytes)
    name: str  # for messages: the path, or "(in memory)"

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def fingerprint(image: Image.Image) -> str:
    """SHA-256 of the decoded pixels with their mode and size: the same for the same pixels
    in any lossless file, and for an in-memory image."""
    digest = hashlib.sha256(f"{image.mode};{image.width}x{image.height};".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def load_image(source: ImageInput, what: str = "image") -> InputImage:
    """A path, a PIL image or a uint8 array (H, W), (H, W, 3) or (H, W, 4) -> InputImage.

    Raises ``InputError`` (``FileNotFoundError`` for a missing path) naming ``what`` and the
    file: not an image, truncated, or larger than :data:`MAX_INPUT_PIXELS`.
    """
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim not in (2, 3):
            raise InputError(
                f"the {what} array has dtype {source.dtype} and shape {source.shape}: give "
                "uint8 (H, W), (H, W, 3) or (H, W, 4)"
            )
        source = Image.fromarray(source)
    if isinstance(source, Image.Image):  # an opened file not yet decoded keeps its name
        return _checked(source, getattr(source, "filename", "") or "(in memory)", what)
    path = Path(source).expanduser()
    if not path.is_file():
        kind = "is a folder" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"{what} {path} {kind}: give an image file (PNG, JPEG, WebP)")
    try:
        with Image.open(path) as opened:
            _check_pixels(opened.size, str(path), what)
            image = ImageOps.exif_transpose(_decoded(opened, str(path), what))
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise InputError(f"{what} {path} cannot be read as an image ({e})") from None
    return InputImage(image, fingerprint(image), str(path))  # checked and turned above


def _decoded(image: Image.Image, name: str, what: str) -> Image.Image:
    """The pixels decoded now (Pillow opens lazily): damaged data (a broken zlib stream, a
    mangled chunk, a cut file) is an ``InputError`` naming the file, not Pillow's OSError or
    SyntaxError from deep inside a later step."""
    try:
        image.load()
    except (OSError, SyntaxError, EOFError, zlib.error) as e:
        kind = image.format or "image"
        raise InputError(
            f"{what} {name} cannot be read as an image (broken {kind} data: {e})"
        ) from None
    return image


def _check_pixels(size: tuple[int, int], name: str, what: str) -> None:
    w, h = size
    if w * h > MAX_INPUT_PIXELS:
        raise InputError(
            f"{what} {name} is {w}x{h} ({w * h / 2**20:.0f} MP), over the "
            f"{MAX_INPUT_PIXELS // 2**20} MP limit: downscale it first"
        )
    if min(w, h) < 1:
        raise InputError(f"{what} {name} is empty ({w}x{h})")


def _checked(image: Image.Image, name: str, what: str) -> InputImage:
    """An in-memory image: its size checked, its EXIF orientation applied (a file's is
    applied as it is read)."""
    _check_pixels(image.size, name, what)
    image = _decoded(image, name, what)
    image = ImageOps.exif_transpose(image) if "exif" in image.info else image
    return InputImage(image, fingerprint(image), name)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency (an alpha channel or a palette's) composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def natural_size(width: int, height: int, min_side: int, max_side: int) -> tuple[int, int]:
    """An input's own size as a canvas: scaled (aspect kept) so both sides fit
    ``min_side..max_side``, then each side rounded to a multiple of 16."""
    scale = min(1.0, max_side / max(width, height))
    scale = max(scale, min_side / min(width, height))
    return tuple(
        min(max_side, max(min_side, PIXELS_PER_TOKEN * round(side * scale / PIXELS_PER_TOKEN)))
        for side in (width, height)
    )


def fit(image: Image.Image, size: tuple[int, int], resample: int) -> Image.Image:
    """Resize to cover ``size`` (aspect kept), then crop the centre (``ImageOps.fit``)."""
    if image.size == size:
        return image
    return ImageOps.fit(image, size, resample, centering=(0.5, 0.5))


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of a 2-D bool mask by ``radius`` cells in every direction (square)."""
    out = mask.copy()
    for _ in range(radius):
        rows = out.copy()
        rows[1:] |= out[:-1]
        rows[:-1] |= out[1:]
        out = rows.copy()
        out[:, 1:] |= rows[:, :-1]
        out[:, :-1] |= rows[:, 1:]
    return out


def masked_tokens(pixel_mask: np.ndarray) -> np.ndarray:
    """Pixel mask (H, W) bool -> (H/16, W/16) bool: a token is regenerated when ANY of its
    16x16 pixels is, so no masked pixel is kept."""
    h, w = pixel_mask.shape
    t = PIXELS_PER_TOKEN
    return pixel_mask.reshape(h // t, t, w // t, t).any(axis=(1, 3))


def token_weights(pixel_mask: np.ndarray, grow: int, feather: int) -> np.ndarray:
    """Pixel mask (H, W) bool -> token weights (H/16, W/16) float32, 1 = regenerate: the
    :func:`masked_tokens`, grown by ``grow`` tokens; ``feather`` more rings of tokens get
    weights falling linearly towards 0 (ring k of F: ``1 - k / (F + 1)``)."""
    tokens = dilate(masked_tokens(pixel_mask), grow)
    weights = tokens.astype(np.float32)
    inner = tokens
    for k in range(1, feather + 1):
        outer = dilate(inner, 1)
        weights[outer & ~inner] = 1 - k / (feather + 1)
        inner = outer
    return weights


@dataclass(frozen=True)
class Edit:
    """A prepared edit: what the pipeline encodes, which tokens it regenerates, what it pastes.

    ``canvas`` (H, W, 3) uint8 is the VAE encoder's input; ``token_mask`` (H/16, W/16)
    float32, 1 = regenerate, is None for plain image-to-image; ``paste_mask`` (H, W) bool,
    True = a generated pixel, is None unless paste-back was asked for.
    """

    canvas: np.ndarray
    strength: float
    token_mask: np.ndarray | None
    paste_mask: np.ndarray | None
    image_sha256: str
    mask_sha256: str | None

    def paste(self, pixels: np.ndarray) -> np.ndarray:
        """Decoded (H, W, 3) uint8 -> the input's own pixels wherever ``paste_mask`` is False."""
        if self.paste_mask is None:
            return pixels
        return np.where(self.paste_mask[..., None], pixels, self.canvas)


def check_edit_settings(
    has_image: bool,
    has_mask: bool,
    strength: float | None,
    mask_grow: int,
    mask_feather: int,
    paste_back: bool,
    expand: tuple[int, ...] | None,
) -> None:
    """The checks that need no file: option combinations and ranges (``InputError``)."""
    if not has_image:
        given = [
            name
            for name, on in (
                ("mask", has_mask),
                ("strength", strength is not None),
                ("mask_grow", mask_grow != 0),
                ("mask_feather", mask_feather != 0),
                ("paste_back", paste_back),
                ("expand", expand is not None),
            )
            if on
        ]
        if given:
            raise InputError(
                f"{', '.join(given)} edit(s) an input image: give one with --image (image=)"
            )
        return
    if strength is not None and not (math.isfinite(strength) and 0 < strength <= 1):
        raise InputError(
            f"strength {strength} is out of range: use a number in (0, 1] (1 = from noise)"
        )
    for name, value in (("mask_grow", mask_grow), ("mask_feather", mask_feather)):
        if not isinstance(value, int) or not 0 <= value <= MAX_MASK_TOKENS:
            raise InputError(f"{name} {value!r} is out of range: use 0..{MAX_MASK_TOKENS} tokens")
    if (mask_grow or mask_feather) and not (has_mask or expand is not None):
        raise InputError("mask_grow and mask_feather shape a mask: give --mask or --expand too")
    if paste_back and not (has_mask or expand is not None):
        raise InputError("paste_back keeps the unmasked pixels: give --mask or --expand too")
    if expand is not None:
        if len(expand) != 4 or not all(isinstance(v, int) for v in expand):
            raise InputError(f"expand {expand!r}: give 4 whole numbers LEFT,TOP,RIGHT,BOTTOM")
        if any(v < 0 or v % PIXELS_PER_TOKEN for v in expand) or not any(expand):
            raise InputError(
                f"expand {','.join(map(str, expand))}: each side must be a multiple of "
                f"{PIXELS_PER_TOKEN} pixels, >= 0, and at least one side > 0"
            )


def edit_size(
    image: InputImage,
    width: int | None,
    height: int | None,
    expand: tuple[int, int, int, int] | None,
    min_side: int,
    max_side: int,
) -> tuple[int, int, int, int]:
    """(canvas width, canvas height, inner width, inner height): the canvas is the given size
    or the image's natural size (plus the expansion); the inner part holds the image."""
    left, top, right, bottom = expand or (0, 0, 0, 0)
    if width is None or height is None:
        w0, h0 = natural_size(*image.size, min_side, max_side)
        inner_w = w0 if width is None else width - left - right
        inner_h = h0 if height is None else height - top - bottom
    else:
        inner_w, inner_h = width - left - right, height - top - bottom
    if inner_w < PIXELS_PER_TOKEN or inner_h < PIXELS_PER_TOKEN:
        raise InputError(
            f"expand {left},{top},{right},{bottom} leaves {inner_w}x{inner_h} pixels of a "
            f"{width}x{height} canvas for the image: expand less or give a larger size"
        )
    return inner_w + left + right, inner_h + top + bottom, inner_w, inner_h


def prepare_edit(
    image: InputImage,
    mask: InputImage | None,
    inner_size: tuple[int, int],
    strength: float | None,
    mask_grow: int = 0,
    mask_feather: int = 0,
    paste_back: bool = False,
    expand: tuple[int, int, int, int] | None = None,
) -> Edit:
    """Fit the image (and mask) to ``inner_size`` and place it on the canvas (``expand`` adds
    a border, edge pixels repeated, all of it masked); see :class:`Edit`. Sizes are multiples
    of 16, checked by the caller; a mask must have the image's size (else ``InputError``)."""
    if mask is not None and mask.size != image.size:
        raise InputError(
            f"mask {mask.name} is {mask.size[0]}x{mask.size[1]} but image {image.name} is "
            f"{image.size[0]}x{image.size[1]}: the mask must have the image's size (both are "
            "then fitted to the output size together)"
        )
    left, top, right, bottom = expand or (0, 0, 0, 0)
    inner = np.asarray(fit(to_rgb(image.image), inner_size, Image.Resampling.LANCZOS))
    canvas = np.pad(inner, [(top, bottom), (left, right), (0, 0)], mode="edge")
    pixel_mask = None
    if mask is not None:
        luminance = fit(mask.image.convert("L"), inner_size, Image.Resampling.BILINEAR)
        pixel_mask = np.asarray(luminance) >= MASK_THRESHOLD
    if expand is not None:
        inside = np.zeros(inner.shape[:2], bool) if pixel_mask is None else pixel_mask
        pixel_mask = np.pad(inside, [(top, bottom), (left, right)], constant_values=True)
    token_mask = paste_mask = None
    if pixel_mask is not None:
        token_mask = token_weights(pixel_mask, mask_grow, mask_feather)
        if paste_back:  # the masked pixels and the tokens mask_grow added, no feathered ring
            tokens = masked_tokens(pixel_mask)
            added = dilate(tokens, mask_grow) & ~tokens
            t = PIXELS_PER_TOKEN
            paste_mask = pixel_mask | np.repeat(np.repeat(added, t, 0), t, 1)
    if strength is None:
        strength = DEFAULT_STRENGTH if pixel_mask is None else 1.0
    return Edit(
        np.ascontiguousarray(canvas),
        float(strength),
        token_mask,
        paste_mask,
        image.sha256,
        None if mask is None else mask.sha256,
    )
