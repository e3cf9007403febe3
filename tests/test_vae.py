"""The MLX VAE on tiny synthetic weights: packing, loading, bounded-memory decode and encode
(no torch).

Tolerances:
- patchify/unpatchify: bitwise (a pure permutation). pack(unpack(z)) vs z: 1e-6 absolute,
  the fp32 rounding of ``z * scale + shift`` followed by ``(x - shift) / scale``.
- Constants vs diffusers' BN formula ``z * sqrt(var + 1e-4) + mean`` with the buffers set to
  the constants (fp32, as the synthetic writer stores them): 1e-6 relative (a few fp32 ulps
  from ``sqrt(fp32(SCALE**2 - 1e-4) + 1e-4)``).
- Bounded-memory decode vs plain decode: one strip is bitwise equal (same ops). With many
  strips only the GroupNorm statistics differ (per-strip fp32 moments combined in float64
  vs one fp32 reduction, ~1e-7 relative): fp32 outputs within 1e-4 absolute (observed
  ~6e-6). In bf16 those ulp-level differences flip single bf16 roundings, which a random
  network amplifies like any other bf16 rounding: the strip decode must be as accurate as the
  plain bf16 decode, i.e. its distance to the fp32 decode at most 1.25x the plain bf16
  decode's (observed ~1.0x).
- Bounded-memory encode vs plain encode: the same reasoning and the same bf16 bound (1.25x,
  observed 0.95-1.02x). One strip is bitwise equal; with several strips the fp32 latents are
  within 1e-5 relative L2 (same ops, only the GroupNorm statistics combined in float64:
  observed 1.0-1.3e-6; dropping the downsamplers' halo row gives 0.2-0.6). One Downsample
  layer on strips vs whole: 1e-6 (the same conv for each output row).
- GroupNorm moments of 1M fp32 values per group (512^2 x 4 channels, the real model's
  full-resolution layout) vs float64: mean within 1e-6 of the std, variance 1e-6 relative.
  The summation tree gives 1-4e-7 (fan-ins 4-256; torch's fp32 var_mean 0.3-0.9e-7); a plain
  fp32 mx.mean/mx.sum gave 3.9e-5 and 1.2e-5.
"""

import json
import shutil
import warnings

import mlx.core as mx
import numpy as np
import pytest
from helpers import rel_l2
from mlx.utils import tree_flatten

from ideogram4_mlx.config import CheckpointError
from ideogram4_mlx.constants import LATENT_SCALE, LATENT_SHIFT
from ideogram4_mlx.latents import pack, patchify, to_uint8, unpack, unpatchify
from ideogram4_mlx.synth import write_synthetic_checkpoint
from ideogram4_mlx.vae import (
    DEFAULT_STRIP_PIXELS,
    Downsample,
    Flux2VAE,
    VAEConfig,
    count_parameters,
    decode,
    encode,
    kernel_layout,
)
from ideogram4_mlx.vae_strips import RowStrips, downsample_strips, encoder_strips

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    root = write_synthetic_checkpoint(
        tmp_path_factory.mktemp("vae") / "ckpt", "tiny", seed=3, components=("vae",)
    )
    return root / "vae"


@pytest.fixture(scope="module")
def models(vae_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the synthetic bn buffers hold the constants
        return {
            "float32": Flux2VAE.from_pretrained(vae_dir, dtype=mx.float32),
            "bfloat16": Flux2VAE.from_pretrained(vae_dir, dtype=mx.bfloat16),
        }


def latents(batch, grid_h, grid_w, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, grid_h * grid_w, 128)).astype(np.float32)


