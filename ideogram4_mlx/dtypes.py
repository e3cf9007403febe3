"""Compute dtypes by name: one table for the CLI, metadata, convert and the reference path."""

from __future__ import annotations

import mlx.core as mx

from ideogram4_mlx.errors import InputError

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def parse_dtype(name: str) -> mx.Dtype:
    """``bfloat16``/``bf16``, ``float16``/``fp16``, ``float32``/``fp32`` -> the MLX dtype."""
    canonical = DTYPE_ALIASES.get(name, name)
    if canonical not in DTYPES:
        valid = ", ".join([*DTYPES, *DTYPE_ALIASES])
        raise InputError(f"unknown dtype {name!r}; valid: {valid}")
    return DTYPES[canonical]


def dtype_name(dtype: mx.Dtype) -> str:
    """The table's name of an MLX dtype (``bfloat16``, ...)."""
    return next(name for name, d in DTYPES.items() if d == dtype)
