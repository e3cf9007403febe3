"""Which Ideogram 4 checkpoints are on this machine: Hub snapshots in the Hugging Face cache
and the folders a user names (original snapshots or ``ideo4-mlx convert`` outputs).

Data only; ``ideo4-mlx models`` formats it. Nothing here touches the network or reads
tensor data: sizes come from the file system, dtypes from config records and safetensors
headers.
"""

from __future__ import annotations

import math
import os
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub.constants
from huggingface_hub import scan_cache_dir
from huggingface_hub.errors import CacheNotFound

from ideogram4_mlx.config import CheckpointError, read_json
from ideogram4_mlx.hub import DEFAULT_REPO, REQUIRED_FILES
from ideogram4_mlx.quantization import MODE
from ideogram4_mlx.sources import detect
from ideogram4_mlx.weights import component_files, conversion_record, tensor_headers

MODEL_COMPONENTS = ("transformer", "unconditional_transformer", "text_encoder", "vae")
FILE_COMPONENTS = ("tokenizer", "scheduler")  # copied as they are; no dtype
PIPELINE_CLASS = "Ideogram4Pipeline"
DIT_CLASS = "Ideogram4Transformer2DModel"
FP8_TEXT = "fp8, per-row scales"  # the released format (MODEL_NOTES#fp8-dequantization)
# Single DiT files a folder may hold (a ComfyUI models folder), searched this deep.
DIT_FILE_SUFFIXES = (".gguf", ".safetensors")
DIT_FILE_DEPTH = 2
MAX_LISTED_FILES = 200


@dataclass(frozen=True)
class Component:
    name: str
    dtype: str  # a conversion's dtype, or the stored safetensors dtypes ("F8_E4M3, BF16, F32")
    quantization: str  # "4-bit g64", "none", FP8_TEXT (as released); "" for file components
    size: int  # bytes on disk


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    converted: bool  # some component records mlx_conversion
    source: str | None  # what a conversion was made from
    components: tuple[Component, ...]
    missing: tuple[str, ...]  # files generate needs that are not there
    size: int  # bytes on disk, each file once
    problem: str | None = None  # why the folder could not be read (components then empty)


@dataclass(frozen=True)
class DiTFile:
    """A DiT stored as one file (a Comfy repack, a GGUF file): what ``convert --transformer``
    reads."""

    path: Path
    format: str  # "gguf", "comfy-fp8", ... ("fp8" for the official layout in one file)
    quantization: str  # the stored types, most elements first ("Q4_K, F32")
    size: int
    problem: str | None = None


@dataclass(frozen=True)
class CachedCheckpoint:
    repo_id: str
    revision: str  # commit hash
    refs: tuple[str, ...]  # branches and tags pointing at it ("main")
    checkpoint: Checkpoint


@dataclass(frozen=True)
class ModelList:
    cache_dir: Path
    cached: tuple[CachedCheckpoint, ...]
    folders: tuple[Checkpoint, ...]
    files: tuple[DiTFile, ...] = ()


def list_models(paths=(), cache_dir: Path | str | None = None) -> ModelList:
    """Ideogram 4 snapshots in the Hugging Face cache (``HF_HUB_CACHE``, by default under
    ``HF_HOME``) and the checkpoint folders in ``paths``; a path that is not one raises
    ``CheckpointError``."""
    cache_dir = Path(cache_dir or huggingface_hub.constants.HF_HUB_CACHE).expanduser()
    folders, files = [], []
    for path in (Path(p).expanduser() for p in paths):
        if path.is_file():
            files.append(inspect_file(path))
        elif path.is_dir() and not is_checkpoint_folder(path) and (found := dit_files(path)):
            files.extend(inspect_file(f) for f in found)  # e.g. ComfyUI/models
        else:
            folders.append(inspect_checkpoint(path))
    cached = tuple(cached_checkpoints(cache_dir))
    return ModelList(cache_dir, cached, tuple(folders), tuple(files))


def is_checkpoint_folder(folder: Path) -> bool:
    """A snapshot or conversion has component configs (ComfyUI's models/vae/ has none)."""
    return (folder / "model_index.json").is_file() or any(
        (folder / n / "config.json").is_file() for n in MODEL_COMPONENTS
    )


def dit_files(folder: Path) -> list[Path]:
    """The .gguf and .safetensors files under ``folder`` (at most DIT_FILE_DEPTH deep) whose
    headers hold an Ideogram 4 DiT, at most MAX_LISTED_FILES of them."""
    found = []
    for root, dirs, names in os.walk(folder):
        depth = len(Path(root).relative_to(folder).parts)
        if depth >= DIT_FILE_DEPTH:
            dirs.clear()
        for name in sorted(names):
            path = Path(root) / name
            if path.suffix in DIT_FILE_SUFFIXES and len(found) < MAX_LISTED_FILES:
                if path.suffix == ".gguf" or holds_dit(path):
                    found.append(path)
    return sorted(found)


def holds_dit(path: Path) -> bool:
    """A safetensors file with the DiT's first block (any repack prefix); headers only."""
    try:
        keys = tensor_headers([path])
    except CheckpointError:
        return False
    return any(k.endswith("layers.0.attention_norm1.weight") for k in keys)


