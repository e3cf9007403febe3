"""A synthetic checkpoint in the bitsandbytes 4-bit layouts (MODEL_NOTES#nf4-layout).

Made from a synthetic fp8 snapshot (``write_synthetic_checkpoint``): every fp8 linear is
dequantized exactly (``dequantize_fp8``) and quantized again as bitsandbytes' ``quantize_4bit``
does (nf4, blocksize 64, absmax per block, the nearest code, ties to the lower one), one layer at
a time, so even the full-size DiT is written in bounded memory. Other tensors are copied bit for
bit; ``vae/``, ``tokenizer/``, ``scheduler/`` and ``model_index.json`` are copied.

    write_nf4_checkpoint(fp8_dir, dst, naming="split", layout="nf4")

``naming``: the DiTs' attention as ``to_q/to_k/to_v/to_out.0`` (the repos today) or as the fused
``qkv``/``o`` of older ``ideogram-4-nf4`` snapshots. ``layout``: ``"nf4"`` writes one file a
component; ``"nf4-diffusers"`` writes the DiTs and the text encoder as two shards and an index,
as diffusers' and transformers' ``save_pretrained`` do past their shard size.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ideogram4_mlx.errors import InputError
from ideogram4_mlx.files import check_destination, write_folder
from ideogram4_mlx.synth.writer import header_bytes
from ideogram4_mlx.weights import (
    FP8_DTYPE,
    SCALE_SUFFIX,
    component_files,
    dequantize_fp8,
    tensor_headers,
)

NAMINGS = ("split", "fused")
LAYOUTS = ("nf4", "nf4-diffusers")
BLOCKSIZE = 64
DIT_FOLDERS = ("transformer", "unconditional_transformer")
QUANTIZED_FOLDERS = (*DIT_FOLDERS, "text_encoder")
COPIED = ("vae", "tokenizer", "scheduler", "model_index.json")
KIND = "a synthetic nf4 checkpoint"
# What BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
# bnb_4bit_compute_dtype=torch.bfloat16).to_dict() gives in diffusers 0.42 and transformers 5
# (the same keys in both; tests/test_nf4.py checks it against both libraries).
QUANTIZATION_CONFIG = {
    "_load_in_4bit": True,
    "_load_in_8bit": False,
    "bnb_4bit_compute_dtype": "bfloat16",
    "bnb_4bit_quant_storage": "uint8",
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": False,
    "llm_int8_enable_fp32_cpu_offload": False,
    "llm_int8_has_fp16_weight": False,
    "llm_int8_skip_modules": None,
    "llm_int8_threshold": 6.0,
    "load_in_4bit": True,
    "load_in_8bit": False,
    "quant_method": "bitsandbytes",
}
NF4_TABLE = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
     -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
     0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
     0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0],
    dtype=np.float32,
)  # fmt: skip
# bitsandbytes' quantize_4bit (backends/default/ops.py): bucketize on the midpoints.
NF4_MIDPOINTS = (NF4_TABLE[:-1] + NF4_TABLE[1:]) / np.float32(2)
TINY = np.float32(1e-38)  # its clamp of an all-zero block's absmax
CHUNK_VALUES = 1 << 22  # values dequantized and quantized at once
NUMPY_DTYPES = {"U8": np.uint8, "F32": np.float32, "BF16": np.uint16, "I64": np.int64}


def quantize_nf4(w: np.ndarray, blocksize: int = BLOCKSIZE) -> tuple[np.ndarray, np.ndarray]:
    """``w`` (any shape, float32 values) -> (packed uint8 ``(ceil(n/2), 1)``, float32 absmax
    ``(ceil(n/blocksize),)``), bit for bit what bitsandbytes' ``quantize_4bit`` returns."""
    flat = np.ascontiguousarray(w, dtype=np.float32).reshape(-1)
    n = flat.size
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = np.abs(blocks).max(axis=1) if full else np.zeros(0, np.float32)
    scaled = np.clip(blocks * (np.float32(1) / np.maximum(absmax, TINY))[:, None], -1, 1)
    scaled = scaled.reshape(-1)
    if full < n:  # the short last block divides instead of multiplying by the reciprocal
        last = np.maximum(np.abs(flat[full:]).max(), TINY)
        absmax = np.append(absmax, last)
        scaled = np.concatenate([scaled, np.clip(flat[full:] / last, -1, 1)])
    if n % 2:
        scaled = np.append(scaled, np.float32(0))  # the pad nibble is the code of 0.0
    codes = np.searchsorted(NF4_MIDPOINTS, scaled, side="left").astype(np.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed.reshape(-1, 1), absmax.astype(np.float32)


def quant_state_bytes(shape: tuple[int, int], dtype: str = "bfloat16") -> bytes:
    """The JSON bitsandbytes packs into ``quant_state.bitsandbytes__nf4`` (json.dumps defaults)."""
    state = {"quant_type": "nf4", "blocksize": BLOCKSIZE, "dtype": dtype, "shape": list(shape)}
    return json.dumps(state).encode("utf-8")


@dataclass(frozen=True)
class Entry:
    """One tensor to write: its name, dtype, shape, and how to make its bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    make: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return (
            int(np.prod(self.shape, dtype=np.int64)) * np.dtype(NUMPY_DTYPES[self.dtype]).itemsize
        )


def write_nf4_checkpoint(
    src, dst, naming: str = "split", layout: str = "nf4", force: bool = False
) -> Path:
    """Write the nf4 layout of the synthetic fp8 snapshot ``src`` at ``dst``; return ``dst``."""
    if naming not in NAMINGS or layout not in LAYOUTS:
        raise InputError(
            f"naming {naming!r} / layout {layout!r}: expected one of {NAMINGS} / {LAYOUTS}"
        )
    src, dst = Path(src), Path(dst).expanduser()
    check_destination(dst, force, foreign_entry, KIND)
    with write_folder(dst, force, foreign_entry, KIND) as tmp:
        for name in COPIED:
            if (src / name).is_dir():
                shutil.copytree(src / name, tmp / name, symlinks=False)
            elif (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        for folder in QUANTIZED_FOLDERS:
            if (src / folder).is_dir():
                write_component(src / folder, tmp / folder, folder, naming, layout)
    return dst


def foreign_entry(dst: Path) -> str | None:
    """The first entry of ``dst`` that this writer would not have written, or None."""
    ours = {*COPIED, *QUANTIZED_FOLDERS}
    for entry in sorted(dst.iterdir()):
        if entry.is_symlink() or entry.name not in ours:
            return entry.name
    return None


def write_component(src: Path, dst: Path, folder: str, naming: str, layout: str) -> None:
    dst.mkdir(parents=True)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    config.pop("ideogram_fp8_weight_only", None)
    config["quantization_config"] = dict(QUANTIZATION_CONFIG)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    (dst / "config.json").write_text(text, encoding="utf-8")
    files = component_files(src)
    weights: dict[str, mx.array] = {}
    for path in files:
        weights.update(mx.load(str(path)))
    entries = list(
        plan(tensor_headers(files), weights, folder in DIT_FOLDERS and naming == "split")
    )
    stem = "diffusion_pytorch_model" if folder in DIT_FOLDERS else "model"
    if layout == "nf4":
        write_safetensors(dst / f"{stem}.safetensors", entries)
        return
    half = sum(e.nbytes for e in entries) // 2
    cut = next(i for i, total in enumerate(np.cumsum([e.nbytes for e in entries])) if total > half)
    shards = [entries[: max(cut, 1)], entries[max(cut, 1) :]]
    names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards, strict=True):
        write_safetensors(dst / name, shard)
    index = {
        "metadata": {"total_size": sum(e.nbytes for e in entries)},
        "weight_map": {
            e.name: name for name, shard in zip(names, shards, strict=True) for e in shard
        },
    }
    text = json.dumps(index, indent=2, sort_keys=True) + "\n"
    (dst / f"{stem}.safetensors.index.json").write_text(text, encoding="utf-8")


def plan(headers, weights: dict[str, mx.array], split: bool) -> Iterator[Entry]:
    """The output tensors of one component, in file order: each fp8 linear as a bitsandbytes
    group (the DiT's ``qkv`` as three when ``split``), everything else as it is."""
    for key in sorted(headers):
        dtype, shape, _ = headers[key]
        if key.endswith(SCALE_SUFFIX):
            continue
        if dtype != FP8_DTYPE:
            yield Entry(key, dtype, tuple(shape), lambda key=key: raw(weights.pop(key)))
            continue
        qkv = split and key.endswith(".attention.qkv.weight")
        layer = Layer(weights, key, 3 if qkv else 1)
        if qkv:
            rows = shape[0] // 3
            for i, name in enumerate(("to_q", "to_k", "to_v")):
                part = key.replace(".qkv.", f".{name}.")
                yield from group(part, (rows, shape[1]), layer, slice(i * rows, (i + 1) * rows))
        elif split and key.endswith(".attention.o.weight"):
            yield from group(key.replace(".o.", ".to_out.0."), tuple(shape), layer, slice(None))
        else:
            yield from group(key, tuple(shape), layer, slice(None))


class Layer:
    """One fp8 linear: a row slice dequantized and nf4-quantized when its packed codes are
    written, and dropped once its absmax is (so memory stays one layer's)."""

    def __init__(self, weights: dict[str, mx.array], key: str, slices: int):
        self.weights, self.key, self.left = weights, key, slices
        self.held: tuple[tuple, tuple[np.ndarray, np.ndarray]] | None = None

    def quantized(self, rows: slice) -> tuple[np.ndarray, np.ndarray]:
        token = (rows.start, rows.stop)
        if self.held is None or self.held[0] != token:
            weight = self.weights[self.key][rows]
            scale = self.weights[self.key[: -len(".weight")] + SCALE_SUFFIX][rows]
            out, cols = weight.shape
            # Row chunks of whole blocks (cols * step a multiple of the block size) keep the
            # float copies small; bitsandbytes' blocks run over the flat weight, so they match.
            unit = BLOCKSIZE // math.gcd(cols, BLOCKSIZE)
            step = max(unit, CHUNK_VALUES // cols // unit * unit)
            parts = [
                quantize_nf4(np.array(dequantize_fp8(weight[r : r + step], scale[r : r + step])
                                      .astype(mx.float32)))
                for r in range(0, out, step)
            ]  # fmt: skip
            packed = np.concatenate([p for p, _ in parts])
            self.held = (token, (packed, np.concatenate([a for _, a in parts])))
        return self.held[1]

    def packed(self, rows: slice) -> np.ndarray:
        return self.quantized(rows)[0]

    def absmax(self, rows: slice) -> np.ndarray:
        absmax = self.quantized(rows)[1]
        self.held, self.left = None, self.left - 1
        if not self.left:  # an evaluated array left in the dict would keep its memory
            self.weights.pop(self.key)
            self.weights.pop(self.key[: -len(".weight")] + SCALE_SUFFIX)
        return absmax


def group(name: str, shape: tuple[int, int], layer: Layer, rows: slice) -> Iterator[Entry]:
    """The four tensors of one bitsandbytes layer, in the order they are written."""
    n = shape[0] * shape[1]
    state = np.frombuffer(quant_state_bytes(shape), dtype=np.uint8)
    yield Entry(name, "U8", (-(-n // 2), 1), lambda: layer.packed(rows))
    yield Entry(name + ".absmax", "F32", (-(-n // BLOCKSIZE),), lambda: layer.absmax(rows))
    yield Entry(name + ".quant_map", "F32", (16,), lambda: NF4_TABLE)
    yield Entry(name + ".quant_state.bitsandbytes__nf4", "U8", state.shape, lambda: state)


def raw(value: mx.array) -> np.ndarray:
    """The stored bits of a copied tensor (bf16 as uint16: numpy has no bfloat16)."""
    if value.dtype == mx.bfloat16:
        value = mx.view(value, mx.uint16)
    return np.array(value)


def write_safetensors(path: Path, entries: list[Entry]) -> None:
    """Stream ``entries`` to ``path`` in order; only one tensor's bytes are held at a time."""
    with open(path, "wb") as f:
        f.write(header_bytes(entries))
        for e in entries:
            data = np.ascontiguousarray(e.make(), dtype=NUMPY_DTYPES[e.dtype]).astype(
                np.dtype(NUMPY_DTYPES[e.dtype]).newbyteorder("<"), copy=False
            )
            if data.nbytes != e.nbytes:
                raise InputError(f"{path}: {e.name} made {data.nbytes} bytes, planned {e.nbytes}")
            f.write(data.tobytes())
        f.flush()
        os.fsync(f.fileno())
