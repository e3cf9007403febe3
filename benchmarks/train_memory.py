"""Peak memory of one LoRA training step (#31): measured on full-width blocks, projected to 34.

Measured, each point in its own process (MLX peak memory, GB = 1e9 bytes): a full-width DiT
(the real ``TransformerConfig``: hidden 4608, 18 heads x 256, FFN 12288) with 1 and 2 blocks
instead of 34 and random weights, LoRA on the default targets (``train.step.add_lora``), one
``train_step`` (forward, backward over the adapters only, AdamW update; the optimizer state
initialised before) on batch 1 at ``(side / 16)^2`` image tokens plus a 256-token caption. The
step's activations = MLX peak during the step - memory active before it (weights, adapters,
optimizer state, the prepared batch). Blocks are the only thing that repeats, so with
``n`` blocks the activations are ``n * kept + transient``: ``kept`` (what one block keeps for
the backward pass) = act(2 blocks) - act(1 block) - one block's LoRA gradients, ``transient``
= act(1) - kept. Sides without both block counts take ``kept`` and ``transient`` from a
least-squares fit over those with both: widths of (tokens, hidden) plus attention-score planes
(heads, tokens, tokens), the constants of ``ideogram4_mlx.train.memory``.

Projected to the real 34 blocks: ``34 * kept + transient`` activations, plus the base weights
(34 blocks by the shapes: bf16, or the block linears quantized to 8 / 4 bits, group 64, the
AdaLN modulations and everything outside the blocks bf16, as ``convert --quantize`` keeps them
at most), plus the adapters, their gradients and AdamW's two moments (4 x the LoRA
parameters, fp32; one block's gradients are taken out of ``kept``), plus one batch of cached
features (256 x 53248 text features + the latents, bf16).

CPU (fp32, the CPU backend's fast path; bf16 is a fallback there, minutes per step):

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python benchmarks/train_memory.py --sides 512 768 1024 --out \\
        benchmarks/results/train_memory_cpu.txt
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REAL_LAYERS = 34
CAPTION_TOKENS = 256
GROUP_SIZE = 64
RESULTS = Path(__file__).parent / "results"


def measure_child(side: int, rank: int, checkpoint: bool, layers: int, dtype_name: str) -> dict:
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    from ideogram4_mlx.train.step import (
        LoRASettings,
        add_lora,
        make_optimizer,
        prepare_batch,
        train_step,
    )
    from ideogram4_mlx.transformer import Ideogram4Transformer, TransformerConfig

    dtype = getattr(mx, dtype_name)
    config = TransformerConfig(num_layers=layers)
    model = Ideogram4Transformer(config)
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    add_lora(model, LoRASettings(rank=rank, alpha=float(rank)), checkpoint=checkpoint)
    grid = side // 16
    n = grid * grid
    rng = np.random.default_rng(0)
    features = mx.array(
        rng.standard_normal((1, CAPTION_TOKENS, config.llm_features_dim), dtype=np.float32)
    ).astype(dtype)
    latents = mx.array(rng.standard_normal((1, n, config.in_channels), dtype=np.float32))
    noise = mx.array(rng.standard_normal((1, n, config.in_channels), dtype=np.float32))
    batch = prepare_batch(
        model, latents, features, [CAPTION_TOKENS], (grid, grid), np.array([0.5]), noise
    )
    mx.eval(batch.seq, latents, noise)
    optimizer = make_optimizer()
    optimizer.init(model.trainable_parameters())
    mx.eval(optimizer.state)
    lora = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
    mx.clear_cache()
    resident = mx.get_active_memory()
    mx.reset_peak_memory()
    start = time.perf_counter()
    train_step(model, optimizer, batch)
    seconds = time.perf_counter() - start
    peak = mx.get_peak_memory()
    return {
        "side": side,
        "rank": rank,
        "checkpoint": checkpoint,
        "layers": layers,
        "dtype": dtype_name,
        "tokens": n + CAPTION_TOKENS,
        "resident_gb": resident / 1e9,
        "peak_gb": peak / 1e9,
        "activations_gb": (peak - resident) / 1e9,
        "lora_params_gb": lora / 1e9,
        "seconds": seconds,
    }


def base_bytes() -> dict[str, dict[str, int]]:
    """Bytes of one block and of the rest of the DiT, bf16 and with the block linears (not the
    AdaLN modulation) quantized to 8 and 4 bits, group 64, by building them (lazily: sizes only)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from ideogram4_mlx.transformer import Ideogram4Transformer, TransformerConfig

    out = {}
    for name, bits in (("bf16", None), ("8-bit", 8), ("4-bit", 4)):
        model = Ideogram4Transformer(TransformerConfig(num_layers=1))
        model.set_dtype(mx.bfloat16)
        if bits:
            nn.quantize(
                model.layers[0],
                group_size=GROUP_SIZE,
                bits=bits,
                class_predicate=lambda p, m: isinstance(m, nn.Linear) and "adaln" not in p,
            )
        sizes = {k: v.nbytes for k, v in tree_flatten(model.parameters())}
        block = sum(v for k, v in sizes.items() if k.startswith("layers.0."))
        out[name] = {"block": block, "rest": sum(sizes.values()) - block}
        del model
    return out


