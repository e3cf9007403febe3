"""Sanitized tensors against a model's float skeleton (shared by the converter and the delta)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from ideogram4_mlx.config import CheckpointError


def check_keys(
    weights: dict[str, mx.array], expected: dict, key_files: dict[str, Path], src_dir: Path
) -> None:
    """Sanitized tensors against the float skeleton of the config: keys and shapes."""
    for key in sorted(expected):
        if key not in weights:
            raise CheckpointError(
                f"{src_dir}: {key} is missing (config.json expects shape {tuple(expected[key])})"
            )
    for key in sorted(weights):
        if key not in expected:
            raise CheckpointError(
                f"{source_file(key, key_files, src_dir)}: unexpected tensor {key} "
                f"(config.json has no such parameter)"
            )
        if weights[key].shape != expected[key]:
            raise CheckpointError(
                f"{source_file(key, key_files, src_dir)}: {key} has shape "
                f"{tuple(weights[key].shape)}, config.json expects {tuple(expected[key])}"
            )


def source_file(key: str, key_files: dict[str, Path], src_dir: Path) -> Path:
    """The file holding a sanitized key (repack prefixes and split qkv names allowed)."""
    files = set(key_files.values())
    if len(files) == 1:
        return files.pop()
    stem = key.rpartition(".")[0]
    stems = (
        stem,
        stem.replace(".qkv", ".to_q"),
        stem.replace(".attention.o", ".attention.to_out.0"),
    )
    for source_key, path in key_files.items():
        if source_key.rpartition(".")[0].endswith(stems):
            return path
    return src_dir
