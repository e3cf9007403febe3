"""A Comfy-Org single-file DiT (test tooling) made from a synthetic fp8 snapshot's DiT folder,
in the layout of ``Comfy-Org/Ideogram-4``'s ``diffusion_models/`` files
(MODEL_NOTES#comfy-single-file-dits):

- ``fp8_scaled``: every linear F8_E4M3 with one F32 ``weight_scale`` per tensor and a
  ``comfy_quant`` marker ``{"format": "float8_e4m3fn"}``; norms, biases and the indicator BF16.
- ``nvfp4_mixed``: the block matrices (``qkv``, ``o``, ``w1..w3``) nvfp4 (packed E2M1, blocked
  F8_E4M3 block scales, F32 ``weight_scale_2``), the other linears fp8 as above.

    from ideogram4_mlx.synth.comfy import write_comfy_dit
    write_comfy_dit(snapshot / "transformer", "/tmp/nvfp4_mixed.safetensors", "nvfp4_mixed")

Weights are the snapshot's fp8 weights dequantized in float32 and quantized again the way
comfy-kitchen does (per-tensor amax scales), a few rows at a time (``CHUNK_VALUES``: the
encoders' float64 temporaries of a whole 12288 x 4608 weight took 16 GB). The output file's
tensors are held in memory until it is written (its size: a full-width block is ~0.26 GB).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from ideogram4_mlx.errors import InputError
from ideogram4_mlx.synth.writer import FP8_MAX, encode_e4m3

KINDS = ("fp8_scaled", "nvfp4_mixed")
NVFP4_LAYERS = (
    "attention.qkv",
    "attention.o",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
)
E2M1_MAX = 6.0
E2M1_POSITIVE = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
E2M1_MIDPOINTS = (E2M1_POSITIVE[:-1] + E2M1_POSITIVE[1:]) / 2  # exact in float32 and float64
# Safetensors dtype -> numpy storage; safetensors' serializer orders by alignment, then name.
STORAGE = {"F32": "<f4", "BF16": "<u2", "F8_E4M3": "u1", "U8": "u1"}
ORDER = ("F32", "BF16", "F8_E4M3", "U8")
DIT_FILE = "diffusion_pytorch_model.safetensors"
CHUNK_VALUES = 1 << 21  # values encoded at once (whole rows): bounds the float64 temporaries


def write_comfy_dit(
    dit_dir,
    dst,
    kind: str = "fp8_scaled",
    *,
    prefix: str = "",
    bf16: tuple[str, ...] = (),
    input_scales: bool = False,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write the DiT of a synthetic snapshot folder (``transformer/`` or
    ``unconditional_transformer/``) to ``dst`` as a Comfy ``kind`` file and return its path.

    ``prefix`` is put before every key (repacks may add ``model.diffusion_model.``); linears
    named in ``bf16`` stay BF16 without a marker; ``input_scales`` adds ComfyUI's per-layer
    activation scale (F32, dropped by readers of the weights).
    """
    if kind not in KINDS:
        raise InputError(f"unknown Comfy file kind {kind!r}; use one of {', '.join(KINDS)}")
    source = mx.load(str(Path(dit_dir) / DIT_FILE))
    tensors: dict[str, tuple[str, np.ndarray]] = {}
    for key in sorted(source):
        if key.endswith(".weight_scale") or key not in source:
            continue
        name = key[: -len(".weight")]
        scale_key = name + ".weight_scale"
        if scale_key not in source:
            bits = np.array(source[key].astype(mx.bfloat16).view(mx.uint16))
            tensors[prefix + key] = ("BF16", bits)
            continue
        fp8, scale = source.pop(key), source.pop(scale_key)  # evaluated ones are freed
        weight = np.array(mx.from_fp8(fp8, dtype=mx.float32) * scale[:, None])
        layer = prefix + name + "."
        if name in bf16:
            tensors[layer + "weight"] = ("BF16", bf16_bits(weight))
            continue
        nvfp4 = kind == "nvfp4_mixed" and name.endswith(NVFP4_LAYERS) and name.startswith("layers.")
        tensors.update(quantize_nvfp4(layer, weight) if nvfp4 else quantize_fp8(layer, weight))
        if input_scales:
            tensors[layer + "input_scale"] = ("F32", np.array(1.0, dtype=np.float32))
    return write_safetensors(Path(dst), tensors, metadata or {})


def marker(fmt: str) -> tuple[str, np.ndarray]:
    """A ``comfy_quant`` tensor: the JSON bytes ComfyUI writes (``json.dumps({"format": ...})``)."""
    return "U8", np.frombuffer(json.dumps({"format": fmt}).encode("utf-8"), dtype=np.uint8)


def quantize_fp8(layer: str, weight: np.ndarray) -> dict:
    """Per-tensor fp8 as comfy-kitchen quantizes it: ``scale = amax / 448``."""
    scale = np.float32(np.abs(weight).max() / FP8_MAX) or np.float32(1.0)
    codes = np.concatenate(
        [
            encode_e4m3(np.clip(part * (np.float32(1.0) / scale), -FP8_MAX, FP8_MAX))
            for part in row_chunks(weight)
        ]
    )
    return {
        layer + "weight": ("F8_E4M3", codes),
        layer + "weight_scale": ("F32", np.array(scale, dtype=np.float32)),
        layer + "comfy_quant": marker("float8_e4m3fn"),
    }


