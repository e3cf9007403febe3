"""MLX VAE vs diffusers' AutoencoderKLFlux2 on the same random weights (MODEL_NOTES#vae).

Weights: a tiny diffusers model (block_out_channels (32, 32, 64, 64), 1 layer per block,
8 groups) from ``torch.manual_seed(0)``, GroupNorm affines randomised, every weight rounded
to bf16 and saved as bf16 with fp32 bn buffers holding the constants. The reference
denormalises with diffusers' BN-buffer formula; ours with the constants.

Tolerances:
- fp32: relative L2 <= 1e-4 on the decoder output and the encoded latents. Same weights,
  same formulas; only summation order differs (conv/GEMM blocking, GroupNorm reductions,
  the last ulp of sqrt in the BN formula). Observed ~2e-6, so 1e-4 is a 50x margin that
  still catches any formula error (those give >= 1e-2). uint8: max |diff| <= 1 LSB (a value
  near a rounding boundary may land on either side).
- bf16: no two bf16 implementations agree bitwise (rounding points differ: MLX rounds a
  conv before adding its bias, PyTorch adds it in fp32; SDPA kernels). The reference's own
  bf16 run differs from its fp32 run by its rounding noise ``floor`` (~1.4e-2 relative here:
  a random network amplifies rounding). Ours must stay within 1.5x that floor of the fp32
  reference (observed 1.07-1.18x). uint8: ours vs the fp32 reference at most
  max(2, 1.5 x the reference's own bf16 max diff) LSB (observed 5-6 vs 4-5).
- The bounded-memory decode and encode are held to the same bounds as the plain ones. These
  images are smaller than one default strip, so ``encode``'s default is one strip; the
  "strips" case takes 16-row strips (every image here is 32-64 rows).
- fp32 encoder precision vs a float64 run of the same diffusers model, at 512^2: 1M values per
  full-resolution GroupNorm group (4 channels per group, as in the real model's 128-channel
  blocks; 16 and 32 channels keep it quick). Ours at most 2x torch fp32's own error, measured
  in the test on NCHW-contiguous input as the diffusers pipeline feeds it (reference_encode's
  channels-last view takes a less precise torch GroupNorm kernel: 1.3e-5 here). Observed:
  torch 1.22e-6, ours 1.17e-6 (whole image) and 1.16e-6 (two strips); with plain fp32
  mx.mean/mx.sum moments ours were 7.5e-6 and 4.6e-6 (6.1x and 3.7x). More sizes and the
  decoder: benchmarks/vae_precision.py.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
from helpers import rel_l2, require_reference

from ideogram4_mlx.constants import LATENT_SCALE, LATENT_SHIFT
from ideogram4_mlx.latents import from_uint8, to_uint8, unpack
from ideogram4_mlx.vae import Flux2VAE, decode, encode

# (batch, grid_h, grid_w): 48x80 px, 64x32 px, 32x96 px
CASES = [(2, 3, 5), (1, 4, 2), (1, 2, 6)]


@pytest.fixture(scope="module")
def torch():
    return require_reference()


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory, torch):
    return write_vae(tmp_path_factory.mktemp("vae_parity") / "vae", torch, (32, 32, 64, 64), 8)


def write_vae(path, torch, block_out_channels, groups):
    """A seeded diffusers VAE, GroupNorm affines randomised, bf16 weights, constant bn."""
    from diffusers import AutoencoderKLFlux2
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = AutoencoderKLFlux2(
        block_out_channels=block_out_channels, layers_per_block=1, norm_num_groups=groups
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn_like(p))
            p.copy_(p.to(torch.bfloat16).float())
        model.bn.running_mean.copy_(torch.from_numpy(LATENT_SHIFT))
        var = LATENT_SCALE.astype(np.float64) ** 2 - 1e-4
        model.bn.running_var.copy_(torch.from_numpy(var.astype(np.float32)))
    model.save_config(path)
    state = {
        k: (v if k.startswith("bn.") else v.to(torch.bfloat16)).contiguous()
        for k, v in model.state_dict().items()
    }
    save_file(state, str(path / "diffusion_pytorch_model.safetensors"))
    return path


@pytest.fixture(scope="module")
def reference_decodes(models):
    """``(dtype, case) -> reference_decode_float output``, computed once per module."""
    from ideogram4_mlx.reference.vae import reference_decode_float

    cache = {}

    def get(dtype, batch, grid_h, grid_w):
        key = (dtype, batch, grid_h, grid_w)
        if key not in cache:
            z = latents(batch, grid_h, grid_w, seed=grid_h * 10 + grid_w)
            cache[key] = reference_decode_float(models[("ref", dtype)], z, grid_h, grid_w)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def models(vae_dir, torch):
    from ideogram4_mlx.reference.vae import load_reference_vae

    return {
        ("ref", "float32"): load_reference_vae(vae_dir, dtype=torch.float32),
        ("ref", "bfloat16"): load_reference_vae(vae_dir, dtype=torch.bfloat16),
        ("mlx", "float32"): Flux2VAE.from_pretrained(vae_dir, dtype=mx.float32),
        ("mlx", "bfloat16"): Flux2VAE.from_pretrained(vae_dir, dtype=mx.bfloat16),
    }


def latents(batch, grid_h, grid_w, seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, grid_h * grid_w, 128)).astype(np.float32)


def images(batch, grid_h, grid_w, seed):
    """Smooth gradients plus noise, uint8, so the encoder sees image-like input."""
    rng = np.random.default_rng(seed)
    h, w = 16 * grid_h, 16 * grid_w
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    base = np.stack([yy, xx, 1 - yy * xx], axis=-1)[None] * 200
    noise = rng.normal(0, 20, (batch, h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def max_lsb(a, b):
    return int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max())


def test_config_json_is_readable_by_both(vae_dir, models):
    config = json.loads((vae_dir / "config.json").read_text())
    assert models[("mlx", "float32")].config.block_out_channels == tuple(
        config["block_out_channels"]
    )


@pytest.mark.parametrize("batch, grid_h, grid_w", CASES)
def test_decode_fp32(models, reference_decodes, torch, batch, grid_h, grid_w):
    z = latents(batch, grid_h, grid_w, seed=grid_h * 10 + grid_w)
    ours = models[("mlx", "float32")]
    expected = reference_decodes("float32", batch, grid_h, grid_w)
    actual = np.array(ours.decode_raw(unpack(mx.array(z), grid_h, grid_w), strip_pixels=None))
    assert actual.shape == expected.shape == (batch, 16 * grid_h, 16 * grid_w, 3)
    assert rel_l2(actual, expected) <= 1e-4
    # The official conversion on the reference side: round((clamp(x) + 1) * 127.5) in torch.
    expected_u8 = ((torch.from_numpy(expected).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    assert max_lsb(decode(ours, z, grid_h, grid_w), expected_u8.numpy()) <= 1


@pytest.mark.parametrize("strip_pixels", [None, 512], ids=["plain", "strips"])
@pytest.mark.parametrize("batch, grid_h, grid_w", CASES)
def test_decode_bf16_within_noise_floor(
    models, reference_decodes, batch, grid_h, grid_w, strip_pixels
):
    z = latents(batch, grid_h, grid_w, seed=grid_h * 10 + grid_w)
    exact = reference_decodes("float32", batch, grid_h, grid_w)
    ref16 = reference_decodes("bfloat16", batch, grid_h, grid_w)
    ours = models[("mlx", "bfloat16")].decode_raw(unpack(mx.array(z), grid_h, grid_w), strip_pixels)
    ours = np.array(ours)
    floor = rel_l2(ref16, exact)
    assert rel_l2(ours, exact) <= 1.5 * floor, (rel_l2(ours, exact), floor)
    lsb_floor = max_lsb(to_uint8(ref16), to_uint8(exact))
    assert max_lsb(to_uint8(ours), to_uint8(exact)) <= max(2, 1.5 * lsb_floor)


@pytest.mark.parametrize("mode", ["default", "plain", "strips"])
@pytest.mark.parametrize("batch, grid_h, grid_w", CASES)
def test_encode(models, batch, grid_h, grid_w, mode):
    from ideogram4_mlx.reference.vae import reference_encode

    image = images(batch, grid_h, grid_w, seed=grid_w)
    strip_pixels = {"plain": None, "strips": 16 * 16 * grid_w}  # strips: 16 image rows
    kwargs = {"strip_pixels": strip_pixels[mode]} if mode in strip_pixels else {}
    exact = reference_encode(models[("ref", "float32")], image)
    assert exact.shape == (batch, grid_h * grid_w, 128)
    assert rel_l2(np.array(encode(models[("mlx", "float32")], image, **kwargs)), exact) <= 1e-4
    floor = rel_l2(reference_encode(models[("ref", "bfloat16")], image), exact)
    ours16 = np.array(encode(models[("mlx", "bfloat16")], image, **kwargs))
    assert rel_l2(ours16, exact) <= 1.5 * floor, (rel_l2(ours16, exact), floor)


def test_constants_equal_reference_bn_denormalisation(models, torch):
    """Our constant-based unpack equals diffusers' ``z * sqrt(var + eps) + mean`` in the
    (pi, pj, c) layout of Ideogram4Pipeline, computed from the model's own buffers."""
    ref = models[("ref", "float32")]
    z = latents(1, 2, 3, seed=9)
    zt = torch.from_numpy(z)
    std = torch.sqrt(ref.bn.running_var + ref.config.batch_norm_eps)
    raw = (zt * std + ref.bn.running_mean).view(1, 2, 3, 2, 2, 32).permute(0, 5, 1, 3, 2, 4)
    expected = raw.reshape(1, 32, 4, 6).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.array(unpack(mx.array(z), 2, 3)), expected, rtol=1e-6, atol=1e-7)