def images(batch, height, width, seed=0):
    """Smooth gradients plus noise in [-1, 1], fp32 (B, H, W, 3): image-like encoder input."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
    base = np.stack([yy, xx, -yy * xx], axis=-1)[None] * 0.8
    noise = rng.normal(0, 0.15, (batch, height, width, 3))
    return mx.array(np.clip(base + noise, -1, 1).astype(np.float32))


def copy_vae(vae_dir, dst, edit):
    """A copy of ``vae_dir`` whose tensors went through ``edit(dict) -> dict``."""
    shutil.copytree(vae_dir, dst)
    weights = edit(dict(mx.load(str(vae_dir / WEIGHTS))))
    mx.save_safetensors(str(dst / WEIGHTS), weights)
    return dst


# --- config ---------------------------------------------------------------------------------


def test_config_from_dict_ignores_unknown_keys(vae_dir):
    d = json.loads((vae_dir / "config.json").read_text())
    config = VAEConfig.from_dict({**d, "sample_size": 512, "something_new": 1})
    assert config.block_out_channels == tuple(d["block_out_channels"])
    assert config.patch_size == (2, 2)
    assert config.scale_factor == 8
    assert VAEConfig().decoder_channels == (128, 256, 512, 512)


def test_config_rejects_unsupported_architecture():
    with pytest.raises(CheckpointError, match="act_fn"):
        VAEConfig(act_fn="relu")
    with pytest.raises(CheckpointError, match="not divisible"):
        VAEConfig(block_out_channels=(32, 48, 64, 64), norm_num_groups=32)
    with pytest.raises(CheckpointError, match="latent_channels 16"):
        VAEConfig(latent_channels=16)


def test_real_config_has_84m_parameters():
    # MODEL_NOTES#vae-configuration, bn buffers excluded
    assert count_parameters(Flux2VAE(VAEConfig())) == 84_046_115


# --- latent packing -------------------------------------------------------------------------


def test_unpatchify_element_mapping():
    """``raw[ch, 2r+pi, 2c+pj] = packed[r*gw + c, pi*64 + pj*32 + ch]``, NHWC
    (MODEL_NOTES#latent-packing)."""
    gh, gw = 3, 5
    packed = np.arange(2 * gh * gw * 128, dtype=np.float32).reshape(2, gh * gw, 128)
    raw = np.array(unpatchify(mx.array(packed), gh, gw))
    assert raw.shape == (2, 2 * gh, 2 * gw, 32)
    for b in range(2):
        for r in range(gh):
            for c in range(gw):
                for pi in range(2):
                    for pj in range(2):
                        for ch in range(32):
                            expected = packed[b, r * gw + c, pi * 64 + pj * 32 + ch]
                            assert raw[b, 2 * r + pi, 2 * c + pj, ch] == expected


def test_patchify_roundtrip_is_bitwise():
    z = latents(2, 4, 3, seed=1)
    raw = unpatchify(mx.array(z), 4, 3)
    np.testing.assert_array_equal(np.array(patchify(raw)), z)
    raw = np.random.default_rng(2).standard_normal((1, 6, 10, 32)).astype(np.float32)
    np.testing.assert_array_equal(np.array(unpatchify(patchify(mx.array(raw)), 3, 5)), raw)


def test_pack_inverts_unpack():
    z = latents(2, 3, 5)
    raw = unpack(mx.array(z), 3, 5)
    assert raw.dtype == mx.float32 and raw.shape == (2, 6, 10, 32)
    np.testing.assert_allclose(np.array(pack(raw)), z, rtol=0, atol=1e-6)


def test_unpack_with_wrong_grid_raises():
    with pytest.raises(ValueError, match="grid"):
        unpack(mx.array(latents(1, 3, 5)), 5, 5)


def test_constants_equal_diffusers_bn_formula():
    """diffusers: ``z * sqrt(running_var + eps) + running_mean`` in fp32
    (MODEL_NOTES#latent-normalization)."""
    z = latents(1, 2, 3, seed=4)
    running_mean = LATENT_SHIFT
    running_var = (LATENT_SCALE.astype(np.float64) ** 2 - 1e-4).astype(np.float32)
    std = np.sqrt(running_var + np.float32(1e-4))
    expected = (z * std + running_mean).reshape(1, 2, 3, 2, 2, 32)
    expected = expected.transpose(0, 1, 3, 2, 4, 5).reshape(1, 4, 6, 32)
    np.testing.assert_allclose(np.array(unpack(mx.array(z), 2, 3)), expected, rtol=1e-6, atol=1e-7)


def test_to_uint8_clamps_and_rounds_half_to_even():
    x = np.array([-2.0, -1.0, 0.0, 1.0, 3.0], dtype=np.float32)
    np.testing.assert_array_equal(to_uint8(x), [0, 0, 128, 255, 255])
    # fp32 values whose (x + 1) * 127.5 is exactly k + 0.5: ties go to the even neighbour.
    for k in (0, 1, 2, 3, 100, 253):
        x = np.float32((k + 0.5) / 127.5 - 1)
        for _ in range(64):
            y = (x + np.float32(1)) * np.float32(127.5)
            if y == k + 0.5:
                assert int(to_uint8(np.array([x]))[0]) == k + (k % 2)
                break
            x = np.nextafter(x, np.float32(2 if y < k + 0.5 else -2), dtype=np.float32)


# --- loading --------------------------------------------------------------------------------


def sanitize(weights):
    return Flux2VAE(VAEConfig()).sanitize(weights)  # lazy: the real-size skeleton costs nothing


def assert_same(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].shape == b[key].shape and mx.array_equal(a[key], b[key]).item(), key


def diffusers_dict():
    """A hand-built diffusers dict: conv_in's (4, 3, 3, 3) reads the same in both layouts."""
    return {
        "encoder.conv_in.weight": mx.arange(4 * 27).reshape(4, 3, 3, 3),
        "encoder.conv_in.bias": mx.ones((4,)),
        "encoder.conv_out.weight": mx.arange(4 * 2 * 9).reshape(4, 2, 3, 3),
        "quant_conv.weight": mx.arange(2 * 3).reshape(2, 3, 1, 1),
        "bn.running_mean": mx.zeros((128,)),
        "bn.running_var": mx.ones((128,)),
    }


def test_sanitize_transposes_drops_bn_and_is_idempotent():
    raw = diffusers_dict()
    out = sanitize(raw)
    assert kernel_layout(raw) == "diffusers" and kernel_layout(out) == "mlx"
    expected = {k: v for k, v in raw.items() if not k.startswith("bn.")}
    expected = {k: v.transpose(0, 2, 3, 1) if v.ndim == 4 else v for k, v in expected.items()}
    assert_same(out, expected)
    assert_same(sanitize(out), out)  # already converted: conv_in is not transposed again
    with_bn = {**out, "bn.running_mean": raw["bn.running_mean"]}  # as convert writes it
    assert_same(sanitize(with_bn), out)


def test_sanitize_of_the_synthetic_vae_is_idempotent(vae_dir):
    once = sanitize(dict(mx.load(str(vae_dir / WEIGHTS))))
    assert once["encoder.conv_in.weight"].shape == (32, 3, 3, 3)  # ambiguous by shape
    assert once["decoder.conv_in.weight"].shape == (64, 3, 3, 32)
    assert_same(sanitize(once), once)


def test_kernel_layouts_must_not_mix_and_ambiguous_dicts_are_diffusers():
    raw = diffusers_dict()
    mixed = {**raw, "quant_conv.weight": raw["quant_conv.weight"].transpose(0, 2, 3, 1)}
    with pytest.raises(CheckpointError, match=r"quant_conv\.weight \(2, 1, 1, 3\) is a mlx"):
        sanitize(mixed)
    ambiguous = {"encoder.conv_in.weight": raw["encoder.conv_in.weight"]}
    assert kernel_layout(ambiguous) == "diffusers"
    out = sanitize(ambiguous)["encoder.conv_in.weight"]
    assert mx.array_equal(out, raw["encoder.conv_in.weight"].transpose(0, 2, 3, 1)).item()


def test_vae_saved_in_mlx_layout_loads_equal_to_the_raw_one(vae_dir, tmp_path, models):
    """No conversion record needed: the layout is read off the kernels; bn buffers travel."""
    raw = dict(mx.load(str(vae_dir / WEIGHTS)))
    bn = {k: v for k, v in raw.items() if k.startswith("bn.")}
    mlx_dir = copy_vae(vae_dir, tmp_path / "vae", lambda w: {**sanitize(w), **bn})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the bn buffers are still there and checked
        loaded = Flux2VAE.from_pretrained(mlx_dir, dtype=mx.float32)
    assert_same(
        dict(tree_flatten(loaded.parameters())), dict(tree_flatten(models["float32"].parameters()))
    )


def test_loader_reads_config_and_dtype(models):
    assert models["bfloat16"].dtype == mx.bfloat16
    assert models["float32"].decoder.up_blocks[0].resnets[0].norm1.weight.dtype == mx.float32
    assert models["float32"].config.norm_num_groups == 8


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda w: {k: v for k, v in w.items() if k != "decoder.conv_out.bias"}, "conv_out.bias"),
        (lambda w: {**w, "decoder.extra.weight": mx.zeros((3,))}, "decoder.extra.weight"),
        (
            lambda w: {**w, "encoder.conv_in.weight": mx.zeros((32, 3, 3, 1))},
            "encoder.conv_in.weight",
        ),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_strict_loading_names_the_key(vae_dir, tmp_path, edit, message):
    bad = copy_vae(vae_dir, tmp_path / "vae", edit)
    with pytest.raises(CheckpointError, match=message.replace(".", r"\.")):
        Flux2VAE.from_pretrained(bad)


