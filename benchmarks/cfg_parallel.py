"""CFG-parallel (two ranks, one DiT each) vs one process holding both DiTs, side by side.

Full-width DiTs (the real ``TransformerConfig``: hidden 4608, 18 x 256 heads, FFN 12288, the
53248 -> 4608 text projection on the conditional DiT only) with random weights and
``--layers`` blocks instead of 34, fp32. A few Euler steps of the CFG loop
(``sampler.euler_steps``) at ``--tokens`` image tokens and ``--text`` text tokens:

- ``single``: one process, both DiTs, ``sampler.guide`` (what ``generate`` runs);
- ``ranks``: ``mlx.launch -n 2 --backend ring``, rank 0 the conditional DiT, rank 1 the
  unconditional one, ``generation.parallel_guidance`` (what ``generate --distributed`` runs).

Reported per run: the median step time after a warm-up step, the bytes each rank hands to
``mx.distributed`` per step (counted at the call, also in latent tensors of (1, N, 128) fp32),
MLX's peak memory over the steps (weights resident plus activations) and the peak RSS, per
rank; and whether rank 0's final latents equal the single process's bit for bit.

Cores: each rank is pinned to one core (``sched_setaffinity``, OpenBLAS with 1 thread); the
single process gets all of them. On a 2-core host the two setups have the same cores in
total; on two Macs each rank has a whole machine.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python benchmarks/cfg_parallel.py --layers 1 2 --tokens 256 1024

runs both setups (each in fresh processes, one at a time) and prints the table. One rank
pair by hand: ``mlx.launch -n 2 --backend ring -- python benchmarks/cfg_parallel.py --mode
ranks --layers 2 --tokens 256 --out /tmp/r``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from dit_step import machine  # benchmarks/ (the script's folder)

from ideogram4_mlx.distributed import CFGGroup, Watchdog, rank_timeout
from ideogram4_mlx.generation import parallel_guidance, velocity_fns
from ideogram4_mlx.sampler import euler_steps, resolve_schedule
from ideogram4_mlx.transformer import Ideogram4Transformer, TransformerConfig

REAL_LAYERS = 34
LATENT_CHANNELS = 128
SEEDS = {"cond": 1, "uncond": 2}  # each DiT's random weights: the same in every process


def build_dit(which: str, layers: int) -> Ideogram4Transformer:
    """A full-width fp32 DiT with random weights; the unconditional one without its text
    projection, as ``from_pretrained(text_input=False)`` leaves it."""
    mx.random.seed(SEEDS[which])
    model = Ideogram4Transformer(TransformerConfig(num_layers=layers))
    if which == "uncond":
        model.llm_cond_norm = model.llm_cond_proj = None  # never materialised
    mx.eval(model.parameters())
    return model


def inputs(tokens: int, n_text: int, llm_dim: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((1, tokens, LATENT_CHANNELS), dtype=np.float32)
    features = rng.standard_normal((1, n_text, llm_dim), dtype=np.float32)
    return noise, features


def grid_of(tokens: int) -> int:
    side = int(round(tokens**0.5))
    if side * side != tokens:
        raise SystemExit(f"--tokens {tokens}: give a square number of image tokens (16^2, 32^2)")
    return side


class CountedCollectives:
    """Tallies the bytes this process hands to ``mx.distributed`` (each call's input)."""

    def __init__(self):
        self.sent = 0
        self.calls = 0
        self.originals = {}

    def install(self):
        for name in ("all_gather", "all_sum"):
            original = getattr(mx.distributed, name)
            self.originals[name] = original

            def counted(x, *a, _original=original, **k):
                self.sent += x.nbytes
                self.calls += 1
                return _original(x, *a, **k)

            setattr(mx.distributed, name, counted)


def timed_pass(fn, times: list[float]):
    """``fn`` evaluated on its own, its seconds appended to ``times``: one DiT pass's compute
    (the latents it reads are already evaluated), apart from the exchange and the combine."""
    if fn is None:
        return None

    def timed(z: mx.array, t: float) -> mx.array:
        begin = time.perf_counter()
        v = fn(z, t)
        mx.eval(v)
        times.append(time.perf_counter() - begin)
        return v

    return timed


def run(args) -> dict:
    """One process: ``single`` (both DiTs) or one rank of ``ranks``; the result as a dict."""
    group = None
    if args.mode == "ranks":
        world = mx.distributed.init()
        group = CFGGroup(world, Watchdog(world.rank(), rank_timeout()))
    rank = 0 if group is None else group.rank
    if group is not None and os.environ.get("CFG_BENCH_PIN", "1") == "1":
        # mlx.launch busy-polls its ranks' pipes (~1 core); it runs under nice 19, the ranks
        # take back the normal priority (as root; otherwise they stay at 19 with it).
        with contextlib.suppress(PermissionError):
            os.setpriority(os.PRIO_PROCESS, 0, 0)
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[rank % len(cores)]})
    counter = CountedCollectives()
    if group is not None:
        counter.install()
    held = ("cond", "uncond") if group is None else (("cond", "uncond")[rank],)
    start = time.perf_counter()
    dits = {w: build_dit(w, args.layers) if w in held else None for w in ("cond", "uncond")}
    build_s = time.perf_counter() - start
    weights_gb = mx.get_active_memory() / 1e9
    grid = grid_of(args.tokens)
    noise, features = inputs(args.tokens, args.text, TransformerConfig().llm_features_dim)
    feats = mx.array(features) if dits["cond"] is not None else None
    cond, uncond = velocity_fns(dits["cond"], dits["uncond"], feats, grid, grid)
    passes = {"cond": [], "uncond": []}
    cond, uncond = timed_pass(cond, passes["cond"]), timed_pass(uncond, passes["uncond"])
    guided = None
    if group is not None:
        guided = parallel_guidance(group, cond if rank == 0 else uncond)
    # 16 * grid pixels a side; the preset's shape: guidance 7 then its polish weight 3.
    schedule = resolve_schedule(16 * grid, 16 * grid, num_steps=args.steps)
    mx.reset_peak_memory()
    sent_before = counter.sent
    times, z = [], None
    for _ in range(1 + args.repeats):  # the first pass (warm-up) is not timed
        steps = euler_steps(mx.array(noise), schedule, cond, uncond, guided=guided)
        begin = time.perf_counter()
        for _step, _, z in steps:  # each step's passes run (timed_pass) as it is yielded
            mx.eval(z)
            times.append(time.perf_counter() - begin)
            begin = time.perf_counter()
    per_step = times[args.steps :]
    total_steps = args.steps * (1 + args.repeats)
    out = {
        "mode": args.mode,
        "rank": rank,
        "layers": args.layers,
        "tokens": args.tokens,
        "text": args.text,
        "cores": sorted(os.sched_getaffinity(0)),
        "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
        "build_s": build_s,
        "weights_gb": weights_gb,
        "step_s": statistics.median(per_step),
        "times": per_step,
        "pass_s": {k: statistics.median(v[args.steps :]) for k, v in passes.items() if v},
        "nice": os.getpriority(os.PRIO_PROCESS, 0),
        "loadavg_1min": os.getloadavg()[0],
        "peak_gb": mx.get_peak_memory() / 1e9,
        "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "sent_bytes_per_step": (counter.sent - sent_before) / total_steps,
        "calls_per_step": counter.calls / total_steps,
        "latent_bytes": args.tokens * LATENT_CHANNELS * 4,
        "guidance": list(schedule.guidance),
        "finite": bool(mx.isfinite(z).all().item()),
    }
    label = args.label or args.mode
    if rank == 0:
        np.save(args.out / f"{label}-latents.npy", np.array(z))
    (args.out / f"{label}-rank{rank}.json").write_text(json.dumps(out))
    return out


