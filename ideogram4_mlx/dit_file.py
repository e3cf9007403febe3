"""A DiT given as one file, loaded as it is: a GGUF file or a single safetensors file (a Comfy
repack, the official fp8 ``transformer/`` file alone), no ``convert`` first
(MODEL_NOTES#direct-dit-files).

The file holds weights only: the config is the checkpoint's (``transformer/config.json``, or
``unconditional_transformer/config.json`` for an unconditional DiT), checked against the file's
headers before anything is built (``weights.checked_config``). A safetensors file loads as a
folder's would (decoded lazily by its format, ``ideogram4_mlx.sources``). A GGUF file loads one
DiT block at a time: every linear whose ggml type MLX's affine quantization holds exactly in the
load dtype (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1; in float32 also Q4_K, Q5_K: ``sources.keep``) becomes
a ``QuantizedLinear`` with the file's codes, scales and biases, untouched; every other tensor is
the ``gguf`` package's dequantization cast to the load dtype. That is what
``convert --quantize keep --dtype D`` writes, so both load the same numbers.

Everything that takes a DiT folder takes such a file through the functions here, which hand a
folder on to the folder's own code: :func:`build_dit`, :func:`load_dit`, :func:`dit_quantization`,
:func:`file_sizes` (the memory plan's bytes). Streaming blocks (``--low-memory``,
``resident_blocks``) re-reads a block from the file each pass, like a folder's
``WeightStream``.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ideogram4_mlx.config import CheckpointError
from ideogram4_mlx.dtypes import dtype_name
from ideogram4_mlx.errors import InputError
from ideogram4_mlx.quantization import quantize_skeleton
from ideogram4_mlx.sources import BLOCK, Headers, block_groups
from ideogram4_mlx.sources.keep import keep_plan, kept_among, kept_tensors
from ideogram4_mlx.transformer import (
    CHECKPOINT_PREFIXES,
    DIT_COMPONENTS,
    TEXT_INPUT_MODULES,
    Ideogram4Transformer,
    block_index,
    check_swappable,
    resident_block_count,
)
from ideogram4_mlx.weights import (
    cast_floats,
    check_raw_dtypes,
    conversion_record,
    load_safetensors,
    placeholders,
    sanitized,
    source_headers,
    tensor_headers,
)

SUFFIXES = (".gguf", ".safetensors")
# The tensor every full DiT holds (stable-diffusion.cpp tells Ideogram 4 by it), which no
# delta or LoRA file has: a single file with it is a whole DiT (``--uncond FILE``).
MARKER = "embed_image_indicator.weight"
# The dtypes whose scales hold a GGUF block's exactly (``GGUFSource.exact_spec``); in another
# load dtype (bfloat16) every tensor is dequantized.
KEPT_SCALES = ("float16", "float32")


def is_dit_file(source: str | Path) -> bool:
    """Whether ``source`` names a single DiT weight file (not a folder nor a repo id)."""
    path = Path(source).expanduser()
    return path.is_file() and path.suffix in SUFFIXES


def is_full_dit_file(source: str | Path) -> bool:
    """Whether ``source`` is a whole DiT in one file (a GGUF file, or safetensors holding the
    DiT's ``embed_image_indicator``), as opposed to a delta or LoRA file (low-rank pairs)."""
    path = Path(source).expanduser()
    if not is_dit_file(path):
        return False
    if path.suffix == ".gguf":
        return True
    keys = {strip(k) for k in tensor_headers([path])}
    return MARKER in keys


def strip(key: str) -> str:
    for prefix in CHECKPOINT_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def config_dir(checkpoint_dir: Path, name: str) -> Path:
    """The folder whose ``config.json`` a file standing for DiT ``name`` is read with: the
    checkpoint's own ``name/``, or its ``transformer/`` (both DiTs share the architecture)."""
    own = Path(checkpoint_dir) / name
    return own if (own / "config.json").is_file() else Path(checkpoint_dir) / DIT_COMPONENTS[0][0]


class DiTFile:
    """One DiT file with the config folder it is read with. ``reader``: a GGUF file's
    ``GGUFSource``; None for safetensors (decoded by ``weights.load_safetensors``)."""

    def __init__(self, path: Path | str, config_folder: Path | str):
        self.path = Path(path).expanduser()
        self.config_folder = Path(config_folder)
        if not self.path.is_file() or self.path.suffix not in SUFFIXES:
            raise InputError(
                f"{self.path}: not a DiT file (expected a .gguf or .safetensors file, a DiT "
                "folder or a checkpoint folder)"
            )
        self.reader = None
        self.quantizations: dict[str, dict | None] = {}  # file_quantization's, by dtype name
        if self.path.suffix == ".gguf":
            from ideogram4_mlx.sources.gguf_file import GGUFSource  # the gguf package, lazily

            self.reader = GGUFSource(self.path)
        elif MARKER not in {strip(k) for k in tensor_headers([self.path])}:
            raise CheckpointError(
                f"{self.path}: holds no {MARKER}, so it is not a whole Ideogram 4 DiT (a LoRA "
                "or delta file? those go to --lora / --uncond); give the DiT's .safetensors"
            )

    def __fspath__(self) -> str:  # where it is, for fingerprints and messages
        return str(self.path)

    def __repr__(self) -> str:
        return f"DiTFile({str(self.path)!r})"

    @functools.cached_property
    def headers(self) -> Headers:
        """Decoded headers: what loading produces, keys as in the file."""
        return self.reader.headers() if self.reader is not None else source_headers([self.path])

    def build(self) -> Ideogram4Transformer:
        """The float skeleton, its config checked against the file's headers."""
        return Ideogram4Transformer.build(self.config_folder, self.headers)

    def plan(self, model: nn.Module, dtype: mx.Dtype) -> tuple[dict | None, dict]:
        """The kept layers' quantization and ``{weight key: source keys}`` (GGUF in a dtype
        that holds the file's scales: ``KEPT_SCALES``), else ``(None, {})``."""
        name = dtype_name(dtype)
        if self.reader is None or name not in KEPT_SCALES:
            return None, {}
        return keep_plan(model, self.reader, name)

    def skeleton(self, dtype: mx.Dtype) -> tuple[Ideogram4Transformer, dict]:
        """The skeleton its keys and shapes are checked on, then quantized as kept layers need."""
        model = self.build()
        check_keys(model, placeholders(self.headers), self.path)
        plan, kept = self.plan(model, dtype)
        quantize_skeleton(model, {"quantization": plan})
        return model, kept

    def weights(self, keys: list[str], model, kept: dict, dtype: mx.Dtype) -> dict:
        """The parameters made from the source ``keys`` (one block's), read now from a GGUF
        file: kept layers as the file stores them, the rest dequantized and cast."""
        copied, taken = kept_among(kept, keys)
        weights = cast_floats(
            sanitized(model, self.reader.load(sorted(set(keys) - taken)), self.path), dtype
        )
        for key in sorted(copied):
            weights.update(kept_tensors(key, copied[key], self.reader, dtype))
        return weights

    def lazy(self, model, dtype: mx.Dtype) -> dict:
        """Every parameter of a safetensors file, lazily (read when evaluated)."""
        return cast_floats(sanitized(model, load_safetensors([self.path]), self.path), dtype)


def check_keys(model: nn.Module, tensors: dict, path: Path) -> None:
    """The file's tensors, sanitized, against the float skeleton: every parameter present with
    its shape, nothing else (before anything is read)."""
    expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
    found = sanitized(model, tensors, path)
    for key in sorted(expected):
        if key not in found:
            raise CheckpointError(
                f"{path}: {key} is missing (the checkpoint's config.json expects shape "
                f"{tuple(expected[key])}); give a whole DiT file of this checkpoint's model"
            )
    for key in sorted(found):
        if key not in expected:
            raise CheckpointError(
                f"{path}: unexpected tensor {key} (the DiT has no such parameter); give a "
                "DiT file of this checkpoint's model"
            )
        if tuple(found[key].shape) != tuple(expected[key]):
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(found[key].shape)}, the checkpoint's "
                f"config.json expects {tuple(expected[key])}"
            )


