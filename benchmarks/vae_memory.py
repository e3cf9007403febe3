"""Peak memory and time of the plain vs the bounded-memory (row-strip) VAE decode.

A full-size random VAE (the real config: block_out_channels [128, 256, 512, 512], 2 layers per
block, 84M parameters) in bf16. Each measurement runs in a fresh process, so the RSS high-water
mark (``ru_maxrss``) is that decode's alone; ``mx.get_peak_memory()`` is reset after loading,
so it counts the weights (168 MB) plus everything the decode allocates.

    python benchmarks/vae_memory.py                        # the default matrix
    python benchmarks/vae_memory.py --one 1024x1024 strips # one measurement

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

from ideogram4_mlx.vae import DEFAULT_STRIP_PIXELS, Flux2VAE, VAEConfig, count_parameters, decode

# The plain 2048x2048 decode needs far more than this 23 GiB machine has (its 3x3 convs at full
# resolution unfold 256 channels x 9 taps in fp32: ~39 GiB for one conv); it is extrapolated.
DEFAULT_RUNS = [
    ("512x512", "plain"),
    ("512x512", "strips"),
    ("1024x1024", "plain"),
    ("1024x1024", "strips"),
    ("2048x512", "strips"),
    ("2048x2048", "strips"),
]
GiB = 2**30


def measure(size: str, mode: str, dtype: str) -> dict:
    height, width = (int(v) for v in size.split("x"))
    vae = Flux2VAE(VAEConfig())
    vae.set_dtype(getattr(mx, dtype))
    mx.eval(vae.parameters())
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    grid_h, grid_w = height // 16, width // 16
    latents = np.random.default_rng(0).standard_normal((1, grid_h * grid_w, 128), np.float32)
    mx.reset_peak_memory()
    start = time.perf_counter()
    image = decode(vae, latents, grid_h, grid_w, DEFAULT_STRIP_PIXELS if mode == "strips" else None)
    seconds = time.perf_counter() - start
    assert image.shape == (1, height, width, 3)
    return {
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
    parser.add_argument("--one", nargs=2, metavar=("HxW", "MODE"), help="MODE: plain or strips")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one, args.dtype)), flush=True)
        return
    print(f"{'size':>10} {'mode':>7} {'time s':>8} {'mlx peak GiB':>13} {'RSS peak GiB':>13}")
    for size, mode in DEFAULT_RUNS:
        cmd = [sys.executable, __file__, "--one", size, mode, "--dtype", args.dtype]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{size:>10} {mode:>7} failed (exit {done.returncode}): {done.stderr[-200:]}")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"{size:>10} {mode:>7} {r['seconds']:>8} {r['mlx_peak_gib']:>13} "
            f"{r['rss_peak_gib']:>13}",
            flush=True,
        )


if __name__ == "__main__":
    main()
