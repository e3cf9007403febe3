"""What a user asks for (``--lora FILE[:SCALE]``, ``--lora-uncond``) and finding the files
again for a replay from an image's metadata (by SHA-256, given or in the Hugging Face cache).
Reading and applying the files is ``lora.py``'s.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ideogram4_mlx import hub
from ideogram4_mlx.errors import InputError
from ideogram4_mlx.lora import LoRAError, file_sha256

TARGETS = ("cond", "uncond")  # transformer/, unconditional_transformer/
MAX_SCALE = 100.0


@dataclass(frozen=True)
class LoRASpec:
    """A LoRA to load: a file or a Hub repo (``owner/name`` or ``owner/name/file``), its
    scale (None: 1, or the stored one in a replay) and its DiT (``cond`` or ``uncond``)."""

    source: str | Path
    scale: float | None = None
    target: str = "cond"

    def __post_init__(self):
        if self.target not in TARGETS:
            raise LoRAError(f"LoRA target {self.target!r}: use one of {', '.join(TARGETS)}")
        if self.scale is not None and not (
            np.isfinite(self.scale) and abs(self.scale) <= MAX_SCALE
        ):
            raise LoRAError(
                f"LoRA scale {self.scale} for {self.source}: use a finite number within "
                f"+-{MAX_SCALE:g}"
            )

    def resolved(self) -> LoRASpec:
        """This spec with its scale as a float: 1 where none was given."""
        return replace(self, scale=1.0 if self.scale is None else float(self.scale))


def parse_lora_option(value: str, target: str = "cond") -> LoRASpec:
    """``FILE`` or ``FILE:SCALE`` (the part after the last colon, when it is a number)."""
    source, _, tail = value.rpartition(":")
    try:
        scale = float(tail) if source else None
    except ValueError:
        scale = None
    return LoRASpec(value if scale is None else source, scale, target)


def replay_loras(stored, given: list[LoRASpec]) -> list[LoRASpec]:
    """The LoRAs of an image's metadata (``loras``: name, sha256, target, scale) as specs.

    Each stored LoRA's file is one of ``given`` with the same SHA-256 (its scale, when given,
    overrides the stored one), else a file of the same name in the Hugging Face cache with
    that SHA-256; otherwise ``LoRAError`` says which file to give. Given files matching no
    stored LoRA are added. Raises ``InputError`` for a mistyped record.
    """
    if stored is None:
        stored = []
    if not isinstance(stored, list) or not all(_valid_record(r) for r in stored):
        raise InputError(
            "metadata field 'loras' is not a list of {name, sha256, target, scale} records"
        )
    hashes = [file_sha256(hub.resolve_file(spec.source)) for spec in given]
    specs, used = [], set()
    for record in stored:
        match_ = next((i for i, h in enumerate(hashes) if h == record["sha256"]), None)
        if match_ is not None:
            used.add(match_)
            spec = given[match_]
            scale = record["scale"] if spec.scale is None else spec.scale
            specs.append(LoRASpec(spec.source, scale, record["target"]))
            continue
        path = next(
            (p for p in hub.cached_files(record["name"]) if file_sha256(p) == record["sha256"]),
            None,
        )
        if path is None:
            flag = "--lora" if record["target"] == "cond" else "--lora-uncond"
            raise LoRAError(
                f"the image used the LoRA {record['name']} (sha256 {record['sha256'][:12]}..., "
                f"scale {record['scale']}) and no file with that SHA-256 was given or is in the "
                f"Hugging Face cache: give it with {flag} FILE"
            )
        specs.append(LoRASpec(path, record["scale"], record["target"]))
    specs += [spec for i, spec in enumerate(given) if i not in used]
    return specs


def _valid_record(record) -> bool:
    return (
        isinstance(record, dict)
        and isinstance(record.get("name"), str)
        and isinstance(record.get("sha256"), str)
        and record.get("target") in TARGETS
        and isinstance(record.get("scale"), (int, float))
        and not isinstance(record.get("scale"), bool)
    )
