"""Comfy-Org's single-file DiTs (``Comfy-Org/Ideogram-4``: ``ideogram4[_unconditional]_fp8_scaled``
and ``_nvfp4_mixed``): ComfyUI's mixed-precision layout (MODEL_NOTES#comfy-single-file-dits).

Every quantized linear ``X`` carries a ``X.comfy_quant`` marker (U8 bytes of a JSON object whose
``format`` names the layout) next to its weight:

- ``float8_e4m3fn``: ``X.weight`` F8_E4M3 ``(out, in)``, ``X.weight_scale`` one F32 scale for the
  whole tensor; ``w = fp8 * scale``.
- ``nvfp4``: ``X.weight`` U8 ``(out, in / 2)``, two E2M1 codes a byte, the first in the high
  nibble; ``X.weight_scale`` F8_E4M3 scales, one per 16 inputs, in cuBLAS's blocked layout padded
  to 128 rows and 4 columns; ``X.weight_scale_2`` one F32 scale for the tensor;
  ``w = e2m1 * (scale_2 * block_scale)``.

``X.input_scale`` (an activation scale for FP8 matmuls) is dropped. Layers without a marker are
plain float tensors. Keys are the official fp8 names (ComfyUI's model uses the same module
names), so decoding only replaces each group by a float32 ``X.weight``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from safetensors import SafetensorError, safe_open

from ideogram4_mlx.config import CheckpointError
from ideogram4_mlx.sources import Headers

MARKER = "comfy_quant"
FP8 = "float8_e4m3fn"
NVFP4 = "nvfp4"
FORMATS = (FP8, NVFP4)
MAX_MARKER_BYTES = 4096  # ComfyUI writes {"format": ...} plus a flag or two
NVFP4_GROUP = 16  # inputs per block scale
BLOCK_ROWS, BLOCK_COLS = 128, 4  # the blocked (swizzled) scale tile
SCALAR_SHAPES = ((), (1,))
# Parts of a quantized group besides the weight and the marker.
SCALES = {FP8: ("weight_scale",), NVFP4: ("weight_scale", "weight_scale_2")}
DROPPED = ("input_scale",)  # activation scale of ComfyUI's FP8 matmul, no part of the weight
REFUSED = ("pre_quant_scale",)  # scales the input: the weight alone is not the layer
AUX = ("weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale", MARKER)
# E2M1 code -> value (sign bit 3), comfy-kitchen's E2M1_LUT.
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FIX = "re-download the file from Comfy-Org/Ideogram-4"
CHECKED: set[tuple] = set()  # block-scale tensors already found free of NaN


@dataclass(frozen=True)
class Layer:
    """One marked linear: ``prefix`` is ``X.``, ``shape`` the float weight's ``(out, in)``."""

    prefix: str
    format: str
    shape: tuple[int, int]
    path: Path


