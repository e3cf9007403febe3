"""Primitives shared by the DiT, the text encoder and the VAE.

Rounding follows PyTorch's bf16 reference (spec §I.4-5): RMSNorm normalises in fp32, rounds,
then multiplies by the weight; SiLU is evaluated in fp32 and rounded once. RoPE tables are
host-side: angles reach ~6.6e4 rad, so they are evaluated in float64 from the fp32 products
the reference forms, then rounded to fp32 (spec §C.3, §I.2).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np


def silu(x: mx.array) -> mx.array:
    xf = x.astype(mx.float32)
    return (xf * mx.sigmoid(xf)).astype(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        # Normalise in fp32 and round to x's dtype (one fused kernel on Metal/CUDA; the same
        # composed ops on the CPU, bit for bit), then multiply by the weight: the reference's
        # two roundings (spec D.4).
        return mx.fast.rms_norm(x, None, self.eps) * self.weight


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate-half RoPE on (B, L, H, D) with cos/sin (B, L, 1, D)."""
    half = x.shape[-1] // 2
    rotated = mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """``1 / theta ** (arange(0, head_dim, 2) / head_dim)`` in fp32, each step correctly rounded.

    The power is taken in float64 and rounded: numpy's float32 ``**`` (SIMD since numpy 2.x)
    is not correctly rounded and lands 1 ulp off in ~20 of the 128 slots.
    """
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    power = (np.float64(np.float32(theta)) ** exponent.astype(np.float64)).astype(np.float32)
    return (np.float32(1.0) / power).astype(np.float32)


def rope_cos_sin(position_ids: np.ndarray, head_dim: int, theta: float) -> tuple[np.ndarray, ...]:
    """cos/sin (B, T, head_dim) fp32 for (B, T) positions, 1-D RoPE: fp32 angles, as HF forms
    them, then exact cos/sin."""
    angles = position_ids.astype(np.float32)[..., None] * rope_inv_freq(head_dim, theta)
    angles = np.concatenate([angles, angles], axis=-1).astype(np.float64)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