def spawn(side: int, rank: int, checkpoint: bool, layers: int, dtype: str, timeout: float):
    args = [str(side), str(rank), str(int(checkpoint)), str(layers), dtype]
    done = subprocess.run(
        [sys.executable, __file__, "--child", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode:
        raise SystemExit(f"child {args} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> str:
    import os
    import platform

    import mlx.core as mx

    cpu = platform.processor() or platform.machine()
    try:
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    system = f"{platform.system()} {platform.machine()}"
    return f"{cpu}, {os.cpu_count()} cores, {system}, MLX {mx.__version__}"


def fit(points: dict, config) -> tuple[float, float]:
    """Least-squares (widths, planes): bytes = (w * L * hidden + p * heads * L^2) * 4."""
    import numpy as np

    if not points:
        return (float("nan"), float("nan"))
    rows = [
        [4 * tokens * config.hidden_size, 4 * config.num_attention_heads * tokens**2]
        for tokens in points
    ]
    solution, *_ = np.linalg.lstsq(np.array(rows, float), np.array(list(points.values())))
    return float(solution[0]), float(solution[1])


def grads(row: dict) -> float:
    """Bytes of one block's LoRA gradients (fp32, the adapters' size)."""
    return row["lora_params_gb"] * 1e9 / row["layers"]


def fitted(coef: tuple[float, float], config, tokens: int) -> float:
    widths, planes = coef
    return 4 * (
        widths * tokens * config.hidden_size + planes * config.num_attention_heads * tokens**2
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", nargs="+", type=int, default=[512, 768, 1024])
    parser.add_argument("--ranks", nargs="+", type=int, default=[16, 32])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--timeout", type=float, default=400, help="seconds per measured step")
    parser.add_argument(
        "--points",
        type=Path,
        default=RESULTS / "train_memory_cpu.jsonl",
        help="measured points (JSON lines): reused, missing ones measured and appended",
    )
    parser.add_argument("--no-measure", action="store_true", help="only the points file's")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", nargs=5)
    args = parser.parse_args()
    if args.child:
        side, rank, ckpt, layers, dtype = args.child
        print(json.dumps(measure_child(int(side), int(rank), ckpt == "1", int(layers), dtype)))
        return

    from ideogram4_mlx.train.memory import lora_parameters
    from ideogram4_mlx.transformer import TransformerConfig

    config = TransformerConfig()
    text = args.points.read_text() if args.points.exists() else ""
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]

    def point(side, rank, ckpt, layers):
        for r in rows:
            key = (r["side"], r["rank"], r["checkpoint"], r["layers"], r["dtype"])
            if key == (side, rank, ckpt, layers, args.dtype):
                return r
        if args.no_measure:
            return None
        r = spawn(side, rank, ckpt, layers, args.dtype, args.timeout)
        rows.append(r)
        with args.points.open("a") as f:
            f.write(json.dumps(r) + "\n")
        return r

    # Activations (GB) measured: {(side, rank, ckpt): {layers: act}}
    measured = {}
    for side in args.sides:
        for rank in args.ranks:
            for ckpt in (False, True):
                for layers in (1, 2):
                    r = point(side, rank, ckpt, layers)
                    if r is not None:
                        measured.setdefault((side, ckpt), {}).setdefault(rank, {})[layers] = r
    # Fits per mode: kept over the sides with both block counts (any rank: it moves the
    # activations by < 0.1%), then transient = act1 - kept (measured, else fitted) - gradients
    # over every side with a 1-block step.
    fits = {}
    for ckpt in (False, True):
        kept, ones = {}, {}
        for (_side, mode), by_rank in measured.items():
            if mode != ckpt:
                continue
            for r in by_rank.values():
                if 1 in r:
                    ones[r[1]["tokens"]] = r[1]
                if 1 in r and 2 in r:
                    # less the second block's LoRA gradients (counted with the adapters)
                    k = (r[2]["activations_gb"] - r[1]["activations_gb"]) * 1e9 - grads(r[1])
                    kept[r[1]["tokens"]] = k
                    break
        kept_fit = fit(kept, config)
        transient = {
            t: one["activations_gb"] * 1e9 - grads(one) - kept.get(t, fitted(kept_fit, config, t))
            for t, one in ones.items()
        }
        fits[ckpt] = (kept_fit, fit(transient, config))

    base = base_bytes()
    # Activations measured in fp32 here; bf16 keeps the same tensors at half the bytes except
    # what computes in fp32 whatever the dtype (softmax, SiLU, the adapters' inputs): halving
    # is the stated assumption (the fp32 figure is bf16's upper bound).
    scale = 0.5 if args.dtype == "float32" else 1.0
    lines = [
        f"# benchmarks/train_memory.py, {time.strftime('%Y-%m-%d')}: {machine()}; "
        f"measured in {args.dtype} on full-width DiTs of 1 and 2 blocks, batch 1, "
        f"{CAPTION_TOKENS}-token caption, LoRA (alpha = rank) on the default targets, AdamW. "
        "GB = 1e9 bytes.",
        "# act1/act2: MLX peak - active before the step with 1 / 2 blocks (measured; '-' not "
        "measured); kept = act2 - act1 - a block's LoRA gradients (what a block keeps for the "
        "backward pass), "
        "transient = act1 - kept - gradients; kept marked * comes from the fit.",
        "# fit (widths of (L, hidden), planes of (heads, L, L), fp32): "
        + "; ".join(
            f"{'checkpointed' if c else 'plain'} kept {k[0]:.2f} w + {k[1]:.3f} p, "
            f"transient {t[0]:.2f} w + {t[1]:.3f} p"
            for c, (k, t) in fits.items()
        ),
        f"# projected to 34 blocks: activations = {scale} x (34 kept + transient) (bf16 = half "
        "of fp32: assumption); peak = base weights + LoRA (A/B, gradients, 2 AdamW moments, "
        "fp32) + "
        "one batch (bf16) + activations",
        "# base weights, 34 blocks + the rest (block linears quantized, group 64; AdaLN and the "
        "rest bf16): "
        + ", ".join(f"{k} {(34 * v['block'] + v['rest']) / 1e9:.2f} GB" for k, v in base.items()),
        f"{'side':>5} {'tokens':>6} {'rank':>4} {'ckpt':>4}  {'act1':>6} {'act2':>6} "
        f"{'kept':>7} {'trans':>6} {'s/step':>6}  {'acts34':>6} {'lora+opt':>8}  "
        f"{'peak bf16':>9} {'peak 8bit':>9} {'peak 4bit':>9}",
    ]
    for line in lines:
        print(line, flush=True)
    checks = []
    for side in args.sides:
        tokens = (side // 16) ** 2 + CAPTION_TOKENS
        for rank in args.ranks:
            for ckpt in (False, True):
                by_rank = measured.get((side, ckpt), {})
                # this rank's steps, else another rank's (it moves them by < 0.1%): both
                # block counts first
                order = [by_rank.get(rank, {}), *by_rank.values()]
                r = next((x for x in order if 1 in x and 2 in x), None)
                r = r or next((x for x in order if x), {})
                one, two = r.get(1), r.get(2)
                if one and two:
                    kept = (two["activations_gb"] - one["activations_gb"]) * 1e9 - grads(one)
                    transient = one["activations_gb"] * 1e9 - kept
                    mark = " "
                elif one:  # kept from the fit, transient from this 1-block step
                    kept = fitted(fits[ckpt][0], config, tokens)
                    transient = one["activations_gb"] * 1e9 - grads(one) - kept
                    mark = "*"
                else:
                    kept = fitted(fits[ckpt][0], config, tokens)
                    transient = fitted(fits[ckpt][1], config, tokens)
                    mark = "*"
                lora = 4 * 4 * lora_parameters(config, rank)
                batch_gb = (
                    CAPTION_TOKENS * config.llm_features_dim + 3 * 128 * (tokens - CAPTION_TOKENS)
                ) * 2
                acts = scale * (REAL_LAYERS * kept + transient)
                peaks = {
                    k: (REAL_LAYERS * v["block"] + v["rest"] + lora + batch_gb + acts) / 1e9
                    for k, v in base.items()
                }
                a1 = f"{one['activations_gb']:6.2f}" if one else f"{'-':>6}"
                a2 = f"{two['activations_gb']:6.2f}" if two else f"{'-':>6}"
                sec = f"{one['seconds']:6.0f}" if one else f"{'-':>6}"
                if one and not two:  # the transient fit against this 1-block step
                    fit1 = (kept + fitted(fits[ckpt][1], config, tokens) + grads(one)) / 1e9
                    checks.append(
                        f"# check {side}^2 rank {rank} {'checkpointed' if ckpt else 'plain'}: "
                        f"1 block measured {one['activations_gb']:.2f} GB, both fits {fit1:.2f} GB"
                    )
                if one and one["rank"] != rank:  # another rank's measurement
                    a1, a2 = a1 + "r", a2 + ("r" if two else "")
                lines.append(
                    f"{side:>5} {tokens:>6} {rank:>4} {'yes' if ckpt else 'no':>4}  {a1} {a2} "
                    f"{kept / 1e9:6.3f}{mark} {transient / 1e9:6.2f} {sec}  {acts / 1e9:6.2f} "
                    f"{lora / 1e9:8.3f}  {peaks['bf16']:9.2f} {peaks['8-bit']:9.2f} "
                    f"{peaks['4-bit']:9.2f}"
                )
                print(lines[-1], flush=True)
    for line in checks:
        print(line, flush=True)
    lines += checks
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
