"""GGUF DiT files: one Ideogram 4 transformer as stable-diffusion.cpp and ComfyUI-GGUF write it.

The file's table is read with the `gguf` package's ``GGUFReader``, bounded and checked before any
tensor is built; a tensor's bytes are read when it is asked for, into a buffer of its own (not
through the reader's memory map, whose touched pages would stay in the process's resident set
until the whole file is: MODEL_NOTES#gguf-dit-files), and every
quantized tensor is dequantized by ``gguf.quants.dequantize``, the reference decoding
(MODEL_NOTES#gguf-dit-files). Keys are the fp8 repo's names (MODEL_NOTES#dit-keys): the
``model.diffusion_model.`` prefix some conversions carry is dropped. The ggml types that MLX's
own quantization holds exactly (``exact``) can be copied without dequantizing.

    source = GGUFSource("ideogram4-transformer-q8_0.gguf")
    for keys in block_groups(source.headers()):   # one DiT block in memory at a time
        weights = source.load(keys)                # float32 (F16/BF16 tensors as they are)
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as GGML
from gguf.quants import Q4_K, dequantize

from ideogram4_mlx.config import MAX_WIDTH, CheckpointError, short
from ideogram4_mlx.dtypes import all_finite
from ideogram4_mlx.sources import Headers

MAGIC = b"GGUF"
# Bounds checked before the reader builds anything: the real DiT holds 458 tensors, names of at
# most 57 characters with the prefix, and a few metadata keys at most.
MAX_TENSORS = 4096
MAX_FIELDS = 4096
MAX_NAME = 256
# stable-diffusion.cpp's `--diffusion-model` conversions and ComfyUI-GGUF name tensors under this
# prefix; `-m` conversions use the bare names.
PREFIX = "model.diffusion_model."
# general.architecture: stable-diffusion.cpp writes no metadata at all; the ComfyUI-GGUF fork's
# converter writes "ideogram".
ARCHITECTURES = ("ideogram", "ideogram4")
# The ComfyUI-GGUF fork's custom formats (ConvRot INT8/INT4) announce each tensor so.
CUSTOM_QUANT = "comfy.gguf.quant."
MARKER = "embed_image_indicator.weight"  # the tensor stable-diffusion.cpp tells Ideogram 4 by
FLOATS = {GGML.F32: "F32", GGML.F16: "F16", GGML.BF16: "BF16"}
# The quantized types `gguf.quants` dequantizes (those the installed version knows).
QUANTIZED = tuple(
    getattr(GGML, name)
    for name in (
        "Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K IQ1_S IQ1_M IQ2_XXS IQ2_XS IQ2_S "
        "IQ3_XXS IQ3_S IQ4_NL IQ4_XS TQ1_0 TQ2_0 MXFP4"
    ).split()
    if hasattr(GGML, name)
)
SUPPORTED = tuple(FLOATS) + QUANTIZED
CHUNK_ELEMENTS = 1 << 22  # rows dequantized at once: bounds the reader's temporaries
GROUP = 32  # the MLX group size of every exact type (one ggml block or K-quant sub-block)


def is_gguf(path: Path | str) -> bool:
    """Whether ``path`` is a file starting with the GGUF magic (4 bytes read)."""
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == MAGIC


class _BoundedReader(gguf.GGUFReader):
    """``GGUFReader`` whose counts and tensor table are checked before it builds anything, so a
    damaged or hostile file fails with a line naming the tensor (the table layout is the
    reader's: name, n_dims, dims, type, offset)."""

    def __init__(self, path: Path):
        self.source = path
        super().__init__(path)

    def _build_fields(self, offs, count):
        self._bound(count, MAX_FIELDS, "metadata keys")
        return super()._build_fields(offs, count)

    def _build_tensor_info(self, offs, count):
        custom = next((k for k in self.fields if k.startswith(CUSTOM_QUANT)), None)
        if custom is not None:
            raise CheckpointError(
                f"{self.source}: {custom} marks the ComfyUI-GGUF fork's own Q8_CR/Q4_CR format "
                "(rotated INT8/INT4 rows), not a ggml type; use a Q8_0, Q6_K, Q4_K ... GGUF or "
                "convert the fp8 release"
            )
        self._bound(count, MAX_TENSORS, "tensors", "; the DiT has 458")
        return super()._build_tensor_info(offs, count)

    def _bound(self, count: int, limit: int, what: str, known: str = "") -> None:
        if count > limit:
            raise CheckpointError(
                f"{self.source}: claims {count} {what} (at most {limit}{known}); "
                "the file is damaged or not a DiT"
            )

    def _build_tensors(self, start_offs, fields):
        for field in fields:
            _check_entry(self.source, field, start_offs, int(self.data.size))
        super()._build_tensors(start_offs, fields)


def _check_entry(path: Path, field, start: int, size: int) -> None:
    """One tensor table entry: name, type, shape and where its bytes lie."""
    _, _, n_dims, dims, raw_type, offset = field.parts
    name = field.name
    where = f"{path}: tensor {name[:MAX_NAME]!r}"
    if len(name) > MAX_NAME:
        raise CheckpointError(f"{where}...: name longer than {MAX_NAME} characters")
    raw = int(raw_type[0])
    if raw not in {t.value for t in SUPPORTED}:
        label = GGML(raw).name if raw in {t.value for t in GGML} else "unknown"
        raise CheckpointError(
            f"{where} has ggml type {raw} ({label}), which is not a float or quantized weight "
            f"type this reader takes ({', '.join(t.name for t in SUPPORTED)})"
        )
    qtype = GGML(raw)
    shape = tuple(int(d) for d in reversed(dims.tolist()))
    if not 1 <= int(n_dims[0]) <= 2 or len(shape) != int(n_dims[0]):
        raise CheckpointError(f"{where} has {int(n_dims[0])} dimensions; DiT tensors have 1 or 2")
    if not all(1 <= d <= MAX_WIDTH for d in shape):
        raise CheckpointError(f"{where} has shape {shape}; each size must be 1..{MAX_WIDTH}")
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        raise CheckpointError(
            f"{where} ({qtype.name}) has rows of {shape[-1]} values, not a multiple of the "
            f"type's block of {block}: the file is damaged"
        )
    end = start + int(offset[0]) + int(np.prod(shape)) // block * block_bytes
    if end > size:
        raise CheckpointError(
            f"{where} ({qtype.name}, shape {shape}) ends at byte {end}, past the end of the "
            f"file ({size} bytes): the file is truncated"
        )


class GGUFSource:
    """One GGUF DiT file: validated on opening, keys in the fp8 repo's naming.

    ``headers()``: ``{key: (dtype, (out, in), path)}`` as ``load`` returns the tensors;
    ``qtypes()``: ``{key: ggml type name}``; ``load(keys)``: the tensors, dequantized one at a
    time; ``exact(key)``: MLX's quantized triple of a tensor whose type MLX holds exactly.
    """

    format = "gguf"  # the source format a conversion records

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: file not found")
        if not is_gguf(self.path):
            raise CheckpointError(f"{self.path}: not a GGUF file (it does not start with GGUF)")
        try:
            reader = _BoundedReader(self.path)
        except (ValueError, IndexError, KeyError, OverflowError) as e:
            raise CheckpointError(
                f"{self.path}: not a readable GGUF file ({e}); it may be truncated"
            ) from None
        self.architecture = _string_field(reader, "general.architecture")
        self._tensors = self._named(reader)
        # numpy order (out, in): ggml lists a tensor's sizes innermost first
        self._shapes = {
            k: tuple(int(d) for d in reversed(t.shape.tolist())) for k, t in self._tensors.items()
        }
        if self.architecture not in (None, *ARCHITECTURES) or MARKER not in self._tensors:
            found = "none given" if self.architecture is None else short(self.architecture)
            raise CheckpointError(
                f"{self.path}: not an Ideogram 4 DiT (architecture {found}, "
                f"{'no' if MARKER not in self._tensors else 'has'} {MARKER}); "
                "give a GGUF of ideogram4's transformer or unconditional_transformer"
            )

    def _named(self, reader) -> dict:
        """Tensors by fp8-repo key: a file naming some under ``PREFIX`` must name all so."""
        names = [t.name for t in reader.tensors]
        prefixed = any(n.startswith(PREFIX) for n in names)
        out = {}
        for t in reader.tensors:
            if prefixed and not t.name.startswith(PREFIX):
                raise CheckpointError(
                    f"{self.path}: tensor {t.name} is outside {PREFIX} (the file holds more "
                    "than one model); give a DiT-only GGUF"
                )
            out[t.name.removeprefix(PREFIX)] = t
        return out

    def headers(self) -> Headers:
        """``{key: (dtype of what load returns, numpy shape (out, in), path)}``: F32 for
        quantized tensors, F32/F16/BF16 for float ones as stored."""
        return {
            key: (FLOATS.get(t.tensor_type, "F32"), self._shapes[key], self.path)
            for key, t in self._tensors.items()
        }

    def qtypes(self) -> dict[str, str]:
        """``{key: ggml type name}`` ("Q8_0", "Q4_K", "BF16", ...)."""
        return {key: t.tensor_type.name for key, t in self._tensors.items()}

    def load(self, keys: Iterable[str]) -> dict[str, mx.array]:
        """The tensors of ``keys``, read and decoded now, one at a time: quantized ones as
        float32 (``gguf.quants.dequantize``), F32/F16/BF16 ones unchanged. Non-finite values
        are an error naming the tensor."""
        return {key: self._load(key) for key in keys}

    def _entry(self, key: str):
        if key not in self._tensors:
            raise CheckpointError(f"{self.path}: has no tensor {key}")
        return self._tensors[key]

    def _data(self, key: str) -> np.ndarray:
        """A tensor's stored bytes as the reader's view types them (``t.data``'s dtype and
        shape), read from the file into a new array: memory is this tensor's alone, freed with
        it (reading the memory-mapped view would leave its pages resident)."""
        t = self._entry(key)
        out = np.empty(t.data.shape, t.data.dtype)
        with self.path.open("rb") as f:
            f.seek(t.data_offset)
            got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        if got != out.nbytes:
            raise CheckpointError(
                f"{self.path}: tensor {key} needs {out.nbytes} bytes at offset "
                f"{t.data_offset}, the file has {got}: the file was truncated after opening"
            )
        return out

    def _load(self, key: str) -> mx.array:
        t = self._entry(key)
        shape = self._shapes[key]
        data = self._data(key)
        if t.tensor_type == GGML.BF16:
            value = mx.array(data.view("<u2").reshape(shape)).view(mx.bfloat16)
        elif t.tensor_type in FLOATS:
            value = mx.array(data.reshape(shape))
        else:
            value = self._dequantized(t.tensor_type, data, shape)
        if not all_finite(value):
            self._not_finite(key)
        return value

    def _dequantized(self, qtype: GGML, data: np.ndarray, shape: tuple[int, ...]) -> mx.array:
        """gguf's float32 dequantization, a row chunk at a time, into the MLX array's own
        memory through a NumPy view (MLX's documented buffer protocol), not into a NumPy array
        that mx.array would copy: for llm_cond_proj that copy was a second 980 MB at convert's
        peak."""
        rows = data.reshape(-1, data.shape[-1])  # the bytes of one row per line
        cols = shape[-1]
        result = mx.zeros((rows.shape[0], cols), mx.float32)
        mx.eval(result)
        out = np.array(result, copy=False)  # tests compare every row with gguf's decode
        step = max(1, CHUNK_ELEMENTS // cols)
        for r in range(0, rows.shape[0], step):
            out[r : r + step] = dequantize(np.asarray(rows[r : r + step]), qtype)
        del out
        return result.reshape(shape)

    def _not_finite(self, key: str):
        raise CheckpointError(
            f"{self.path}: {key} ({self._tensors[key].tensor_type.name}) holds NaN or infinite "
            "values; the file is damaged"
        )

    def exact_spec(self, key: str, scales_dtype: str = "float16") -> tuple[int, int] | None:
        """``(bits, group_size)`` of a 2-D tensor that MLX's affine mode holds exactly with its
        scales and biases stored as ``scales_dtype`` (from the table, nothing read):
        "float16": Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (one fp16 scale per block); "float32": also
        Q4_K and Q5_K. None for every other tensor (MXFP4: see ``exact``)."""
        t = self._entry(key)
        if len(self._shapes[key]) != 2 or t.tensor_type not in AFFINE_EXACT[scales_dtype]:
            return None
        return BITS[t.tensor_type], GROUP

    def exact(self, key: str, dtype: mx.Dtype | None = None) -> dict | None:
        """For a 2-D tensor whose ggml type MLX's quantization represents exactly (Q8_0, Q4_0,
        Q4_1, Q5_0, Q5_1, Q4_K, Q5_K as affine group 32; MXFP4 as mxfp4): ``{"weight":
        uint32 (out, in*bits/32), "scales", "biases" (float32, affine only), "bits",
        "group_size", "mode"}`` such that ``mx.dequantize`` equals ``load`` value for value
        (bit for bit but for the sign of some zeros, MODEL_NOTES#gguf-dit-files); None for
        every other tensor. ``dtype``: scales and biases cast to it, an error naming the tensor
        if that changes one (Q4_K in float16)."""
        t = self._entry(key)
        unpack = UNPACKERS.get(t.tensor_type)
        shape = self._shapes[key]
        if unpack is None or len(shape) != 2:
            return None
        rows, cols = shape
        data = self._data(key).reshape(rows, -1)
        step = max(1, CHUNK_ELEMENTS // cols)
        parts = [self._exact_rows(key, data[r : r + step]) for r in range(0, rows, step)]
        weight, scales, biases = (
            None if p[0] is None else np.concatenate(p) for p in zip(*parts, strict=True)
        )
        mode = "mxfp4" if t.tensor_type == MXFP4 else "affine"
        if mode == "mxfp4" and (scales == 0xFF).any():
            return None  # an E8M0 NaN scale: MLX reads NaN where ggml reads 2^127
        out = {
            "weight": mx.array(weight),
            "scales": mx.array(scales),
            "bits": BITS[t.tensor_type],
            "group_size": GROUP,
            "mode": mode,
        }
        if mode == "affine":
            out["biases"] = mx.array(biases)
            if dtype is not None:
                self._cast(key, out, dtype)
        return out

    def _cast(self, key: str, exact: dict, dtype: mx.Dtype) -> None:
        for name in ("scales", "biases"):
            value = exact[name].astype(dtype)
            if not mx.array_equal(value.astype(mx.float32), exact[name]).item():
                kind = self._tensors[key].tensor_type.name
                raise CheckpointError(
                    f"{self.path}: {key} ({kind}) has {name} that {dtype} does not hold "
                    "exactly; keep its scales in float32 or dequantize it"
                )
            exact[name] = value

    def _exact_rows(self, key: str, data: np.ndarray):
        """Packed codes, scales and biases of whole rows (``data``: their bytes)."""
        qtype = self._tensors[key].tensor_type
        rows = len(data)
        blocks = np.asarray(data).reshape(-1, gguf.GGML_QUANT_SIZES[qtype][1])
        codes, scales, biases = UNPACKERS[qtype](blocks)
        if biases is not None and not (np.isfinite(scales).all() and np.isfinite(biases).all()):
            self._not_finite(key)
        return (
            pack(codes.reshape(rows, -1), BITS[qtype]),
            scales.reshape(rows, -1),
            None if biases is None else biases.reshape(rows, -1),
        )


def _string_field(reader, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None:
        return None
    if field.types != [gguf.GGUFValueType.STRING]:
        raise CheckpointError(f"{reader.source}: metadata {key} is not a string")
    return field.contents()


# Block layouts -> (codes uint8 (n, 32 k), scales (n, k), biases (n, k)), k groups of 32 per
# block; w = scale * code + bias is the package's dequantization, exactly (products of an fp16
# and a small integer are exact in float32, so one rounding happens on either side).


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes -> 32 codes: element j is byte j's low nibble, element 16 + j its high one."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """A little-endian uint32 per block -> its 32 bits, element i from bit i."""
    word = np.ascontiguousarray(qh).view("<u4")
    return ((word >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _q8_0(b):
    d = _f16(b[:, :2])
    return (b[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8), d, -128 * d


def _q4_0(b):
    d = _f16(b[:, :2])
    return _nibbles(b[:, 2:]), d, -8 * d


def _q4_1(b):
    return _nibbles(b[:, 4:]), _f16(b[:, :2]), _f16(b[:, 2:4])


def _q5_0(b):
    d = _f16(b[:, :2])
    return _nibbles(b[:, 6:]) | (_high_bits(b[:, 2:6]) << 4), d, -16 * d


def _q5_1(b):
    return _nibbles(b[:, 8:]) | (_high_bits(b[:, 4:8]) << 4), _f16(b[:, :2]), _f16(b[:, 2:4])


def _k_scales(b):
    """Q4_K/Q5_K: eight 6-bit scales and mins per 256 -> (scale, bias) per group of 32."""
    sc, m = Q4_K.get_scale_min(np.ascontiguousarray(b[:, 4:16]))
    return _f16(b[:, :2]) * sc.astype(np.float32), -(_f16(b[:, 2:4]) * m.astype(np.float32))


def _k_low(qs):
    """128 bytes -> 256 codes: each 32 bytes hold a group in the low nibbles, the next in the
    high ones."""
    qs = qs.reshape(len(qs), 4, 1, 32)
    return np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(len(qs), 256)


def _q4_k(b):
    return (_k_low(b[:, 16:144]), *_k_scales(b))


def _q5_k(b):
    qh = b[:, 16:48].reshape(len(b), 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    codes = _k_low(b[:, 48:176]) | ((qh & 1).reshape(len(b), 256) << 4)
    return (codes, *_k_scales(b))


def _mxfp4(b):
    # The E2M1 code is ggml's index into its value table (kvalues = 2 x E2M1); ggml's scale is
    # half of E8M0's, so the two products are the same numbers. Code 8 is -0 in MLX, +0 (as
    # code 0) in ggml: written as 0 so the zeros match bit for bit.
    codes = _nibbles(b[:, 1:])
    codes[codes == 8] = 0
    return codes, b[:, :1].copy(), None


UNPACKERS = {
    GGML.Q8_0: _q8_0,
    GGML.Q4_0: _q4_0,
    GGML.Q4_1: _q4_1,
    GGML.Q5_0: _q5_0,
    GGML.Q5_1: _q5_1,
    GGML.Q4_K: _q4_k,
    GGML.Q5_K: _q5_k,
}
BITS = {
    GGML.Q8_0: 8,
    GGML.Q4_0: 4,
    GGML.Q4_1: 4,
    GGML.Q5_0: 5,
    GGML.Q5_1: 5,
    GGML.Q4_K: 4,
    GGML.Q5_K: 5,
}
# What MLX's affine mode holds exactly, by the dtype its scales and biases are stored in: an
# fp16 block scale d and -8 d, -16 d, -128 d are fp16 values; Q4_K's d * sc needs float32.
AFFINE_EXACT = {
    "float16": (GGML.Q8_0, GGML.Q4_0, GGML.Q4_1, GGML.Q5_0, GGML.Q5_1),
    "float32": (GGML.Q8_0, GGML.Q4_0, GGML.Q4_1, GGML.Q5_0, GGML.Q5_1, GGML.Q4_K, GGML.Q5_K),
}
MXFP4 = getattr(GGML, "MXFP4", None)  # in gguf since 0.17.1
if MXFP4 is not None:
    UNPACKERS[MXFP4], BITS[MXFP4] = _mxfp4, 4


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes (rows, cols) < 2**bits -> MLX's packed uint32 (rows, cols * bits / 32): a
    little-endian bit stream, element i at bits [i * bits, (i + 1) * bits)."""
    rows, cols = codes.shape
    if bits == 8:  # one byte per code: the stream is the bytes themselves
        return np.ascontiguousarray(codes, dtype=np.uint8).view("<u4")
    if bits == 4:  # two codes per byte, the first in the low nibble
        pairs = np.asarray(codes, dtype=np.uint8).reshape(rows, cols // 2, 2)
        return np.ascontiguousarray(pairs[..., 0] | (pairs[..., 1] << 4)).view("<u4")
    eight = codes.reshape(rows, cols // 8, 8).astype(np.uint64)
    word = (eight << (np.arange(8, dtype=np.uint64) * np.uint64(bits))).sum(axis=-1)
    raw = word.astype("<u8").view(np.uint8).reshape(rows, cols // 8, 8)[:, :, :bits]
    return np.ascontiguousarray(raw).reshape(rows, -1).view("<u4")
