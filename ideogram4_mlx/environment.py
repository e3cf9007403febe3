"""What machine a generation runs on, and what fits in its memory.

Bits of an image depend on the backend and the math libraries (a different BLAS moves fp32
results by ~1e-5 and bf16 images by a few levels), so the PNG metadata records them and a
replay elsewhere says so.
"""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path

import mlx.core as mx

from ideogram4_mlx.weights import QUANTIZED_DTYPE, component_files, tensor_headers

# Components the pipeline loads, and the share of RAM their weights may take before the
# pipeline frees each one after its stage instead of keeping it for the next image.
MODEL_FOLDERS = ("text_encoder", "transformer", "unconditional_transformer", "vae")
KEEP_FRACTION = 0.6


def backend() -> str:
    """``metal``, ``cuda`` or ``cpu``: where MLX runs its default device."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    return "metal" if mx.metal.is_available() else "cuda"


def describe() -> dict:
    """The machine facts that can change an image's bits: backend, device, MLX, BLAS, OS."""
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    preload = os.environ.get("LD_PRELOAD", "")
    return {
        "backend": backend(),
        "device": str(info.get("device_name", platform.processor() or platform.machine())),
        "mlx": mx.__version__,
        # MLX's Linux CPU wheel bundles its own BLAS; a preloaded OpenBLAS replaces it.
        "blas": "openblas" if "openblas" in preload else "bundled",
        "platform": f"{platform.system()} {platform.machine()}",
    }


def differences(stored: dict | None, current: dict) -> list[str]:
    """``key: stored -> current`` for every fact that differs (all, when none was stored)."""
    if not isinstance(stored, dict):
        return ["the image records no environment (made by an older version)"]
    return [
        f"{key}: {stored.get(key)} -> {value}"
        for key, value in current.items()
        if stored.get(key) != value
    ]


def is_slow(dtype: mx.Dtype, quantized: bool) -> bool:
    """MLX's CPU backend runs bf16/fp16 and quantized matmuls without BLAS (10-50x slower
    than fp32 there); Metal and CUDA do not have that cliff."""
    return backend() == "cpu" and (quantized or dtype != mx.float32)


def physical_memory() -> int:
    """Bytes of RAM (unified memory on a Mac)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def weight_bytes(checkpoint_dir: Path, dtype: mx.Dtype) -> int:
    """What the pipeline's weights take in memory, from the file headers: every float (and
    fp8) tensor in ``dtype``, packed quantized weights as they are; an upper bound (the
    vision tower and the unconditional text projection are counted but never loaded)."""
    total = 0
    for name in MODEL_FOLDERS:
        headers = tensor_headers(component_files(checkpoint_dir / name))
        for tensor_dtype, shape, _ in headers.values():
            count = math.prod(shape)
            if tensor_dtype == QUANTIZED_DTYPE:
                total += 4 * count
            elif tensor_dtype.startswith(("BF", "F")):  # F8_E4M3 too: dequantized at load
                total += count * dtype.size
    return total


def fits_in_memory(checkpoint_dir: Path, dtype: mx.Dtype) -> bool:
    """Whether all models can stay loaded between images (``keep_in_memory=None``)."""
    return weight_bytes(checkpoint_dir, dtype) <= KEEP_FRACTION * physical_memory()
