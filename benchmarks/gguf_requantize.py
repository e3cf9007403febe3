"""What reading a GGUF DiT costs and what re-quantizing its weights adds, on full-width tensors.

Issue #32 asks, for sources that are already 4-bit, what re-quantizing costs against keeping
the dequantized weights (bf16). This takes block 0's linears of a full-width synthetic DiT
(real widths, random weights), writes each as a GGUF of each source type the way
stable-diffusion.cpp converts the fp8 release (ideogram4_mlx/synth/gguf.py; one tensor at a
time, so memory stays near a few copies of the largest), reads it back with ``GGUFSource`` and
reports, per source type:

- ``load MB/s`` and ``exact MB/s``: ``load`` (gguf's dequantization, float32 out) and
  ``exact`` (MLX triples; nan where the type has none), megabytes of float32 weights per second
  on this machine;
- ``source err``: the GGUF's own error against the bf16 weights it was made from;
- the error each target adds to the dequantized weights: ``bf16`` (the dequantized weights
  rounded to bf16: what ``--quantize none`` writes), ``affine-B/G`` (MLX affine B bits, group
  G, bf16 scales, from the dequantized weights), ``mxfp4``. ``--quantize keep`` adds none
  where ``exact`` holds the type (tests/test_gguf.py).

Errors are relative RMS over all the tensors (||W' - W|| / ||W||). Random weights: the numbers
rank the settings, they do not predict image quality.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python benchmarks/gguf_requantize.py --workdir /tmp/gguf-requantize
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as GGML

from ideogram4_mlx.sources.gguf_file import MARKER, GGUFSource
from ideogram4_mlx.synth import SYNTHETIC_PRESETS, write_synthetic_checkpoint
from ideogram4_mlx.synth.gguf import bf16_tensors, encode

SOURCES = ("Q8_0", "Q6_K", "Q4_K", "Q4_0")
TARGETS = (("bf16", None), ("affine-8/64", (8, 64)), ("affine-6/64", (6, 64)),
           ("affine-4/64", (4, 64)), ("affine-4/32", (4, 32)), ("mxfp4", "mxfp4"))  # fmt: skip
KEYS = (
    "layers.0.attention.qkv.weight",
    "layers.0.attention.o.weight",
    "layers.0.feed_forward.w1.weight",
    "layers.0.feed_forward.w2.weight",
    "layers.0.feed_forward.w3.weight",
)


def requantized(w: mx.array, target) -> mx.array:
    if target is None:
        return w.astype(mx.bfloat16).astype(mx.float32)
    if target == "mxfp4":
        q, s = mx.quantize(w, mode="mxfp4")
        return mx.dequantize(q, s, mode="mxfp4", dtype=mx.float32)
    bits, group = target
    q, s, b = mx.quantize(w.astype(mx.bfloat16), group, bits)
    return mx.dequantize(q, s, b, group, bits).astype(mx.float32)


def one_tensor_gguf(path: Path, key: str, bits: np.ndarray, marker: np.ndarray, qtype: str):
    """A GGUF holding one weight of ``qtype`` (and the DiT's marker tensor, BF16)."""
    writer = gguf.GGUFWriter(path, arch="")
    writer.add_tensor(MARKER, marker.view(np.uint8), raw_dtype=GGML.BF16)
    kind = GGML[qtype]
    writer.add_tensor(key, encode(bits, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GGUFSource(path)


def sums(a: mx.array, b: mx.array) -> float:
    d = a - b
    return float(mx.sum(d * d))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/gguf-requantize"))
    parser.add_argument("--sources", nargs="+", default=list(SOURCES))
    args = parser.parse_args()

    spec = dataclasses.replace(SYNTHETIC_PRESETS["full-width"], dit_num_layers=1)
    src = args.workdir / "src"
    if not src.exists():
        write_synthetic_checkpoint(src, spec, components=("transformer",))
    marker = bf16_tensors(src / "transformer", [MARKER])[MARKER]
    header = ["source", "load MB/s", "exact MB/s", "source err"] + [n for n, _ in TARGETS]
    stats = {q: {"load": 0.0, "exact": 0.0, "src": 0.0, **{n: 0.0 for n, _ in TARGETS}}
             for q in args.sources}  # fmt: skip
    norm, total_mb = 0.0, 0.0
    for key in KEYS:
        bits = bf16_tensors(src / "transformer", [key])[key]
        original = mx.array(bits).view(mx.bfloat16).astype(mx.float32)
        norm += float(mx.sum(original * original))
        total_mb += original.nbytes / 1e6
        for qtype in args.sources:
            path = args.workdir / f"{qtype}.gguf"
            path.unlink(missing_ok=True)
            source = one_tensor_gguf(path, key, bits, marker, qtype)
            start = time.perf_counter()
            w = source.load([key])[key]
            mx.eval(w)
            stats[qtype]["load"] += time.perf_counter() - start
            start = time.perf_counter()
            exact = source.exact(key)
            stats[qtype]["exact"] += time.perf_counter() - start if exact else float("nan")
            del exact
            stats[qtype]["src"] += sums(w, original)
            for name, target in TARGETS:
                stats[qtype][name] += sums(requantized(w, target), w)
            del source, w
            path.unlink()
        print(f"{key}: done", flush=True)
    rows = []
    for qtype, st in stats.items():
        row = [qtype, f"{total_mb / st['load']:.0f}", f"{total_mb / st['exact']:.0f}"]
        row += [f"{(st[n] / norm) ** 0.5:.2e}" for n in ("src", *(n for n, _ in TARGETS))]
        rows.append(row)
    print(f"\n{total_mb:.0f} MB of float32 weights ({', '.join(KEYS)}), relative RMS errors")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
