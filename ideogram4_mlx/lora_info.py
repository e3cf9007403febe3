"""``ideo4-mlx lora-info``'s report on a LoRA file against a checkpoint's DiT (``lora.py``
reads and matches it)."""

from __future__ import annotations

import re
from dataclasses import replace

from ideogram4_mlx.lora import LoRAError, LoRAFile, match


def describe(lora: LoRAFile, shapes: dict[str, tuple[int, int]], against: str) -> list[str]:
    """``lora-info``'s report: layout, ranks, alphas, what it targets and what matched."""
    kinds: dict[str, int] = {}
    for target, deltas in lora.deltas.items():
        kind = re.sub(r"^layers\.\d+\.", "layers.*.", target)
        for d in deltas:
            label = kind + (f" ({'qkv'[d.third]} third)" if d.third is not None else "")
            kinds[label] = kinds.get(label, 0) + 1
    scales = sorted({round(d.alpha_scale, 6) for ds in lora.deltas.values() for d in ds})
    matched = [t for t in lora.deltas if t in shapes]
    unmatched = [t for t in lora.deltas if t not in shapes]
    lines = [
        f"file      : {lora.path}",
        f"sha256    : {lora.sha256}",
        f"layout    : {lora.layout}",
        f"rank(s)   : {', '.join(map(str, lora.ranks))}",
        f"alpha / r : {', '.join(f'{s:g}' for s in scales)}",
        f"modules   : {len(lora.deltas)} ({sum(kinds.values())} updates)",
    ]
    if lora.diffs:
        lines.append(
            f"full diffs: {len(lora.diffs)} tensors (.diff/.diff_b: an unconditional delta)"
        )
    lines += [f"  {kind}: {count}" for kind, count in sorted(kinds.items())]
    lines.append(
        f"names     : {len(matched)} of {len(lora.deltas)} modules are layers of {against}"
    )
    lines += [f"  unmatched: {t}" for t in unmatched[:10]]
    try:
        match(replace(lora, text_encoder_keys=[]), shapes, allow_partial=True, diffs=True)
    except LoRAError as e:
        lines.append(f"shapes    : do not fit ({e})")
    else:
        partial = (
            f" ({len(unmatched)} of {len(lora.deltas)} modules match no layer: "
            "--lora-allow-partial applies the rest)"
            if unmatched
            else ""
        )
        fits = f"fits: {len(matched)} layers{partial}" if matched else "no module names a layer"
        lines.append(f"shapes    : {fits}")
    if lora.text_encoder_keys:
        lines.append(f"text encoder keys: {len(lora.text_encoder_keys)} (not supported)")
    if lora.training is not None:
        lines.append(f"training  : {lora.training}")
    return lines
