"""Where the converter reads one component from: a folder of safetensors files (any format
``ideogram4_mlx.sources`` decodes), or a single DiT file (a Comfy repack, a GGUF file).

An input hands out decoded headers (keys as in the source, float dtypes and ``(out, in)``
shapes), the groups of keys loaded at once and the tensors of a group. A folder and a Comfy
file decode lazily, so one group holds every key and the writer evaluates one tensor at a time;
a GGUF file dequantizes eagerly, so its groups are single tensors (a split q/k/v together) and
one is in memory
(MODEL_NOTES#checkpoint-formats).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from ideogram4_mlx.config import CheckpointError
from ideogram4_mlx.errors import InputError
from ideogram4_mlx.sources import OFFICIAL, Headers, detect, tensor_groups
from ideogram4_mlx.weights import (
    DtypeRule,
    check_raw_dtypes,
    component_files,
    load_safetensors,
    placeholders,
    source_headers,
    tensor_headers,
)

# The DiT components a single file can stand for.
FILE_COMPONENTS = ("transformer", "unconditional_transformer")


@dataclass
class ComponentInput:
    """One component's tensors. ``files``: the weight files; ``reader``: a GGUF file's reader
    (``ideogram4_mlx.sources.gguf_file``), None for safetensors files."""

    files: list[Path]
    reader: object | None = None
    single: bool = False  # a DiT file given by itself, not a component folder
    _lazy: dict | None = field(default=None, repr=False)

    @classmethod
    def folder(cls, component_dir: Path) -> ComponentInput:
        return cls(component_files(component_dir))

    @classmethod
    def file(cls, path: Path) -> ComponentInput:
        """A single DiT file: safetensors (a Comfy repack, or any layout a folder may hold) or
        GGUF (read with the ``gguf`` package, ``ideogram4_mlx.sources.gguf_file``)."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise InputError(f"{path}: no such file (give a .safetensors or .gguf DiT file)")
        if path.suffix == ".safetensors":
            return cls([path], single=True)
        if path.suffix == ".gguf":
            from ideogram4_mlx.sources.gguf_file import GGUFSource

            return cls([path], GGUFSource(path), single=True)
        raise InputError(
            f"{path}: not a DiT file this converter reads (expected .safetensors or .gguf)"
        )

    @property
    def format(self) -> str:
        if self.reader is not None:
            return self.reader.format
        return getattr(detect(tensor_headers(self.files)), "name", OFFICIAL)

    def headers(self) -> Headers:
        return self.reader.headers() if self.reader is not None else source_headers(self.files)

    def check_dtypes(self, rule: DtypeRule) -> dict[str, Path]:
        """Every tensor's dtype (``weights.check_raw_dtypes``; a reader checks its own file);
        ``{key: file}``."""
        if self.reader is not None:
            return {key: path for key, (_, _, path) in self.headers().items()}
        return check_raw_dtypes(self.files, rule)

    def groups(self) -> list[list[str]]:
        """Keys loaded at once: all (lazy safetensors), or one tensor (a GGUF file; split
        to_q/to_k/to_v together, which sanitize joins)."""
        keys = self.headers()
        return [sorted(keys)] if self.reader is None else tensor_groups(keys)

    def load(self, keys: Iterable[str]) -> dict[str, mx.array]:
        if self.reader is not None:
            return self.reader.load(keys)
        if self._lazy is None:
            self._lazy = load_safetensors(self.files)
        return {k: self._lazy.pop(k) for k in keys}

    def placeholders(self) -> dict[str, mx.array]:
        """Lazy zeros of every decoded tensor's shape: what ``sanitize`` and the key checks
        run on before anything is read (never evaluated)."""
        return placeholders(self.headers())

    def exact_spec(self, key: str, scales_dtype: str) -> tuple[int, int] | None:
        """``(bits, group_size)`` of a source weight that MLX's affine mode stores exactly as
        it is with scales in ``scales_dtype`` (GGUF Q8_0/Q4_0/Q4_1/Q5_0/Q5_1; with float32
        scales also Q4_K/Q5_K), from the headers; None otherwise (``--quantize keep``)."""
        if self.reader is None or not hasattr(self.reader, "exact_spec"):
            return None
        return self.reader.exact_spec(key, scales_dtype)

    def exact(self, key: str, dtype: mx.Dtype) -> dict:
        """That weight in MLX's layout: ``{"weight", "scales", "biases"}`` (scales and biases in
        ``dtype``, refused if that changes a value), read now."""
        return self.reader.exact(key, dtype)


def check_format(name: str, found: str, expected: str | None) -> None:
    """``--from``: the format the files hold must be the one asked for."""
    family = found.split("-")[0]
    if expected is not None and expected not in (found, family):
        raise CheckpointError(
            f"{name}: the files hold the {found} format, not {expected}; drop --from to "
            "convert what they hold, or point at the other files"
        )
