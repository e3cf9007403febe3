"""Generation metadata in PNG files: write it, read it back, turn it into a replay.

The metadata (``GenerationResult.metadata``) is stored as JSON in one compressed iTXt chunk
(UTF-8, so captions in any script survive) under the key :data:`PNG_KEY`.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from ideogram4_mlx.caption import parse_json
from ideogram4_mlx.environment import describe, differences
from ideogram4_mlx.errors import InputError
from ideogram4_mlx.files import write_file
from ideogram4_mlx.pipeline_options import STORED, STORED_DEFAULTS, PipelineOptions
from ideogram4_mlx.request import METADATA_TYPES, SETTINGS, GenerationRequest
from ideogram4_mlx.version import __version__

PNG_KEY = "ideogram4-mlx"


def png_info(metadata: Mapping) -> PngInfo:
    """A PNG text chunk holding ``metadata`` as JSON, for ``Image.save(..., pnginfo=...)``."""
    info = PngInfo()
    info.add_itxt(PNG_KEY, json.dumps(metadata, ensure_ascii=False), zip=True)
    info.add_text("Software", f"ideogram4-mlx {__version__}")
    return info


def png_bytes(image: Image.Image, metadata: Mapping) -> bytes:
    """The PNG file :func:`save_png` writes, in memory (to send it to another rank)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(metadata))
    return buffer.getvalue()


def save_png(
    image: Image.Image, path: Path | str, metadata: Mapping | None = None, force: bool = False
) -> Path:
    """Write ``image`` (with ``metadata``) to ``path`` atomically.

    The PNG goes to a temporary file in the same folder, renamed into place at the end, so
    ``path`` never holds a half-written image, and a link at ``path`` is replaced, never
    written through. Missing parent folders are created. An existing ``path`` raises
    ``FileExistsError`` unless ``force``.
    """
    pnginfo = None if metadata is None else png_info(metadata)
    return write_file(path, lambda f: image.save(f, format="PNG", pnginfo=pnginfo), force)


def check_output(path: Path | str, force: bool = False) -> None:
    """What :func:`save_png` would refuse, checked before any work: an existing ``path``
    without ``force``, a folder at ``path``, or a parent folder that cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a .png file name")
    if (path.exists() or path.is_symlink()) and not force:
        raise FileExistsError(f"{path} already exists; pass --force to replace it")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # save_png creates the missing folders below the first one
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write into {parent}: choose another --output")


def compare_replay(original: Path | str, replayed: Path | str) -> str:
    """How a replay's pixels compare with the image it replays, in one line."""
    with Image.open(original) as a, Image.open(replayed) as b:
        old, new = np.asarray(a.convert("RGB"), np.int16), np.asarray(b.convert("RGB"), np.int16)
    if old.shape != new.shape:
        return f"replay: {replayed} and {original} differ in size"
    diff = np.abs(old - new).max(axis=-1)
    if not diff.any():
        return f"replay: identical to {original}"
    return (
        f"replay: differs from {original} in {100 * (diff > 0).mean():.1f}% of pixels, "
        f"by at most {int(diff.max())} levels"
    )


def read_metadata(path: Path | str) -> dict:
    """The metadata dict stored by :func:`png_info` in the PNG at ``path``.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a file that is not
    a PNG or has no (or unreadable) ideogram4-mlx metadata.
    """
    try:
        with Image.open(path) as image:
            kind = image.format
            text = dict(getattr(image, "text", {}))
    except UnidentifiedImageError as e:
        raise InputError(f"{path} is not an image") from e
    if kind != "PNG":
        raise InputError(f"{path} is a {kind} file; metadata is only stored in PNG files")
    if PNG_KEY not in text:
        raise InputError(
            f"{path} has no {PNG_KEY} metadata: it was not written by `ideo4-mlx generate`, "
            "or the metadata was stripped"
        )
    try:
        metadata = parse_json(text[PNG_KEY])
    except ValueError as e:  # invalid or too deeply nested
        raise InputError(f"{path}: the {PNG_KEY} metadata is not valid JSON ({e})") from e
    if not isinstance(metadata, dict):
        raise InputError(f"{path}: the {PNG_KEY} metadata is not a JSON object")
    return metadata


def replay(
    metadata: Mapping, overrides: Mapping | None = None, options: PipelineOptions | None = None
) -> tuple[PipelineOptions, GenerationRequest]:
    """The :class:`PipelineOptions` and the ``GenerationRequest`` that reproduce ``metadata``.

    ``overrides`` holds stored options (``model``, ``revision``, ``dtype``) and request fields;
    the request's are applied with ``dataclasses.replace`` to
    ``GenerationRequest.from_metadata(metadata)``, where values that only came from the
    preset are None: a new ``preset`` brings its own steps, guidance, mu and std unless the
    image set them explicitly, a new ``num_steps`` reshapes a preset-shaped guidance schedule.
    ``options`` (the command line's) give everything the image does not store; the image's
    LoRAs are found again among its ``loras`` or in the Hugging Face cache
    (:meth:`PipelineOptions.from_metadata`).

    Raises ``ValueError`` when a field is missing or mistyped, or when the image was made
    from given noise (no seed) and no ``seed`` override is given.
    """
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(STORED + SETTINGS))
    if unknown:
        raise InputError(f"cannot override {unknown}; valid: {', '.join(STORED + SETTINGS)}")
    missing = [
        k for k in (*STORED, *METADATA_TYPES) if k not in metadata and k not in STORED_DEFAULTS
    ]
    if missing:
        raise InputError(f"the metadata has no {', '.join(missing)}: it cannot be replayed")
    request = GenerationRequest.from_metadata(metadata)
    if request.seed is None and overrides.get("seed") is None:
        raise InputError(
            "the image was made from given noise, not a seed, so it cannot be replayed; "
            "give a seed to reuse its other settings"
        )
    if metadata.get("version") != __version__:
        warnings.warn(
            f"the image was made by ideogram4-mlx {metadata.get('version')}, this is "
            f"{__version__}: the replay may differ",
            stacklevel=2,
        )
    changed = differences(metadata.get("environment"), describe())
    if changed:
        warnings.warn(
            f"the image was made on another setup ({'; '.join(changed)}): the replay may "
            "differ by a few levels in some pixels",
            stacklevel=2,
        )
    options = PipelineOptions.from_metadata(metadata, options, overrides)
    request = replace(request, **{k: v for k, v in overrides.items() if k in SETTINGS})
    return options, request