def blocked_shape(rows: int, groups: int) -> tuple[int, int]:
    """The stored shape of an nvfp4 block-scale grid of ``rows x groups`` (cuBLAS tiles)."""
    return (-(-rows // BLOCK_ROWS) * BLOCK_ROWS, -(-groups // BLOCK_COLS) * BLOCK_COLS)


def unblock(scales: mx.array, rows: int, groups: int) -> mx.array:
    """cuBLAS blocked layout -> ``(rows, groups)``, comfy-kitchen's ``from_blocked``: each
    128x4 tile is stored as 32 rows of 16, row r of the tile at (r % 32, 4 * (r // 32) + c)."""
    padded_rows, padded_cols = blocked_shape(rows, groups)
    n_r, n_c = padded_rows // BLOCK_ROWS, padded_cols // BLOCK_COLS
    tiles = scales.reshape(n_r, n_c, 32, 4, 4).transpose(0, 1, 3, 2, 4)
    grid = tiles.reshape(n_r, n_c, BLOCK_ROWS, BLOCK_COLS).transpose(0, 2, 1, 3)
    return grid.reshape(padded_rows, padded_cols)[:rows, :groups]


def dequantize_fp8(weight: mx.array, scale: mx.array) -> mx.array:
    """float32 ``fp8 * scale``: fp8 -> f32 is exact, so the product is rounded once."""
    return mx.from_fp8(weight, dtype=mx.float32) * scale.astype(mx.float32).reshape(())


def nvfp4_codes(weight: mx.array) -> mx.array:
    """Packed bytes ``(out, in / 2)`` -> E2M1 codes ``(out, in)``, high nibble first."""
    codes = mx.stack([mx.right_shift(weight, 4), mx.bitwise_and(weight, 0xF)], axis=-1)
    return codes.reshape(weight.shape[0], -1)


def dequantize_nvfp4(weight: mx.array, block_scale: mx.array, scale_2: mx.array) -> mx.array:
    """float32 ``e2m1 * (scale_2 * block_scale)``, in comfy-kitchen's order of operations
    (``dequantize_nvfp4`` with ``output_type=float32``): the two scales multiplied first."""
    rows, cols = weight.shape[0], weight.shape[1] * 2
    values = mx.take(mx.array(E2M1, dtype=mx.float32), nvfp4_codes(weight).astype(mx.uint32))
    blocks = mx.from_fp8(unblock(block_scale, rows, cols // NVFP4_GROUP), dtype=mx.float32)
    total = scale_2.astype(mx.float32).reshape(()) * blocks
    grouped = values.reshape(rows, cols // NVFP4_GROUP, NVFP4_GROUP) * total[..., None]
    return grouped.reshape(rows, cols)


def mlx_nvfp4(
    weight: mx.array, block_scale: mx.array, scale_2: mx.array
) -> tuple[mx.array, mx.array, mx.array] | None:
    """The MLX ``nvfp4`` triple ``(w_q, scales, global_scale)`` holding an nvfp4 layer exactly:
    ``mx.dequantize(w_q, scales, mode="nvfp4", global_scale=g, dtype=float32)`` equals
    :func:`dequantize_nvfp4`. None where no float32 ``g`` does (MODEL_NOTES#comfy-nvfp4-in-mlx).

    The codes and block scales move as they are (nibbles swapped: MLX puts the first element in
    the low nibble; scales unblocked). MLX's ``global_scale`` is the tensor's amax and it
    multiplies by ``global_scale / 2688``, so ``g`` must divide back to ``scale_2`` exactly.
    """
    rows, cols = weight.shape[0], weight.shape[1] * 2
    swapped = mx.bitwise_or(mx.left_shift(weight, 4), mx.right_shift(weight, 4))
    w_q = swapped.reshape(rows, cols // 8, 4).view(mx.uint32).reshape(rows, cols // 8)
    scales = unblock(block_scale, rows, cols // NVFP4_GROUP)
    g = global_scale_for(float(np.array(scale_2.astype(mx.float32)).reshape(())))
    return None if g is None else (w_q, scales, mx.array(g, dtype=mx.float32))


def global_scale_for(scale_2: float) -> float | None:
    """The float32 ``g`` with ``fl32(g / 2688) == scale_2`` (MLX's decode of nvfp4's global
    scale, 2688 = 448 * 6), the nearest to ``scale_2 * 2688``; None if there is none."""
    target, divisor = np.float32(scale_2), np.float32(448.0 * 6.0)
    g = np.float32(target * divisor)
    for _ in range(4):  # g / 2688 is monotonic in g: walk towards the target
        back = np.float32(g / divisor)
        if back == target:
            return float(g)
        g = np.nextafter(g, np.float32(math.inf if back < target else -math.inf), dtype=np.float32)
    return None


class ComfyFormat:
    """``FORMAT``: Comfy's ``comfy_quant`` layers, fp8_scaled and nvfp4_mixed files alike."""

    name = "comfy"

    def claims(self, headers: Headers) -> bool:
        return any(key.endswith("." + MARKER) for key in headers)

    def decoded_headers(self, headers: Headers) -> Headers:
        layers = checked_layers(headers)
        out = {k: v for k, v in headers.items() if owner(k, layers) is None}
        for layer in layers.values():
            out[layer.prefix + "weight"] = ("F32", layer.shape, layer.path)
        return out

    def decode(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        formats = {
            key[: -len(MARKER)]: marker_format(bytes(np.array(value)), key, "the loaded weights")
            for key, value in weights.items()
            if key.endswith("." + MARKER)
        }
        out = {k: v for k, v in weights.items() if owner(k, formats) is None}
        for prefix, fmt in formats.items():
            names = [prefix + "weight", *(prefix + leaf for leaf in SCALES[fmt])]
            missing = [name for name in names if name not in weights]
            if missing:
                raise CheckpointError(f"{prefix}{MARKER} ({fmt}): {missing[0]} is missing; {FIX}")
            parts = [weights[name] for name in names]
            decode = dequantize_fp8 if fmt == FP8 else dequantize_nvfp4
            out[prefix + "weight"] = decode(*parts)
        return out


def owner(key: str, layers) -> str | None:
    """The marked prefix whose group ``key`` belongs to (weight or auxiliary), else None."""
    prefix, _, leaf = key.rpartition(".")
    prefix += "."
    if prefix in layers and (leaf == "weight" or leaf in AUX):
        return prefix
    return None


def checked_layers(headers: Headers) -> dict[str, Layer]:
    """Every marked layer, its marker read and every tensor of its group checked (dtype, shape,
    the scalar scales finite and positive); stray scales or quantized tensors are errors."""
    layers = {}
    for key, (dtype, shape, path) in headers.items():
        if key.endswith("." + MARKER):
            prefix = key[: -len(MARKER)]
            layers[prefix] = check_group(prefix, read_marker(key, dtype, shape, path), headers)
    for key, (dtype, _, path) in headers.items():
        if owner(key, layers) is not None:
            continue
        leaf = key.rpartition(".")[2]
        if leaf in AUX:
            raise CheckpointError(
                f"{path}: {key} has no {key.rpartition('.')[0]}.{MARKER} marker next to it; "
                f"the file is damaged or not a Comfy checkpoint: {FIX}"
            )
        if dtype in ("F8_E4M3", "U8"):
            raise CheckpointError(
                f"{path}: {key} is {dtype} but has no {MARKER} marker saying how to read it; {FIX}"
            )
    return layers


def read_marker(key: str, dtype: str, shape: tuple[int, ...], path: Path) -> str:
    """A ``comfy_quant`` marker's format, read after bounding its size from the header."""
    if dtype != "U8" or len(shape) != 1 or not 0 < shape[0] <= MAX_MARKER_BYTES:
        raise CheckpointError(
            f"{path}: {key} is {dtype} {list(shape)}, expected U8 bytes of a JSON object "
            f"(1 to {MAX_MARKER_BYTES}); {FIX}"
        )
    return marker_format(bytes(read_tensor(path, key)), key, path)


def marker_format(raw: bytes, key: str, path) -> str:
    """The ``format`` of a marker's JSON bytes; unknown or malformed markers are errors."""
    if len(raw) > MAX_MARKER_BYTES:
        raise CheckpointError(f"{path}: {key} holds {len(raw)} bytes; {FIX}")
    try:
        conf = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: {key} is not UTF-8 JSON ({e}); {FIX}") from None
    fmt = conf.get("format") if isinstance(conf, dict) else None
    if fmt not in FORMATS:
        raise CheckpointError(
            f"{path}: {key} has format {fmt!r}; this reader knows {', '.join(FORMATS)} "
            "(convert other Comfy formats to bf16 in ComfyUI first)"
        )
    return fmt


def check_group(prefix: str, fmt: str, headers: Headers) -> Layer:
    """The tensors of one marked layer against its format (MODEL_NOTES#comfy-single-file-dits)."""
    weight_key = prefix + "weight"
    if weight_key not in headers:
        raise CheckpointError(
            f"{headers[prefix + MARKER][2]}: {prefix}{MARKER} marks no {weight_key}; {FIX}"
        )
    dtype, shape, path = headers[weight_key]
    for leaf in REFUSED:
        if prefix + leaf in headers:
            raise CheckpointError(
                f"{path}: {prefix}{leaf} scales the layer's input, which a weight cannot hold; "
                "this reader takes weight-only files"
            )
    for leaf in SCALES[fmt]:
        if prefix + leaf not in headers:
            raise CheckpointError(f"{path}: {fmt} weight {weight_key} has no {prefix}{leaf}; {FIX}")
    if prefix + DROPPED[0] in headers:
        check_scalar(prefix + DROPPED[0], headers, positive=False)
    expected = "F8_E4M3" if fmt == FP8 else "U8"
    if dtype != expected or len(shape) != 2 or 0 in shape:
        raise CheckpointError(
            f"{path}: {weight_key} is {dtype} {list(shape)}, expected a 2-D {expected} {fmt} "
            f"weight; {FIX}"
        )
    if fmt == FP8:
        check_scalar(prefix + "weight_scale", headers)
        return Layer(prefix, fmt, shape, path)
    rows, cols = shape[0], shape[1] * 2
    if rows % NVFP4_GROUP or cols % NVFP4_GROUP:
        raise CheckpointError(
            f"{path}: {weight_key} {list(shape)} holds a {rows}x{cols} nvfp4 weight; Comfy pads "
            f"both to multiples of {NVFP4_GROUP}; {FIX}"
        )
    scale_dtype, scale_shape, _ = headers[prefix + "weight_scale"]
    want = blocked_shape(rows, cols // NVFP4_GROUP)
    if scale_dtype not in ("F8_E4M3", "U8") or tuple(scale_shape) != want:
        raise CheckpointError(
            f"{path}: {prefix}weight_scale is {scale_dtype} {list(scale_shape)}, expected "
            f"F8_E4M3 {list(want)} (one scale per {NVFP4_GROUP} inputs of {rows}x{cols}, "
            f"padded to {BLOCK_ROWS}x{BLOCK_COLS} tiles); {FIX}"
        )
    check_scalar(prefix + "weight_scale_2", headers)
    check_block_scales(path, prefix + "weight_scale")
    return Layer(prefix, fmt, (rows, cols), path)


def check_scalar(key: str, headers: Headers, positive: bool = True) -> None:
    """A per-tensor scale: one F32 value, finite (and > 0 where it scales the weight)."""
    dtype, shape, path = headers[key]
    if dtype != "F32" or tuple(shape) not in SCALAR_SHAPES:
        raise CheckpointError(
            f"{path}: {key} is {dtype} {list(shape)}, expected one F32 value per tensor "
            f"(Comfy's per-tensor scale, not the official per-row layout); {FIX}"
        )
    value = float(read_tensor(path, key).reshape(()))
    if not math.isfinite(value) or (positive and value <= 0):
        raise CheckpointError(f"{path}: {key} is {value}, expected a finite scale > 0; {FIX}")


def check_block_scales(path: Path, key: str) -> None:
    """No NaN among an nvfp4 layer's E4M3 block scales (codes 0x7F, 0xFF): one tensor read at a
    time (1/32 of the weight's bytes), each (file, key, mtime) once per process."""
    stat = path.stat()
    token = (str(path), key, stat.st_size, stat.st_mtime_ns)
    if token in CHECKED:
        return
    try:
        scales = mx.load(str(path))[key]
        nan = int(mx.sum(mx.bitwise_and(scales, 0x7F) == 0x7F).item())
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: {key} cannot be read ({e}); {FIX}") from None
    if nan:
        raise CheckpointError(f"{path}: {key} holds {nan} NaN block scale(s); {FIX}")
    CHECKED.add(token)


def read_tensor(path: Path, key: str) -> np.ndarray:
    """One small tensor, read with safetensors (its size already bounded from the header)."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            return f.get_tensor(key)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: {key} cannot be read ({e}); {FIX}") from e


FORMAT = ComfyFormat()
