"""Where one full-width DiT block's time goes, and whether ``mx.compile`` helps, on this device.

Times, for one block at real width (random fp32/bf16 weights, no checkpoint needed) and a
given sequence length, each stage of the block evaluated on its own (matmuls, attention,
the element-wise chains between them), then the same element-wise chains eager and under
``mx.compile``, and the per-element cost of ``exp``/``sigmoid`` next to an add (numpy's exp
for scale). Minimum of ``--repeats`` after a warm-up.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python benchmarks/block_profile.py --tokens 1324 1024
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import numpy as np

from ideogram4_mlx.layers import apply_rope, silu
from ideogram4_mlx.transformer import TransformerBlock, TransformerConfig


def best_of(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def stage_times(block: TransformerBlock, length: int, dtype: mx.Dtype, repeats: int) -> dict:
    """Seconds per stage of one block pass, each stage evaluated separately."""
    cfg_heads, head_dim = block.attention.num_heads, block.attention.head_dim
    h = (mx.random.normal((1, length, cfg_heads * head_dim)) * 0.5).astype(dtype)
    c = mx.random.normal((1, 1, 512)).astype(dtype)
    cos, sin = (mx.random.normal((1, length, 1, head_dim)).astype(dtype) for _ in range(2))
    mx.eval(h, c, cos, sin)
    at, ff = block.attention, block.feed_forward
    mod = block.adaln_modulation(c)
    scale_a, gate_a, scale_f, gate_f = mx.split(mod, 4, axis=-1)
    x = block.attention_norm1(h) * (1 + scale_a)
    qkv = at.qkv(x).reshape(1, length, 3, cfg_heads, head_dim)
    q = apply_rope(at.norm_q(qkv[:, :, 0]), cos, sin).transpose(0, 2, 1, 3)
    k = apply_rope(at.norm_k(qkv[:, :, 1]), cos, sin).transpose(0, 2, 1, 3)
    v = qkv[:, :, 2].transpose(0, 2, 1, 3)
    o = mx.fast.scaled_dot_product_attention(q, k, v, scale=head_dim**-0.5)
    o = o.transpose(0, 2, 1, 3).reshape(1, length, -1)
    a = at.o(o)
    h2 = h + mx.tanh(gate_a) * block.attention_norm2(a)
    y = block.ffn_norm1(h2) * (1 + scale_f)
    a1, a3 = ff.w1(y), ff.w3(y)
    g = silu(a1) * a3
    f = ff.w2(g)
    mx.eval(mod, x, qkv, q, k, v, o, a, h2, y, a1, a3, g, f)
    stages = {
        "matmul qkv": lambda: at.qkv(x),
        "matmul o": lambda: at.o(o),
        "matmul w1+w3": lambda: [ff.w1(y), ff.w3(y)],
        "matmul w2": lambda: ff.w2(g),
        "attention (sdpa)": lambda: mx.fast.scaled_dot_product_attention(
            q, k, v, scale=head_dim**-0.5
        ),
        "swiglu gate": lambda: silu(a1) * a3,
        "norms + modulation": lambda: [
            block.attention_norm1(h) * (1 + scale_a),
            block.ffn_norm1(h2) * (1 + scale_f),
        ],
        "qk norm + rope": lambda: [
            apply_rope(at.norm_q(qkv[:, :, 0]), cos, sin),
            apply_rope(at.norm_k(qkv[:, :, 1]), cos, sin),
        ],
        "gated residuals": lambda: [
            h + mx.tanh(gate_a) * block.attention_norm2(a),
            h2 + mx.tanh(gate_f) * block.ffn_norm2(f),
        ],
    }
    out = {name: best_of(lambda fn=fn: mx.eval(fn()), repeats) for name, fn in stages.items()}
    out["whole block"] = best_of(lambda: mx.eval(block(h, c, cos, sin, None)), repeats)

    def chains(a1, a3, h, scale_a, gate_a, a):
        return (
            silu(a1) * a3,
            block.attention_norm1(h) * (1 + scale_a),
            h + mx.tanh(gate_a) * block.attention_norm2(a),
        )

    compiled = mx.compile(chains)
    args = (a1, a3, h, scale_a, gate_a, a)
    out["element-wise chains, eager"] = best_of(lambda: mx.eval(chains(*args)), repeats)
    out["element-wise chains, mx.compile"] = best_of(lambda: mx.eval(compiled(*args)), repeats)
    return out


def per_element_ns(repeats: int) -> dict:
    x = mx.random.normal((4096, 4096))
    mx.eval(x)
    n = x.size
    xn = np.asarray(x)
    ops = {
        "add": lambda: mx.eval(x + x),
        "exp": lambda: mx.eval(mx.exp(x)),
        "sigmoid": lambda: mx.eval(mx.sigmoid(x)),
        "numpy exp": lambda: np.exp(xn),
    }
    return {name: best_of(fn, repeats) * 1e9 / n for name, fn in ops.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1324, 1024])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    dtype = getattr(mx, args.dtype)
    block = TransformerBlock(TransformerConfig(num_layers=1))
    block.set_dtype(dtype)
    mx.eval(block.parameters())
    print(f"device {args.device}, dtype {args.dtype}, min of {args.repeats} after a warm-up")
    for name, ns in per_element_ns(args.repeats).items():
        print(f"  {name:<10} {ns:6.2f} ns/element (fp32)")
    for length in args.tokens:
        times = stage_times(block, length, dtype, args.repeats)
        print(f"\n{length} tokens, one block pass:")
        for name, seconds in times.items():
            print(f"  {name:<34} {seconds:7.3f} s")


if __name__ == "__main__":
    main()