def host() -> str:
    return f"{machine('cpu')}, MLX {mx.__version__} CPU"


def child_args(args, layers: int, tokens: int, mode: str, out: Path, label: str = "") -> list[str]:
    return [
        sys.executable, __file__, "--mode", mode, "--layers", str(layers), "--tokens",
        str(tokens), "--text", str(args.text), "--steps", str(args.steps), "--repeats",
        str(args.repeats), "--out", str(out), "--label", label or mode,
    ]  # fmt: skip


def launch(args, layers: int, tokens: int) -> dict:
    """Both setups for one size, one after the other, each in fresh processes."""
    out = args.workdir / f"{layers}-layers-{tokens}-tokens"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    single = child_args(args, layers, tokens, "single", out)
    launcher = shutil.which("mlx.launch", path=str(Path(sys.executable).parent)) or "mlx.launch"
    ranks = ["nice", "-n", "19", launcher, "-n", "2", "--backend", "ring", "--"]
    ranks += child_args(args, layers, tokens, "ranks", out)
    env = dict(os.environ)
    errors = {}
    runs = [("single", single, {}), ("ranks", ranks, {"OPENBLAS_NUM_THREADS": "1"})]
    if args.equal_threads_check:
        # The bitwise check with the ranks' BLAS settings (1 thread, 1 core): a 2-thread sgemm
        # may block the sums differently from a 1-thread one, which is not the exchange's doing.
        check = child_args(args, layers, tokens, "single", out, label="single1")
        runs.append(("single1", ["taskset", "-c", "0", *check], {"OPENBLAS_NUM_THREADS": "1"}))
    for label, cmd, extra in runs:
        done = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, env={**env, **extra}
        )
        if done.returncode:
            errors[label] = (done.stderr or done.stdout).strip()[-800:]
    files = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    result = {"layers": layers, "tokens": tokens, "runs": files, "errors": errors}
    b = out / "ranks-latents.npy"
    for name, key in (("single", ""), ("single1", "_1thread")):
        a = out / f"{name}-latents.npy"
        if a.exists() and b.exists():
            x, y = np.load(a), np.load(b)
            result[f"bitwise_equal{key}"] = bool(np.array_equal(x, y))
            result[f"max_abs_diff{key}"] = float(np.abs(x - y).max())
    return result


