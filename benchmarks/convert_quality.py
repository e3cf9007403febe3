"""Size on disk and DiT error of each conversion setting, on a full-width synthetic DiT.

Writes a synthetic `transformer/` with the real widths (hidden 4608, FFN 12288, 53248 text
features) and `--layers` blocks, converts it with every setting (affine bits, the mixed
recipes, MLX's float modes mxfp8/mxfp4/nvfp4) and measures, per setting:

- DiT bytes: the tensor bytes of the full 34-block DiT, exact, from the quantized skeleton the
  loader builds (the safetensors headers and index add well under 1 MB); checked against the
  converted `--layers`-block folder's files.
- weight rel-L2: the dequantized block linears vs the fp8 weights dequantized exactly in fp32
  (all blocks' linears together).
- block 0's output (and its update, output - input) rel-L2 vs the bf16 block on the same
  inputs (those block 0 sees in the bf16 DiT's forward), in fp32 activations: weights
  dequantized exactly to fp32 Linears, because MLX's CPU quantized matmul is far too slow
  here (dequantizing is the same product up to fp32 summation order).
- DiT velocity rel-L2 (the README's column): the whole `--layers`-block DiT, weights
  dequantized to bf16 (mlx-lm's `dequantize_model`), bf16 activations, vs the raw fp8 DiT in
  bf16, over the image tokens.

Random weights: the numbers rank the settings, they do not predict image quality.

    python benchmarks/convert_quality.py --workdir /tmp/convert-quality
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import platform
import shutil
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import dequantize_model

from ideogram4_mlx.convert import convert
from ideogram4_mlx.dit_sequence import sequence_ids
from ideogram4_mlx.quantization import FLOAT_MODES, RECIPES, quantization_plan, quantize_skeleton
from ideogram4_mlx.synth import SYNTHETIC_PRESETS, write_synthetic_checkpoint
from ideogram4_mlx.transformer import Ideogram4Transformer, TransformerConfig

SETTINGS = ("bf16", "8", "6", "mixed-4-8", "mixed-4-6", "4", "mxfp8", "mxfp4", "nvfp4")
REAL_LAYERS = 34
FLOAT_BYTES = 2  # bf16: every unquantized tensor of a default conversion


def options(setting: str) -> dict:
    """``convert`` keyword arguments of a setting name."""
    if setting in RECIPES:
        return {"recipe": setting}
    if setting.isdigit():
        return {"quantize": int(setting)}
    if setting in FLOAT_MODES:
        return {"quantize": setting}
    return {}


def skeleton_bytes(config: TransformerConfig, setting: str) -> int:
    """Tensor bytes of a DiT of ``config`` converted with ``setting`` (lazy: nothing built)."""
    model = Ideogram4Transformer(config)
    kwargs = options(setting)
    plan = quantization_plan(model, kwargs.get("quantize"), recipe=kwargs.get("recipe"))
    quantize_skeleton(model, {"quantization": plan})
    return sum(
        v.size * (FLOAT_BYTES if mx.issubdtype(v.dtype, mx.floating) else v.itemsize)
        for _, v in tree_flatten(model.parameters())
    )


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors"))


def inputs(model: Ideogram4Transformer, n_text: int, grid: int):
    rng = np.random.default_rng(0)
    pos, seg, ind = sequence_ids([n_text], grid, grid)
    length = ind.shape[1]
    x = mx.array(rng.standard_normal((1, length, 128)).astype(np.float32))
    feats = rng.standard_normal((1, length, model.config.llm_features_dim)).astype(np.float32)
    return x, np.array([0.5], np.float32), mx.array(feats), pos, seg, ind


def velocity(model: Ideogram4Transformer, n_text: int, grid: int) -> np.ndarray:
    return np.array(model(*inputs(model, n_text, grid))[:, n_text:])


def block0_inputs(model: Ideogram4Transformer, n_text: int, grid: int) -> tuple:
    """(h, c, cos, sin, mask) that block 0 sees in ``model``'s forward."""
    seen = []
    run_block = model.block

    def block(i, h, c, seq):
        if i == 0:
            seen.append((h, c, seq.cos, seq.sin, seq.mask))
        return run_block(i, h, c, seq)

    model.block = block  # the instance attribute shadows the method for this forward
    mx.eval(model(*inputs(model, n_text, grid)))
    del model.block
    return seen[0]


def dequantized(layer: nn.Module) -> nn.Module:
    """A float32 copy of ``layer`` with its quantized linears dequantized exactly."""
    swaps = []
    for path, m in layer.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            w = mx.dequantize(
                m.weight, m.scales, m.get("biases"), m.group_size, m.bits, m.mode, dtype=mx.float32
            )
            linear = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
            linear.weight = w
            if "bias" in m:
                linear.bias = m.bias
            swaps.append((path, linear))
    layer.update_modules(tree_unflatten(swaps))
    layer.set_dtype(mx.float32)
    return layer