def fill(model: nn.Module, weights: dict, path: Path) -> None:
    """Load ``weights`` (some of the parameters) into ``model``, each checked against the
    skeleton's shape and dtype kind, and evaluate them."""
    params = dict(tree_flatten(model.parameters()))
    for key, value in weights.items():
        if key not in params or value.shape != params[key].shape:
            raise CheckpointError(f"{path}: {key} does not fit the skeleton (a bug: report it)")
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(list(weights.values()))


class FileStream:
    """``WeightStream`` for a file: ``take(prefix)`` reads one block's parameters now (GGUF:
    read and dequantized; safetensors: lazy arrays of a fresh ``mx.load``)."""

    def __init__(self, dit: DiTFile, model, kept: dict, dtype: mx.Dtype):
        self.dit, self.model, self.kept, self.dtype = dit, model, kept, dtype
        self.pending: dict = {}

    def open(self) -> None:
        if self.dit.reader is None:
            self.pending = self.dit.lazy(self.model, self.dtype)

    def take(self, prefix: str) -> dict:
        if self.dit.reader is None:
            keys = [k for k in self.pending if k.startswith(prefix)]
            items = [(k[len(prefix) :], self.pending.pop(k)) for k in keys]
        else:
            source = [k for k in self.dit.headers if strip(k).startswith(prefix)]
            found = self.dit.weights(source, self.model, self.kept, self.dtype)
            items = [(k[len(prefix) :], v) for k, v in found.items() if k.startswith(prefix)]
        return tree_unflatten(items)


