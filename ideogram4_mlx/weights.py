"""Reading checkpoint files and loading them: safetensors, fp8 dequantization, strict loading.

One loader serves every component (:func:`load_component`): raw snapshots and converted folders
alike go through the model's own ``sanitize`` (idempotent, so converted weights pass unchanged),
and a converted folder's quantized skeleton is rebuilt from its ``mlx_conversion`` record first.

The fp8 layout (spec §A.2): every quantized ``nn.Linear`` stores ``<name>.weight`` as F8_E4M3
``(out, in)`` and ``<name>.weight_scale`` as F32 ``(out,)``. ``mx.load`` reads F8_E4M3 as uint8.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from safetensors import SafetensorError, safe_open

from ideogram4_mlx.quantization import RECORD_KEY, RECORD_VERSION, quantize_skeleton

FP8_DTYPE = "F8_E4M3"
SCALE_SUFFIX = ".weight_scale"
INDEX_SUFFIX = ".safetensors.index.json"
# A model's ``sanitize``: checkpoint tensors -> its parameters (pure, idempotent).
Sanitize = Callable[[dict[str, mx.array]], dict[str, mx.array]]


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


def conversion_record(component_dir: Path | str) -> dict | None:
    """The ``mlx_conversion`` record of a converted component folder; None for a raw snapshot."""
    path = Path(component_dir) / "config.json"
    record = read_json(path).get(RECORD_KEY)
    if record is not None and record.get("version", 0) > RECORD_VERSION:
        raise CheckpointError(
            f"{path}: converted with format version {record['version']}, this version reads "
            f"up to {RECORD_VERSION}; upgrade ideogram4_mlx or convert again"
        )
    return record


def cast_floats(weights: dict[str, mx.array], dtype: mx.Dtype) -> dict[str, mx.array]:
    """Cast floating tensors to ``dtype``; packed quantized weights (uint32) stay as they are."""
    return {
        k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()
    }


def load_component(
    model: nn.Module,
    component_dir: Path | str,
    dtype: mx.Dtype,
    resident: Callable[[str], bool] | None = None,
) -> nn.Module:
    """Fill ``model`` from a component folder, raw snapshot or converted, strictly, in ``dtype``.

    The tensors go through ``model.sanitize`` (idempotent: a converted folder's MLX-layout
    tensors pass unchanged); a converted folder's quantized skeleton is built first, from its
    record. Every key and shape is checked; only parameters for which ``resident(key)`` is
    true (all, by default) are read. The others stay lazy: a :class:`WeightStream` reads them.
    """
    quantize_skeleton(model, conversion_record(component_dir))
    weights = read_component(component_dir, model.sanitize, dtype)
    load_strict(model, weights, str(component_dir))
    del weights
    for key, param in tree_flatten(model.parameters()):
        if resident is None or resident(key):
            # One tensor at a time: each lazily loaded fp8 tensor is freed once dequantized.
            mx.eval(param)
    return model


def read_component(component_dir: Path | str, sanitize: Sanitize, dtype: mx.Dtype) -> dict:
    """All parameters of a component folder, sanitized, as lazy arrays (nothing is read until
    evaluated)."""
    weights = load_safetensors(component_files(component_dir))
    return cast_floats(sanitize(weights), dtype)


class WeightStream:
    """Parameters read from disk each time a pass needs them, for ``--low-memory``.

    :meth:`take` hands out fresh lazy arrays for one key prefix; once the caller has evaluated
    with them and dropped them, their memory is free again. Costs one read of the streamed
    bytes per pass (the OS file cache usually serves repeats).
    """

    def __init__(self, component_dir: Path | str, sanitize: Sanitize, dtype: mx.Dtype):
        self.component_dir = Path(component_dir)
        self.sanitize = sanitize
        self.dtype = dtype
        self.pending: dict[str, mx.array] = {}

    def open(self) -> None:
        """Start a pass: (re)create the lazy arrays."""
        self.pending = read_component(self.component_dir, self.sanitize, self.dtype)

    def take(self, prefix: str) -> dict:
        """The parameter tree under ``prefix``, removed from the pass (only the caller holds it)."""
        keys = [k for k in self.pending if k.startswith(prefix)]
        return tree_unflatten([(k[len(prefix) :], self.pending.pop(k)) for k in keys])
