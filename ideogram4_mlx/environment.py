"""What machine a generation runs on: backend, BLAS, physical memory.

Bits of an image depend on the backend and the math libraries (a different BLAS moves fp32
results by ~1e-5 and bf16 images by a few levels), so the PNG metadata records them and a
replay elsewhere says so.
"""

from __future__ import annotations

import ctypes
import os
import platform
import warnings
from pathlib import Path

import mlx.core as mx

from ideogram4_mlx.dtypes import dtype_name


def backend() -> str:
    """``metal``, ``cuda`` or ``cpu``: where MLX runs its default device."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    return "metal" if mx.metal.is_available() else "cuda"


class DlInfo(ctypes.Structure):
    """``Dl_info`` of dladdr(3): which loaded file holds an address."""

    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def loaded_files() -> list[Path]:
    """Every file mapped into this process (Linux); empty elsewhere."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    return [Path(line.split(maxsplit=5)[5]) for line in lines if "/" in line]


def openblas(path: str) -> str | None:
    """``openblas-<version>-<kernel>-<n>threads`` of the loaded OpenBLAS at ``path``."""
    lib = ctypes.CDLL(path)
    try:
        corename, config = lib.openblas_get_corename, lib.openblas_get_config
        threads = lib.openblas_get_num_threads()
    except AttributeError:
        return None  # some other BLAS
    corename.restype = config.restype = ctypes.c_char_p
    version = config().decode().split()[1]  # "OpenBLAS 0.3.21 DYNAMIC_ARCH ... Haswell ..."
    return f"openblas-{version}-{corename().decode()}-{threads}threads".lower()


def blas() -> tuple[str | None, str]:
    """(key, how it was found) of the BLAS whose ``cblas_sgemm`` MLX's CPU backend calls.

    A library in the global symbol scope (an ``LD_PRELOAD``) binds before the wheel's own, so
    that one is asked first; the key is None when the library cannot be told.
    """
    try:
        process = ctypes.CDLL(None)
    except OSError as e:
        return None, f"the process's symbols cannot be read ({e})"
    if hasattr(process, "cblas_sgemm"):
        info = DlInfo()
        address = ctypes.cast(process.cblas_sgemm, ctypes.c_void_p)
        if not process.dladdr(address, ctypes.byref(info)):
            return None, "cblas_sgemm is in the global scope but dladdr cannot place it"
        path = info.dli_fname.decode()
        key = openblas(path)
        return key, f"{path}: " + ("OpenBLAS" if key else "not an OpenBLAS, not keyed")
    site = Path(mx.__file__).parent.parent  # auditwheel's mlx_cpu.libs/libblas-<hash>.so.<v>
    bundled = [
        p
        for p in loaded_files()
        if p.parent.parent == site and p.parent.name.startswith("mlx") and "blas" in p.name
    ]
    if bundled:
        name = bundled[0].name
        return f"bundled-{name.split('-')[0]}-{name.split('.so.')[-1]}", str(bundled[0])
    return None, "no cblas_sgemm in the global scope and no BLAS bundled with MLX is loaded"


def describe() -> dict:
    """The machine facts that can change an image's bits: backend, device, MLX, BLAS, OS."""
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    key, _ = blas()
    return {
        "backend": backend(),
        "device": str(info.get("device_name", platform.processor() or platform.machine())),
        "mlx": mx.__version__,
        # MLX's Linux CPU wheel bundles its own BLAS; a preloaded OpenBLAS replaces it, and
        # its kernel and thread count move fp32 results too.
        "blas": key or "unknown",
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


def default_dtype() -> tuple[mx.Dtype, str]:
    """The compute dtype when none is given, and why: float32 on MLX's CPU backend (bf16 and
    quantized matmuls run without BLAS there, see :func:`is_slow`), bfloat16 on Metal and CUDA
    (the model's own precision, half the memory)."""
    where = backend()
    if where == "cpu":
        return mx.float32, "MLX CPU backend"
    return mx.bfloat16, f"MLX {'Metal' if where == 'metal' else 'CUDA'} backend"


def is_slow(dtype: mx.Dtype, quantized: bool) -> bool:
    """MLX's CPU backend runs bf16/fp16 and quantized matmuls without BLAS (10-50x slower
    than fp32 there); Metal and CUDA do not have that cliff."""
    return backend() == "cpu" and (quantized or dtype != mx.float32)


def warn_if_slow(dtype: mx.Dtype, quantized: bool) -> None:
    """A warning (at the caller's caller) when :func:`is_slow`: what runs slowly and the fix."""
    if not is_slow(dtype, quantized):
        return
    slow = [dtype_name(dtype)] if dtype != mx.float32 else []
    slow += ["quantized"] if quantized else []
    warnings.warn(
        f"MLX runs on its CPU backend here, where {' and '.join(slow)} matmuls are 10-50x "
        "slower than dense float32 (no BLAS): for speed use --dtype float32 "
        "(dtype=mx.float32) with an unquantized checkpoint; on a Mac (Metal) this does "
        "not apply",
        stacklevel=3,
    )


def physical_memory() -> int:
    """Bytes of RAM (unified memory on a Mac)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
