"""One guided denoising step (conditional + unconditional DiT pass), side by side.

Implementations, on the same full-width synthetic DiT weights (real dims, fp8 + per-row scales,
``--layers`` blocks instead of 34), each timed in its own fresh process, one at a time:

- ``ours``: ideogram4-mlx, the pipeline's own step (``velocity_fns`` + ``sampler.denoise``).
- ``mflux``: mflux 0.24.0's Ideogram 4 transformer and ``_denoise_step`` (compiled, fp8 weights
  dequantized in every matmul, as it ships). Install for benchmarking only:
  ``pip install --no-deps mflux==0.24.0 platformdirs toml piexif``.
- ``diffusers``: diffusers' ``Ideogram4Transformer2DModel`` with its pipeline's step (text
  left-padded to ``max_sequence_length``, 2048 by default: ``--diffusers-text-slots``).

Sizes: 512^2 with a 300-token caption and 1024^2 with a 1000-token caption. Warm-up steps are
excluded; the median of ``--repeats`` steps is reported, with achieved TFLOP/s from
``benchmarks/flops.py`` (the minimal work; padding and waste are not credited) and peak memory
(MLX's peak or torch.cuda's max allocated, and the process's peak RSS).

With two or more ``--layers`` values, each time is also fitted as ``a + b * layers`` and
projected to the real 34 blocks.

CPU (this repo's CI machine): compare in fp32, since MLX's CPU bf16 matmul is not
BLAS-backed; preload an optimised BLAS for MLX (Debian ``libopenblas0-pthread``):

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python benchmarks/dit_step.py --layers 1 2 --sizes 512 --dtype float32

CUDA (H100 class; MLX with ``mlx[cuda13]``, torch with CUDA): bf16 on the GPU:

    python benchmarks/dit_step.py --device gpu --dtype bfloat16 --layers 2 4 --sizes 512 1024
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

IMPLS = ("ours", "mflux", "diffusers")
CAPTION_TOKENS = {512: 300, 1024: 1000}
GUIDANCE = 7.0
T_CUR, T_NEXT = 0.5, 0.55
REAL_LAYERS = 34


def inputs(side: int, n_text: int, llm_dim: int):
    import numpy as np

    rng = np.random.default_rng(0)
    n_img = (side // 16) ** 2
    noise = rng.standard_normal((1, n_img, 128), dtype=np.float32)
    features = rng.standard_normal((1, n_text, llm_dim), dtype=np.float32)
    return noise, features


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux


def timed(step, warmup: int, repeats: int, sync) -> list[float]:
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        sync(step())
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def run_ours(ckpt: Path, side: int, n_text: int, args) -> dict:
    import mlx.core as mx
    import numpy as np

    from ideogram4_mlx.generation import velocity_fns
    from ideogram4_mlx.sampler import Schedule, denoise
    from ideogram4_mlx.transformer import Ideogram4Transformer

    mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    dtype = getattr(mx, args.dtype)
    start = time.perf_counter()
    cond_dit = Ideogram4Transformer.from_pretrained(ckpt / "transformer", dtype)
    uncond_dit = Ideogram4Transformer.from_pretrained(
        ckpt / "unconditional_transformer", dtype, text_input=False
    )
    load_s = time.perf_counter() - start
    noise, features = inputs(side, n_text, cond_dit.config.llm_features_dim)
    grid = side // 16
    start = time.perf_counter()
    cond, uncond = velocity_fns(cond_dit, uncond_dit, mx.array(features), grid, grid)
    prepare_s = time.perf_counter() - start
    schedule = Schedule(np.array([T_NEXT, T_CUR]), (GUIDANCE,), 0.0, 1.0)
    z = mx.array(noise)
    times = timed(lambda: denoise(z, schedule, cond, uncond), args.warmup, args.repeats, mx.eval)
    return {"load_s": load_s, "prepare_s": prepare_s, "times": times, **mlx_memory()}


def mlx_memory() -> dict:
    import mlx.core as mx

    return {"peak_gb": mx.get_peak_memory() / 1e9, "rss_gb": rss_gb()}


def run_mflux(ckpt: Path, side: int, n_text: int, args) -> dict:
    import mlx.core as mx
    import numpy as np
    from mflux.models.common.config.model_config import ModelConfig

    # mflux's compute dtype is a class attribute read when its modules are imported.
    ModelConfig.precision = getattr(mx, args.dtype)
    mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    from mflux.models.common.weights.loading.safetensors_reader import SafetensorsReader
    from mflux.models.ideogram4.model.ideogram4_transformer import (
        Ideogram4Config,
        Ideogram4Transformer,
    )
    from mflux.models.ideogram4.variants.txt2img.ideogram4 import Ideogram4
    from mflux.models.ideogram4.weights.ideogram4_weight_mapping import Ideogram4WeightMapping
    from mlx.utils import tree_flatten, tree_unflatten

    from ideogram4_mlx.dit_sequence import sequence_ids

    def load(component: str) -> Ideogram4Transformer:
        config = json.loads((ckpt / component / "config.json").read_text())
        model = Ideogram4Transformer(Ideogram4Config(num_layers=config["num_layers"]))
        (path,) = sorted((ckpt / component).glob("*.safetensors"))
        raw = SafetensorsReader.read_file(path)
        weights = {k: Ideogram4WeightMapping.prepare_tensor(k, v) for k, v in raw.items()}
        unknown = set(weights) - {k for k, _ in tree_flatten(model.parameters())}
        if unknown:
            raise SystemExit(f"mflux has no parameter for {sorted(unknown)[:3]}")
        model.update(tree_unflatten(list(weights.items())))
        mx.eval(model.parameters())
        return model

    start = time.perf_counter()
    cond_dit, uncond_dit = load("transformer"), load("unconditional_transformer")
    load_s = time.perf_counter() - start
    noise, features = inputs(side, n_text, cond_dit.config.llm_features_dim)
    grid = side // 16
    n_img = grid * grid
    # mflux's own layout: features over the whole [text][image] sequence, zeros at image slots.
    pos, seg, ind = (mx.array(a) for a in sequence_ids([n_text], grid, grid))
    full = np.zeros((1, n_text + n_img, features.shape[-1]), np.float32)
    full[:, :n_text] = features
    llm = mx.array(full)
    layout = {"position_ids": pos, "segment_ids": seg, "indicator": ind}
    layout |= {"max_text_tokens": n_text, "num_image_tokens": n_img}
    negative = {
        "position_ids": pos[:, n_text:],
        "segment_ids": seg[:, n_text:],
        "indicator": ind[:, n_text:],
        "llm_features": mx.zeros((1, n_img, features.shape[-1]), llm.dtype),
    }
    predict_cond = Ideogram4._predict_conditional(cond_dit)
    predict_uncond = Ideogram4._predict_unconditional(uncond_dit)
    text_z_padding = mx.zeros((1, n_text, 128), mx.float32)
    z = mx.array(noise)

    def step():
        return Ideogram4._denoise_step(
            None,
            z=z,
            t_value=T_CUR,
            s_value=T_NEXT,
            guidance_value=GUIDANCE,
            text_z_padding=text_z_padding,
            llm_features=llm,
            inputs=layout,
            negative_inputs=negative,
            predict_conditional=predict_cond,
            predict_unconditional=predict_uncond,
        )

    times = timed(step, args.warmup, args.repeats, mx.eval)
    return {"load_s": load_s, "times": times, **mlx_memory()}


def run_diffusers(ckpt: Path, side: int, n_text: int, args) -> dict:
    import numpy as np
    import torch

    from ideogram4_mlx.dit_sequence import sequence_ids
    from ideogram4_mlx.reference.transformer import load_reference_transformer

    device = "cuda" if args.device == "gpu" else "cpu"
    dtype = getattr(torch, args.dtype)
    start = time.perf_counter()
    cond_dit = load_reference_transformer(ckpt / "transformer", device, dtype)
    uncond_dit = load_reference_transformer(ckpt / "unconditional_transformer", device, dtype)
    load_s = time.perf_counter() - start
    noise, features = inputs(side, n_text, cond_dit.config.llm_features_dim)
    grid = side // 16
    slots = max(args.diffusers_text_slots, n_text)
    # The pipeline's layout: text left-padded to max_sequence_length, features over the whole
    # sequence (zeros at padding and image slots), a block-diagonal mask from segment ids.
    pos, seg, ind = (
        torch.as_tensor(a[:1], device=device, dtype=torch.long)
        for a in sequence_ids([n_text, slots], grid, grid)
    )
    full = np.zeros((1, slots + grid * grid, features.shape[-1]), np.float32)
    full[:, slots - n_text : slots] = features
    llm = torch.as_tensor(full, device=device).to(dtype)
    neg_llm = torch.zeros((1, grid * grid, features.shape[-1]), device=device, dtype=dtype)
    padding = torch.zeros((1, slots, 128), device=device)
    latents = torch.as_tensor(noise, device=device)
    t = torch.full((1,), T_CUR, device=device).to(dtype)

    @torch.no_grad()
    def step():
        pos_z = torch.cat([padding, latents], dim=1).to(dtype)
        out = cond_dit(
            hidden_states=pos_z,
            timestep=t,
            encoder_hidden_states=llm,
            position_ids=pos,
            segment_ids=seg,
            indicator=ind,
            return_dict=False,
        )[0]
        pos_v = out[:, slots:].float()
        neg_v = uncond_dit(
            hidden_states=latents.to(dtype),
            timestep=t,
            encoder_hidden_states=neg_llm,
            position_ids=pos[:, slots:],
            segment_ids=seg[:, slots:],
            indicator=ind[:, slots:],
            return_dict=False,
        )[0].float()
        v = GUIDANCE * pos_v + (1 - GUIDANCE) * neg_v
        return latents + (T_NEXT - T_CUR) * v

    def sync(_):
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = timed(step, args.warmup, args.repeats, sync)
    peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else float("nan")
    return {"load_s": load_s, "times": times, "peak_gb": peak, "rss_gb": rss_gb()}


RUNNERS = {"ours": run_ours, "mflux": run_mflux, "diffusers": run_diffusers}


def synthetic_dits(workdir: Path, layers: int) -> Path:
    from ideogram4_mlx.synth import SYNTHETIC_PRESETS, write_synthetic_checkpoint

    ckpt = workdir / f"dit-{layers}-layers"
    if not ckpt.exists():
        spec = dataclasses.replace(SYNTHETIC_PRESETS["full-width"], dit_num_layers=layers)
        dits = ("transformer", "unconditional_transformer")
        write_synthetic_checkpoint(ckpt, spec, seed=0, components=dits, progress=True)
    return ckpt


def machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        models = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = models[0] if models else cpu
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"
    if device == "gpu":
        gpu = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        text += f", GPU: {gpu or 'unknown'}"
    blas = os.environ.get("LD_PRELOAD", "")
    return text + (f", LD_PRELOAD={Path(blas).name}" if blas else "")


def spawn(impl: str, ckpt: Path, side: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, str(ckpt), str(side)]
    cmd += ["--dtype", args.dtype, "--device", args.device]
    cmd += ["--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    cmd += ["--diffusers-text-slots", str(args.diffusers_text_slots)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
        return {"error": tail[0] if tail else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def step_tflop(side: int, n_text: int, layers: int) -> float:
    from flops import cfg_step_flops

    from ideogram4_mlx.transformer import TransformerConfig

    return cfg_step_flops(TransformerConfig(num_layers=layers), (side // 16) ** 2, n_text) / 1e12


def report(results: list[dict], args) -> None:
    host = results[0].get("machine") if results else None  # a --report file records it
    print(f"\nmachine: {host or machine(args.device)}; dtype {args.dtype}; device {args.device}")
    print(f"median of {args.repeats} steps after {args.warmup} warm-up; one process per run")
    head = "size   layers impl       step_s  x ours  TFLOP/s  peak_GB  rss_GB"
    print(head)
    for r in results:
        if "error" in r:
            print(f"{r['side']:>4}^2 {r['layers']:>6} {r['impl']:<10} failed: {r['error']}")
            continue
        ours = next(
            (
                o
                for o in results
                if o["impl"] == "ours" and o["side"] == r["side"] and o["layers"] == r["layers"]
            ),
            None,
        )
        ratio = r["median_s"] / ours["median_s"] if ours and "median_s" in ours else float("nan")
        tflops = step_tflop(r["side"], r["n_text"], r["layers"]) / r["median_s"]
        print(
            f"{r['side']:>4}^2 {r['layers']:>6} {r['impl']:<10} {r['median_s']:7.2f} {ratio:7.2f}"
            f" {tflops:8.3f} {r['peak_gb']:8.2f} {r['rss_gb']:7.2f}"
        )
    projection(results)


def projection(results: list[dict]) -> None:
    """Fit step time = a + b * layers per (size, impl) and project to the real 34 blocks."""
    keys = sorted({(r["side"], r["impl"]) for r in results if "median_s" in r})
    lines = []
    for side, impl in keys:
        pts = sorted(
            (r["layers"], r["median_s"])
            for r in results
            if (r["side"], r["impl"]) == (side, impl) and "median_s" in r
        )
        if len({n for n, _ in pts}) < 2:
            continue
        (n0, t0), (n1, t1) = pts[0], pts[-1]
        per_layer = (t1 - t0) / (n1 - n0)
        lines.append((side, impl, t0 + per_layer * (REAL_LAYERS - n0), per_layer))
    if not lines:
        return
    print(f"\nprojected to {REAL_LAYERS} blocks (time = a + b * layers, fitted per row):")
    for side, impl, t34, per_layer in lines:
        ours = next((t for s, i, t, _ in lines if s == side and i == "ours"), float("nan"))
        print(
            f"{side:>4}^2 {impl:<10} {t34:8.1f} s/step  {t34 / ours:5.2f} x ours  "
            f"({per_layer:.2f} s per block)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument(
        "--sizes", nargs="+", type=int, choices=sorted(CAPTION_TOKENS), default=[512, 1024]
    )
    parser.add_argument("--layers", nargs="+", type=int, default=[2])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--diffusers-text-slots",
        type=int,
        default=2048,
        help="the diffusers pipeline's max_sequence_length (its default: 2048)",
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ideo4-dit-bench"))
    parser.add_argument("--json", type=Path, help="append each result here (JSON lines)")
    parser.add_argument("--report", type=Path, help="only print the table of a --json file")
    parser.add_argument("--child", nargs=3, metavar=("IMPL", "CKPT", "SIDE"))
    args = parser.parse_args()
    if args.child:
        impl, ckpt, side = args.child[0], Path(args.child[1]), int(args.child[2])
        out = RUNNERS[impl](ckpt, side, CAPTION_TOKENS[side], args)
        out["median_s"] = statistics.median(out["times"])
        print(json.dumps(out))
        return

    if args.report:
        lines = args.report.read_text().splitlines()
        report([json.loads(line) for line in lines if line.strip()], args)
        return
    results = []
    host = machine(args.device)
    for layers in args.layers:
        ckpt = synthetic_dits(args.workdir, layers)
        for side in args.sizes:
            for impl in args.impls:
                r = spawn(impl, ckpt, side, args)
                r |= {"impl": impl, "side": side, "layers": layers, "n_text": CAPTION_TOKENS[side]}
                r |= {"machine": host, "dtype": args.dtype}
                results.append(r)
                if args.json:  # one line per run, appended, so runs can be split and merged
                    with args.json.open("a") as f:
                        f.write(json.dumps(r) + "\n")
                shown = f"{r['median_s']:.2f} s/step" if "median_s" in r else r["error"]
                print(f"{side}^2, {layers} layers, {impl}: {shown}", flush=True)
    report(results, args)


if __name__ == "__main__":
    main()
