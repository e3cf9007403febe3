"""Compute dtypes by name: one table for the CLI, metadata, convert and the reference path; and
one finiteness check of a float tensor that holds no second copy of it."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

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


# A float is NaN or infinite when its bits, sign cleared, reach the all-ones exponent.
NON_FINITE_FROM = {
    mx.bfloat16: (mx.uint16, 0x7FFF, 0x7F80),
    mx.float16: (mx.uint16, 0x7FFF, 0x7C00),
    mx.float32: (mx.uint32, 0x7FFFFFFF, 0x7F800000),
}
FINITE_CHUNK = 1 << 24  # values checked at once: the check's own memory stays 64 MB at most


def all_finite(value: mx.array) -> bool:
    """No NaN or infinity in ``value`` (evaluated here; another dtype is True), read from its
    bits through a NumPy view of MLX's buffer, a chunk at a time (9x MLX's ``isfinite`` on a
    bfloat16 tensor on the CPU, and no float32 copy)."""
    if value.dtype not in NON_FINITE_FROM:
        return not mx.issubdtype(value.dtype, mx.floating) or bool(mx.isfinite(value).all())
    view, magnitude, exponent = NON_FINITE_FROM[value.dtype]
    bits = np.array(value.view(view), copy=False).reshape(-1)
    return all(
        int(np.max(bits[start : start + FINITE_CHUNK] & magnitude)) < exponent
        for start in range(0, bits.size, FINITE_CHUNK)
    )
