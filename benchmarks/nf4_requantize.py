"""What re-quantizing a 4-bit (nf4) source costs: weight error on a full-width synthetic DiT.

Writes a synthetic fp8 `transformer/` with the real widths (hidden 4608, FFN 12288, 53248 text
features) and `--layers` blocks, makes the `ideogram-ai/ideogram-4-nf4` layout of it
(`ideogram4_mlx.synth.nf4`: bitsandbytes nf4, blocksize 64), decodes it as the loader does, and
compares every Linear weight with the fp8 original (dequantized exactly, bf16):

- nf4 -> bf16: the decode rounded to bf16 once (what `convert --quantize none` keeps);
- nf4 -> affine 8-bit / 4-bit, group 64: that bf16 weight quantized again by `mx.quantize`;
- fp8 -> affine 8-bit / 4-bit, group 64: the fp8 weight quantized directly, for comparison.

Relative L2 over all Linear weights (sqrt of summed squared errors over summed squares), vs the
fp8 weights and vs the nf4 decode (the part re-quantizing adds), and of the DiT's output (the
image-token velocity of one seeded input, float32 compute, as benchmarks/convert_quality.py)
vs the same DiT with the fp8 weights. Every Linear is quantized here;
`convert --quantize 4` keeps some layers float or at 8 bits, so its whole-model error is lower.
Random weights: the numbers compare the routes, they do not predict image quality.

    python benchmarks/nf4_requantize.py --workdir /tmp/nf4-requantize --layers 2
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from ideogram4_mlx.dit_sequence import sequence_ids
from ideogram4_mlx.sources import nf4
from ideogram4_mlx.synth import SYNTHETIC_PRESETS, write_synthetic_checkpoint
from ideogram4_mlx.synth.nf4 import write_nf4_checkpoint
from ideogram4_mlx.transformer import Ideogram4Transformer
from ideogram4_mlx.weights import SCALE_SUFFIX, component_files, dequantize_fp8

ROUTES = ("nf4 -> bf16", "nf4 -> affine 8-bit", "nf4 -> affine 4-bit", "fp8 -> affine 8-bit",
          "fp8 -> affine 4-bit")  # fmt: skip
# Bits a weight on disk: 4 + a float32 absmax per 64 (nf4); b + bf16 scale and bias per 64.
BITS = {"nf4 -> bf16": 16.0, "nf4 -> affine 8-bit": 8.5, "nf4 -> affine 4-bit": 4.5,
        "fp8 -> affine 8-bit": 8.5, "fp8 -> affine 4-bit": 4.5}  # fmt: skip
NF4_BITS = 4.5


def affine(w: mx.array, bits: int) -> mx.array:
    """``w`` (bf16) quantized with MLX's affine mode, group 64, and dequantized (bf16)."""
    return mx.dequantize(*mx.quantize(w, group_size=64, bits=bits), group_size=64, bits=bits)


def load(folder: Path) -> dict[str, mx.array]:
    weights = {}
    for path in component_files(folder):
        weights.update(mx.load(str(path)))
    return weights


def layers(src: Path, nf4_dir: Path):
    """Per Linear of the DiT: its key, the fp8 reference (bf16), the nf4 decode (bf16) and every
    route's weight (bf16), computed lazily one layer at a time."""
    fp8 = load(src / "transformer")
    decoded = nf4.decode(load(nf4_dir / "transformer"))
    for scale_key in sorted(k for k in fp8 if k.endswith(SCALE_SUFFIX)):
        key = scale_key[: -len(SCALE_SUFFIX)] + ".weight"
        # popped: an evaluated array left in the dicts would keep its memory
        ref = dequantize_fp8(fp8.pop(key), fp8.pop(scale_key))  # bf16, the reference rounding
        from_nf4 = decoded.pop(key).astype(mx.bfloat16)
        routes = {
            "nf4 -> bf16": lambda w=from_nf4: w,
            "nf4 -> affine 8-bit": lambda w=from_nf4: affine(w, 8),
            "nf4 -> affine 4-bit": lambda w=from_nf4: affine(w, 4),
            "fp8 -> affine 8-bit": lambda w=ref: affine(w, 8),
            "fp8 -> affine 4-bit": lambda w=ref: affine(w, 4),
        }
        yield key, ref, from_nf4, routes