def inspect_file(path: Path) -> DiTFile:
    """A single DiT file's format and stored types (headers only), or its problem."""
    size = path.stat().st_size
    try:
        if path.suffix == ".gguf":
            from ideogram4_mlx.sources.gguf_file import GGUFSource

            elements = Counter()
            reader = GGUFSource(path)
            headers = reader.headers()
            for key, kind in reader.qtypes().items():
                elements[kind] += math.prod(headers[key][1])
            types = ", ".join(d for d, _ in elements.most_common())
            return DiTFile(path, "gguf", types, size)
        headers = tensor_headers([path])
        found = detect(headers)
        name = "fp8" if found is None else found.name
        return DiTFile(path, name, stored_types(headers), size)
    except CheckpointError as e:
        return DiTFile(path, "?", "", size, problem=str(e))


def cached_checkpoints(cache_dir: Path) -> list[CachedCheckpoint]:
    """Every cached model revision that looks like an Ideogram 4 snapshot, newest first per repo."""
    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return []
    found = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for rev in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            if is_ideogram4(rev.snapshot_path):
                refs = tuple(sorted(rev.refs))
                checkpoint = inspect_or_report(rev.snapshot_path)
                found.append(CachedCheckpoint(repo.repo_id, rev.commit_hash, refs, checkpoint))
    return found


def is_ideogram4(folder: Path) -> bool:
    """Judged by class names: the component folder names alone are shared by other diffusers
    models."""
    for name, expected in (
        ("model_index.json", PIPELINE_CLASS),
        ("transformer/config.json", DIT_CLASS),
    ):
        try:
            if read_json(folder / name).get("_class_name") == expected:
                return True
        except CheckpointError:
            continue
    return False


def inspect_or_report(folder: Path) -> Checkpoint:
    """``inspect_checkpoint``, with a damaged folder listed (and its problem) instead of raised."""
    try:
        return inspect_checkpoint(folder)
    except CheckpointError as e:
        return Checkpoint(folder, False, None, (), (), disk_size(folder), problem=str(e))


def inspect_checkpoint(path: Path | str) -> Checkpoint:
    """What a checkpoint folder holds: per component, its dtype, quantization and size."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder")
    names = [n for n in (*MODEL_COMPONENTS, *FILE_COMPONENTS) if (folder / n).is_dir()]
    if not names:
        raise CheckpointError(
            f"{folder} is not an Ideogram 4 checkpoint folder: it has none of "
            f"{', '.join(MODEL_COMPONENTS + FILE_COMPONENTS)} (expected the layout of "
            f"{DEFAULT_REPO} or of an ideo4-mlx convert output)"
        )
    records = {n: conversion_record(folder / n) for n in names if n in MODEL_COMPONENTS}
    components = tuple(component(folder / n, records.get(n)) for n in names)
    # the source most components came from (a DiT converted from a file names the file)
    sources = Counter(r.get("source") for r in records.values() if r is not None)
    return Checkpoint(
        path=folder,
        converted=bool(sources),
        source=sources.most_common(1)[0][0] if sources else None,
        components=components,
        missing=tuple(f for f in REQUIRED_FILES if not (folder / f).is_file()),
        size=disk_size(folder),
    )


def component(folder: Path, record: dict | None) -> Component:
    size = disk_size(folder)
    if folder.name not in MODEL_COMPONENTS:
        return Component(folder.name, "", "", size)
    if record is not None:
        return Component(folder.name, record["dtype"], quantization_text(record), size)
    try:
        headers = tensor_headers(component_files(folder))
    except CheckpointError:
        return Component(folder.name, "no weights", "none", size)  # e.g. a download under way
    found = detect(headers)
    dtypes = stored_types(headers)
    if found is not None:
        return Component(folder.name, dtypes, found.name, size)
    return Component(folder.name, dtypes, FP8_TEXT if "F8_E4M3" in dtypes else "none", size)


def quantization_text(record: dict) -> str:
    """``4-bit g64``, with the layers that differ: ``mixed-4-8: 4-bit g64; 8-bit: 68 layers,
    float: 3 layers``; a float mode by name: ``mxfp4 (4-bit g32); affine 8-bit g64: 1 layer,
    float: 9 layers``."""
    q = record.get("quantization")
    if not q:
        return "none"
    mode = q.get("mode", MODE)

    def kind(o: dict | bool) -> str:
        if o is False:
            return "float"
        if o.get("mode", mode) == mode:
            return f"{o['bits']}-bit"
        return setting_text(o["mode"], o["bits"], o["group_size"], named=True)

    text = setting_text(mode, q["bits"], q["group_size"])
    counts = Counter(kind(o) for o in q.get("overrides", {}).values())
    if counts:
        text += "; " + ", ".join(
            f"{kind}: {n} layer{'s' if n != 1 else ''}" for kind, n in sorted(counts.items())
        )
    return f"{q['recipe']}: {text}" if q.get("recipe") else text


def setting_text(mode: str, bits: int, group_size: int, named: bool = False) -> str:
    """``4-bit g64`` (``affine 4-bit g64`` when ``named``) or ``mxfp4 (4-bit g32)``."""
    if mode != MODE:
        return f"{mode} ({bits}-bit g{group_size})"
    return f"{MODE} {bits}-bit g{group_size}" if named else f"{bits}-bit g{group_size}"


def stored_types(headers: dict) -> str:
    """The safetensors dtypes of some headers, most elements first."""
    elements = Counter()
    for dtype, shape, _ in headers.values():
        elements[dtype] += math.prod(shape)
    return ", ".join(d for d, _ in elements.most_common())


def disk_size(folder: Path) -> int:
    """Bytes of the files under ``folder``, links followed, each file once (a Hub snapshot
    links into shared blobs)."""
    seen, total = set(), 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                st = os.stat(os.path.join(root, name))
            except OSError:
                continue  # a dangling link
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total
