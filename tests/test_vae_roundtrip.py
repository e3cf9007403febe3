"""The VAE round trip (``decode(encode(image))``, MODEL_NOTES#vae) against an answer known exactly.

Why not the synthetic checkpoints: their VAE weights are random, so a round trip through them
returns noise and no PSNR bound on it means anything. Here the weights are set (in numpy) so
that the real architecture (4 levels, 8x downsampling, mid-block attention, 32 groups of one
channel) is a known autoencoder: the encoder is an 8x8 average pool, the decoder an 8x nearest
upsample, so ``decode(encode(x)) = upsample8(avgpool8(x))`` exactly (up to rounding):

- every ResnetBlock's convs are zero (the block is its residual; channel counts never change,
  so there is no shortcut conv); every attention's ``to_out.0`` is zero (identity);
- Downsample (pad right/bottom, stride-2 3x3 conv): taps (0,0), (0,1), (1,0), (1,1) = 0.25 I,
  a 2x2 average pool; Upsample (nearest x2, 3x3 conv): centre tap I; quant_conv and
  post_quant_conv: 1x1 identity;
- the GroupNorm + SiLU + conv_out at each end: each image channel travels twice, as +p
  (channels 0-2) and -p (channels 3-5), and conv_out takes ``silu(y) - silu(-y) = y``,
  exactly linear with activations of size O(1) (an offset into SiLU's near-linear tail
  would put them at ~20, where bf16's spacing is 1/8). The encoder's conv_norm_out
  standardises each channel, so the latent is the standardised pooled image; the decoder's
  conv_norm_out restores the pooled image's per-channel mean and std.

So the decoder is calibrated to the test image's statistics (``pooled_moments``), and the
latent (de)normalisation with LATENT_SHIFT/LATENT_SCALE and the (de)patchify of ``pack`` and
``unpack`` must cancel. Any error in either, in the pooling or upsampling convs, in the
GroupNorm, or in the strip-wise decode, shows up as a distance to the exact answer.

Tolerances (the image is 192x128 px):
- The exact answer itself: PSNR vs the input 37.4 dB (the 8x8 pool's loss on this smooth
  image; up to 12 levels at the steepest gradients), held to >= 35 dB.
- fp32: max |ours - exact| <= 5e-5 in [-1, 1] units. Observed 1.0e-5 whole-graph and 7e-6
  with the strip decode: almost all of it is the decoder's last GroupNorm, whose fp32 mean
  and variance over all H*W pixels carry ~1e-5 relative error (diffusers, same weights:
  3e-7). uint8: within 1 level of the exact answer's (a value at a rounding boundary may
  land on either side), and PSNR vs the input within 0.01 dB of the exact answer's.
- bf16 (8 significant bits, rounding error <= 2^-9 relative): the input, each of the three
  pools, the standardised latent (|s| <= ~2.5), the SiLU pairs, conv_norm_out (and its
  calibrated mean and std) and conv_out at each end are rounded; their worst cases, in output
  units, add up to ~0.03. Max |ours - exact| <= 0.04 (5 levels; observed 0.008) and PSNR
  within 0.5 dB of the exact answer's (observed 0.01 dB).
- diffusers on the same weights: its fp32 round trip within 5e-5 of the exact answer too, and
  its uint8 image within 1 level of ours.
- Negative control: latents with each 2x2 patch transposed (what a patchify with its patch
  row and column swapped hands a correct unpatchify) decode 0.19 from the exact answer (3800x
  the fp32 tolerance) and 8 dB below its PSNR.
"""

import math

import mlx.core as mx
import numpy as np
import pytest
from helpers import require_reference
from mlx.utils import tree_flatten

from ideogram4_mlx.constants import LATENT_SCALE, LATENT_SHIFT
from ideogram4_mlx.latents import from_uint8, pack, to_uint8, unpack
from ideogram4_mlx.vae import RESNET_EPS, Flux2VAE, VAEConfig, decode, encode

HEIGHT, WIDTH = 192, 128  # grid 12 x 8 tokens: not square, so a transpose shows
GRID_H, GRID_W = HEIGHT // 16, WIDTH // 16
SCALE = 8
DATA = 3  # image channels; channels DATA..2*DATA-1 carry their negatives
CONFIG = VAEConfig(
    block_out_channels=(32, 32, 32, 32),
    layers_per_block=1,
    norm_num_groups=32,
    latent_channels=32,
    mid_block_add_attention=True,
)
CENTRE = [(1, 1)]
POOL_TAPS = [(0, 0), (0, 1), (1, 0), (1, 1)]
# decode keyword arguments: whole-graph, and the bounded-memory path with 8 latent rows per
# strip (3 strips); the encoder likewise: whole image, or strips of 64 rows (2 strips).
STRIP_MODES = {"plain": {"strip_pixels": None}, "strips": {"strip_pixels": 64 * WIDTH}}

FP32_TOL = 5e-5
BF16_TOL = 0.04
MIN_PSNR = 35.0


