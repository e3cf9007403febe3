"""One full-width DiT block, ours against mflux 0.24.0's, on the same weights and inputs.

The step benchmark (``dit_step.py``) fits per-block time from runs of N blocks, which mixes in
each implementation's fixed cost and run-to-run noise; this times one block directly. Both
get the same fp8 codes and per-row scales: mflux's ``Fp8Linear`` decodes them in every call
(as it ships), ours holds them dequantized once. The dequantization here is mflux's own
formula in the compute dtype (not our loader's bf16 rounding, MODEL_NOTES#fp8-dequantization),
so in fp32 the two blocks get the same weights and their outputs can be compared bit for bit.
Variants:

- ``ours``: our ``TransformerBlock`` as the pipeline runs it (attention in head groups,
  feed-forward in token chunks).
- ``ours-onecall``: the same with one SDPA call over all heads and no chunking.
- ``ours-compiled``: ``ours-onecall`` under ``mx.compile`` (evaluation inside is not allowed).
- ``mflux-eager`` / ``mflux-compiled``: mflux's ``Ideogram4TransformerBlock``; mflux compiles
  its whole forward, so ``mflux-compiled`` is what it ships.

Outputs are checked against ``ours`` (relative L2). Minimum of ``--repeats`` after a warm-up.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python benchmarks/block_vs_mflux.py --tokens 5096 4096
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ideogram4_mlx.transformer import TransformerBlock, TransformerConfig

VARIANTS = ("ours", "ours-onecall", "ours-compiled", "mflux-eager", "mflux-compiled")


def fp8_linears(cfg: TransformerConfig, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random finite E4M3 codes (uint8, NaN codes excluded) and per-row scales per linear."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    shapes = {
        "attention.qkv": (3 * d, d),
        "attention.o": (d, d),
        "feed_forward.w1": (f, d),
        "feed_forward.w3": (f, d),
        "feed_forward.w2": (d, f),
        "adaln_modulation": (4 * d, cfg.adaln_dim),
    }
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        magnitude = rng.integers(0, 0x7F, size=shape, dtype=np.uint8)  # 0x7f is NaN
        sign = rng.integers(0, 2, size=shape, dtype=np.uint8) << 7
        scale = rng.uniform(1e-4, 2e-4, size=shape[0]).astype(np.float32)
        out[name] = (magnitude | sign, scale)
    return out


def build(cfg: TransformerConfig, dtype: mx.Dtype, seed: int):
    from mflux.models.common.config.model_config import ModelConfig

    ModelConfig.precision = dtype  # read by mflux's modules when they are imported
    from mflux.models.ideogram4.model.ideogram4_transformer.transformer_block import (
        Ideogram4TransformerBlock,
    )

    theirs = Ideogram4TransformerBlock(
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_attention_heads,
        cfg.norm_eps,
        cfg.adaln_dim,
    )
    ours = {name: TransformerBlock(cfg) for name in ("grouped", "onecall")}
    theirs_params = dict(tree_flatten(theirs.parameters()))
    ours_params = {"adaln_modulation.bias": theirs_params["adaln_modulation.bias"].astype(dtype)}
    for name, (codes, scale) in fp8_linears(cfg, seed).items():
        theirs_params[f"{name}.weight"] = mx.array(codes)
        theirs_params[f"{name}.weight_scale"] = mx.array(scale)
        weight = mx.from_fp8(mx.array(codes), dtype=mx.float32) * mx.array(scale)[:, None]
        ours_params[f"{name}.weight"] = weight.astype(dtype)
    theirs.update(tree_unflatten(list(theirs_params.items())))
    for block in ours.values():
        block.update(tree_unflatten(list(ours_params.items())))
        block.set_dtype(dtype)
    ours["onecall"].attention.score_bytes = 1 << 62
    ours["onecall"].feed_forward.chunk_tokens = None
    mx.eval(theirs.parameters(), [b.parameters() for b in ours.values()])
    return ours, theirs


def variants(ours: dict, theirs, length: int, cfg: TransformerConfig, dtype: mx.Dtype) -> dict:
    h = mx.random.normal((1, length, cfg.hidden_size)).astype(dtype)
    c = mx.random.normal((1, 1, cfg.adaln_dim)).astype(dtype)
    angle = mx.random.uniform(shape=(1, length, 1, cfg.attention_head_dim)) * 6
    cos, sin = mx.cos(angle).astype(dtype), mx.sin(angle).astype(dtype)
    segments = mx.ones((1, length), mx.int32)
    mx.eval(h, c, cos, sin, segments)
    onecall = ours["onecall"]
    compiled_ours = mx.compile(lambda h, c, cos, sin: onecall(h, c, cos, sin, None))
    compiled_theirs = mx.compile(lambda h, s, cos, sin, c: theirs(h, s, cos, sin, c))
    # mflux takes cos/sin as (B, L, D) and the AdaLN input as (B, 1, adaln_dim).
    return {
        "ours": lambda: ours["grouped"](h, c, cos, sin, None),
        "ours-onecall": lambda: onecall(h, c, cos, sin, None),
        "ours-compiled": lambda: compiled_ours(h, c, cos, sin),
        "mflux-eager": lambda: theirs(h, segments, cos[:, :, 0], sin[:, :, 0], c),
        "mflux-compiled": lambda: compiled_theirs(h, segments, cos[:, :, 0], sin[:, :, 0], c),
    }


def best_of(fn, repeats: int) -> tuple[float, mx.array]:
    out = fn()
    mx.eval(out)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", nargs="+", type=int, default=[5096, 4096])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    dtype = getattr(mx, args.dtype)
    cfg = TransformerConfig(num_layers=1)
    ours, theirs = build(cfg, dtype, seed=0)
    print(f"device {args.device}, dtype {args.dtype}, min of {args.repeats} after a warm-up")
    for length in args.tokens:
        fns = variants(ours, theirs, length, cfg, dtype)
        reference, base = None, None
        for name in args.variants:
            seconds, out = best_of(fns[name], args.repeats)
            out = out.astype(mx.float32)
            if reference is None:
                reference, base = out, seconds
            rel = mx.sqrt(mx.sum((out - reference) ** 2) / mx.sum(reference**2)).item()
            print(
                f"{length:>6} tokens  {name:<15} {seconds:8.3f} s  {seconds / base:5.2f} x "
                f"{args.variants[0]}  rel-L2 vs {args.variants[0]} {rel:.1e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