def report(results: list[dict], args) -> str:
    first = next((o for r in results for o in r["runs"].values()), {})
    lines = [
        f"machine: {host()}; fp32; full-width DiTs, random weights",
        f"{args.text} text tokens; {args.steps} Euler steps per pass (guidance "
        f"{first.get('guidance')}), "
        f"median of {args.steps * args.repeats} steps after a {args.steps}-step warm-up pass",
        "cores: single = all cores (OpenBLAS default threads); ranks = one core each "
        "(pinned, OPENBLAS_NUM_THREADS=1)",
        "",
        "pass_s: the DiT pass(es) alone (cond+uncond in one process; the rank's own pass);",
        "other_s: step - pass (exchange, waiting for the other rank, the combine, the Euler step)",
        "",
        "layers tokens setup   cores  step_s  x single  pass_s     other_s  peak_GB  %single  "
        "rss_GB  sent/step_B  latents  load1",
    ]
    for r in results:
        runs = r["runs"]
        single = runs.get("single-rank0")
        for key in ("single-rank0", "ranks-rank0", "ranks-rank1"):
            o = runs.get(key)
            if o is None:
                lines.append(f"{r['layers']:>6} {r['tokens']:>6} {key:<11} missing")
                continue
            base = single or o
            sent = o["sent_bytes_per_step"]
            setup = "single" if o["mode"] == "single" else f"rank {o['rank']}"
            passes = "+".join(f"{v:.2f}" for v in o["pass_s"].values())
            other = o["step_s"] - sum(o["pass_s"].values())
            lines.append(
                f"{r['layers']:>6} {r['tokens']:>6} {setup:<7} {len(o['cores']):>5} "
                f"{o['step_s']:7.2f} {o['step_s'] / base['step_s']:9.2f}  {passes:<10} "
                f"{other:7.2f} {o['peak_gb']:8.2f} {100 * o['peak_gb'] / base['peak_gb']:7.0f}% "
                f"{o['rss_gb']:7.2f} {sent:12.0f} {sent / o['latent_bytes']:8.2f} "
                f"{o['loadavg_1min']:6.1f}"
            )
        both = [runs[k] for k in ("ranks-rank0", "ranks-rank1") if k in runs]
        if both:
            total = sum(o["sent_bytes_per_step"] for o in both) / both[0]["latent_bytes"]
            lines.append(
                f"{'':>14}exchanged per step, both ranks: {total:.2f} latent tensors "
                f"(1, {r['tokens']}, 128) fp32 = {both[0]['latent_bytes']} B each; "
                f"{both[0]['calls_per_step']:.0f} collective call(s) per rank per step"
            )
        if single is not None and len(both) == 2:
            exchange = min(o["step_s"] - sum(o["pass_s"].values()) for o in both)
            two = max(single["pass_s"].values()) + exchange
            lines.append(
                f"{'':>14}two machines (each rank with this host's cores): ~max(single's passes)"
                f" + rank exchange {exchange:.2f} = {two:.2f} s/step, "
                f"{two / single['step_s']:.2f} x single"
            )
        if "bitwise_equal" in r:
            lines.append(
                f"{'':>14}rank 0's final latents == single process's: {r['bitwise_equal']} "
                f"(max |diff| {r['max_abs_diff']:.3g})"
            )
        if "bitwise_equal_1thread" in r:
            lines.append(
                f"{'':>14}rank 0's final latents == single process's on 1 core, 1 BLAS thread "
                f"(the ranks' setting): {r['bitwise_equal_1thread']} "
                f"(max |diff| {r['max_abs_diff_1thread']:.3g})"
            )
        for cmd, err in r["errors"].items():
            lines.append(f"{'':>14}FAILED {cmd}: {err.splitlines()[-1:]}")
    lines += projection(results)
    return "\n".join(lines)


