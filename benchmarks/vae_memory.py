"""Peak memory and time of the plain vs the bounded-memory (row-strip) VAE decode and encode.

A full-size random VAE (the real config: block_out_channels [128, 256, 512, 512], 2 layers per
block, 84M parameters) in bf16. Each measurement runs in a fresh process, so the RSS high-water
mark (``ru_maxrss``) is that decode's or encode's alone; ``mx.get_peak_memory()`` is reset
after loading, so it counts the weights (168 MB) plus everything the run allocates.

    python benchmarks/vae_memory.py                               # the default matrix
    python benchmarks/vae_memory.py --parts encode                # only the encoder rows
    python benchmarks/vae_memory.py --one encode 1024x1024 strips # one measurement
    python benchmarks/vae_memory.py --json results.jsonl          # also append JSON lines

Results on a 2-core CPU: benchmarks/results/vae_encoder_memory_cpu.txt.

On Linux the ``mlx[cpu]`` wheel links a reference BLAS (~3 GFLOP/s here); preloading the
system OpenBLAS (``LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0``) makes fp32 GEMMs
~40x faster and leaves MLX's memory accounting unchanged.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np

from ideogram4_mlx.vae import (
    DEFAULT_STRIP_PIXELS,
    Flux2VAE,
    VAEConfig,
    count_parameters,
    decode,
    encode,
)

# The plain 2048x2048 decode and encode need more than this 23 GiB machine has (their 3x3 convs
# at full resolution unfold 256 (decoder) or 128 (encoder) channels x 9 taps in fp32: ~39 or
# ~19 GiB for one conv); they are extrapolated.
DEFAULT_RUNS = [
    ("decode", "512x512", "plain"),
    ("decode", "512x512", "strips"),
    ("decode", "1024x1024", "plain"),
    ("decode", "1024x1024", "strips"),
    ("decode", "2048x512", "strips"),
    ("decode", "2048x2048", "strips"),
    ("encode", "512x512", "plain"),
    ("encode", "512x512", "strips"),
    ("encode", "1024x1024", "plain"),
    ("encode", "1024x1024", "strips"),
    ("encode", "2048x2048", "strips"),
]
GiB = 2**30


def run(vae: Flux2VAE, part: str, height: int, width: int, strip_pixels: int | None) -> float:
    """One decode or encode of random input; returns its seconds."""
    rng = np.random.default_rng(0)
    if part == "decode":
        grid_h, grid_w = height // 16, width // 16
        latents = rng.standard_normal((1, grid_h * grid_w, 128), np.float32)
        mx.reset_peak_memory()
        start = time.perf_counter()
        image = decode(vae, latents, grid_h, grid_w, strip_pixels)
        assert image.shape == (1, height, width, 3)
    else:
        image = rng.integers(0, 256, (1, height, width, 3), np.uint8)
        mx.reset_peak_memory()
        start = time.perf_counter()
        latents = encode(vae, image, strip_pixels)
        mx.eval(latents)
        assert latents.shape == (1, height * width // 256, 128)
    return time.perf_counter() - start


def measure(part: str, size: str, mode: str, dtype: str) -> dict:
    height, width = (int(v) for v in size.split("x"))
    vae = Flux2VAE(VAEConfig())
    vae.set_dtype(getattr(mx, dtype))
    mx.eval(vae.parameters())
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    seconds = run(vae, part, height, width, DEFAULT_STRIP_PIXELS if mode == "strips" else None)
    return {
        "part": part,
        "size": size,
        "mode": mode,
        "dtype": dtype,
        "params": count_parameters(vae),
        "seconds": round(seconds, 1),
        "mlx_peak_gib": round(mx.get_peak_memory() / GiB, 3),
        "rss_peak_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB, 3),
        "rss_after_load_gib": round(rss_loaded / GiB, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--one",
        nargs=3,
        metavar=("PART", "HxW", "MODE"),
        help="PART: decode or encode; MODE: plain or strips",
    )
    parser.add_argument(
        "--parts", nargs="+", default=["decode", "encode"], choices=["decode", "encode"]
    )
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--json", help="append one JSON line per measurement to this file")
    args = parser.parse_args()
    if args.one:
        result = measure(*args.one, args.dtype)
        print(json.dumps(result), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(result) + "\n")
        return
    header = f"{'part':>6} {'size':>10} {'mode':>7} {'time s':>8} {'mlx peak GiB':>13}"
    print(header + f" {'RSS peak GiB':>13}")
    for part, size, mode in DEFAULT_RUNS:
        if part not in args.parts:
            continue
        cmd = [sys.executable, __file__, "--one", part, size, mode, "--dtype", args.dtype]
        if args.json:
            cmd += ["--json", args.json]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{part:>6} {size:>10} {mode:>7} failed (exit {done.returncode}): ", end="")
            print(done.stderr[-200:], flush=True)
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"{part:>6} {size:>10} {mode:>7} {r['seconds']:>8} {r['mlx_peak_gib']:>13} "
            f"{r['rss_peak_gib']:>13}",
            flush=True,
        )


if __name__ == "__main__":
    main()
