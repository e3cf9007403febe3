"""Work per image by mode, side by side in one run (issue #28): V4_DEFAULT_20 against each way
of doing less (no unconditional DiT, few steps, one DiT for both passes, the unconditional DiT
as a delta, step caching).

Each mode runs one image in its own process on the same synthetic checkpoint (random weights:
times and memory are real, image quality is not measured). Columns:

- ``passes``: DiT forward passes over the denoise (CFG steps count 2, guidance-1 steps 1, a
  cached pass counts as a pass of block 0 only and is listed apart);
- ``held GB``: the DiTs' parameters in memory (one DiT counted once), plus a delta's low-rank
  factors;
- ``peak GB``: MLX's peak over the denoise stage (loading included);
- ``s/image``: denoise + decode seconds; ``x``: that time over the default's;
- ``PFLOP @1024``: the same mode at the real model's size (1024^2, a 1000-token caption) from
  the FLOP model (``flops.py``: passes x per-pass FLOPs, cached passes at one block), and the
  time that would take at an assumed 20 TFLOP/s achieved (Metal is not measured here: the
  column only scales the FLOP count).

    python benchmarks/work_per_image.py --workdir /tmp/ideo4-work
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flops import dit_pass_flops, image_tokens  # noqa: E402

from ideogram4_mlx.transformer import TransformerConfig  # noqa: E402

CAPTION = (
    '{"high_level_description":"a red sign","compositional_deconstruction":'
    '{"background":"white","elements":[{"type":"text","text":"OPEN","desc":"bold"}]}}'
)
ASSUMED_TFLOPS = 20.0  # an assumption for the projection column, not a measurement
DELTA_RANK = 16
# mode -> (checkpoint, load options, request settings)
MODES = {
    "default (V4_DEFAULT_20)": ("pair", {}, {}),
    "guidance 1 (no uncond DiT)": ("pair", {}, {"guidance_schedule": (1.0,)}),
    "8 steps, guidance 1": ("pair", {}, {"num_steps": 8, "guidance_schedule": (1.0,)}),
    "--uncond self": ("pair", {"uncond": "self"}, {}),
    f"--uncond delta (rank {DELTA_RANK})": ("delta", {}, {}),
    "--cache-threshold 0.08": ("pair", {}, {"cache_threshold": 0.08}),
}
CHILD = """
import json, sys, time
import mlx.core as mx
from mlx.utils import tree_flatten
from ideogram4_mlx import load
BRANCHES = ("cond", "uncond")
def delta_bytes(lora):
    if lora is None:
        return 0
    factors = [a for ds in lora.deltas.values() for d in ds for a in (d.down, d.up)]
    return sum(a.nbytes for a in [*factors, *lora.diffs.values()])
model, size, options, settings = json.loads(sys.argv[1])
pipe = load(model, dtype="float32", keep_in_memory=True, **options)
pipe.generate(sys.argv[2], width=256, height=256, seed=0, **{**settings, "num_steps": 1})  # warm-up
start = time.perf_counter()
result = pipe.generate(sys.argv[2], width=size, height=size, seed=1, **settings)
seconds = time.perf_counter() - start
held = {id(d): d for d in (pipe._dits or ()) if d is not None}.values()
nbytes = sum(v.nbytes for d in held for _, v in tree_flatten(d.parameters()))
stats = result.stats["denoise"]
print(json.dumps({"seconds": seconds, "peak_gb": stats["peak_gb"], "held_gb": nbytes / 1e9,
                  "steps": len(result.metadata["guidance_schedule"]),
                  "guidance": result.metadata["guidance_schedule"],
                  "full_passes": {b: stats[b]["full_passes"] for b in BRANCHES if b in stats},
                  "cached_passes": {b: stats[b]["cached_passes"] for b in BRANCHES if b in stats},
                  "delta_gb": delta_bytes(pipe.uncond_delta) / 1e9}))
"""


def checkpoints(workdir: Path) -> dict[str, Path]:
    """A synthetic pair whose DiT is wide enough to dominate (its unconditional DiT = the
    conditional one + rank-4 + noise), and a copy converted with the delta in place."""
    from ideogram4_mlx.convert import convert
    from ideogram4_mlx.synth import SYNTHETIC_PRESETS
    from ideogram4_mlx.synth.uncond_pair import write_synthetic_pair

    spec = replace(
        SYNTHETIC_PRESETS["tiny"],
        dit_num_layers=2,
        dit_num_attention_heads=8,
        dit_intermediate_size=4096,
        dit_adaln_dim=256,
    )
    pair = workdir / "pair"
    if not pair.exists():
        write_synthetic_pair(pair, spec, rank=4)
    delta = workdir / f"delta-{DELTA_RANK}"
    if not delta.exists():
        convert(pair, delta, dtype="float32", uncond_as_lora=DELTA_RANK, progress=False)
    return {"pair": pair, "delta": delta}


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def passes(guidance: list[float], full: dict | None, cached: dict | None) -> tuple[int, int]:
    """(full passes, cached passes) over the denoise."""
    if full:
        return sum(full.values()), sum((cached or {}).values())
    return sum(1 if g == 1.0 else 2 for g in guidance), 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ideo4-work"))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    paths = checkpoints(args.workdir)
    real = TransformerConfig()
    n_img, n_text = image_tokens(1024, 1024), 1000
    per_pass = dit_pass_flops(real, n_img, n_text)
    per_block = per_pass / real.num_layers
    rows = []
    for name, (which, options, settings) in MODES.items():
        payload = json.dumps([str(paths[which]), args.size, options, settings])
        out = subprocess.run(
            [sys.executable, "-c", CHILD, payload, CAPTION],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        row = json.loads(out.strip().splitlines()[-1])
        row["held_gb"] += row.pop("delta_gb")
        full, cached = passes(row["guidance"], row["full_passes"], row["cached_passes"])
        flops = full * per_pass + cached * per_block
        rows.append({"mode": name, "passes": full, "cached": cached, **row, "pflop": flops / 1e15})
    base = rows[0]["seconds"]
    print(f"machine: {cpu_name()} ({platform.machine()}), MLX CPU, fp32, "
          f"{args.size}^2, synthetic DiT (2 layers, hidden 1024)")  # fmt: skip
    header = (
        "| mode | passes (cached) | held GB | peak GB | s/image | x | PFLOP @1024 | s @20 TFLOP/s |"
    )
    print(header)
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['passes']} ({r['cached']}) | {r['held_gb']:.3f} | "
            f"{r['peak_gb']:.3f} | {r['seconds']:.2f} | {r['seconds'] / base:.2f} | "
            f"{r['pflop']:.2f} | {r['pflop'] * 1e3 / ASSUMED_TFLOPS:.0f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
