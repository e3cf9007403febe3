"""Denoising peak under a memory budget (``ideogram4_mlx.memory``), full size, 4-bit DiTs.

For each budget: plan the resident blocks of both DiTs for a 1024^2 image with a 1000-token
caption (5096 tokens), load both DiTs as planned (the full-size synthetic DiT, real layout and
sizes, converted with ``ideo4-mlx convert --quantize 4``; the unconditional one without its
text projection, as the pipeline loads it), set MLX's cache limit as planned, and measure, in
its own process, MLX's peak memory over one step's weight traffic: every streamed block of
both DiTs read, evaluated and dropped in turn, as ``Ideogram4Transformer.run`` does.

The block computation itself is not run: 4-bit matmuls on MLX's CPU backend take minutes per
block at this size. Its activations are added from ``benchmarks/results/pipeline_memory.json``
(one full-width block at 1024^2, measured with the same score/chunk settings: streaming uses
the low-memory ones). So ``peak`` = measured weights peak + measured activations; the
planner's own estimate is printed next to it.

    python benchmarks/memory_limit.py --workdir /tmp/ideo4-memlimit --budgets 6 8 12 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SIDE, CAPTION_TOKENS = 1024, 1000
TOKENS = (SIDE // 16) ** 2 + CAPTION_TOKENS


def prepare(workdir: Path) -> Path:
    from ideogram4_mlx.convert import convert
    from ideogram4_mlx.synth import SYNTHETIC_PRESETS, write_synthetic_checkpoint

    src, q4 = workdir / "src", workdir / "q4"
    parts = ("transformer",)
    if not src.exists():
        write_synthetic_checkpoint(src, SYNTHETIC_PRESETS["full"], components=parts, progress=True)
    if not q4.exists():
        convert(src, q4, quantize=4, components=parts, progress=True)
    return q4


def sizes(q4: Path):
    import mlx.core as mx

    from ideogram4_mlx.memory import dit_sizes

    # Conditional and unconditional DiTs share layout and size: one folder serves both.
    return tuple(dit_sizes(q4 / "transformer", mx.bfloat16, text) for text in (True, False))


def measure_child(q4: Path, budget_gb: float, dits: int = 2) -> dict:
    import mlx.core as mx

    from ideogram4_mlx.memory import cache_limit, denoise_bytes, plan_from_sizes, set_cache_limit
    from ideogram4_mlx.transformer import Ideogram4Transformer, drop_parameters

    budget = budget_gb * 1e9
    # dits=1: the conditional DiT alone (guidance 1, --uncond self, or an unconditional delta)
    dit_sizes = sizes(q4)[:dits]
    plan = plan_from_sizes(dit_sizes, budget, TOKENS)
    estimate = denoise_bytes(dit_sizes, plan, TOKENS)
    set_cache_limit(cache_limit(budget, estimate))
    models = [
        Ideogram4Transformer.from_pretrained(q4 / "transformer", text_input=text, resident_blocks=k)
        for text, k in zip((True, False)[:dits], plan, strict=True)
    ]
    mx.clear_cache()
    resident = mx.get_active_memory()
    mx.reset_peak_memory()
    seconds = []
    for _ in range(2):  # the second round may come from the OS file cache
        start = time.perf_counter()
        for model in models:
            if model.stream is None:
                continue
            model.stream.open()
            for i in range(model.resident_blocks, len(model.layers)):
                layer = model.layers[i]
                layer.update(model.stream.take(f"layers.{i}."))
                mx.eval(layer.parameters())
                drop_parameters(layer)
        seconds.append(time.perf_counter() - start)
    return {
        "budget_gb": budget_gb,
        "resident_blocks": list(plan),
        "streamed_blocks": [m.streamed_blocks for m in models],
        "resident_gb": resident / 1e9,
        # reset_peak_memory() starts from 0, not from what is resident.
        "weights_peak_gb": max(mx.get_peak_memory(), resident) / 1e9,
        "estimate_gb": estimate / 1e9,
        "stream_s": seconds,
    }


def spawn(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(f"child {args} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measured_activations() -> dict[str, float]:
    """Activations of one full-width block at 1024^2 (GB), per mode, from pipeline_memory."""
    rows = json.loads((RESULTS / "pipeline_memory.json").read_text())["rows"]
    return {r["mode"]: r["activations"] for r in rows if r["side"] == SIDE}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ideo4-memlimit"))
    parser.add_argument("--budgets", nargs="+", type=float, default=[6, 8, 12, 16])
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--one-dit", action="store_true", help="also the conditional DiT alone (#28), all resident"
    )
    parser.add_argument("--child", nargs="+")
    args = parser.parse_args()
    if args.child:
        dits = int(args.child[2]) if len(args.child) > 2 else 2
        print(json.dumps(measure_child(Path(args.child[0]), float(args.child[1]), dits)))
        return

    q4 = prepare(args.workdir)
    acts = measured_activations()
    import mlx.core as mx

    from ideogram4_mlx.environment import backend, physical_memory

    machine = (
        f"{mx.device_info().get('device_name', platform.processor())}, {os.cpu_count()} cores, "
        f"{physical_memory() / 2**30:.0f} GiB, {platform.system()} {platform.machine()}, "
        f"MLX {mx.__version__} {backend()} backend"
    )
    lines = [
        f"# benchmarks/memory_limit.py, {time.strftime('%Y-%m-%d')}: {machine}; full-size "
        f"synthetic DiT, 4-bit, bf16, both DiTs; {SIDE}^2 with a {CAPTION_TOKENS}-token "
        f"caption ({TOKENS} tokens). GB = 1e9 bytes.",
        "# peak = measured MLX peak over one step's weight traffic (resident blocks + every "
        "streamed block read and dropped in turn) + measured block activations at 1024^2 "
        f"(pipeline_memory.json: low-memory {acts['low-memory']:.2f} GB when any block streams, "
        f"normal {acts['normal']:.2f} GB when none does).",
        "budget_gb  resident_blocks(cond,uncond)  streamed_per_step  resident_gb  "
        "weights_peak_gb  activations_gb  peak_gb  over_budget_gb  planner_estimate_gb  "
        "stream_s(round1,round2)",
    ]
    for line in lines:
        print(line, flush=True)
    for budget in args.budgets:
        r = spawn(str(q4), str(budget))
        streamed = sum(r["streamed_blocks"])
        act = acts["low-memory" if streamed else "normal"]
        peak = r["weights_peak_gb"] + act
        line = (
            f"{budget:9.1f}  {r['resident_blocks'][0]:>2},{r['resident_blocks'][1]:>2} of 34,34"
            f"{'':14}{streamed:>3}  {r['resident_gb']:11.2f}  {r['weights_peak_gb']:15.2f}  "
            f"{act:14.2f}  {peak:7.2f}  {peak - budget:+14.2f}  {r['estimate_gb']:19.2f}  "
            f"{r['stream_s'][0]:.1f},{r['stream_s'][1]:.1f}"
        )
        lines.append(line)
        print(line, flush=True)
    if args.one_dit:  # guidance 1, --uncond self or a delta: one DiT, all blocks resident
        budget = max(args.budgets)
        r = spawn(str(q4), str(budget), "1")
        peak = r["weights_peak_gb"] + acts["normal"]
        line = (
            f"one DiT ({budget:.0f} GB budget): resident {r['resident_blocks'][0]} of 34, "
            f"resident_gb {r['resident_gb']:.2f}, weights_peak_gb {r['weights_peak_gb']:.2f}, "
            f"activations_gb {acts['normal']:.2f}, peak_gb {peak:.2f}, "
            f"planner_estimate_gb {r['estimate_gb']:.2f}"
        )
        lines.append(line)
        print(line, flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
