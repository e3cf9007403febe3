"""Reading checkpoint files: safetensors headers, fp8 dequantization, strict loading.

The fp8 layout (spec §A.2): every quantized ``nn.Linear`` stores ``<name>.weight`` as F8_E4M3
``(out, in)`` and ``<name>.weight_scale`` as F32 ``(out,)``. ``mx.load`` reads F8_E4M3 as uint8.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from safetensors import SafetensorError, safe_open

FP8_DTYPE = "F8_E4M3"
SCALE_SUFFIX = ".weight_scale"
INDEX_SUFFIX = ".safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint file or directory is missing, damaged or does not match the model."""


def read_json(path: Path) -> dict:
    """A config file; a missing or malformed one is a ``CheckpointError`` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Return ``{key: (safetensors dtype string, shape)}`` without reading tensor data."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="numpy") as f:
            return {
                k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()
            }
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def component_files(component_dir: Path) -> list[Path]:
    """The safetensors files of one component folder: an index's shards, or the single file."""
    component_dir = Path(component_dir)
    indexes = sorted(component_dir.glob(f"*{INDEX_SUFFIX}"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        return [component_dir / name for name in sorted(set(weight_map.values()))]
    files = sorted(component_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{component_dir}: no .safetensors file found")
    return files


def load_safetensors(files: list[Path]) -> dict[str, mx.array]:
    """Load tensors (lazily, as ``mx.load`` does) from one or more files, checking the fp8 pairs.

    F8_E4M3 tensors come back as uint8 and must have a ``.weight_scale`` partner.
    """
    weights: dict[str, mx.array] = {}
    for path in files:
        header = read_header(path)
        try:
            loaded = mx.load(str(path))
        except (RuntimeError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot be read ({e}); the file may be truncated") from e
        for key, (dtype, _) in header.items():
            if dtype == FP8_DTYPE and key.endswith(".weight"):
                scale_key = key[: -len(".weight")] + SCALE_SUFFIX
                if scale_key not in header and scale_key not in weights:
                    raise CheckpointError(f"{path}: fp8 tensor {key} has no {scale_key}")
            elif dtype == FP8_DTYPE:
                raise CheckpointError(
                    f"{path}: unexpected fp8 tensor {key} (only .weight may be fp8)"
                )
        weights.update(loaded)
    return weights


def dequantize_fp8(weight: mx.array, scale: mx.array) -> mx.array:
    """``bf16(bf16(w8) * bf16(scale)[:, None])``: the reference rounding (spec §A.2, §I.3).

    fp8 -> bf16 is exact, and the product of two bf16 values is exact in fp32, so one
    rounding of the product reproduces PyTorch's bf16 multiply bit for bit.
    """
    w = mx.from_fp8(weight, dtype=mx.bfloat16)
    return w * scale.astype(mx.bfloat16)[:, None]


def dequantize_fp8_weights(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Replace every ``X.weight`` (uint8) + ``X.weight_scale`` pair by a bf16 ``X.weight``.

    Idempotent: a dict without ``weight_scale`` keys is returned unchanged.
    """
    out = dict(weights)
    for scale_key in [k for k in weights if k.endswith(SCALE_SUFFIX)]:
        weight_key = scale_key[: -len(SCALE_SUFFIX)] + ".weight"
        if weight_key not in weights:
            raise CheckpointError(f"{scale_key} has no matching {weight_key}")
        w, s = weights[weight_key], out.pop(scale_key)
        if w.dtype != mx.uint8:
            raise CheckpointError(
                f"{weight_key}: expected fp8 (uint8) data next to a weight_scale, got {w.dtype}"
            )
        if s.shape != (w.shape[0],):
            raise CheckpointError(
                f"{scale_key}: shape {s.shape} does not match {weight_key} rows ({w.shape[0]},)"
            )
        out[weight_key] = dequantize_fp8(w, s)
    return out


def strip_prefixes(weights: dict[str, mx.array], prefixes: tuple[str, ...]) -> dict[str, mx.array]:
    """Drop the first matching prefix of every key (repacks add ``model.diffusion_model.``)."""
    out = {}
    for key, value in weights.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        out[key] = value
    return out


def load_strict(model: nn.Module, weights: dict[str, mx.array], source: str) -> None:
    """Load ``weights`` into ``model``; any missing, unexpected or mis-shaped key is an error."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        raise CheckpointError(f"{source}: missing {len(missing)} key(s), e.g. {missing[:3]}")
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected {len(unexpected)} key(s), e.g. {unexpected[:3]}"
        )
    for key, value in weights.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(value.shape)}, "
                f"the model config expects {tuple(expected[key].shape)}"
            )
    model.load_weights(list(weights.items()), strict=True)
