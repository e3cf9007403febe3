"""Per-step overhead of unfused LoRA (#18), side by side with no LoRA and a fused one.

A full-width DiT (the real ``TransformerConfig``: hidden 4608, 18 heads x 256, FFN 12288, adaln
512) with ``--layers`` blocks instead of 34 and random weights (no checkpoint needed), one
conditional DiT pass (``run``; ``prepare`` once outside the timing) over ``--text-tokens`` text
plus ``(side / 16)^2`` image tokens, for each variant:

- ``none``: no LoRA;
- ``unfused-r16``, ``unfused-r64``: ``apply_loras`` with a random LoRA of that rank on every
  block's ``attention.qkv``, ``attention.o`` and ``feed_forward.w1/w2/w3`` (our fused names, as
  ai-toolkit and DiffSynth files have);
- ``split-r64``: the same rank with separate q, k and v deltas on ``attention.qkv`` (the
  diffusers/PEFT layout; each third is padded to the full qkv width before the add);
- ``fused-r64``: ``fuse_loras`` of the rank-64 LoRA (its time should equal ``none``).

Every variant shares the base weights (the LoRAs are added to copies of the module tree). Passes
are interleaved (one of each variant per round, the order rotated each round) after a warm-up
round; the median of ``--repeats`` rounds is reported with its ratio to ``none`` (the median of
each round's ratio), next to the FLOP ratio (``flops.dit_pass_flops`` for the blocks; a LoRA adds
``2 r (in + out)`` per token per linear). The per-pass difference is a few percent, within the
noise of a shared CPU, so each unfused LoRA's terms are also timed alone (one block's five,
added to base outputs, min of ``--term-repeats``). A 0-block pass is timed too, so the times
are split into the per-block cost and the rest, and projected to the real 34 blocks.

CPU (this repo's CI machine): fp32 with an optimised BLAS preloaded for MLX:

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python benchmarks/lora_step.py --layers 1 --sizes 512 --repeats 7
    # 1024^2: ~18 s a pass here, so fewer rounds and variants (about 4 minutes)
    python benchmarks/lora_step.py --sizes 1024 --variants none unfused-r16 unfused-r64 \\
        fused-r64 --repeats 2 --term-repeats 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from dit_step import machine  # benchmarks/ (the script's folder)
from flops import dit_pass_flops

from ideogram4_mlx.dit_sequence import sequence_ids
from ideogram4_mlx.lora import Delta, LoRAFile, apply_loras, fuse_loras, lora_parameters
from ideogram4_mlx.transformer import Ideogram4Transformer, TransformerConfig

REAL_LAYERS = 34
TARGETS = ("attention.qkv", "attention.o", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
VARIANTS = ("none", "unfused-r16", "unfused-r64", "split-r64", "fused-r64")
T = 0.5


def random_lora(model: Ideogram4Transformer, rank: int, split_qkv: bool, seed: int) -> LoRAFile:
    """A rank-``rank`` LoRA on every block's ``TARGETS``, built in memory (alpha = rank)."""
    rng = np.random.default_rng(seed)
    deltas = {}
    for i, layer in enumerate(model.layers):
        modules = dict(layer.named_modules())
        for name in TARGETS:
            out, inp = modules[name].weight.shape
            parts = [0, 1, 2] if split_qkv and name == "attention.qkv" else [None]
            path = f"layers.{i}.{name}"
            deltas[path] = []
            for third in parts:
                rows = out // 3 if third is not None else out
                down = rng.standard_normal((rank, inp), dtype=np.float32) / np.sqrt(inp)
                up = rng.standard_normal((rows, rank), dtype=np.float32) * 0.01 / np.sqrt(rank)
                deltas[path].append(Delta(mx.array(down), mx.array(up), 1.0, path, third))
    name = f"random-r{rank}{'-split' if split_qkv else ''}"
    return LoRAFile(Path(f"{name}.safetensors"), "", "in memory", deltas)


def copy_of(base: Ideogram4Transformer, config: TransformerConfig) -> Ideogram4Transformer:
    """A DiT sharing ``base``'s weight arrays (no copy); LoRAs change only its module tree."""
    model = Ideogram4Transformer(config)
    params = dict(base.parameters())
    params["layers"] = params["layers"][: config.num_layers]
    model.update(params)
    return model