def linear_weights(model: Ideogram4Transformer) -> dict[str, mx.array]:
    """Every block linear's weight, in float32 (quantized ones dequantized exactly)."""
    out = {}
    for path, m in model.named_modules():
        if not path.startswith("layers."):
            continue
        if isinstance(m, nn.QuantizedLinear):
            out[path] = mx.dequantize(
                m.weight, m.scales, m.get("biases"), m.group_size, m.bits, m.mode, dtype=mx.float32
            )
        elif isinstance(m, nn.Linear):
            out[path] = m.weight.astype(mx.float32)
    return out


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/convert-quality"))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--grid", type=int, default=8, help="image tokens per side")
    parser.add_argument("--text-tokens", type=int, default=16)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    args = parser.parse_args()

    spec = dataclasses.replace(SYNTHETIC_PRESETS["full-width"], dit_num_layers=args.layers)
    src = args.workdir / "src"
    if not src.exists():
        write_synthetic_checkpoint(src, spec, seed=0, components=("transformer",))
    config = TransformerConfig.from_file(src / "transformer" / "config.json")
    full = dataclasses.replace(config, num_layers=REAL_LAYERS)
    machine = f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs"
    print(f"{machine}, MLX {mx.__version__} on {mx.default_device()}")

    start = time.perf_counter()
    raw = Ideogram4Transformer.from_pretrained(src / "transformer")
    reference = velocity(raw, args.text_tokens, args.grid)
    del raw
    exact = linear_weights(Ideogram4Transformer.from_pretrained(src / "transformer", mx.float32))
    mx.eval(exact)
    bf16_dir = args.workdir / "out-bf16-reference"
    if not bf16_dir.exists():
        convert(src, bf16_dir, components=("transformer",), progress=False)
    bf16 = Ideogram4Transformer.from_pretrained(bf16_dir / "transformer", mx.float32)
    block_in = block0_inputs(bf16, args.text_tokens, args.grid)
    block_ref = np.array(bf16.layers[0](*block_in))
    h_in = np.array(block_in[0])
    mx.eval(block_in)
    del bf16
    print(f"references: {time.perf_counter() - start:.0f} s")
    bf16_bytes = skeleton_bytes(full, "bf16")
    tokens = args.text_tokens + args.grid**2
    print(
        f"{args.layers}-block full-width DiT, {tokens} tokens ({args.text_tokens} text); "
        f"full {REAL_LAYERS}-block DiT bf16 {bf16_bytes / 1e9:.2f} GB"
    )
    print(
        "| setting | DiT size on disk (34 blocks) | vs bf16 | weight rel-L2 vs fp8 "
        "| block 0 output rel-L2 vs bf16 | block 0 update rel-L2 | "
        f"DiT rel-L2 vs fp8 weights ({args.layers} full-width blocks) |"
    )
    print("|---|---|---|---|---|---|---|")
    for setting in args.settings:
        t0 = time.perf_counter()
        dst = args.workdir / f"out-{setting}"
        shutil.rmtree(dst, ignore_errors=True)
        convert(src, dst, components=("transformer",), progress=False, **options(setting))
        predicted = skeleton_bytes(config, setting)
        on_disk = folder_bytes(dst / "transformer")
        assert 0 <= on_disk - predicted < 1_000_000, (setting, on_disk, predicted)
        size = skeleton_bytes(full, setting)

        model = Ideogram4Transformer.from_pretrained(dst / "transformer")
        weights = linear_weights(model)
        num = sum(float(mx.sum((weights[k] - exact[k]) ** 2)) for k in exact)
        den = sum(float(mx.sum(exact[k] ** 2)) for k in exact)
        del weights
        out = np.array(dequantized(model.layers[0])(*block_in))
        block_err = rel(out, block_ref)
        update_err = rel(out - h_in, block_ref - h_in)
        del model
        gc.collect()
        # bf16 Linear layers for the whole-DiT forward: the bf16 rounding of the dequantized
        # weights (~0.1% RMS) is small next to the quantization error itself.
        model = dequantize_model(Ideogram4Transformer.from_pretrained(dst / "transformer"))
        err = rel(velocity(model, args.text_tokens, args.grid), reference)
        del model
        print(
            f"| {setting} | {size / 1e9:.2f} GB | {size / bf16_bytes:.3f}x | "
            f"{np.sqrt(num / den):.4f} | {block_err:.4f} | {update_err:.4f} | {err:.4f} |",
            flush=True,
        )
        print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
        shutil.rmtree(dst)
        gc.collect()


if __name__ == "__main__":
    main()