def test_loader_warns_when_bn_buffers_differ(vae_dir, tmp_path):
    def shift_mean(w):
        return {**w, "bn.running_mean": w["bn.running_mean"] + 1e-3}

    bad = copy_vae(vae_dir, tmp_path / "vae", shift_mean)
    with pytest.warns(UserWarning, match="bn.running_mean/running_var differ"):
        Flux2VAE.from_pretrained(bad, dtype=mx.float32)


def test_loader_warns_when_bn_buffers_are_missing(vae_dir, tmp_path):
    bad = copy_vae(
        vae_dir, tmp_path / "vae", lambda w: {k: v for k, v in w.items() if "bn." not in k}
    )
    with pytest.warns(UserWarning, match="no bn.running_mean"):
        Flux2VAE.from_pretrained(bad, dtype=mx.float32)


def test_bf16_bn_buffers_are_compared_at_their_precision(vae_dir, tmp_path):
    """A bf16 checkpoint holding the bf16-rounded constants is fine; a real change is not."""

    def to_bf16(w):
        return {**w, **{k: w[k].astype(mx.bfloat16) for k in ("bn.running_mean", "bn.running_var")}}

    ok = copy_vae(vae_dir, tmp_path / "ok", to_bf16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Flux2VAE.from_pretrained(ok, dtype=mx.float32)
    bad = copy_vae(
        vae_dir,
        tmp_path / "bad",
        lambda w: to_bf16({**w, "bn.running_var": w["bn.running_var"] * 1.1}),
    )
    with pytest.warns(UserWarning, match="differ"):
        Flux2VAE.from_pretrained(bad, dtype=mx.float32)


# --- decode / encode ------------------------------------------------------------------------


def test_decode_and_encode_shapes(models):
    vae = models["float32"]
    image = decode(vae, latents(2, 3, 5), 3, 5)
    assert image.dtype == np.uint8 and image.shape == (2, 48, 80, 3)
    assert 0 < image.mean() < 255
    z = encode(vae, image)
    assert z.dtype == mx.float32 and z.shape == (2, 15, 128)
    as_float = image.astype(np.float32) / 127.5 - 1
    np.testing.assert_array_equal(np.array(encode(vae, as_float)), np.array(z))
    with pytest.raises(ValueError, match="multiples of 16|% 16"):
        encode(vae, np.zeros((1, 40, 48, 3), np.uint8))


def test_bounded_decode_one_strip_is_bitwise(models):
    z = unpack(mx.array(latents(1, 3, 4)), 3, 4)
    for vae in models.values():
        plain = np.array(vae.decode_raw(z))
        one_strip = np.array(vae.decode_raw(z, strip_pixels=10**9))
        np.testing.assert_array_equal(one_strip, plain)


@pytest.mark.parametrize("grid", [(3, 5), (4, 2)])
def test_bounded_decode_matches_plain(models, grid):
    """Strips of one latent row (the extreme case) and of two, batch 2, non-square."""
    z = unpack(mx.array(latents(2, *grid, seed=5)), *grid)
    width = grid[1] * 16
    exact = np.array(models["float32"].decode_raw(z))
    for rows in (1, 2):
        strips = np.array(models["float32"].decode_raw(z, strip_pixels=rows * 8 * width))
        np.testing.assert_allclose(strips, exact, rtol=0, atol=1e-4)

    plain16 = np.array(models["bfloat16"].decode_raw(z))
    floor = rel_l2(plain16, exact)
    for rows in (1, 2):
        strips16 = np.array(models["bfloat16"].decode_raw(z, strip_pixels=rows * 8 * width))
        assert rel_l2(strips16, exact) <= 1.25 * floor, (rel_l2(strips16, exact), floor)


def test_decode_uses_bounded_path_by_default(models):
    vae = models["bfloat16"]
    z = latents(1, 4, 3, seed=6)
    expected = to_uint8(vae.decode_raw(unpack(mx.array(z), 4, 3), strip_pixels=32768))
    np.testing.assert_array_equal(decode(vae, z, 4, 3), expected)


@pytest.mark.slow
def test_bounded_decode_peak_memory(models):
    """512x512 on the tiny bf16 VAE: the strip decode's MLX peak is a fraction of the plain
    one's (full-size numbers: benchmarks/vae_memory.py). Observed 114 vs 1139 MiB."""
    vae = models["bfloat16"]
    z = unpack(mx.array(latents(1, 32, 32, seed=7)), 32, 32)
    peaks = {}
    for name, strip_pixels in (("plain", None), ("strips", DEFAULT_STRIP_PIXELS)):
        mx.eval(z)
        mx.reset_peak_memory()
        mx.eval(vae.decode_raw(z, strip_pixels))
        peaks[name] = mx.get_peak_memory()
    assert peaks["strips"] * 4 < peaks["plain"], peaks


def test_bounded_encode_one_strip_is_bitwise(models):
    """A strip taller than the image, and one exactly as tall (48 rows of 80 pixels)."""
    x = images(2, 48, 80, seed=8)
    for vae in models.values():
        plain = np.array(vae.encode_raw(x))
        for strip_pixels in (10**9, 48 * 80):
            np.testing.assert_array_equal(np.array(vae.encode_raw(x, strip_pixels)), plain)


@pytest.mark.parametrize("batch, height, width", [(2, 48, 80), (1, 64, 32), (2, 40, 16)])
def test_bounded_encode_matches_plain(models, batch, height, width):
    """Strips of 8 rows (the extreme: one row at the lowest level), 24 and 32 rows (one of
    them leaves a shorter last strip for each height), batch 2, non-square."""
    x = images(batch, height, width, seed=height + width)
    exact = np.array(models["float32"].encode_raw(x))
    assert exact.shape == (batch, height // 8, width // 8, 32)
    plain16 = np.array(models["bfloat16"].encode_raw(x))
    floor = rel_l2(plain16, exact)
    for rows in (8, 24, 32):
        strips = np.array(models["float32"].encode_raw(x, strip_pixels=rows * width))
        assert strips.shape == exact.shape and strips.dtype == np.float32
        assert rel_l2(strips, exact) <= 1e-5, (rows, rel_l2(strips, exact))
        strips16 = np.array(models["bfloat16"].encode_raw(x, strip_pixels=rows * width))
        assert rel_l2(strips16, exact) <= 1.25 * floor, (rows, rel_l2(strips16, exact), floor)


@pytest.mark.parametrize("height, rows", [(12, 4), (10, 4), (9, 4), (8, 2)])
def test_downsample_strips_reads_the_next_strips_first_row(height, rows):
    """Output row r reads input rows 2r..2r+2: the last row of every output strip needs the
    first row of the next input strip (zeros at the bottom). Last strips of 2, 1 rows too."""
    layer = Downsample(16)
    x = mx.random.normal((2, height, 6, 16), key=mx.random.key(height))
    expected = np.array(layer(x))
    out = downsample_strips(layer, RowStrips.split(x, rows, groups=4))
    actual = np.array(mx.concatenate(out.parts, axis=1))
    assert actual.shape == expected.shape == (2, height // 2, 3, 16)
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6)


def test_bounded_encode_rejects_uneven_strip_rows(models):
    with pytest.raises(ValueError, match="multiple of 8"):
        encoder_strips(models["float32"].encoder, images(1, 32, 16), 12)


def test_encode_uses_bounded_path_by_default(models, monkeypatch):
    """256x192: the default strip size makes strips of 168 rows (and a last one of 88)."""
    vae = models["bfloat16"]
    x = images(1, 256, 192, seed=9)
    expected = pack(vae.encode_raw(x, strip_pixels=DEFAULT_STRIP_PIXELS))
    calls = []
    monkeypatch.setattr(
        "ideogram4_mlx.vae.encoder_strips",
        lambda encoder, x, rows: calls.append(rows) or encoder_strips(encoder, x, rows),
    )
    np.testing.assert_array_equal(np.array(encode(vae, np.array(x))), np.array(expected))
    assert calls == [168]


@pytest.mark.slow
def test_bounded_encode_peak_memory(models):
    """512x512 on the tiny bf16 VAE: the strip encode's MLX peak is a fraction of the plain
    one's (full-size numbers: benchmarks/vae_memory.py). Observed 118 vs 1174-1190 MiB."""
    vae = models["bfloat16"]
    x = images(1, 512, 512, seed=10)
    peaks = {}
    for name, strip_pixels in (("plain", None), ("strips", DEFAULT_STRIP_PIXELS)):
        mx.eval(x)
        mx.reset_peak_memory()
        mx.eval(vae.encode_raw(x, strip_pixels))
        peaks[name] = mx.get_peak_memory()
    assert peaks["strips"] * 4 < peaks["plain"], peaks
