"""Ideogram 4's latent packing and the image <-> uint8 conversions (MODEL_NOTES#vae).

Packed latents are what the DiT sees: (B, gh * gw, 128), normalised, fp32. Raw latents are the
VAE's: (B, 2gh, 2gw, 32), NHWC. Packed channel index = pi * 2C + pj * C + c.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ideogram4_mlx.constants import LATENT_SCALE, LATENT_SHIFT, PATCH


def patchify(raw: mx.array) -> mx.array:
    """(B, 2gh, 2gw, C) -> (B, gh * gw, 4C); a pure permutation (exact)."""
    b, h, w, c = raw.shape
    if h % PATCH or w % PATCH:
        raise ValueError(f"latent size {h}x{w} is not a multiple of the {PATCH}x{PATCH} patch")
    x = raw.reshape(b, h // PATCH, PATCH, w // PATCH, PATCH, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // PATCH) * (w // PATCH), PATCH * PATCH * c)


def unpatchify(packed: mx.array, grid_h: int, grid_w: int) -> mx.array:
    """(B, gh * gw, 4C) -> (B, 2gh, 2gw, C) with ``raw[2r+pi, 2c+pj, ch] = packed[r*gw+c,
    pi*2C + pj*C + ch]``; the inverse of :func:`patchify` (exact)."""
    b, n, c4 = packed.shape
    if n != grid_h * grid_w or c4 % (PATCH * PATCH):
        raise ValueError(f"latents {tuple(packed.shape)} do not fit a {grid_h}x{grid_w} grid")
    c = c4 // (PATCH * PATCH)
    x = packed.reshape(b, grid_h, grid_w, PATCH, PATCH, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, grid_h * PATCH, grid_w * PATCH, c)


def denormalize(latents: mx.array) -> mx.array:
    """Model latents -> raw packed VAE latents, fp32: ``z * LATENT_SCALE + LATENT_SHIFT``."""
    return mx.array(latents).astype(mx.float32) * mx.array(LATENT_SCALE) + mx.array(LATENT_SHIFT)


def normalize(raw_packed: mx.array) -> mx.array:
    """Raw packed VAE latents -> model latents, fp32: ``(z - LATENT_SHIFT) / LATENT_SCALE``."""
    z = raw_packed.astype(mx.float32)
    return (z - mx.array(LATENT_SHIFT)) / mx.array(LATENT_SCALE)


def unpack(latents: mx.array, grid_h: int, grid_w: int) -> mx.array:
    """Packed normalised latents (B, gh * gw, 128) -> raw VAE latents (B, 2gh, 2gw, 32) fp32."""
    return unpatchify(denormalize(latents), grid_h, grid_w)


def pack(raw: mx.array) -> mx.array:
    """Raw VAE latents (B, 2gh, 2gw, 32) -> packed normalised latents (B, gh * gw, 128) fp32."""
    return normalize(patchify(raw))


def to_uint8(x: mx.array | np.ndarray) -> np.ndarray:
    """Decoder output in [-1, 1] -> uint8: ``round((clamp(x) + 1) * 127.5)``, ties to even."""
    x = np.clip(np.asarray(x, dtype=np.float32), -1.0, 1.0)
    return np.round((x + np.float32(1)) * np.float32(127.5)).astype(np.uint8)


def from_uint8(image: np.ndarray) -> np.ndarray:
    """uint8 RGB -> float32 in [-1, 1] (``x / 127.5 - 1``)."""
    return image.astype(np.float32) / np.float32(127.5) - np.float32(1)
