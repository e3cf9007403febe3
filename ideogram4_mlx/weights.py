"""Reading checkpoint files and loading them: safetensors, fp8 dequantization, strict loading.

One loader serves every component (:func:`load_component`): raw snapshots and converted folders
alike go through the model's own ``sanitize`` (idempotent, so converted weights pass unchanged),
and a converted folder's quantized skeleton is rebuilt from its ``mlx_conversion`` record first.

The fp8 layout (MODEL_NOTES#fp8-dequantization): every quantized ``nn.Linear`` stores
``<name>.weight`` as F8_E4M3 ``(out, in)`` and ``<name>.weight_scale`` as F32 ``(out,)``.
``mx.load`` reads F8_E4M3 as uint8.

Before anything is built or read, the headers are checked: every file lies inside its component
folder, config.json agrees with the tensors (:func:`checked_config`) and every tensor has the
dtype of its layout (:func:`check_raw_dtypes`, :func:`check_converted_dtypes`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from safetensors import SafetensorError, safe_open

from ideogram4_mlx.config import CheckpointError, Config, json_kind, read_json
from ideogram4_mlx.errors import InputError
from ideogram4_mlx.quantization import RECORD_KEY, RECORD_VERSION, check_record, quantize_skeleton
from ideogram4_mlx.sources import Headers, decoded_keys, detect

FP8_DTYPE = "F8_E4M3"
SCALE_SUFFIX = ".weight_scale"
INDEX_SUFFIX = ".safetensors.index.json"
QUANTIZED_DTYPE = "U32"  # the packed weight of a quantized layer
# The scales of MLX's float quantization modes: e8m0 (mxfp4, mxfp8) or e4m3 (nvfp4) bytes
# (MODEL_NOTES#mlx-quantization-modes).
FLOAT_MODE_SCALES_DTYPE = "U8"
# The safetensors dtype of each dtype name a conversion record may hold.
SAFETENSORS_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
# What a format's dequantized weights may be (``ideogram4_mlx.sources``).
DEQUANTIZED_DTYPES = ("F32", "BF16", "F16")
# A model's ``sanitize``: checkpoint tensors -> its parameters (pure, idempotent).
Sanitize = Callable[[dict[str, mx.array]], dict[str, mx.array]]


@dataclass(frozen=True)
class DtypeRule:
    """The safetensors dtypes a model's raw snapshot files may hold (MODEL_NOTES#checkpoint)."""

    floats: tuple[str, ...] = ("BF16",)  # every tensor but fp8 weights and their scales
    fp8: bool = True  # a ``.weight`` may be F8_E4M3 next to an F32 ``.weight_scale``
    skip: tuple[str, ...] = ()  # key prefixes nobody reads as parameters (checked elsewhere)


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


def tensor_headers(files: list[Path]) -> dict[str, tuple[str, tuple[int, ...], Path]]:
    """``{key: (dtype, shape, file)}`` over all files of a component, from the headers only."""
    return {
        key: (dtype, shape, path)
        for path in files
        for key, (dtype, shape) in read_header(path).items()
    }