def build(variants: list[str], layers: int) -> tuple[dict, dict]:
    """The DiT of each variant (plus ``0 blocks``), and each unfused LoRA's (values, FLOPs
    per token) as it runs."""
    config = TransformerConfig(num_layers=layers)
    base = Ideogram4Transformer(config)
    mx.eval(base.parameters())
    models = {"0 blocks": copy_of(base, dataclasses.replace(config, num_layers=0))}
    extra = {}
    for name in variants:
        model = copy_of(base, config)
        if name != "none":
            kind, rank = name.split("-r")
            lora = random_lora(base, int(rank), kind == "split", seed=int(rank))
            if kind == "fused":
                fuse_loras(model, [(lora, 1.0)])
                mx.eval(model.parameters())
            else:
                apply_loras(model, [(lora, 1.0)])
                extra[name] = (lora_parameters(model), lora_flops_per_token(lora))
        models[name] = model
    return models, extra


def lora_flops_per_token(lora: LoRAFile) -> int:
    """``x @ down.T`` and ``@ up.T`` of every delta: 2 r (in + out) per token (out: a third's
    rows for split q/k/v, each with its own ``down``)."""
    return sum(2 * d.down.size + 2 * d.up.size for ds in lora.deltas.values() for d in ds)


def measure(
    models: dict, side: int, n_text: int, warmup: int, repeats: int, term_repeats: int
) -> dict:
    """Seconds per pass of each model, interleaved, and of each unfused LoRA's terms alone;
    also each output for the checks."""
    base = models["none"]
    grid = side // 16
    rng = np.random.default_rng(0)
    features = rng.standard_normal((1, n_text, base.config.llm_features_dim), dtype=np.float32)
    latents = mx.array(rng.standard_normal((1, n_text + grid * grid, 128), dtype=np.float32))
    seq = base.prepare(mx.array(features), *sequence_ids([n_text], grid, grid))
    t = np.array([T], dtype=np.float32)
    names = list(models)
    times = {n: [] for n in names}
    cpu_times = {n: [] for n in names}  # this process's CPU seconds: less sensitive to others
    outputs = {}
    for round_ in range(warmup + repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start, cpu = time.perf_counter(), time.process_time()
            out = models[name].run(latents, t, seq)
            mx.eval(out)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - cpu)
            outputs[name] = out
        print(f"  round {round_ + 1}/{warmup + repeats} done", file=sys.stderr, flush=True)
    length = n_text + grid * grid
    terms = {
        name: term_seconds(model, length, term_repeats)
        for name, model in models.items()
        if name.startswith(("unfused", "split"))
    }
    return {"times": times, "cpu": cpu_times, "outputs": outputs, "terms": terms}


def term_seconds(model: Ideogram4Transformer, length: int, repeats: int) -> float:
    """One block's LoRA work alone: each adapted linear's unfused term added to a base output,
    as ``_WithLoRA`` does (min of ``repeats`` after a warm-up)."""
    cfg = model.config
    x = mx.random.normal((1, length, cfg.hidden_size))
    g = mx.random.normal((1, length, cfg.intermediate_size))
    modules = dict(model.layers[0].named_modules())
    work = []
    for name in TARGETS:
        module = modules[name]
        y = mx.zeros((1, length, module.weight.shape[0]))
        work.append((module.lora, g if name == "feed_forward.w2" else x, y))
    mx.eval(x, g, *[y for *_, y in work])

    def step():
        mx.eval([y + adapters.term(inp) for adapters, inp, y in work])

    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times)


def load() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def rel_diff(a: mx.array, b: mx.array) -> float:
    return (mx.linalg.norm(a - b) / mx.linalg.norm(b)).item()


def paired(times: list[float], none: list[float]) -> float:
    """Median of each round's ratio (same moment, same load): steadier than a ratio of medians."""
    return statistics.median(t / n for t, n in zip(times, none, strict=True))


