"""Write a synthetic Ideogram 4 checkpoint in the exact layout of `ideogram-ai/ideogram-4-fp8`.

The real weights are gated, so every loading, conversion and generation test runs on folders made
here, through the same code that reads the real snapshot. Folder and file names, config keys,
safetensors key names, shapes and dtypes follow MODEL_NOTES#checkpoint; only the sizes
(SyntheticSpec) and the values (seeded random) differ. Files are streamed tensor by tensor and
chunk by chunk, so even the full-size 9.3 GB transformer file is written with bounded memory.

    write_synthetic_checkpoint("/tmp/ideo4-tiny")                       # whole checkpoint, < 2 s
    write_synthetic_checkpoint(dst, "full", components=("transformer",))  # one real-size DiT file
"""

import functools
import json
import os
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np
from tqdm import tqdm

from ideogram4_mlx.files import check_destination, write_folder
from ideogram4_mlx.hub import check_components
from ideogram4_mlx.synth import configs
from ideogram4_mlx.synth.plan import (
    ALL_COMPONENTS,
    COMPONENTS,
    NUMPY_DTYPES,
    SyntheticSpec,
    TensorPlan,
    dit_tensors,
    prompt_enhancer_head_tensors,
    resolve_spec,
    text_encoder_tensors,
    vae_tensors,
)
from ideogram4_mlx.synth.tokenizer import text_vocab_size, tokenizer_files

FP8_MAX = 448.0
KIND = "a synthetic checkpoint"


def write_synthetic_checkpoint(
    dst,
    spec: SyntheticSpec | str = "tiny",
    *,
    seed: int = 0,
    components=COMPONENTS,
    force: bool = False,
    progress: bool = False,
) -> Path:
    """Write a seeded synthetic checkpoint folder at `dst` and return its path.

    `spec` is a SyntheticSpec or a SYNTHETIC_PRESETS name. `components` picks the sub-folders
    (model_index.json is always written); `"prompt_enhancer_head"` (not a default) adds the
    diffusers lm-head folder, laid out as its repo is. Files are built in a partial sibling
    folder that is renamed into place at the end (`ideogram4_mlx.files`), so `dst` never holds
    a half-written checkpoint. `force` replaces only an empty folder or one holding nothing but
    checkpoint files (model_index.json and component folders). The same spec and seed give
    byte-identical files.
    """
    spec = resolve_spec(spec)
    components = check_components(components, ALL_COMPONENTS)
    dst = Path(dst).expanduser()
    check_destination(dst, force, _foreign_entry, KIND)
    files = _plan_files(spec, components)
    total = sum(f.size for f in files)
    with write_folder(dst, force, _foreign_entry, KIND, total) as tmp:
        with tqdm(
            total=total, unit="B", unit_scale=True, desc=dst.name, disable=not progress
        ) as bar:
            for f in files:
                _write_file(tmp, f, seed, bar.update)
    return dst


def _foreign_entry(dst: Path) -> str | None:
    """The first thing in `dst` that is not a checkpoint file or component folder, or None."""
    for entry in sorted(dst.iterdir()):
        if entry.is_symlink():
            return entry.name
        if entry.name == "model_index.json" and entry.is_file():
            continue
        # diffusion_models/: the DiT files of `synth --dit-files` (synth.layouts)
        if not (entry.name in (*ALL_COMPONENTS, "diffusion_models") and entry.is_dir()):
            return entry.name
    return None


@dataclass(frozen=True)
class _File:
    path: str  # relative to the checkpoint root
    text: str | None = None
    tensors: tuple[TensorPlan, ...] = ()

    @property
    def size(self) -> int:
        if self.text is not None:
            return len(self.text.encode("utf-8"))
        return len(safetensors_header(self.tensors)) + sum(t.nbytes for t in self.tensors)


