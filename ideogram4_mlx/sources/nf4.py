"""bitsandbytes 4-bit checkpoints (``ideogram-ai/ideogram-4-nf4``, ``-nf4-diffusers``).

Each quantized ``nn.Linear`` ``X`` is a group of tensors (MODEL_NOTES#nf4-layout):

- ``X.weight``: U8 ``(ceil(n/2), 1)``, two 4-bit codes a byte, high nibble first, running
  row-major over the real ``(out, in)`` shape (n = out * in);
- ``X.weight.absmax``: F32 ``(ceil(n/blocksize),)``, one scale a block (U8 codes when the
  scales are themselves quantized: then ``X.weight.nested_absmax`` F32 and
  ``X.weight.nested_quant_map`` F32 ``(256,)`` come along);
- ``X.weight.quant_map``: F32 ``(16,)``, bitsandbytes' table for the quant type;
- ``X.weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``): U8 bytes of a JSON object with
  ``quant_type``, ``blocksize``, ``dtype``, ``shape`` (and ``nested_*`` when nested).

Decoding is bitsandbytes' formula, in float32: ``w = quant_map[code] * absmax[block]``, the
absmax of a nested group first being ``nested_quant_map[a] * nested_absmax[a_block] + offset``
(MODEL_NOTES#nf4-dequantization). Everything a file can set is bounded and checked before a
tensor is read; the ``FORMAT`` object below is what ``ideogram4_mlx.sources`` registers.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from safetensors import SafetensorError, safe_open

from ideogram4_mlx.config import CheckpointError, short

STATE_MARK = ".quant_state.bitsandbytes__"
ABSMAX, QUANT_MAP = ".absmax", ".quant_map"
NESTED_ABSMAX, NESTED_QUANT_MAP = ".nested_absmax", ".nested_quant_map"
AUX_SUFFIXES = (ABSMAX, QUANT_MAP, NESTED_ABSMAX, NESTED_QUANT_MAP)
MAX_STATE_BYTES = 64 << 10  # the JSON is ~80-170 bytes; anything near this is not a quant state
MAX_DIM = 1 << 24  # per axis of the weight shape
# The block sizes bitsandbytes' dequantize_4bit accepts (functional.py).
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DTYPES = ("bfloat16", "float16", "float32")  # the float dtypes it dequantizes to
NESTED_MAP_SIZE = 256
STATE_KEYS = {"quant_type", "blocksize", "dtype", "shape"}
NESTED_KEYS = {"nested_blocksize", "nested_dtype", "nested_offset"}
# bitsandbytes' tables (functional.get_4bit_type): its kernels decode with these and ignore the
# file's quant_map, so a file must hold exactly them for the file and bitsandbytes to agree.
NF4_TABLE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
# fp4: sign, 2 exponent bits, 1 mantissa bit, over 12; code 8 is +0 (bitsandbytes writes it
# as the int -0).
FP4_CODES = (0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0,
             -2.0, -3.0)  # fmt: skip
TABLES = {
    "nf4": np.array(NF4_TABLE, dtype=np.float32),
    "fp4": np.array(FP4_CODES, dtype=np.float32) / np.float32(12.0),
}
RESAVE = "re-save the layer with bitsandbytes (Linear4bit, nf4 or fp4)"
REDOWNLOAD = "download the file again (it may be truncated or damaged)"

Headers = dict[str, tuple[str, tuple[int, ...], Path]]


@dataclass(frozen=True)
class QuantState:
    """The quant-state JSON of one layer, checked."""

    quant_type: str
    blocksize: int
    dtype: str
    shape: tuple[int, int]
    nested_blocksize: int | None = None
    nested_offset: float | None = None  # a float32 value

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def packed(self) -> int:
        return -(-self.numel // 2)

    @property
    def nested_blocks(self) -> int:
        return -(-self.blocks // self.nested_blocksize)

    def expected(self, weight_key: str) -> dict[str, tuple[tuple[str, ...], tuple]]:
        """Each tensor of the group -> (allowed safetensors dtypes, allowed shapes)."""
        packed = ((self.packed, 1), (self.packed,))
        out = {weight_key: (("U8",), packed), weight_key + QUANT_MAP: (("F32",), ((16,),))}
        if self.nested_blocksize is None:
            out[weight_key + ABSMAX] = (("F32",), ((self.blocks,),))
        else:
            out[weight_key + ABSMAX] = (("U8",), ((self.blocks,),))
            out[weight_key + NESTED_ABSMAX] = (("F32",), ((self.nested_blocks,),))
            out[weight_key + NESTED_QUANT_MAP] = (("F32",), ((NESTED_MAP_SIZE,),))
        return out


def state_groups(keys, where: str = "") -> dict[str, str]:
    """``{X.weight: its quant-state key}`` for every bitsandbytes group among ``keys``; an
    auxiliary tensor of no group, or a weight with two states, is a ``CheckpointError``."""
    groups: dict[str, str] = {}
    for key in keys:
        weight_key, mark, _ = key.partition(STATE_MARK)
        if not mark:
            continue
        if weight_key in groups:
            raise CheckpointError(
                f"{where}{weight_key} has two quant states ({groups[weight_key]} and {key}); "
                f"{RESAVE}"
            )
        if not weight_key.endswith(".weight"):
            raise CheckpointError(
                f"{where}{key}: bitsandbytes quantizes only a layer's .weight, found "
                f"{weight_key!r}; {RESAVE}"
            )
        groups[weight_key] = key
    for key in keys:
        for suffix in AUX_SUFFIXES:
            base = key[: -len(suffix)]
            if key.endswith(suffix) and base.endswith(".weight") and base not in groups:
                raise CheckpointError(
                    f"{where}{key} belongs to no quantized weight ({base}{STATE_MARK}nf4 is "
                    f"missing); {REDOWNLOAD}"
                )
    return groups


def parse_state(raw: bytes, key: str, where: str = "") -> QuantState:
    """The JSON of ``key`` (``...quant_state.bitsandbytes__<type>``), every field checked."""
    at = f"{where}{key}"
    if len(raw) > MAX_STATE_BYTES:
        raise CheckpointError(
            f"{at}: quant state is {len(raw)} bytes, at most {MAX_STATE_BYTES} expected; "
            f"{REDOWNLOAD}"
        )
    try:
        state = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{at}: quant state is not JSON ({e}); {REDOWNLOAD}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{at}: quant state is {short(state)}, not a JSON object; {RESAVE}")
    nested = NESTED_KEYS & state.keys()
    unknown = sorted(state.keys() - STATE_KEYS - NESTED_KEYS)
    missing = sorted(STATE_KEYS - state.keys()) + sorted(NESTED_KEYS - nested if nested else [])
    if unknown or missing:
        problem = f"unknown field {unknown[0]!r}" if unknown else f"no {missing[0]!r} field"
        raise CheckpointError(f"{at}: quant state has {problem}; {RESAVE}")
    kind = key.rpartition(STATE_MARK)[2]
    quant_type = state["quant_type"]
    if kind not in TABLES or quant_type != kind:
        raise CheckpointError(
            f"{at}: quant_type {short(quant_type)} (key says {kind!r}) is not supported; "
            f"this reads bitsandbytes nf4 and fp4 only: {RESAVE}"
        )
    shape = state["shape"]
    if not (
        isinstance(shape, list)
        and len(shape) == 2
        and all(type(d) is int and 0 < d <= MAX_DIM for d in shape)
    ):
        raise CheckpointError(
            f"{at}: shape {short(shape)} is not a 2-D (out, in) of positive sizes <= "
            f"{MAX_DIM}; {RESAVE}"
        )
    if state["dtype"] not in DTYPES:
        raise CheckpointError(
            f"{at}: dtype {short(state['dtype'])} is not one of {list(DTYPES)}; {RESAVE}"
        )
    out = QuantState(quant_type, blocksize(state, "blocksize", at), state["dtype"], tuple(shape))
    if not nested:
        return out
    offset = state["nested_offset"]
    if state["nested_dtype"] != "float32" or not (
        type(offset) in (int, float) and math.isfinite(offset) and abs(offset) < 3.4e38
    ):
        raise CheckpointError(
            f"{at}: nested_dtype {short(state['nested_dtype'])} / nested_offset "
            f"{short(offset)}: expected 'float32' and a finite number; {RESAVE}"
        )
    return QuantState(
        out.quant_type,
        out.blocksize,
        out.dtype,
        out.shape,
        blocksize(state, "nested_blocksize", at),
        float(np.float32(offset)),
    )


def blocksize(state: dict, field: str, at: str) -> int:
    value = state[field]
    if type(value) is not int or value not in BLOCKSIZES:
        raise CheckpointError(f"{at}: {field} {short(value)} is not one of {BLOCKSIZES}; {RESAVE}")
    return value


# Headers: what decode() will produce, every group checked against its files.


def claims(headers: Headers) -> bool:
    """These tensors hold bitsandbytes 4-bit groups (a quant-state key is there)."""
    return any(STATE_MARK in key for key in headers)


def decoded_headers(headers: Headers) -> Headers:
    """``headers`` with each group replaced by one F32 ``X.weight`` of its real shape, after
    checking every tensor of it: dtypes and shapes from the headers, then the quant state,
    quant map and scales read from the files (each bounded first; all small).

    A load asks several times (dtype checks, config checks, the load itself): the answer for
    the same headers of unchanged files (size, mtime, inode) is remembered."""
    files = sorted({path for _, _, path in headers.values()})
    try:
        stats = tuple(
            (str(p), s.st_size, s.st_mtime_ns, s.st_ino) for p in files for s in [p.stat()]
        )
    except OSError as e:
        raise CheckpointError(f"{files[0] if files else '?'}: cannot be read ({e})") from e
    token = (stats, tuple(sorted((k, v[0], tuple(v[1]), str(v[2])) for k, v in headers.items())))
    if token not in CHECKED:
        if len(CHECKED) >= CHECKED_SIZE:
            CHECKED.pop(next(iter(CHECKED)))
        CHECKED[token] = check_and_decode_headers(headers)
    return dict(CHECKED[token])


CHECKED: dict[tuple, Headers] = {}  # the last few decoded_headers answers
CHECKED_SIZE = 8


def check_and_decode_headers(headers: Headers) -> Headers:
    groups = state_groups(headers, "")
    out = dict(headers)
    with contextlib.ExitStack() as stack:
        opened: dict[Path, object] = {}

        def read(key: str) -> np.ndarray:
            path = headers[key][2]
            if path not in opened:
                try:
                    opened[path] = stack.enter_context(safe_open(str(path), framework="numpy"))
                except (SafetensorError, OSError) as e:
                    raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
            try:
                return opened[path].get_tensor(key)
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path}: {key} cannot be read ({e}); {REDOWNLOAD}") from e

        for weight_key, state_key in groups.items():
            state = header_state(headers, state_key, read)
            check_members(headers, weight_key, state, state_key, f"{headers[state_key][2]}: ")
            for key, (dtypes, shapes) in state.expected(weight_key).items():
                check_header(headers, key, dtypes, shapes, state_key)
                out.pop(key)
            out.pop(state_key)
            check_values(weight_key, state, read, headers)
            out[weight_key] = ("F32", state.shape, headers[weight_key][2])
    return out


def header_state(headers: Headers, state_key: str, read) -> QuantState:
    dtype, shape, path = headers[state_key]
    if dtype != "U8" or len(shape) != 1 or not 0 < shape[0] <= MAX_STATE_BYTES:
        raise CheckpointError(
            f"{path}: {state_key} is {dtype} {shape}, expected U8 JSON bytes (at most "
            f"{MAX_STATE_BYTES}); {REDOWNLOAD}"
        )
    return parse_state(read(state_key).tobytes(), state_key, f"{path}: ")


def check_members(keys, weight_key: str, state: QuantState, state_key: str, where="") -> None:
    """No tensor of the group is left over: nested scales need nested fields in the state."""
    expected = state.expected(weight_key)
    for suffix in AUX_SUFFIXES:
        key = weight_key + suffix
        if key in keys and key not in expected:
            raise CheckpointError(
                f"{where}{key} is not described by {state_key} (no nested_* fields); {REDOWNLOAD}"
            )


def check_header(headers: Headers, key: str, dtypes, shapes, state_key: str) -> None:
    if key not in headers:
        path = headers[state_key][2]
        raise CheckpointError(f"{path}: {key} is missing (needed by {state_key}); {REDOWNLOAD}")
    dtype, shape, path = headers[key]
    if dtype not in dtypes or tuple(shape) not in shapes:
        raise CheckpointError(
            f"{path}: {key} is {dtype} {tuple(shape)}, but {state_key} needs "
            f"{' or '.join(dtypes)} {' or '.join(str(s) for s in shapes)}; {REDOWNLOAD}"
        )


def check_values(weight_key: str, state: QuantState, read, headers: Headers) -> None:
    """The quant map is bitsandbytes' table; every scale is finite."""
    quant_map = read(weight_key + QUANT_MAP)
    table = TABLES[state.quant_type]
    if not np.array_equal(quant_map.view(np.uint32), table.view(np.uint32)):
        raise CheckpointError(
            f"{headers[weight_key + QUANT_MAP][2]}: {weight_key + QUANT_MAP} is not "
            f"bitsandbytes' {state.quant_type} table (bitsandbytes decodes with its own table, "
            f"so this file would not mean what it says); {RESAVE}"
        )
    absmax = read(weight_key + ABSMAX)
    if state.nested_blocksize is not None:
        nested = read(weight_key + NESTED_ABSMAX)
        nested_map = read(weight_key + NESTED_QUANT_MAP)
        for key, values in ((NESTED_ABSMAX, nested), (NESTED_QUANT_MAP, nested_map)):
            if not np.isfinite(values).all():
                path = headers[weight_key + key][2]
                raise CheckpointError(
                    f"{path}: {weight_key + key} holds non-finite values; {REDOWNLOAD}"
                )
        absmax = nested_absmax_numpy(absmax, nested, nested_map, state)
    if not np.isfinite(absmax).all():
        path = headers[weight_key + ABSMAX][2]
        raise CheckpointError(
            f"{path}: {weight_key + ABSMAX} holds non-finite scales; {REDOWNLOAD}"
        )