def report(side: int, n_text: int, layers: int, result: dict, extra: dict) -> list[dict]:
    config = TransformerConfig(num_layers=layers)
    n_img = (side // 16) ** 2
    tokens = n_text + n_img
    empty = dataclasses.replace(config, num_layers=0)
    block = (dit_pass_flops(config, n_img, n_text) - dit_pass_flops(empty, n_img, n_text)) // layers
    times = dict(result["times"])
    rest = statistics.median(times.pop("0 blocks"))
    none_block = (statistics.median(times["none"]) - rest) / layers
    print(f"\n{side}^2: {n_img} image + {n_text} text = {tokens} tokens, {layers} block(s)")
    print(f"  outside the blocks (0-block pass): {rest:.3f} s")
    print(
        "  variant        pass_s   min_s  x none  cpu x none  FLOP x none  terms_ms  "
        f"1+terms/block  {REAL_LAYERS}-block_s  LoRA values"
    )
    rows = []
    for name, ts in times.items():
        seconds = statistics.median(ts)
        ratio = paired(ts, times["none"])
        cpu_ratio = paired(result["cpu"][name], result["cpu"]["none"])
        values, per_token = extra.get(name, (0, 0))
        flop_ratio = 1 + per_token * tokens / layers / block
        per_block = (seconds - rest) / layers
        terms = result["terms"].get(name, 0.0)
        projected = rest + REAL_LAYERS * per_block
        print(
            f"  {name:<13} {seconds:7.3f} {min(ts):7.3f} {ratio:7.3f} {cpu_ratio:11.3f}"
            f" {flop_ratio:12.4f}"
            f" {terms * 1e3:9.0f} {1 + terms / none_block:14.4f} {projected:11.1f}  {values:,}"
        )
        rows.append(
            {
                "side": side,
                "n_text": n_text,
                "tokens": tokens,
                "layers": layers,
                "variant": name,
                "times": ts,
                "median_s": seconds,
                "ratio": ratio,
                "cpu_s": result["cpu"][name],
                "cpu_ratio": cpu_ratio,
                "flop_ratio": flop_ratio,
                "terms_s": terms,
                "terms_ratio": 1 + terms / none_block,
                "block_s": per_block,
                "rest_s": rest,
                "projected_s": projected,
                "lora_values": values,
            }
        )
    out = result["outputs"]
    checks = [("unfused-r64", "fused-r64"), ("unfused-r64", "none")]
    for a, b in checks:
        if a in out and b in out:
            print(f"  rel-L2 {a} vs {b}: {rel_diff(out[a], out[b]):.1e}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--sizes", nargs="+", type=int, default=[512])
    parser.add_argument("--text-tokens", type=int, default=100)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--term-repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if "none" not in args.variants:
        parser.error("--variants needs none (the ratios are to it)")
    mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    start = time.perf_counter()
    models, extra = build(args.variants, args.layers)
    print(f"machine: {machine(args.device)}; MLX {mx.__version__} {args.device}, fp32")
    print(f"load average at the start (1, 5, 15 min): {load()}; other processes share the CPUs")
    print(
        f"one conditional DiT pass, full width, {args.layers} block(s), random weights; LoRA on "
        f"every block's {', '.join(TARGETS)}; median of {args.repeats} interleaved rounds after "
        f"{args.warmup} warm-up (built in {time.perf_counter() - start:.0f} s)"
    )
    rows = []
    for side in args.sizes:
        result = measure(
            models, side, args.text_tokens, args.warmup, args.repeats, args.term_repeats
        )
        rows += report(side, args.text_tokens, args.layers, result, extra)
    print(
        "\npass_s: median, min_s: fastest pass; x none: median over rounds of pass / that "
        "round's none pass;\ncpu x none: the same for this process's CPU time; FLOP x none: per "
        "block (matmuls and attention, flops.py)\nplus the unfused LoRA's 2 r (in + out) per "
        "token per linear; terms_ms: one block's LoRA terms alone (added to base outputs),\n"
        f"min of {args.term_repeats}; 1+terms/block: over the none block (pass - 0-block pass); "
        f"{REAL_LAYERS}-block_s: 0-block pass + {REAL_LAYERS} x (pass - 0-block pass) / blocks"
    )
    print(f"total {time.perf_counter() - start:.0f} s; load average at the end {load()}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