def _plan_files(spec: SyntheticSpec, components: tuple[str, ...]) -> list[_File]:
    files = [_File("model_index.json", text=configs.diffusers_json(configs.model_index()))]
    if "scheduler" in components:
        text = configs.diffusers_json(configs.scheduler_config())
        files.append(_File("scheduler/scheduler_config.json", text=text))
    if "text_encoder" in components:
        vocab = text_vocab_size(spec)
        text = configs.text_encoder_json(spec, vocab, tokenizer_files()["special_ids"])
        files.append(_File("text_encoder/config.json", text=text))
        tensors = tuple(text_encoder_tensors(spec, vocab))
        files.append(_File("text_encoder/model.safetensors", tensors=tensors))
    if "tokenizer" in components:
        files += [
            _File(f"tokenizer/{name}", text=text) for name, text in tokenizer_files()["files"]
        ]
    for folder in ("transformer", "unconditional_transformer"):
        if folder in components:
            text = configs.diffusers_json(configs.dit_config(spec))
            files.append(_File(f"{folder}/config.json", text=text))
            tensors = tuple(dit_tensors(spec))
            files.append(_File(f"{folder}/diffusion_pytorch_model.safetensors", tensors=tensors))
    if "vae" in components:
        text = configs.diffusers_json(configs.vae_config(spec))
        files.append(_File("vae/config.json", text=text))
        tensors = tuple(vae_tensors(spec))
        files.append(_File("vae/diffusion_pytorch_model.safetensors", tensors=tensors))
    if "prompt_enhancer_head" in components:
        vocab = text_vocab_size(spec)
        text = configs.diffusers_json(configs.prompt_enhancer_head_config(spec, vocab))
        files.append(_File("prompt_enhancer_head/config.json", text=text))
        tensors = tuple(prompt_enhancer_head_tensors(spec, vocab))
        path = "prompt_enhancer_head/diffusion_pytorch_model.safetensors"
        files.append(_File(path, tensors=tensors))
    return files


def _write_file(root: Path, f: _File, seed: int, on_bytes) -> None:
    path = root / f.path
    path.parent.mkdir(parents=True, exist_ok=True)
    if f.text is not None:
        path.write_text(f.text, encoding="utf-8", newline="\n")
        on_bytes(len(f.text.encode("utf-8")))
        return
    # The folder is part of the RNG key so the two DiTs get different weights.
    try:
        _write_safetensors(path, f.tensors, seed, Path(f.path).parent.name, on_bytes)
    except OSError as e:  # pwrite names no file; a full disk is reported with it
        if e.errno is None or e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e


# Streaming safetensors writer (header layout as safetensors' own serializer writes it)

# safetensors orders tensors by dtype (larger alignment first), then by name.
_DTYPE_ORDER = ("I64", "F32", "BF16", "F8_E4M3")
CHUNK_ELEMENTS = 1 << 24  # <= 32 MB of output per chunk


def safetensors_header(tensors) -> bytes:
    """The 8-byte length + JSON header for `tensors`, in safetensors' own order and padding."""
    return header_bytes(_ordered(tensors))


def header_bytes(tensors) -> bytes:
    """The 8-byte length + JSON header for `tensors` (each with name, dtype, shape and nbytes)
    laid out in the order given, padded as safetensors pads."""
    header = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _ordered(tensors) -> list[TensorPlan]:
    return sorted(tensors, key=lambda t: (_DTYPE_ORDER.index(t.dtype), t.name))


def _write_safetensors(path: Path, tensors, seed: int, folder: str, on_bytes) -> None:
    """Stream `tensors` to `path`: worker threads fill chunks and pwrite them at their offsets."""
    header = safetensors_header(tensors)
    workers = min(4, os.cpu_count() or 1)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _pwrite_all(fd, header, 0)
        on_bytes(len(header))
        with ThreadPoolExecutor(workers) as pool:
            pending = deque()
            try:
                for job in _chunk_jobs(_ordered(tensors), seed, folder, len(header)):
                    pending.append(pool.submit(_write_chunk, fd, *job))
                    if len(pending) >= workers + 2:  # bounds memory to a few chunks
                        on_bytes(pending.popleft().result())
                while pending:
                    on_bytes(pending.popleft().result())
            finally:
                for future in pending:
                    future.cancel()
    finally:
        os.close(fd)


