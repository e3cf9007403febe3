"""Primitives shared by the DiT, the text encoder and the VAE, and their config base.

Rounding follows PyTorch's bf16 reference (MODEL_NOTES#bf16-rounding): RMSNorm normalises in
fp32, rounds, then multiplies by the weight; SiLU is evaluated in fp32 and rounded once. RoPE
tables are host-side: angles reach ~6.6e4 rad, so they are evaluated in float64 from the fp32
products the reference forms, then rounded to fp32 (MODEL_NOTES#mrope-positions).
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar, TypeVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ideogram4_mlx.weights import CheckpointError, HeaderCheck, read_json

Config = TypeVar("Config", bound="BaseConfig")
# Bounds on config.json integers, checked before any model is built, so that an absurd value
# fails here instead of allocating: generous multiples of the real model's (34 and 36 layers,
# 2 VAE resnets per block, 4 blocks; widths up to the 151936-token vocabulary).
MAX_LAYERS = 1000
MAX_WIDTH = 1 << 20


@dataclass(frozen=True)
class BaseConfig:
    """Base of the config dataclasses (as mlx-lm's ``BaseModelArgs``): read from config.json."""

    # Fields that count layers (at most MAX_LAYERS; other integers at most MAX_WIDTH).
    layer_fields: ClassVar[tuple[str, ...]] = ()
    # Key prefixes of repacked files, stripped before ``header_checks`` keys are looked up.
    weight_prefixes: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_dict(cls: type[Config], d: dict) -> Config:
        """The known fields of ``d``, type- and bounds-checked (integers 1..MAX_*, floats
        finite and positive); unknown keys are ignored, JSON lists become tuples."""
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in fields(cls):
            if f.name in d:
                limit = MAX_LAYERS if f.name in cls.layer_fields else MAX_WIDTH
                kwargs[f.name] = checked_value(f.name, d[f.name], hints[f.name], limit)
        return cls(**kwargs)

    @classmethod
    def from_file(cls: type[Config], path: Path | str) -> Config:
        path = Path(path)
        config = read_json(path)
        try:
            return cls.from_dict(config)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None

    def header_checks(self) -> list[HeaderCheck]:
        """Values to compare with the tensors a checkpoint holds (``weights.checked_config``)."""
        return []


def checked_value(name: str, value, hint, limit: int):
    """``value`` as a field of type ``hint`` (JSON lists become tuples); a wrong type or an
    out-of-bounds number is a ``CheckpointError`` naming the field."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        (hint, *others) = [a for a in typing.get_args(hint) if a is not type(None)]
        if others:
            return value
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        variadic = len(args) == 2 and args[1] is Ellipsis
        if not isinstance(value, list | tuple) or not (
            len(value) <= MAX_LAYERS if variadic else len(value) == len(args)
        ):
            size = "a list" if variadic else f"a list of {len(args)}"
            raise CheckpointError(f"{name} is {short(value)}, expected {size}")
        return tuple(
            checked_value(f"{name}[{i}]", v, args[0] if variadic else args[i], limit)
            for i, v in enumerate(value)
        )
    problem = None
    if hint is bool and not isinstance(value, bool):
        problem = "true or false"
    elif hint is str and not isinstance(value, str):
        problem = "a string"
    elif hint is int and (type(value) is not int or not 1 <= value <= limit):
        problem = f"an integer from 1 to {limit}"
    elif hint is float and (
        type(value) not in (int, float) or not (math.isfinite(value) and value > 0)
    ):
        problem = "a finite number above 0"
    if problem:
        raise CheckpointError(f"{name} is {short(value)}, expected {problem}")
    return value


def short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