def load_file(
    dit: DiTFile,
    dtype: mx.Dtype,
    text_input: bool = True,
    resident_blocks: int | None = None,
    low_memory: bool = False,
) -> Ideogram4Transformer:
    """The DiT of ``dit``, as ``Ideogram4Transformer.from_pretrained`` loads a folder: the
    first ``resident_blocks`` blocks resident (None: all), the others streamed from the file;
    ``text_input=False``: the text projection is not read."""
    model, kept = dit.skeleton(dtype)
    model.resident_blocks = resident_block_count(resident_blocks, low_memory, len(model.layers))

    def wanted(key: str) -> bool:  # a parameter key (sanitized)
        if not text_input and key.startswith(TEXT_INPUT_MODULES):
            return False
        index = block_index(key)
        return index is None or index < model.resident_blocks

    if dit.reader is None:
        if dit.path.suffix == ".safetensors":
            check_raw_dtypes([dit.path], model.dtype_rule)
        weights = dit.lazy(model, dtype)
        fill(model, {k: v for k, v in weights.items() if wanted(k)}, dit.path)
        del weights
    else:
        for keys in block_groups(dit.headers):
            match = BLOCK.search(strip(keys[0]))
            if match is not None and int(match.group(1)) >= model.resident_blocks:
                continue
            if match is None:  # outside the blocks: the text projection only if it is read
                keys = [
                    k for k in keys if text_input or not strip(k).startswith(TEXT_INPUT_MODULES)
                ]
            found = dit.weights(keys, model, kept, dtype)
            fill(model, {k: v for k, v in found.items() if wanted(k)}, dit.path)
    if not text_input:
        model.llm_cond_norm = model.llm_cond_proj = None
    if model.streamed_blocks:
        model.stream_from(FileStream(dit, model, kept, dtype))
    return model


# -- a folder or a file: what the pipeline, the memory plan and the LoRA checks call ----------


def as_source(source: Path | DiTFile) -> Path | DiTFile:
    return source if isinstance(source, DiTFile) else Path(source)


def build_dit(source: Path | DiTFile) -> Ideogram4Transformer:
    """The float skeleton of a DiT folder or file (``Ideogram4Transformer.build``)."""
    source = as_source(source)
    return source.build() if isinstance(source, DiTFile) else Ideogram4Transformer.build(source)


