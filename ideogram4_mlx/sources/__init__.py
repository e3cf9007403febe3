"""Checkpoint formats other than the official fp8 layout, decoded to float tensors on the way in.

The official snapshot (`ideogram-ai/ideogram-4-fp8`) is read as it is: its fp8 + per-row scale
pairs are dequantized by each model's ``sanitize``. Every other layout users hold is a
*format*: a module of this package with a ``FORMAT`` object that recognises its tensors from the
safetensors headers and replaces each quantized group by one float ``X.weight``, before any
model sees the tensors (MODEL_NOTES#checkpoint-formats):

- ``claims(headers)``: these headers hold this format's tensors (headers only, cheap);
- ``decoded_headers(headers)``: every format tensor checked, and the headers as ``decode``
  will produce them (dequantized weights "F32", shape ``(out, in)``, helper tensors gone);
- ``decode(weights)``: the same on the lazily loaded arrays, with MLX ops only, so nothing is
  read before the converter or loader evaluates one tensor at a time (bounded memory).

``ideogram4_mlx.weights`` calls them (:func:`detect`) in its dtype and config checks and in
``load_safetensors``: loading a folder and converting it both see float weights.

Single-file DiTs (a GGUF file, a Comfy repack) are read by a :class:`Reader`, which the
converter streams block by block (:func:`block_groups`).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import mlx.core as mx

from ideogram4_mlx.config import CheckpointError

# key -> (safetensors dtype string, shape, file), as ``weights.tensor_headers`` returns it.
Headers = dict[str, tuple[str, tuple[int, ...], Path]]

# "module:attribute" of every registered format, in the order they are asked.
REGISTERED: tuple[str, ...] = ("nf4:FORMAT", "comfy:FORMAT")
# The names ``--from`` accepts: the official layout, then each format family (a format's
# name is its family, or the family and a variant: ``comfy-nvfp4``).
OFFICIAL = "fp8"
SOURCE_FAMILIES = (OFFICIAL, "nf4", "comfy", "gguf")


class Format(Protocol):
    name: str

    def claims(self, headers: Headers) -> bool: ...

    def decoded_headers(self, headers: Headers) -> Headers: ...

    def decode(self, weights: dict[str, mx.array]) -> dict[str, mx.array]: ...


class Reader(Protocol):
    """The tensors of one component from a source that is not a folder of safetensors files
    (a GGUF file): decoded headers, tensors loaded a few at a time, and the tensors whose
    quantization MLX represents exactly (``exact``), which ``--quantize keep`` copies."""

    format: str  # its name (``gguf``), recorded in the conversion

    def headers(self) -> Headers: ...

    def load(self, keys: Iterable[str]) -> dict[str, mx.array]: ...

    def exact(self, key: str) -> dict | None: ...


def formats() -> list[Format]:
    """The registered formats (their modules are imported on first use)."""
    found = []
    for entry in REGISTERED:
        module, _, attr = entry.partition(":")
        found.append(getattr(importlib.import_module(f"{__name__}.{module}"), attr))
    return found


def detect(headers: Headers) -> Format | None:
    """The format whose tensors these headers hold; None for the official layout (or plain
    float weights). Two formats claiming one component is a damaged or mixed file."""
    claiming = [f for f in formats() if f.claims(headers)]
    if len(claiming) > 1:
        files = sorted({str(path) for _, _, path in headers.values()})
        raise CheckpointError(
            f"{', '.join(files)}: holds tensors of several formats "
            f"({', '.join(f.name for f in claiming)}); use the files of one checkpoint"
        )
    return claiming[0] if claiming else None


def format_name(headers: Headers) -> str:
    """The name of the headers' format (``fp8`` for the official layout)."""
    found = detect(headers)
    return OFFICIAL if found is None else found.name


def decoded_keys(raw: Headers, decoded: Headers) -> set[str]:
    """The keys a format produced or changed (the dequantized weights)."""
    return {k for k, v in decoded.items() if raw.get(k, (None, None))[:2] != v[:2]}


BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.")


SPLIT_ATTENTION = re.compile(r"\.attention\.to_[qkv]\.")


def tensor_groups(keys: Iterable[str]) -> list[list[str]]:
    """Keys one tensor at a time, in block order (:func:`block_groups`), but for diffusers'
    split ``to_q/to_k/to_v`` of one block, which ``sanitize`` joins into one ``qkv``: what a
    converter loads at once from an eagerly decoding reader (one tensor in float32 in memory)."""
    groups = []
    for block in block_groups(keys):
        joined: dict[str, list[str]] = {}
        for key in block:
            stem = SPLIT_ATTENTION.sub(".attention.to_qkv.", key)
            joined.setdefault(stem, []).append(key)
        groups.extend(joined.values())
    return groups


def block_groups(keys: Iterable[str]) -> list[list[str]]:
    """Keys grouped by DiT block (``layers.N.``), the keys outside the blocks first: what a
    converter loads at once from an eagerly decoding reader (one block in memory)."""
    groups: dict[int, list[str]] = {}
    for key in sorted(keys):
        match = BLOCK.search(key)
        groups.setdefault(-1 if match is None else int(match.group(1)), []).append(key)
    return [groups[i] for i in sorted(groups)]