def _chunk_jobs(ordered: list[TensorPlan], seed: int, folder: str, offset: int):
    for t in ordered:
        rows, cols = t.rows_cols
        row_bytes = t.nbytes // rows
        step = max(1, CHUNK_ELEMENTS // max(cols, 1))
        key = zlib.crc32(f"{folder}/{t.name}".encode())
        for i, r0 in enumerate(range(0, rows, step)):
            yield t, (seed, key, i), r0, min(rows, r0 + step), offset + r0 * row_bytes
        offset += t.nbytes


def _write_chunk(fd: int, t: TensorPlan, entropy, r0: int, r1: int, offset: int) -> int:
    data = _fill(t, entropy, r0, r1)
    _pwrite_all(fd, data, offset)
    return data.nbytes


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _fill(t: TensorPlan, entropy: tuple[int, int, int], r0: int, r1: int) -> np.ndarray:
    """Rows r0:r1 of `t` as little-endian array, from an RNG stream owned by this chunk."""
    rng = np.random.default_rng(entropy)
    cols = t.rows_cols[1]
    n = (r1 - r0) * cols
    if t.init == "fp8":
        return _fp8_rows(rng, r1 - r0, cols, t.fan_in)
    if t.init == "scale":
        z = _normal_quantiles()[_random_u16(rng, n)]
        return (np.exp(0.1 * z) / (t.fan_in**0.5 * _fp8_sigma(t.fan_in))).astype("<f4")
    if t.init == "normal":
        return _bf16_table(t.mean, t.std)[_random_u16(rng, n)]
    return np.asarray(t.values[r0 * cols : r1 * cols], dtype=NUMPY_DTYPES[t.dtype])


def _fp8_rows(rng: np.random.Generator, rows: int, cols: int, fan_in: int) -> np.ndarray:
    codes = _fp8_table(fan_in)[_random_u16(rng, rows * cols)].reshape(rows, cols)
    # The official quantizer maps each row's largest |w| to exactly 448 (0x7E); pin it so.
    peak = np.argmax(codes & 0x7F, axis=1)
    r = np.arange(rows)
    codes[r, peak] = (codes[r, peak] & 0x80) | 0x7E
    return codes


def _random_u16(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.bit_generator.random_raw((n + 3) // 4).view("<u2")[:n]


# Values are drawn by inverse-CDF lookup: a uniform 16-bit index picks one of 65536 normal
# quantiles whose encoded form is precomputed. Exact N(0,1) to 1/65536 in probability, and fast
# enough (one gather per element) to write the 9.3 GB DiT at about disk speed.


@functools.cache
def _normal_quantiles() -> np.ndarray:
    normal = NormalDist()
    return np.array([normal.inv_cdf((i + 0.5) / 65536) for i in range(65536)])


def _fp8_sigma(fan_in: int) -> float:
    """Std of the fp8 codes so a row of fan_in draws peaks near 448 (E max|z| ~ sqrt(2 ln n))."""
    return FP8_MAX / np.sqrt(2 * np.log(max(fan_in, 4)))


@functools.cache
def _fp8_table(fan_in: int) -> np.ndarray:
    return encode_e4m3(_normal_quantiles() * _fp8_sigma(fan_in))


@functools.cache
def _bf16_table(mean: float, std: float) -> np.ndarray:
    bits = (mean + std * _normal_quantiles()).astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")


# FP8 E4M3FN (bias 7, no infinities, 0x7F/0xFF NaN, max 448)


def decode_e4m3(codes) -> np.ndarray:
    """E4M3FN bytes -> float32, the decode of MODEL_NOTES#fp8-dequantization."""
    codes = np.asarray(codes, dtype=np.uint8)
    e = ((codes >> 3) & 0xF).astype(np.int32)
    m = (codes & 0x7).astype(np.float32)
    mag = np.where(e == 0, m / 8 * 2.0**-6, (1 + m / 8) * np.exp2(e - 7))
    mag = np.where((codes & 0x7F) == 0x7F, np.nan, mag)
    return np.where(codes & 0x80, -mag, mag).astype(np.float32)


_E4M3_POSITIVE = decode_e4m3(np.arange(0x7F)).astype(np.float64)  # codes 0x00..0x7E, ascending


def encode_e4m3(x) -> np.ndarray:
    """float -> E4M3FN bytes, round to nearest even, saturating at +-448 (never a NaN code)."""
    x = np.asarray(x, dtype=np.float64)
    if np.isnan(x).any():
        raise ValueError("encode_e4m3: input contains NaN")
    a = np.minimum(np.abs(x), FP8_MAX)
    hi = np.clip(np.searchsorted(_E4M3_POSITIVE, a), 1, 0x7E)
    lo = hi - 1
    d_lo, d_hi = a - _E4M3_POSITIVE[lo], _E4M3_POSITIVE[hi] - a
    take_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    code = np.where(take_hi, hi, lo).astype(np.uint8)
    return code | (np.signbit(x).astype(np.uint8) << 7)