def load_dit(
    source: Path | DiTFile,
    dtype: mx.Dtype,
    text_input: bool = True,
    resident_blocks: int | None = None,
) -> Ideogram4Transformer:
    """``Ideogram4Transformer.from_pretrained`` for a folder, :func:`load_file` for a file."""
    source = as_source(source)
    if isinstance(source, DiTFile):
        return load_file(source, dtype, text_input, resident_blocks)
    return Ideogram4Transformer.from_pretrained(
        source, dtype, text_input=text_input, resident_blocks=resident_blocks
    )


def file_quantization(dit: DiTFile, dtype: mx.Dtype) -> dict | None:
    """The quantization a file's DiT loads with in ``dtype`` (a GGUF file's kept layers, as
    ``convert --quantize keep`` records it); None when every weight loads in float. Warns when
    the file has such layers but ``dtype`` (bfloat16) cannot keep them (once per dtype)."""
    name = dtype_name(dtype)
    if name in dit.quantizations:
        return dit.quantizations[name]
    model = dit.build()
    plan = dit.quantizations[name] = dit.plan(model, dtype)[0]
    if plan is None and dit.reader is not None and keep_plan(model, dit.reader, "float16")[0]:
        warnings.warn(
            f"{dit.path.name}: its Q8_0/Q4_0/... layers load dequantized in {dtype_name(dtype)} "
            "(bfloat16 scales do not hold the file's fp16 ones, and other scales would turn the "
            "activations to float32): --dtype float16 (or float32) keeps them as they are",
            stacklevel=5,  # load()'s caller
        )
    return plan


def file_sizes(dit: DiTFile, dtype: mx.Dtype, text_input: bool = True) -> tuple:
    """``(resident, blocks, transient, config)`` bytes of a file's DiT as :func:`load_file`
    holds it in ``dtype`` (``memory.DiTSizes``' fields): the quantized skeleton's parameters
    (kept layers packed as stored, the rest in ``dtype``); a block's transient bytes are its
    float32 dequantization (GGUF) or none."""
    model, _ = dit.skeleton(dtype)
    resident, blocks, transient = 0, [0] * len(model.layers), [0] * len(model.layers)
    for key, value in tree_flatten(model.parameters()):
        if not text_input and key.startswith(TEXT_INPUT_MODULES):
            continue
        floating = mx.issubdtype(value.dtype, mx.floating)
        held = value.size * (dtype.size if floating else value.itemsize)
        index = block_index(key)
        if index is None:
            resident += held
            continue
        blocks[index] += held
        if dit.reader is not None and floating:
            transient[index] += value.size * 4
    return resident, tuple(blocks), max(transient, default=0), model.config


def dit_source(path: Path | None, checkpoint_dir: Path, name: str = DIT_COMPONENTS[0][0]):
    """A resolved ``--transformer`` (or ``--uncond FILE``) as the pipeline holds it: a file as a
    :class:`DiTFile` read with the checkpoint's config for DiT ``name``, a folder as it is."""
    if path is None or not Path(path).expanduser().is_file():
        return path
    return DiTFile(path, config_dir(checkpoint_dir, name))


def check_dit(source, checkpoint_dir: Path) -> None:
    """Before any weights load: a swapped-in DiT folder's config against the checkpoint's
    (``check_swappable``); a file's headers against the checkpoint's config and its tensors'
    keys and shapes against the model (``CheckpointError`` naming the key)."""
    if isinstance(source, DiTFile):
        check_keys(source.build(), placeholders(source.headers), source.path)
    else:
        check_swappable(source, Path(checkpoint_dir) / DIT_COMPONENTS[0][0])


def dit_quantization(source, dtype: mx.Dtype) -> dict | None:
    """What a DiT loads quantized with: a converted folder's recorded quantization, a file's
    kept layers (:func:`file_quantization`); None for float weights."""
    if isinstance(source, DiTFile):
        return file_quantization(source, dtype)
    record = dit_record(source)
    return None if record is None else record.get("quantization")


def dit_record(source) -> dict | None:
    """The ``mlx_conversion`` record of a DiT folder; None for a file, a raw snapshot or a
    folder the checkpoint lacks."""
    if isinstance(source, DiTFile) or not (Path(source) / "config.json").is_file():
        return None
    return conversion_record(source)
