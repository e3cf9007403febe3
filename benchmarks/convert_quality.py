"""Size on disk and DiT error of each conversion setting, on a full-width synthetic DiT.

Writes a synthetic `transformer/` with the real widths (hidden 4608, FFN 12288, 53248 text
features) and `--layers` blocks, converts it with every setting, and compares the velocity of
each converted model with the raw fp8 weights (dequantized exactly, bf16): relative L2 over the
image tokens. Random weights: the numbers rank the settings, they do not predict image quality.

    python benchmarks/convert_quality.py --workdir /tmp/convert-quality
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import shutil
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.utils import dequantize_model

from ideogram4_mlx.convert import convert
from ideogram4_mlx.dit_sequence import sequence_ids
from ideogram4_mlx.quantization import RECIPES
from ideogram4_mlx.synth import SYNTHETIC_PRESETS, write_synthetic_checkpoint
from ideogram4_mlx.transformer import Ideogram4Transformer
from ideogram4_mlx.weights import component_files, read_header

SETTINGS = ("bf16", "8", "6", "mixed-4-8", "mixed-4-6", "4")
REAL_LAYERS = 34


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors"))


def velocity(model: Ideogram4Transformer, n_text: int, grid: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    pos, seg, ind = sequence_ids([n_text], grid, grid)
    length = ind.shape[1]
    x = mx.array(rng.standard_normal((1, length, 128)).astype(np.float32))
    feats = rng.standard_normal((1, length, model.config.llm_features_dim)).astype(np.float32)
    out = model(x, np.array([0.5], np.float32), mx.array(feats), pos, seg, ind)
    return np.array(out[:, n_text:])


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
    start = time.perf_counter()
    reference = velocity(
        Ideogram4Transformer.from_pretrained(src / "transformer"), args.text_tokens, args.grid
    )
    print(f"reference forward: {time.perf_counter() - start:.0f} s")
    src_bytes = folder_bytes(src / "transformer")
    print(f"{args.layers}-block full-width DiT; fp8 source {src_bytes / 1e9:.3f} GB")
    print("| setting | size on disk | vs fp8 | est. full DiT | rel-L2 vs fp8 weights |")
    print("|---|---|---|---|---|")
    for setting in args.settings:
        dst = args.workdir / f"out-{setting}"
        shutil.rmtree(dst, ignore_errors=True)
        kwargs = {"recipe": setting} if setting in RECIPES else {}
        if setting.isdigit():
            kwargs["quantize"] = int(setting)
        convert(src, dst, components=("transformer",), progress=False, **kwargs)
        size = folder_bytes(dst / "transformer")
        # Dequantized to bf16 Linear layers: MLX's CPU quantized matmul is far too slow here
        # (> 8 min a forward). The bf16 rounding of those weights (~0.1% RMS) is small next
        # to the quantization error itself.
        model = dequantize_model(Ideogram4Transformer.from_pretrained(dst / "transformer"))
        out = velocity(model, args.text_tokens, args.grid)
        err = np.linalg.norm(out - reference) / np.linalg.norm(reference)  # fmt: skip
        # per-block bytes scale with depth; the non-block layers are counted once
        per_block = (size - non_block_bytes(dst / "transformer")) / args.layers
        full = size + per_block * (REAL_LAYERS - args.layers)
        print(
            f"| {setting} | {size / 1e9:.3f} GB | {size / src_bytes:.2f}x | {full / 1e9:.2f} GB "
            f"| {err:.4f} |",
            flush=True,
        )
        shutil.rmtree(dst)
        gc.collect()


def non_block_bytes(component_dir: Path) -> int:
    """Bytes of the tensors outside ``layers.*`` (from the safetensors headers)."""
    sizes = {"BF16": 2, "F16": 2, "F32": 4, "U32": 4}
    return sum(
        sizes[dtype] * int(np.prod(shape, dtype=np.int64))
        for path in component_files(component_dir)
        for key, (dtype, shape) in read_header(path).items()
        if not key.startswith("layers.")
    )


if __name__ == "__main__":
    main()