def test_synthetic_checkpoint_parity(tiny_checkpoint, torch):
    """The project's synthetic ``vae/`` (same layout as the real repo) in fp32."""
    from ideogram4_mlx.reference.vae import (
        load_reference_vae,
        reference_decode,
        reference_decode_float,
        reference_encode,
    )

    ref = load_reference_vae(tiny_checkpoint / "vae")
    ours = Flux2VAE.from_pretrained(tiny_checkpoint / "vae", dtype=mx.float32)
    z = latents(1, 3, 4, seed=11)
    expected = reference_decode_float(ref, z, 3, 4)
    assert rel_l2(np.array(ours.decode_raw(unpack(mx.array(z), 3, 4))), expected) <= 1e-4
    assert max_lsb(decode(ours, z, 3, 4), reference_decode(ref, z, 3, 4)) <= 1
    image = images(1, 3, 4, seed=12)
    assert rel_l2(np.array(encode(ours, image)), reference_encode(ref, image)) <= 1e-4


PRECISION_SIDE = 512


@pytest.fixture(scope="module")
def precision_case(tmp_path_factory, torch):
    """(VAE folder, image (1, 512, 512, 3) in [-1, 1], float64 raw latent mean, torch fp32's
    relative error): uniform noise, so the moments are those of busy activations."""
    from ideogram4_mlx.reference.vae import load_reference_vae

    path = write_vae(tmp_path_factory.mktemp("vae_precision") / "vae", torch, (16, 16, 32, 32), 4)
    side = PRECISION_SIDE
    noise = np.random.default_rng(0).integers(0, 256, (1, side, side, 3), dtype=np.uint8)
    x = from_uint8(noise).astype(np.float32)

    def raw_mean(dtype):
        model = load_reference_vae(path, dtype=dtype)
        nchw = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(dtype)
        with torch.no_grad():
            z = model.encode(nchw, return_dict=False)[0].mean
        return z.permute(0, 2, 3, 1).double().numpy()

    exact = raw_mean(torch.float64)
    return path, x, exact, rel_l2(raw_mean(torch.float32), exact)


@pytest.mark.parametrize(
    "strip_pixels", [None, PRECISION_SIDE**2 // 2], ids=["whole", "two-strips"]
)
def test_fp32_encoder_is_as_precise_as_torch(precision_case, strip_pixels):
    path, x, exact, torch_error = precision_case
    ours = Flux2VAE.from_pretrained(path, dtype=mx.float32)
    error = rel_l2(np.array(ours.encode_raw(mx.array(x), strip_pixels)), exact)
    assert error <= 2 * torch_error, (error, torch_error)