def projection(results: list[dict]) -> list[str]:
    """Peak memory fitted as a + b * layers per setup, projected to the real 34 blocks."""
    lines = []
    for tokens in sorted({r["tokens"] for r in results}):
        rows = sorted((r for r in results if r["tokens"] == tokens), key=lambda r: r["layers"])
        if len({r["layers"] for r in rows}) < 2:
            continue
        lo, hi = rows[0], rows[-1]
        projected = {}
        for key in ("single-rank0", "ranks-rank0", "ranks-rank1"):
            if key not in lo["runs"] or key not in hi["runs"]:
                continue
            p0, p1 = lo["runs"][key]["peak_gb"], hi["runs"][key]["peak_gb"]
            per_layer = (p1 - p0) / (hi["layers"] - lo["layers"])
            projected[key] = p0 + per_layer * (REAL_LAYERS - lo["layers"])
        if "single-rank0" not in projected:
            continue
        base = projected["single-rank0"]
        parts = [f"{k}: {v:.1f} GB ({100 * v / base:.0f}%)" for k, v in projected.items()]
        lines.append(
            f"projected to {REAL_LAYERS} blocks fp32, {tokens} tokens: " + ", ".join(parts)
        )
    return ["", *lines] if lines else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["both", "single", "ranks"], default="both")
    parser.add_argument("--layers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--tokens", nargs="+", type=int, default=[256])
    parser.add_argument("--text", type=int, default=100, help="text tokens (conditional DiT)")
    parser.add_argument("--steps", type=int, default=3, help="Euler steps per timed pass")
    parser.add_argument("--repeats", type=int, default=1, help="timed passes after a warm-up")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ideo4-cfg-bench"))
    parser.add_argument("--out", type=Path, help="a rank's result folder (--mode single/ranks)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--label", default="", help="a child's file name stem (default: mode)")
    parser.add_argument(
        "--equal-threads-check",
        action="store_true",
        help="also run the single process on 1 core with 1 BLAS thread (untimed) and compare "
        "its latents with rank 0's bit for bit",
    )
    args = parser.parse_args()
    if args.mode != "both":
        args.layers, args.tokens = args.layers[0], args.tokens[0]
        args.out = args.out or args.workdir / "manual"
        args.out.mkdir(parents=True, exist_ok=True)
        print(json.dumps(run(args)))
        return
    results = []
    for tokens in args.tokens:
        for layers in args.layers:
            r = launch(args, layers, tokens)
            results.append(r)
            print(f"{layers} layers, {tokens} tokens: done", file=sys.stderr, flush=True)
    print(report(results, args))
    if args.json:
        args.json.write_text(json.dumps({"machine": host(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