def smooth_image() -> np.ndarray:
    """(1, 192, 128, 3) uint8: low-frequency sinusoids and gradients in every channel."""
    y, x = np.meshgrid(np.arange(HEIGHT) / HEIGHT, np.arange(WIDTH) / WIDTH, indexing="ij")
    r = 0.5 + 0.35 * np.sin(2 * np.pi * (0.7 * y + 0.3 * x) + 0.4)
    g = 0.5 + 0.3 * np.cos(2 * np.pi * (0.5 * x - 0.4 * y)) + 0.1 * (y - 0.5)
    b = 0.15 + 0.6 * x * (1 - 0.5 * y) + 0.1 * np.sin(3 * np.pi * y)
    rgb = np.stack([r, g, b], axis=-1)[None]
    return np.round(255 * rgb).astype(np.uint8)


def pool_upsample(image: np.ndarray) -> np.ndarray:
    """The exact answer: ``upsample8(avgpool8(x))`` of a uint8 image, float64 in [-1, 1]."""
    x = from_uint8(image).astype(np.float64)
    b, h, w, c = x.shape
    pooled = x.reshape(b, h // SCALE, SCALE, w // SCALE, SCALE, c).mean(axis=(2, 4))
    return pooled.repeat(SCALE, axis=1).repeat(SCALE, axis=2)


def pooled_moments(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (biased, as GroupNorm's) variance of the pooled image."""
    up = pool_upsample(image)  # nearest upsampling leaves both unchanged
    return up.mean(axis=(0, 1, 2)), up.var(axis=(0, 1, 2))


def kernel(shape: tuple[int, ...], taps: list, links: list) -> np.ndarray:
    """A conv kernel (O, kh, kw, I) with ``w[o, a, b, i] = value`` for every tap (a, b) and
    link (o, i, value)."""
    w = np.zeros(shape, np.float32)
    for a, b in taps:
        for o, i, value in links:
            w[o, a, b, i] = value
    return w


def identity(n: int, value: float = 1.0) -> list:
    return [(c, c, value) for c in range(n)]


def known_weights(model: Flux2VAE, image: np.ndarray) -> dict[str, np.ndarray]:
    """Parameters (MLX layout) making ``model`` the pool/upsample autoencoder for ``image``."""
    shapes = {k: v.shape for k, v in tree_flatten(model.parameters())}
    # Zero everything (convs, linears, biases) but the GroupNorm scales.
    weights = {
        k: np.full(s, float("norm" in k and k.endswith(".weight")), np.float32)
        for k, s in shapes.items()
    }
    split = [(c, c, 1.0) for c in range(DATA)] + [(DATA + c, c, -1.0) for c in range(DATA)]
    merge = [(c, c, 1.0) for c in range(DATA)] + [(c, DATA + c, -1.0) for c in range(DATA)]
    for key, shape in shapes.items():
        if key.endswith("downsamplers.0.conv.weight"):
            weights[key] = kernel(shape, POOL_TAPS, identity(shape[0], 0.25))
        elif key.endswith("upsamplers.0.conv.weight"):
            weights[key] = kernel(shape, CENTRE, identity(shape[0]))
    for key in ("quant_conv.weight", "post_quant_conv.weight"):
        weights[key] = kernel(shapes[key], [(0, 0)], identity(shapes[key][0]))
    for key, links in [
        ("encoder.conv_in.weight", split),
        ("encoder.conv_out.weight", merge),
        ("decoder.conv_in.weight", split),
        ("decoder.conv_out.weight", merge),
    ]:
        weights[key] = kernel(shapes[key], CENTRE, links)
    # The decoder's conv_norm_out sees the standardised pooled image s = (p - m) / sqrt(v + e)
    # (mean 0, variance v / (v + e)) and maps it back to p.
    mean, var = pooled_moments(image)
    std = np.sqrt(var + RESNET_EPS) * np.sqrt(var / (var + RESNET_EPS) + RESNET_EPS)
    weights["decoder.conv_norm_out.weight"][: 2 * DATA] = np.tile(std, 2)
    weights["decoder.conv_norm_out.bias"][: 2 * DATA] = np.concatenate([mean, -mean])
    return weights


def psnr(actual: np.ndarray, expected: np.ndarray) -> float:
    mse = np.mean((actual.astype(np.float64) - expected.astype(np.float64)) ** 2)
    return 10 * math.log10(255**2 / mse)


def max_lsb(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max())


@pytest.fixture(scope="module")
def image():
    return smooth_image()


@pytest.fixture(scope="module")
def weights(image):
    return known_weights(Flux2VAE(CONFIG), image)


@pytest.fixture(scope="module")
def round_trips(weights, image):
    """``(dtype, mode) -> (packed latents, decoder output fp32, the model)``, computed once."""
    encoded, cache = {}, {}

    def get(dtype, mode):
        if (dtype, mode) not in encoded:
            vae = Flux2VAE(CONFIG)
            params = [(k, mx.array(v).astype(getattr(mx, dtype))) for k, v in weights.items()]
            vae.load_weights(params, strict=True)
            encoded[dtype, mode] = (vae, encode(vae, image, **STRIP_MODES[mode]))
        if (dtype, mode) not in cache:
            vae, latents = encoded[dtype, mode]
            raw = unpack(latents, GRID_H, GRID_W)
            out = np.array(vae.decode_raw(raw, **STRIP_MODES[mode]))
            cache[dtype, mode] = (latents, out, vae)
        return cache[dtype, mode]

    return get


def test_exact_answer_is_a_good_reconstruction(image):
    """The bound the round trips are held to: what the 8x8 pool loses on this image."""
    exact = to_uint8(pool_upsample(image))
    assert psnr(exact, image) >= MIN_PSNR
    assert max_lsb(exact, image) > 0  # the pool does lose something


@pytest.mark.parametrize("mode", STRIP_MODES)
def test_round_trip_fp32_equals_pool_upsample(round_trips, image, mode):
    latents, actual, vae = round_trips("float32", mode)
    assert latents.shape == (1, GRID_H * GRID_W, 128)
    exact = pool_upsample(image)
    assert actual.shape == exact.shape == (1, HEIGHT, WIDTH, 3)
    assert np.abs(actual - exact).max() <= FP32_TOL
    # The public entry points end to end: uint8 in, uint8 out.
    decoded = decode(vae, latents, GRID_H, GRID_W, **STRIP_MODES[mode])
    assert max_lsb(decoded, to_uint8(exact)) <= 1
    assert psnr(decoded, image) >= max(MIN_PSNR, psnr(to_uint8(exact), image) - 0.01)


@pytest.mark.parametrize("mode", STRIP_MODES)
def test_round_trip_bf16_near_pool_upsample(round_trips, image, mode):
    _, actual, _ = round_trips("bfloat16", mode)
    exact = pool_upsample(image)
    assert np.abs(actual - exact).max() <= BF16_TOL
    assert psnr(to_uint8(actual), image) >= psnr(to_uint8(exact), image) - 0.5


def test_patch_transpose_is_caught(round_trips, image):
    """Negative control: the latents that a patchify with its patch row and column swapped
    would hand a correct unpatchify (each 2x2 latent patch transposed) decode far outside the
    fp32 tolerance and lose PSNR, although the image stays smooth."""
    latents, _, vae = round_trips("float32", "plain")
    raw = np.array(unpack(latents, GRID_H, GRID_W))
    b, h, w, c = raw.shape
    swapped = raw.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 4, 3, 2, 5)
    wrong = pack(mx.array(swapped.reshape(b, h, w, c)))
    actual = np.array(vae.decode_raw(unpack(wrong, GRID_H, GRID_W), strip_pixels=None))
    exact = pool_upsample(image)
    assert np.abs(actual - exact).max() > 100 * FP32_TOL
    assert psnr(to_uint8(actual), image) < psnr(to_uint8(exact), image) - 5.0


def test_diffusers_round_trip_matches(round_trips, weights, image):
    """diffusers' AutoencoderKLFlux2 on the same weights: the same exact answer, and within
    one level of our uint8 image."""
    torch = require_reference()
    from diffusers import AutoencoderKLFlux2

    from ideogram4_mlx.reference.vae import reference_decode_float, reference_encode

    model = AutoencoderKLFlux2(
        block_out_channels=CONFIG.block_out_channels,
        layers_per_block=CONFIG.layers_per_block,
        norm_num_groups=CONFIG.norm_num_groups,
        latent_channels=CONFIG.latent_channels,
        mid_block_add_attention=CONFIG.mid_block_add_attention,
    )
    state = {
        k: torch.from_numpy(v.transpose(0, 3, 1, 2).copy() if v.ndim == 4 else v)
        for k, v in weights.items()
    }
    # bn buffers holding the constants, as the real checkpoint's (see test_vae_parity.py).
    var = LATENT_SCALE.astype(np.float64) ** 2 - CONFIG.batch_norm_eps
    state["bn.running_mean"] = torch.from_numpy(LATENT_SHIFT.copy())
    state["bn.running_var"] = torch.from_numpy(var.astype(np.float32))
    state["bn.num_batches_tracked"] = model.bn.num_batches_tracked
    model.load_state_dict(state, strict=True)
    model.eval()

    reference = reference_decode_float(model, reference_encode(model, image), GRID_H, GRID_W)
    assert np.abs(reference - pool_upsample(image)).max() <= FP32_TOL
    # The official uint8 conversion on the reference side (torch.round: ties to even).
    reference_u8 = ((torch.from_numpy(reference).clamp(-1, 1) + 1) * 127.5).round()
    _, ours, _ = round_trips("float32", "plain")
    assert max_lsb(reference_u8.to(torch.uint8).numpy(), to_uint8(ours)) <= 1