def component_files(component_dir: Path) -> list[Path]:
    """The safetensors files of one component folder: an index's shards, or the single file.

    Each must resolve (links followed) inside the folder: an index cannot point elsewhere.
    """
    component_dir = Path(component_dir)
    indexes = sorted(component_dir.glob(f"*{INDEX_SUFFIX}"))
    if indexes:
        source = f"{indexes[0]}: weight_map entry"
        return [
            inside(component_dir, name, f"{source} {name!r}") for name in index_shards(indexes[0])
        ]
    files = sorted(component_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{component_dir}: no .safetensors file found")
    return [inside(component_dir, path.name, str(path)) for path in files]


def index_shards(index: Path) -> list[str]:
    """The shard file names of a safetensors index, checked to be a map of strings."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(
            f"{index}: weight_map must be an object mapping tensor names to shard files, "
            f"found {json_kind(weight_map)}; restore the index from the original checkpoint"
        )
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise CheckpointError(
                f"{index}: weight_map[{key!r}] is {name!r}, expected a shard file name; "
                "restore the index from the original checkpoint"
            )
    return sorted(set(weight_map.values()))


def inside(component_dir: Path, name: str, source: str) -> Path:
    """``component_dir / name``, which must name a file in the folder and, links followed, land
    there too; else a ``CheckpointError`` starting with ``source``."""
    path = component_dir / name
    try:
        target = path.resolve()
        roots = allowed_roots(component_dir)
    except (OSError, RuntimeError, ValueError) as e:  # link loops, NUL bytes
        raise CheckpointError(f"{source}: cannot be resolved ({e})") from None
    relative = Path(name)
    if (
        relative.is_absolute()
        or ".." in relative.parts
        or not any(target.is_relative_to(root) for root in roots)
    ):
        raise CheckpointError(
            f"{source} resolves to {target}, outside {roots[0]}; weight files must be inside "
            "their component folder (copy the file there)"
        )
    return path


def allowed_roots(component_dir: Path) -> list[Path]:
    """Where the files of a component folder may really live: the folder itself, and the
    ``blobs/`` of a Hugging Face cache snapshot, whose files are all links into it
    (``models--org--name/snapshots/<rev>/<component>/x -> ../../../blobs/<hash>``)."""
    root = component_dir.resolve()
    for parent in root.parents:
        if parent.name == "snapshots" and (parent.parent / "blobs").is_dir():
            return [root, (parent.parent / "blobs").resolve()]
    return [root]


def check_fp8_pair(key: str, tensors: dict, path: Path) -> None:
    """An F8_E4M3 tensor must be a ``.weight`` with a ``.weight_scale`` partner
    (MODEL_NOTES#fp8-dequantization)."""
    if not key.endswith(".weight"):
        raise CheckpointError(f"{path}: unexpected fp8 tensor {key} (only .weight may be fp8)")
    scale_key = key[: -len(".weight")] + SCALE_SUFFIX
    if scale_key not in tensors:
        raise CheckpointError(f"{path}: fp8 tensor {key} has no {scale_key}")


def source_headers(files: list[Path]) -> dict[str, tuple[str, tuple[int, ...], Path]]:
    """:func:`tensor_headers` as the weights will be once loaded: a checkpoint in another
    format (nf4, a Comfy repack; ``ideogram4_mlx.sources``) is checked and its quantized
    groups stand as the float ``X.weight`` they decode to (MODEL_NOTES#checkpoint-formats)."""
    headers = tensor_headers(files)
    found = detect(headers)
    return headers if found is None else found.decoded_headers(headers)


def load_safetensors(files: list[Path]) -> dict[str, mx.array]:
    """Load tensors (lazily, as ``mx.load`` does) from one or more files, checking the fp8 pairs.

    F8_E4M3 tensors come back as uint8 and must have a ``.weight_scale`` partner. A checkpoint
    in another format is decoded to float weights, lazily (``ideogram4_mlx.sources``).
    """
    tensors = tensor_headers(files)
    found = detect(tensors)
    if found is None:
        for key, (dtype, _, path) in tensors.items():
            if dtype == FP8_DTYPE:
                check_fp8_pair(key, tensors, path)
    else:
        found.decoded_headers(tensors)  # every format tensor checked before any is read
    weights: dict[str, mx.array] = {}
    for path in files:
        try:
            weights.update(mx.load(str(path)))
        except (RuntimeError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot be read ({e}); the file may be truncated") from e
    return weights if found is None else found.decode(weights)


def check_raw_dtypes(files: list[Path], rule: DtypeRule) -> dict[str, Path]:
    """Every tensor of a raw snapshot has its layout's dtype (headers only): fp8 only as a
    ``.weight`` with an F32 ``.weight_scale``, every other tensor one of ``rule.floats``.

    A retagged tensor (BF16 bits labelled F16 or I16) would load as garbage, so it is an error
    naming the file and key. A checkpoint in another format is checked by its format, and the
    weights it dequantizes may be F32, BF16 or F16 (``ideogram4_mlx.sources``).
    Returns ``{key: file}``.
    """
    raw = tensor_headers(files)
    found = detect(raw)
    tensors = raw if found is None else found.decoded_headers(raw)
    dequantized = set() if found is None else decoded_keys(raw, tensors)
    for key, (dtype, _, path) in tensors.items():
        if key.startswith(rule.skip):
            continue
        if key in dequantized:
            if dtype not in DEQUANTIZED_DTYPES:
                raise CheckpointError(
                    f"{path}: {key} decodes to {dtype}, expected one of {DEQUANTIZED_DTYPES}"
                )
            continue
        if rule.fp8 and key.endswith(SCALE_SUFFIX):
            allowed = ("F32",)
            weight_key = key[: -len(SCALE_SUFFIX)] + ".weight"
            found = tensors.get(weight_key, ("missing",))[0]
            if found != FP8_DTYPE:
                raise CheckpointError(
                    f"{path}: {key} scales no fp8 tensor ({weight_key} is {found}, "
                    f"expected {FP8_DTYPE})"
                )
        elif rule.fp8 and key.endswith(".weight"):
            allowed = (FP8_DTYPE, *rule.floats)
        else:
            allowed = rule.floats
        if dtype not in allowed:
            raise CheckpointError(
                f"{path}: {key} has dtype {dtype}, expected {' or '.join(allowed)}"
            )
        if dtype == FP8_DTYPE:
            check_fp8_pair(key, tensors, path)
    return {key: path for key, (_, _, path) in tensors.items()}


def check_converted_dtypes(files: list[Path], model: nn.Module, record: dict) -> None:
    """Every parameter of a converted folder has the dtype its ``mlx_conversion`` record says:
    quantized weights U32, the scales of a float mode (mxfp4, mxfp8, nvfp4) U8, every other
    parameter (affine scales and biases too) the record's float dtype. ``model`` is the
    skeleton already quantized from the record; other keys (bn buffers, or unexpected ones
    ``load_strict`` names) are not checked here."""
    stored = {mx.uint32: QUANTIZED_DTYPE, mx.uint8: FLOAT_MODE_SCALES_DTYPE}
    float_dtype = SAFETENSORS_DTYPES[record["dtype"]]
    expected = {k: stored.get(v.dtype, float_dtype) for k, v in tree_flatten(model.parameters())}
    for key, (dtype, _, path) in tensor_headers(files).items():
        if key in expected and dtype != expected[key]:
            raise CheckpointError(
                f"{path}: {key} has dtype {dtype}, expected {expected[key]} (the dtype its "
                f"config.json's {RECORD_KEY} records); convert the checkpoint again"
            )


def checked_config(
    config_class: type[Config], component_dir: Path | str, headers: Headers | None = None
) -> Config:
    """A component folder's ``config.json`` as ``config_class``, checked (before any model is
    built) against the tensors its weight files hold: see :func:`check_config_against_files`.

    ``headers``: the tensors of a single-file source (a GGUF or Comfy DiT) instead of the
    folder's files; without a ``config.json`` in ``component_dir`` the config's defaults (the
    real model's) are checked against them.
    """
    component_dir = Path(component_dir)
    path = component_dir / "config.json"
    if headers is None:
        config = config_class.from_file(path)
        headers = source_headers(component_files(component_dir))
    else:
        config = config_class.from_file(path) if path.is_file() else config_class()
    check_config_against_files(config, headers, path)
    return config


def check_config_against_files(config, headers: Headers, config_path: Path) -> None:
    """The layer count and key widths of ``config`` (its ``header_checks()``) against the
    tensors of ``headers`` (``source_headers``: decoded, read from the headers only), so that a
    config that does not describe these weights fails before a model of its size is built.
    Keys lose the config's ``weight_prefixes``."""
    tensors = {
        key: (shape, path)
        for key, (_, shape, path) in strip_prefixes(headers, config.weight_prefixes).items()
    }
    for check in config.header_checks():
        if check.key.endswith("."):
            held = layer_count(tensors, check.key)
            if held != check.value:
                span = f"{check.key}0 to {check.key}{held - 1}" if held else f"no {check.key}N"
                raise CheckpointError(
                    f"{config_path}: {check.field} is {check.value}, but the weight files hold "
                    f"{held} ({span}); fix config.json or use the weights it came with"
                )
            continue
        if check.key not in tensors:
            raise CheckpointError(
                f"{config_path.parent}: {check.key} is missing from the weight files "
                f"(config.json's {check.field} is checked against it)"
            )
        shape, path = tensors[check.key]
        held = shape[check.axis] if len(shape) > check.axis else None
        if held != check.value:
            raise CheckpointError(
                f"{config_path}: {check.field} is {check.value}, but {path.name} holds "
                f"{check.key} of shape {shape} ({held} at axis {check.axis}); fix config.json "
                "or use the weights it came with"
            )


def layer_count(keys, prefix: str) -> int:
    """1 + the highest N among keys ``{prefix}N.*`` (0 when there are none)."""
    indices = [k[len(prefix) :].partition(".")[0] for k in keys if k.startswith(prefix)]
    return 1 + max((int(i) for i in indices if i.isdecimal()), default=-1)


def dequantize_fp8(weight: mx.array, scale: mx.array) -> mx.array:
    """``bf16(bf16(w8) * bf16(scale)[:, None])``: the reference rounding
    (MODEL_NOTES#fp8-dequantization).

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
    if record is None:
        return None
    version = record.get("version", 0) if isinstance(record, dict) else None
    if isinstance(version, int) and version > RECORD_VERSION:
        raise CheckpointError(
            f"{path}: converted with format version {version}, this version reads "
            f"up to {RECORD_VERSION}; upgrade ideogram4_mlx or convert again"
        )
    dtype = record.get("dtype") if isinstance(record, dict) else None
    if not (isinstance(version, int) and isinstance(dtype, str) and dtype in SAFETENSORS_DTYPES):
        raise CheckpointError(
            f"{path}: {RECORD_KEY} is damaged (expected an object with an integer version and "
            f"a dtype in {list(SAFETENSORS_DTYPES)}); convert the checkpoint again"
        )
    try:
        check_record(record.get("quantization"))
    except ValueError as e:
        raise CheckpointError(
            f"{path}: {RECORD_KEY} is damaged ({e}); convert the checkpoint again"
        ) from None
    return record


def quantized_skeleton(model: nn.Module, component_dir: Path | str) -> dict | None:
    """``model`` with the layers the folder's conversion quantized swapped in (in place); the
    folder's record, None for a raw snapshot. A record the model's widths refuse is damaged."""
    record = conversion_record(component_dir)
    try:
        quantize_skeleton(model, record)
    except InputError as e:
        raise CheckpointError(
            f"{Path(component_dir) / 'config.json'}: {RECORD_KEY} is damaged ({e}); convert the "
            "checkpoint again"
        ) from None
    return record


def placeholders(headers: Headers) -> dict[str, mx.array]:
    """Lazy zeros of every decoded tensor's shape (fp8 and byte tensors as uint8): what
    ``sanitize`` and the key checks run on before anything is read (never evaluated)."""
    return {
        k: mx.zeros(shape, mx.uint8 if dtype in ("F8_E4M3", "U8") else mx.float32)
        for k, (dtype, shape, _) in headers.items()
    }


def sanitized(model: nn.Module, weights: dict[str, mx.array], where: Path) -> dict:
    """``model.sanitize`` with the source named in its errors."""
    try:
        return model.sanitize(weights)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None


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
    record. Every dtype (raw: ``model.dtype_rule``; converted: the record), key and shape is
    checked; only parameters for which ``resident(key)`` is true (all, by default) are read.
    The others stay lazy: a :class:`WeightStream` reads them.
    """
    record = quantized_skeleton(model, component_dir)
    files = component_files(component_dir)
    if record is None:
        check_raw_dtypes(files, model.dtype_rule)
    else:
        check_converted_dtypes(files, model, record)
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


# What fingerprint() reads of each weight file's tensor data: its first and last MiB.
FINGERPRINT_SAMPLE = 1 << 20


def fingerprint(component_dir: Path | str) -> str:
    """A SHA-256 identifying a component folder's weights without reading them all: its
    ``config.json`` and, per weight file, its name, size, safetensors header and the first and
    last MiB of its data. Tells one DiT from another (another seed, fine-tune or conversion
    changes those bytes), not a guard against deliberate tampering. A single DiT file
    (``dit_file``; a GGUF file has no safetensors header): its name, size and first and last
    MiB."""
    component_dir = Path(component_dir)
    if component_dir.is_file():
        return file_fingerprint(component_dir)
    digest = hashlib.sha256((component_dir / "config.json").read_bytes())
    for path in component_files(component_dir):
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with path.open("rb") as f:
            header = int.from_bytes(f.read(8), "little")
            digest.update(f.read(min(size, header + FINGERPRINT_SAMPLE)))
            f.seek(max(8 + header, size - FINGERPRINT_SAMPLE))
            digest.update(f.read())
    return digest.hexdigest()


def file_fingerprint(path: Path) -> str:
    """:func:`fingerprint` of one weight file: its name, size, first and last MiB."""
    size = path.stat().st_size
    digest = hashlib.sha256(f"{path.name}\0{size}\0".encode())
    with path.open("rb") as f:
        digest.update(f.read(FINGERPRINT_SAMPLE))
        f.seek(max(0, size - FINGERPRINT_SAMPLE))
        digest.update(f.read())
    return digest.hexdigest()
