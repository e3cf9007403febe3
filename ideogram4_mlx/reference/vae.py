"""diffusers' ``AutoencoderKLFlux2`` as the Ideogram 4 pipelines use it
(MODEL_NOTES#vae-decode, #vae-encode).

Independent of the MLX code: diffusers' module code, and diffusers' own latent
(de)normalisation from the VAE's ``bn`` buffers in the (patch_row, patch_col, channel) layout
of ``Ideogram4Pipeline``. Inputs and outputs are numpy, NHWC.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLFlux2
from safetensors import safe_open

BN_BUFFERS = ("bn.running_mean", "bn.running_var")


def load_reference_vae(
    component_dir: Path | str, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> AutoencoderKLFlux2:
    """``AutoencoderKLFlux2.from_pretrained(component_dir)`` in ``dtype`` on ``device``.

    The bn buffers are re-read in fp32 after the cast: they are only used by the latent
    (de)normalisation, so a bf16 reference then differs from fp32 by the network alone.
    """
    component_dir = Path(component_dir)
    # low_cpu_mem_usage=False: the default warns "install accelerate" when accelerate is absent;
    # the VAE is small, so the plain load costs nothing.
    model = AutoencoderKLFlux2.from_pretrained(
        str(component_dir), torch_dtype=dtype, low_cpu_mem_usage=False
    )
    path = component_dir / "diffusion_pytorch_model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        for key in BN_BUFFERS:
            getattr(model.bn, key.split(".")[1]).data = f.get_tensor(key).float()
    return model.to(device).eval()


def _bn_mean_std(model: AutoencoderKLFlux2) -> tuple[torch.Tensor, torch.Tensor]:
    mean = model.bn.running_mean.float()
    std = torch.sqrt(model.bn.running_var.float() + model.config.batch_norm_eps)
    return mean, std


@torch.no_grad()
def reference_decode_float(
    model: AutoencoderKLFlux2, latents: np.ndarray, grid_h: int, grid_w: int
) -> np.ndarray:
    """Packed normalised latents (B, gh * gw, 128) -> decoder output (B, H, W, 3) fp32, not
    clamped: ``z * sqrt(var + eps) + mean`` in fp32, (pi, pj, c) unpatchify, cast, decode."""
    param = next(model.parameters())
    z = torch.as_tensor(np.asarray(latents, dtype=np.float32)).to(param.device)
    mean, std = _bn_mean_std(model)
    z = z * std.to(z.device) + mean.to(z.device)
    b, _, c4 = z.shape
    c = c4 // 4
    z = z.view(b, grid_h, grid_w, 2, 2, c).permute(0, 5, 1, 3, 2, 4)
    z = z.reshape(b, c, 2 * grid_h, 2 * grid_w)
    decoded = model.decode(z.to(param.dtype), return_dict=False)[0]
    return decoded.float().permute(0, 2, 3, 1).cpu().numpy()


def reference_decode(
    model: AutoencoderKLFlux2, latents: np.ndarray, grid_h: int, grid_w: int
) -> np.ndarray:
    """As :func:`reference_decode_float`, then the official uint8 conversion:
    ``round((clamp(x, -1, 1) + 1) * 127.5)`` (torch.round: ties to even) -> (B, H, W, 3)."""
    x = torch.from_numpy(reference_decode_float(model, latents, grid_h, grid_w))
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


@torch.no_grad()
def reference_encode(model: AutoencoderKLFlux2, image: np.ndarray) -> np.ndarray:
    """RGB (B, H, W, 3) uint8, or float in [-1, 1] -> packed normalised latents (B, N, 128)
    fp32: encoder + quant_conv, the mean (channels [:32]), (pi, pj, c) patchify, bn buffers."""
    param = next(model.parameters())
    image = np.asarray(image)
    if image.dtype == np.uint8:
        x = torch.from_numpy(image).float() / 127.5 - 1
    else:
        x = torch.from_numpy(image.astype(np.float32))
    # contiguous NCHW: on a channels-last view torch's CPU GroupNorm sums less precisely
    # (fp32 error 1.3e-5 at 512^2 instead of 1.2e-6)
    x = x.permute(0, 3, 1, 2).contiguous().to(device=param.device, dtype=param.dtype)
    posterior = model.encode(x, return_dict=False)[0]
    z = posterior.mean.float()
    b, c, h, w = z.shape
    z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, 4 * c)
    mean, std = _bn_mean_std(model)
    return ((z - mean.to(z.device)) / std.to(z.device)).cpu().numpy()
