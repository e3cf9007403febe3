"""Step caching (``--cache-threshold``, ``step_cache.BlockCache``): seconds and passes.

For each threshold T, the same image (seed, size, steps) through ``generate``: denoise and
total seconds (the fastest of ``--repeats``: the machine may be shared), full and cached passes
per CFG branch, and how far the latents moved from the first T (relative L2). The default
checkpoint is the tiny synthetic one (random weights, ``--layers`` blocks per DiT): its numbers
say what a cached pass saves and that T = 0 changes nothing, not what caching does to a real
image. Random weights move block 0 by ~80-160% a step, so the thresholds peers use
(0.05-0.12) skip nothing there; 1.0 shows what a skip saves.

    python benchmarks/step_cache.py --layers 12
    python benchmarks/step_cache.py --model /path/to/ideogram4 --size 1024 --steps 20
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from ideogram4_mlx import load
from ideogram4_mlx.synth import SYNTHETIC_PRESETS, write_synthetic_checkpoint

CAPTION = '{"high_level_description":"a red sign","compositional_deconstruction":{}}'


def run(pipe, threshold: float, args) -> tuple[float, float, dict, np.ndarray]:
    """One image: denoise and total seconds, the denoise stats and the latents."""
    settings = {"width": args.size, "height": args.size, "num_steps": args.steps, "seed": 3}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = pipe.generate(CAPTION, **settings, cache_threshold=threshold)
    total = time.perf_counter() - start
    return result.stats["denoise"]["seconds"], total, result.stats["denoise"], result.latents


def passes(counts: dict) -> str:
    return f"{counts['full_passes']}+{counts['cached_passes']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, help="a checkpoint (default: the tiny synthetic)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0, 0.05, 0.08, 0.2, 1])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--layers", type=int, default=2, help="the synthetic DiTs' blocks")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        spec = replace(SYNTHETIC_PRESETS["tiny"], dit_num_layers=args.layers)
        model = args.model or write_synthetic_checkpoint(Path(tmp) / "tiny", spec, seed=0)
        pipe = load(model, dtype=getattr(mx, args.dtype), keep_in_memory=True)
        run(pipe, 0.0, args)  # warm-up
        # Interleaved, every other repeat in reverse: the times drift up over a session here
        # (2.5 -> 3.8 s for the same run), which would otherwise favour the first thresholds.
        runs = {t: [] for t in args.thresholds}
        for i in range(args.repeats):
            for t in args.thresholds[:: -1 if i % 2 else 1]:
                runs[t].append(run(pipe, t, args))
    rows = {}
    for t, done in runs.items():
        row = {"denoise_s": min(r[0] for r in done), "total_s": min(r[1] for r in done)}
        rows[t] = {**row, "cond": done[-1][2]["cond"], "uncond": done[-1][2]["uncond"]}, done[-1][3]
    base_row, base = rows[args.thresholds[0]]
    name = args.model or f"tiny synthetic, {args.layers} blocks (random weights)"
    print(f"model: {name}; {args.size}^2, {args.steps} steps, fastest of {args.repeats}; "
          "passes: full+cached")  # fmt: skip
    print(f"{'T':>6} {'denoise s':>10} {'x':>6} {'total s':>8} {'cond':>7} {'uncond':>7} "
          f"{'latents rel L2 vs first T':>26}")  # fmt: skip
    for t, (row, latents) in rows.items():
        moved = float(np.linalg.norm(latents - base) / np.linalg.norm(base))
        speedup = base_row["denoise_s"] / row["denoise_s"]
        print(f"{t:>6g} {row['denoise_s']:>10.3f} {speedup:>6.2f} {row['total_s']:>8.3f} "
              f"{passes(row['cond']):>7} {passes(row['uncond']):>7} {moved:>26.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
