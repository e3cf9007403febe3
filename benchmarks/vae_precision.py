"""fp32 VAE encode and decode vs a float64 run of the same diffusers model: relative L2 of
torch fp32 and of ours (whole image, two strips, the default strips of 2**15 pixels).

A seeded diffusers ``AutoencoderKLFlux2`` (block_out_channels 16, 16, 32, 32, one layer per
block, 4 groups: 4 channels per group at full resolution, as in the real model's 128-channel
blocks), GroupNorm affines randomised, weights rounded to bf16 (exact in every dtype). Input:
uniform uint8 noise (encode), standard normal raw latents (decode). torch runs on
NCHW-contiguous tensors, as the diffusers pipeline feeds it ("torch"), and on the channels-last
view that ``reference_encode`` passes ("torch NHWC": another GroupNorm kernel).
``--plain-moments`` swaps in the former GroupNorm moments (a plain fp32 ``mx.mean``/``mx.sum``)
for comparison.

    python benchmarks/vae_precision.py --sizes 512 1024
    python benchmarks/vae_precision.py --sizes 512 1024 --plain-moments

Results on a 2-core CPU: benchmarks/results/vae_precision_cpu.txt.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import torch
from diffusers import AutoencoderKLFlux2

from ideogram4_mlx import vae, vae_strips
from ideogram4_mlx.latents import from_uint8


def plain_moments(x: mx.array, groups: int) -> tuple[mx.array, mx.array]:
    """The former ``group_moments``: two passes, each one fp32 reduction."""
    b, c = x.shape[0], x.shape[-1]
    xf = x.astype(mx.float32).reshape(b, -1, groups, c // groups)
    mean = mx.mean(xf, axis=(1, 3))
    return mean, mx.sum(mx.square(xf - mean[:, None, :, None]), axis=(1, 3))


def write_model(path: Path, channels: tuple[int, ...], groups: int) -> Path:
    torch.manual_seed(0)
    model = AutoencoderKLFlux2(
        block_out_channels=channels, layers_per_block=1, norm_num_groups=groups
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            p.copy_(p.to(torch.bfloat16).float())
    model.save_pretrained(path, safe_serialization=True)
    return path


def rel_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def torch_run(model: AutoencoderKLFlux2, part: str, x: np.ndarray, nhwc: bool) -> np.ndarray:
    """Raw latent mean (encode) or decoder output (decode), NHWC float64."""
    dtype = next(model.parameters()).dtype
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    t = (t if nhwc else t.contiguous()).to(dtype)
    with torch.no_grad():
        if part == "encode":
            out = model.encode(t, return_dict=False)[0].mean
        else:
            out = model.decoder(model.post_quant_conv(t))
    return out.permute(0, 2, 3, 1).double().numpy()


def ours_run(model: vae.Flux2VAE, part: str, x: np.ndarray, strip_pixels: int | None):
    run = model.encode_raw if part == "encode" else model.decode_raw
    return np.array(run(mx.array(x), strip_pixels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 1024], help="image side")
    parser.add_argument("--parts", nargs="+", default=["encode", "decode"])
    parser.add_argument("--plain-moments", action="store_true", help="the former moments")
    args = parser.parse_args()
    if args.plain_moments:
        vae.group_moments = vae_strips.group_moments = plain_moments  # GroupNorm, RowStrips
    warnings.simplefilter("ignore")  # save_pretrained's bn buffers are not the constants
    with tempfile.TemporaryDirectory() as tmp:
        path = write_model(Path(tmp) / "vae", (16, 16, 32, 32), 4)
        ref = {
            dtype: AutoencoderKLFlux2.from_pretrained(path, torch_dtype=dtype).eval()
            for dtype in (torch.float64, torch.float32)
        }
        ours = vae.Flux2VAE.from_pretrained(path, dtype=mx.float32)
    moments = "plain fp32" if args.plain_moments else "tree-summed"
    print(f"relative L2 vs float64; our GroupNorm moments: {moments}")
    columns = ("torch", "torch NHWC", "ours", "2 strips", "strips")
    print(f"{'part':>6} {'side':>5} " + " ".join(f"{c:>10}" for c in columns))
    for part in args.parts:
        for side in args.sizes:
            rng = np.random.default_rng(0)
            if part == "encode":
                x = from_uint8(rng.integers(0, 256, (1, side, side, 3), dtype=np.uint8))
            else:
                x = rng.standard_normal((1, side // 8, side // 8, 32))
            x = x.astype(np.float32)
            exact = torch_run(ref[torch.float64], part, x.astype(np.float64), nhwc=False)
            errors = [
                rel_l2(torch_run(ref[torch.float32], part, x, nhwc=False), exact),
                rel_l2(torch_run(ref[torch.float32], part, x, nhwc=True), exact),
            ]
            for strip_pixels in (None, side * side // 2, vae.DEFAULT_STRIP_PIXELS):
                errors.append(rel_l2(ours_run(ours, part, x, strip_pixels), exact))
            print(f"{part:>6} {side:>5} " + " ".join(f"{e:>10.2e}" for e in errors), flush=True)


if __name__ == "__main__":
    main()
