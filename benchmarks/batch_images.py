"""Several images of one prompt: one after another vs one batch through the DiTs, side by side.

Issue #20 asks whether ``--num-images N`` on one machine should run its images one after
another or as one batch (B = N) through the two DiTs, "where that is faster (measure and
choose)". This measures one guided Euler step (the conditional and the unconditional pass,
``sampler.guide``, what ``generate`` runs) on full-width DiTs (the real ``TransformerConfig``,
random weights, ``--layers`` blocks instead of 34) for N images:

- ``sequential``: N steps with latents (1, L, 128), one image at a time;
- ``batch``: one step with latents (N, L, 128); the prompt's prepared layout (text projection,
  RoPE tables) broadcasts over the batch (``generation.velocity_fns``).

Reported per (tokens, N): seconds per image (median of ``--repeats`` after a warm-up),
batch / sequential, MLX peak memory of each, and how far the batch's velocities are from the
sequential ones (a BLAS may block a taller matmul differently, so bit-equality is not expected).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python benchmarks/batch_images.py --layers 1 --tokens 256 1024 --images 1 2 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from dit_step import machine  # benchmarks/ (the script's folder)

from ideogram4_mlx.generation import velocity_fns
from ideogram4_mlx.sampler import guide
from ideogram4_mlx.transformer import Ideogram4Transformer, TransformerConfig

LATENT_CHANNELS = 128
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}


def build_dit(seed: int, layers: int, dtype: mx.Dtype, text: bool) -> Ideogram4Transformer:
    mx.random.seed(seed)
    model = Ideogram4Transformer(TransformerConfig(num_layers=layers))
    if not text:
        model.llm_cond_norm = model.llm_cond_proj = None  # the unconditional DiT has none
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def host() -> str:
    return f"{machine('cpu')}, MLX {mx.__version__} {mx.default_device()}"


def timed(fn, repeats: int) -> tuple[float, mx.array, float]:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up, its last output,
    and MLX's peak memory over the timed runs (GB)."""
    out = fn()
    mx.eval(out)
    mx.reset_peak_memory()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        out = fn()
        mx.eval(out)
        times.append(time.perf_counter() - begin)
    return statistics.median(times), out, mx.get_peak_memory() / 1e9


def measure(args, cond_dit, uncond_dit, tokens: int, images: int) -> dict:
    side = int(round(tokens**0.5))
    if side * side != tokens:
        raise SystemExit(f"--tokens {tokens}: give a square number of image tokens")
    rng = np.random.default_rng(0)
    features = rng.standard_normal((1, args.text, TransformerConfig().llm_features_dim))
    feats = mx.array(features.astype(np.float32))
    cond, uncond = velocity_fns(cond_dit, uncond_dit, feats, side, side)
    guided = guide(cond, uncond)
    z = mx.array(rng.standard_normal((images, tokens, LATENT_CHANNELS)).astype(np.float32))
    t, g = 0.5, args.guidance

    def sequential_evaluated():
        out = []
        for i in range(images):  # as --num-images runs: each image's step evaluated alone
            v = guided(z[i : i + 1], t, g)
            mx.eval(v)
            out.append(v)
        return mx.concatenate(out, axis=0)

    def batch():
        return guided(z, t, g)

    seq_s, seq_v, seq_peak = timed(sequential_evaluated, args.repeats)
    bat_s, bat_v, bat_peak = timed(batch, args.repeats)
    a, b = np.array(seq_v), np.array(bat_v)
    rel = float(np.linalg.norm(a - b) / np.linalg.norm(a))
    return {
        "tokens": tokens,
        "images": images,
        "sequential_s_per_image": seq_s / images,
        "batch_s_per_image": bat_s / images,
        "ratio": bat_s / seq_s,
        "sequential_peak_gb": seq_peak,
        "batch_peak_gb": bat_peak,
        "bitwise_equal": bool(np.array_equal(a, b)),
        "max_abs_diff": float(np.abs(a - b).max()),
        "rel_l2": rel,
        "loadavg_1min": os.getloadavg()[0],
    }


def report(rows: list[dict], args) -> str:
    lines = [
        f"machine: {host()}",
        f"{args.dtype}; full-width DiTs, random weights, {args.layers} block(s) each; "
        f"{args.text} text tokens; one guided step (cond + uncond pass), guidance {args.guidance}; "
        f"median of {args.repeats} after a warm-up",
        "",
        "tokens images  seq_s/img  batch_s/img  batch/seq  seq_peak_GB  batch_peak_GB  "
        "max|diff|  rel_L2    load1",
    ]
    for r in rows:
        lines.append(
            f"{r['tokens']:>6} {r['images']:>6} {r['sequential_s_per_image']:10.2f} "
            f"{r['batch_s_per_image']:12.2f} {r['ratio']:10.3f} {r['sequential_peak_gb']:12.2f} "
            f"{r['batch_peak_gb']:14.2f} {r['max_abs_diff']:10.2g} {r['rel_l2']:8.2g} "
            f"{r['loadavg_1min']:6.1f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--tokens", nargs="+", type=int, default=[256, 1024])
    parser.add_argument("--images", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--text", type=int, default=100, help="text tokens (conditional DiT)")
    parser.add_argument("--guidance", type=float, default=7.0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    cond_dit = build_dit(1, args.layers, dtype, text=True)
    uncond_dit = build_dit(2, args.layers, dtype, text=False)
    rows = []
    for tokens in args.tokens:
        for images in args.images:
            rows.append(measure(args, cond_dit, uncond_dit, tokens, images))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(report(rows, args))
    if args.json:
        settings = {**vars(args), "json": str(args.json)}
        args.json.write_text(json.dumps({"machine": host(), "args": settings, "rows": rows}))


if __name__ == "__main__":
    main()