def nested_absmax_numpy(codes, nested, nested_map, state: QuantState) -> np.ndarray:
    """A nested group's float32 scales, as :func:`dequantize_nested_absmax` computes them."""
    values = nested_map[codes.astype(np.int64)]
    per_value = np.repeat(nested, state.nested_blocksize)[: values.size]
    return values * per_value + np.float32(state.nested_offset)


# decode(): the same replacement on lazily loaded arrays.


def decode(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Replace every group by its float32 ``X.weight`` (lazy: only the quant-state bytes are
    evaluated). Other keys are unchanged; a model's ``sanitize`` renames them."""
    out = dict(weights)
    for weight_key, state_key in state_groups(weights).items():
        raw = weights[state_key]
        if raw.dtype != mx.uint8 or raw.ndim != 1 or raw.size > MAX_STATE_BYTES:
            raise CheckpointError(
                f"{state_key} is {raw.dtype} {tuple(raw.shape)}, expected uint8 JSON bytes (at "
                f"most {MAX_STATE_BYTES}); {REDOWNLOAD}"
            )
        state = parse_state(np.array(raw).tobytes(), state_key)
        check_members(weights, weight_key, state, state_key)
        group = {}
        for key, (dtypes, shapes) in state.expected(weight_key).items():
            if key not in weights:
                raise CheckpointError(f"{key} is missing (needed by {state_key}); {REDOWNLOAD}")
            value = weights[key]
            expected_dtype = mx.uint8 if dtypes == ("U8",) else mx.float32
            if value.dtype != expected_dtype or tuple(value.shape) not in shapes:
                raise CheckpointError(
                    f"{key} is {value.dtype} {tuple(value.shape)}, but {state_key} needs "
                    f"{dtypes[0]} {shapes[0]}; {REDOWNLOAD}"
                )
            group[key] = out.pop(key)
        out.pop(state_key)
        absmax = group[weight_key + ABSMAX]
        if state.nested_blocksize is not None:
            absmax = dequantize_nested_absmax(
                absmax,
                group[weight_key + NESTED_ABSMAX],
                group[weight_key + NESTED_QUANT_MAP],
                state,
            )
        out[weight_key] = dequantize(
            group[weight_key], absmax, group[weight_key + QUANT_MAP], state
        )
    return out


def dequantize(
    packed: mx.array, absmax: mx.array, quant_map: mx.array, state: QuantState
) -> mx.array:
    """``quant_map[code] * absmax[block]`` in float32, shape ``state.shape``.

    ``packed``: uint8, high nibble first; ``absmax``: float32 ``(blocks,)``. One float32
    multiply per value, as bitsandbytes' kernels do, so the result is bit-identical.
    """
    byte = mx.arange(256, dtype=mx.uint32)
    # Each byte's two values, high nibble first: one gather a byte (faster than one a code).
    pairs = mx.stack([mx.take(quant_map, byte >> 4), mx.take(quant_map, byte & 0xF)], axis=1)
    values = pairs[packed.reshape(-1)].reshape(-1)[: state.numel]
    return scale_blocks(values, absmax, state.blocksize).reshape(state.shape)


def dequantize_nested_absmax(
    codes: mx.array, nested: mx.array, nested_map: mx.array, state: QuantState
) -> mx.array:
    """A nested group's scales: ``nested_map[a] * nested[a_block] + offset`` (float32, two
    roundings, as bitsandbytes' dequantize_blockwise and its ``absmax += offset``)."""
    values = mx.take(nested_map, codes.astype(mx.uint32))
    scaled = scale_blocks(values, nested, state.nested_blocksize)
    return scaled + mx.array(state.nested_offset, dtype=mx.float32)


def scale_blocks(values: mx.array, scales: mx.array, blocksize: int) -> mx.array:
    """``values[i] * scales[i // blocksize]``, flat; the last block may be short."""
    n = values.size
    blocks = scales.shape[0]
    pad = blocks * blocksize - n
    if pad:
        values = mx.pad(values, (0, pad))
    return (values.reshape(blocks, blocksize) * scales[:, None]).reshape(-1)[:n]


@dataclass(frozen=True)
class Nf4Format:
    """The source format the loader and converter dispatch on (``ideogram4_mlx.sources``)."""

    name: str = "nf4"

    def claims(self, headers: Headers) -> bool:
        return claims(headers)

    def decoded_headers(self, headers: Headers) -> Headers:
        return decoded_headers(headers)

    def decode(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        return decode(weights)


FORMAT = Nf4Format()
