"""Primitives shared by the DiT, the text encoder and the VAE (its whole-image forwards in
``vae.py`` and its strip forwards in ``vae_strips.py`` alike).

Rounding follows PyTorch's bf16 reference (MODEL_NOTES#bf16-rounding): RMSNorm normalises in
fp32, rounds, then multiplies by the weight; SiLU is evaluated in fp32 and rounded once. RoPE
tables are host-side: angles reach ~6.6e4 rad, so they are evaluated in float64 from the fp32
products the reference forms, then rounded to fp32 (MODEL_NOTES#mrope-positions). GroupNorm
moments are fp32 sums taken as a tree, as precise as torch's.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

SUM_FAN_IN = 64  # values per node of a GroupNorm moment's summation tree


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
        # two roundings (MODEL_NOTES#bf16-rounding).
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


def tree_sum(x: mx.array) -> mx.array:
    """Sum over axis 1 as a tree of SUM_FAN_IN-wide fp32 sums: the rounding error grows with
    the depth, log N, not with N (a plain fp32 sum of a GroupNorm group's millions of values
    is off by ~3e-5 relative, torch's by ~1e-7). fp32 only, so it runs on every backend."""
    while x.shape[1] > SUM_FAN_IN:
        pad = -x.shape[1] % SUM_FAN_IN
        if pad:
            x = mx.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape(x.shape[0], -1, SUM_FAN_IN, *x.shape[2:]).sum(axis=2)
    return x.sum(axis=1)


def group_moments(x: mx.array, groups: int) -> tuple[mx.array, mx.array]:
    """Per-(batch, group) mean and sum of squared deviations (B, G): two passes (mean, then
    squared deviations from it), each a :func:`tree_sum` in fp32."""
    b, c = x.shape[0], x.shape[-1]
    xf = x.astype(mx.float32).reshape(b, -1, groups, c // groups)
    mean = tree_sum(xf).sum(axis=-1) / (xf.shape[1] * xf.shape[3])
    m2 = tree_sum(mx.square(xf - mean[:, None, :, None])).sum(axis=-1)
    return mean, m2


def upsample_nearest(x: mx.array) -> mx.array:
    """(B, H, W, C) -> (B, 2H, 2W, C), every pixel repeated 2x2."""
    b, h, w, c = x.shape
    x = mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return x.reshape(b, 2 * h, 2 * w, c)