def velocity(model: Ideogram4Transformer, n_text: int = 16, grid: int = 8) -> np.ndarray:
    """The image-token velocity of one seeded input (as benchmarks/convert_quality.py)."""
    rng = np.random.default_rng(0)
    pos, seg, ind = sequence_ids([n_text], grid, grid)
    length = ind.shape[1]
    x = mx.array(rng.standard_normal((1, length, 128)).astype(np.float32))
    feats = rng.standard_normal((1, length, model.config.llm_features_dim)).astype(np.float32)
    out = model(x, np.array([0.5], np.float32), mx.array(feats), pos, seg, ind)
    return np.array(out[:, n_text:])


def output_errors(src: Path, nf4_dir: Path) -> dict[str, float]:
    """Rel-L2 of the DiT's velocity (float32 compute) with each route's weights vs the fp8
    weights; one model at a time, its Linear weights swapped layer by layer."""
    model = Ideogram4Transformer.from_pretrained(src / "transformer", dtype=mx.float32)
    reference = velocity(model)
    out = {}
    for name in ROUTES:
        for key, _, _, routes in layers(src, nf4_dir):
            model.load_weights([(key, routes[name]().astype(mx.float32))], strict=False)
            mx.eval(model.parameters())
        v = velocity(model)
        out[name] = float(np.linalg.norm(v - reference) / np.linalg.norm(reference))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/nf4-requantize"))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--no-output", action="store_true", help="weight errors only")
    args = parser.parse_args()

    spec = dataclasses.replace(SYNTHETIC_PRESETS["full-width"], dit_num_layers=args.layers)
    src, nf4_dir = args.workdir / "fp8", args.workdir / "nf4"
    start = time.perf_counter()
    if not src.exists():
        write_synthetic_checkpoint(src, spec, seed=0, components=("transformer",))
    if not nf4_dir.exists():
        write_nf4_checkpoint(src, nf4_dir, naming="fused")
    print(f"wrote the fp8 and nf4 folders: {time.perf_counter() - start:.0f} s")
    err_ref = dict.fromkeys(ROUTES, 0.0)
    err_nf4 = dict.fromkeys(ROUTES, 0.0)
    norm_ref = norm_nf4 = 0.0
    count = 0
    for _, ref, from_nf4, routes in layers(src, nf4_dir):
        ref32, nf432 = ref.astype(mx.float32), from_nf4.astype(mx.float32)
        for name, make in routes.items():
            w32 = make().astype(mx.float32)
            err_ref[name] += mx.sum(mx.square(w32 - ref32)).item()
            err_nf4[name] += mx.sum(mx.square(w32 - nf432)).item()
        norm_ref += mx.sum(mx.square(ref32)).item()
        norm_nf4 += mx.sum(mx.square(nf432)).item()
        count += ref.size
    outputs = {} if args.no_output else output_errors(src, nf4_dir)
    print(f"{args.layers}-block full-width DiT, {count / 1e9:.2f} B Linear weights (fp8 source)")
    print("| route | bits/weight | weight rel-L2 vs fp8 | vs the nf4 decode | DiT output rel-L2 |")
    print("|---|---|---|---|---|")
    for name in ROUTES:
        vs_nf4 = "-" if name.startswith("fp8") else f"{(err_nf4[name] / norm_nf4) ** 0.5:.4f}"
        output = f"{outputs[name]:.4f}" if name in outputs else "-"
        weight = (err_ref[name] / norm_ref) ** 0.5
        print(f"| {name} | {BITS[name]} | {weight:.4f} | {vs_nf4} | {output} |")
    print(f"(the nf4 source itself: {NF4_BITS} bits/weight)")
    print(f"total: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