def quantize_nvfp4(layer: str, weight: np.ndarray) -> dict:
    """nvfp4 as comfy-kitchen's ``quantize_nvfp4``: tensor scale ``amax / (448 * 6)``, block
    scales ``block_amax / 6 / tensor_scale`` rounded to E4M3, codes to the nearest E2M1 value,
    two a byte (first in the high nibble), block scales in the cuBLAS blocked layout."""
    rows, cols = weight.shape
    if rows % 16 or cols % 16:
        raise InputError(f"{layer}weight {weight.shape}: nvfp4 needs multiples of 16")
    tensor_scale = np.float32(np.abs(weight).max() / (FP8_MAX * E2M1_MAX)) or np.float32(1.0)
    parts = [nvfp4_rows(part, tensor_scale) for part in row_chunks(weight)]
    packed = np.concatenate([p for p, _ in parts])
    block_codes = np.concatenate([b for _, b in parts])
    return {
        layer + "weight": ("U8", packed),
        layer + "weight_scale": ("F8_E4M3", to_blocked(block_codes)),
        layer + "weight_scale_2": ("F32", np.array(tensor_scale, dtype=np.float32)),
        layer + "comfy_quant": marker("nvfp4"),
    }


def row_chunks(weight: np.ndarray) -> list[np.ndarray]:
    """Whole rows of ``weight``, about ``CHUNK_VALUES`` values a chunk."""
    step = max(1, CHUNK_VALUES // max(1, weight.shape[-1]))
    return [weight[r : r + step] for r in range(0, weight.shape[0], step)] or [weight]


def nvfp4_rows(weight: np.ndarray, tensor_scale: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a weight -> (packed codes ``(rows, cols / 2)``, E4M3 block-scale codes
    ``(rows, cols / 16)``, not yet blocked), given the whole tensor's scale."""
    rows, cols = weight.shape
    groups = weight.reshape(rows, cols // 16, 16).astype(np.float32)
    block = np.minimum(np.abs(groups).max(-1) / np.float32(E2M1_MAX) / tensor_scale, FP8_MAX)
    block_codes = encode_e4m3(block)
    total = tensor_scale * decode_e4m3_f32(block_codes)
    scaled = np.where(total[..., None] == 0, 0, groups / np.where(total == 0, 1, total)[..., None])
    # the nearest E2M1 magnitude; a tie (on a midpoint) to the even code, as comfy-kitchen
    magnitude = np.abs(scaled)
    nearest = np.searchsorted(E2M1_MIDPOINTS, magnitude, side="left")
    tie = E2M1_MIDPOINTS[np.minimum(nearest, len(E2M1_MIDPOINTS) - 1)] == magnitude
    nearest = (nearest + (tie & (nearest % 2 == 1))).astype(np.uint8)
    codes = (nearest | (np.signbit(scaled).astype(np.uint8) << 3)).reshape(rows, cols)
    packed = (codes[:, 0::2] << 4) | codes[:, 1::2]
    return packed.astype(np.uint8), block_codes


def to_blocked(grid: np.ndarray) -> np.ndarray:
    """``(rows, groups)`` -> cuBLAS's blocked layout, zero-padded to 128x4 tiles (comfy-kitchen's
    ``to_blocked(..., flatten=False)``)."""
    rows, cols = grid.shape
    n_r, n_c = -(-rows // 128), -(-cols // 4)
    padded = np.zeros((n_r * 128, n_c * 4), dtype=grid.dtype)
    padded[:rows, :cols] = grid
    tiles = padded.reshape(n_r, 128, n_c, 4).transpose(0, 2, 1, 3)
    return tiles.reshape(-1, 4, 32, 4).transpose(0, 2, 1, 3).reshape(n_r * 128, n_c * 4)


def decode_e4m3_f32(codes: np.ndarray) -> np.ndarray:
    return np.array(mx.from_fp8(mx.array(codes), dtype=mx.float32))


def bf16_bits(x: np.ndarray) -> np.ndarray:
    return np.array(mx.array(x.astype(np.float32)).astype(mx.bfloat16).view(mx.uint16))


def write_safetensors(path: Path, tensors: dict, metadata: dict[str, str]) -> Path:
    """Raw safetensors (numpy and MLX write neither F8_E4M3 nor bf16 bits as such)."""
    order = sorted(tensors, key=lambda k: (ORDER.index(tensors[k][0]), k))
    header: dict = {"__metadata__": {"format": "pt", **metadata}}
    blobs, offset = [], 0
    for key in order:
        dtype, array = tensors[key]
        data = np.ascontiguousarray(array, dtype=STORAGE[dtype]).tobytes()
        header[key] = {
            "dtype": dtype,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for blob in blobs:
            f.write(blob)
    return path
