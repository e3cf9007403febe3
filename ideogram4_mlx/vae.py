"""The FLUX.2 KL autoencoder (diffusers ``AutoencoderKLFlux2``) in NHWC (MODEL_NOTES#vae); the
latent packing it decodes from and encodes to is ``latents.py``.

Module attribute names equal the diffusers keys of ``vae/diffusion_pytorch_model.safetensors``,
so loading needs no mapping table; conv kernels are transposed once at load. The ``bn.*``
buffers are not weights: the port denormalises with the hard-coded constants
(MODEL_NOTES#latent-normalization) and only checks the buffers against them.

Dtype policy: latents and their (de)normalisation are fp32; the network runs in the weights'
dtype (bf16 in the reference). GroupNorm statistics and the mid-block attention core are fp32,
as in PyTorch; every op's output is rounded to the compute dtype once.

Two forwards: the whole-image ones here (``Encoder.__call__``, ``Decoder.__call__``;
``strip_pixels=None``) are the oracle, checked against diffusers in tests/test_vae_parity.py.
The bounded-memory strip forwards of ``vae_strips.py``, which :func:`decode` and :func:`encode`
take by default, are tested against them in tests/test_vae.py (bit for bit with one strip,
within fp32 rounding with many).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ideogram4_mlx.config import BaseConfig, CheckpointError, HeaderCheck
from ideogram4_mlx.constants import LATENT_SCALE, LATENT_SHIFT, PATCH
from ideogram4_mlx.errors import InputError
from ideogram4_mlx.latents import from_uint8, pack, to_uint8, unpack
from ideogram4_mlx.layers import group_moments, silu, upsample_nearest
from ideogram4_mlx.vae_strips import decoder_strips, encoder_strips
from ideogram4_mlx.weights import (
    DtypeRule,
    checked_config,
    component_files,
    load_component,
    load_safetensors,
)

RESNET_EPS = 1e-6  # every GroupNorm of the encoder and decoder
BN_PREFIX = "bn."
BN_TOLERANCE = 1e-6  # bn buffers vs the constants (MODEL_NOTES#latent-normalization)
# Bounded-memory decode and encode (``vae_strips.py``): image pixels per row strip.
DEFAULT_STRIP_PIXELS = 2**15


@dataclass(frozen=True)
class VAEConfig(BaseConfig):
    """Mirrors ``vae/config.json`` (diffusers names); the defaults are the real model."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    decoder_block_out_channels: tuple[int, ...] | None = None
    layers_per_block: int = 2
    act_fn: str = "silu"
    latent_channels: int = 32
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    batch_norm_eps: float = 1e-4
    patch_size: tuple[int, int] = (PATCH, PATCH)

    layer_fields: ClassVar[tuple[str, ...]] = ("layers_per_block",)

    def __post_init__(self):
        n = len(self.block_out_channels)
        problems = []
        if self.act_fn != "silu":
            problems.append(f"act_fn {self.act_fn!r} (only 'silu')")
        if tuple(self.patch_size) != (PATCH, PATCH):
            problems.append(f"patch_size {list(self.patch_size)} (only [2, 2])")
        if tuple(self.down_block_types) != ("DownEncoderBlock2D",) * n:
            problems.append(f"down_block_types {list(self.down_block_types)}")
        if tuple(self.up_block_types) != ("UpDecoderBlock2D",) * n:
            problems.append(f"up_block_types {list(self.up_block_types)}")
        if len(self.decoder_channels) != n:
            problems.append(f"decoder_block_out_channels {list(self.decoder_channels)}")
        if PATCH * PATCH * self.latent_channels != LATENT_SHIFT.size:
            problems.append(f"latent_channels {self.latent_channels} (Ideogram 4 packs 32)")
        channels = self.block_out_channels + self.decoder_channels
        if any(c % self.norm_num_groups for c in channels):
            problems.append(f"channels {list(channels)} not divisible by {self.norm_num_groups}")
        if problems:
            raise CheckpointError("unsupported VAE config: " + "; ".join(problems))

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        return self.decoder_block_out_channels or self.block_out_channels

    @property
    def scale_factor(self) -> int:
        """Image pixels per latent pixel along each axis (8 for the real model)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def header_checks(self) -> list[HeaderCheck]:
        """Block counts and widths against the checkpoint (a kernel's axis 0 is its output
        channels in both the diffusers and the MLX layout)."""
        down, up = "encoder.down_blocks.", "decoder.up_blocks."
        checks = [
            HeaderCheck("block_out_channels (its length)", len(self.block_out_channels), down),
            HeaderCheck("layers_per_block", self.layers_per_block, down + "0.resnets."),
            HeaderCheck("layers_per_block + 1", self.layers_per_block + 1, up + "0.resnets."),
        ]
        for i, c in enumerate(self.block_out_channels):
            field = f"block_out_channels[{i}]"
            checks.append(HeaderCheck(field, c, f"{down}{i}.resnets.0.conv2.weight"))
        n = len(self.decoder_channels)
        for i, c in enumerate(self.decoder_channels):
            field = f"decoder_block_out_channels[{i}] (or block_out_channels)"
            checks.append(HeaderCheck(field, c, f"{up}{n - 1 - i}.resnets.0.conv2.weight"))
        return checks


# ---------------------------------------------------------------------------------------------
# Layers. All tensors are NHWC.


class GroupNorm(nn.Module):
    """PyTorch GroupNorm: fp32 statistics, ``x * scale + shift`` in fp32, one rounding."""

    def __init__(self, groups: int, dims: int, eps: float = RESNET_EPS):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.bias = mx.zeros((dims,))
        self.groups = groups
        self.eps = eps

    def __call__(self, x: mx.array, stats: tuple[mx.array, mx.array] | None = None) -> mx.array:
        """``stats`` = (mean, var) (B, G) of the whole tensor, when ``x`` is only a strip of it."""
        if stats is None:
            mean, m2 = group_moments(x, self.groups)
            mean, var = mean, m2 / (x.size // (x.shape[0] * self.groups))
        else:
            mean, var = stats
        per_group = x.shape[-1] // self.groups
        rstd = mx.repeat(mx.rsqrt(var + self.eps), per_group, axis=-1)
        scale = rstd * self.weight.astype(mx.float32)
        shift = self.bias.astype(mx.float32) - mx.repeat(mean, per_group, axis=-1) * scale
        y = x.astype(mx.float32) * scale[:, None, None] + shift[:, None, None]
        return y.astype(x.dtype)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` accumulating in fp32 with the bias added before the one rounding, as
    PyTorch's bf16 conv does. (Rounding the conv and then the bias add costs 1.25x the
    reference's own bf16 error instead of 1.0x.) On the CPU backend bf16 convs run in fp32
    anyway."""

    def __call__(self, x: mx.array, padding: int | None = None) -> mx.array:
        padding = self.padding if padding is None else padding
        w = self.weight.astype(mx.float32)
        y = mx.conv2d(x.astype(mx.float32), w, stride=self.stride, padding=padding)
        return (y + self.bias.astype(mx.float32)).astype(x.dtype)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm(groups, out_channels)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = Conv2d(in_channels, out_channels, 1)

    def shortcut(self, x: mx.array) -> mx.array:
        return self.conv_shortcut(x) if "conv_shortcut" in self else x

    def __call__(self, x: mx.array) -> mx.array:
        h = self.conv1(silu(self.norm1(x)))
        h = self.conv2(silu(self.norm2(h)))
        return self.shortcut(x) + h


def attention(q: mx.array, k: mx.array, v: mx.array, query_chunk: int | None) -> mx.array:
    """Single-head SDPA (B, L, C) in fp32, scale 1/sqrt(C). With ``query_chunk`` the queries are
    evaluated chunk by chunk, so only one chunk's (chunk, L) scores exist at a time (exact:
    softmax is per query)."""
    q, k, v = (t.astype(mx.float32)[:, None] for t in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1])
    if query_chunk is None:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)[:, 0]
    out = []
    for start in range(0, q.shape[2], query_chunk):
        chunk = q[:, :, start : start + query_chunk]
        out.append(mx.fast.scaled_dot_product_attention(chunk, k, v, scale=scale)[:, 0])
        mx.eval(out[-1])
    return mx.concatenate(out, axis=1)


class Attention(nn.Module):
    """Mid-block self-attention over all H*W positions, one head, with the residual."""

    def __init__(self, dims: int, groups: int):
        super().__init__()
        self.group_norm = GroupNorm(groups, dims)
        self.to_q = nn.Linear(dims, dims)
        self.to_k = nn.Linear(dims, dims)
        self.to_v = nn.Linear(dims, dims)
        self.to_out = [nn.Linear(dims, dims)]

    def __call__(self, x: mx.array, query_chunk: int | None = None) -> mx.array:
        b, h, w, c = x.shape
        t = self.group_norm(x).reshape(b, h * w, c)
        o = attention(self.to_q(t), self.to_k(t), self.to_v(t), query_chunk).astype(x.dtype)
        return x + self.to_out[0](o).reshape(b, h, w, c)


class MidBlock(nn.Module):
    def __init__(self, dims: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = [ResnetBlock(dims, dims, groups), ResnetBlock(dims, dims, groups)]
        self.attentions = [Attention(dims, groups)] if add_attention else []

    def __call__(self, x: mx.array, query_chunk: int | None = None) -> mx.array:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x, query_chunk)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a stride-2 3x3 conv without padding."""

    def __init__(self, dims: int):
        super().__init__()
        self.conv = Conv2d(dims, dims, 3, stride=2)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv."""

    def __init__(self, dims: int):
        super().__init__()
        self.conv = Conv2d(dims, dims, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(upsample_nearest(x))


def resnet_chain(in_channels: int, out_channels: int, layers: int, groups: int) -> list:
    """``layers`` ResnetBlocks, the first changing the channel count."""
    channels = [in_channels] + [out_channels] * layers
    return [ResnetBlock(channels[j], out_channels, groups) for j in range(layers)]


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, down: bool):
        super().__init__()
        self.resnets = resnet_chain(in_channels, out_channels, layers, groups)
        self.downsamplers = [Downsample(out_channels)] if down else []

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.resnets + self.downsamplers:
            x = layer(x)
        return x


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, up: bool):
        super().__init__()
        self.resnets = resnet_chain(in_channels, out_channels, layers, groups)
        self.upsamplers = [Upsample(out_channels)] if up else []

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.resnets + self.upsamplers:
            x = layer(x)
        return x


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.down_blocks = [
            DownBlock(ch[max(i - 1, 0)], ch[i], config.layers_per_block, groups, i < len(ch) - 1)
            for i in range(len(ch))
        ]
        self.mid_block = MidBlock(ch[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(groups, ch[-1])
        self.conv_out = Conv2d(ch[-1], 2 * config.latent_channels, 3, padding=1)
        self.scale_factor = config.scale_factor

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, groups = config.decoder_channels[::-1], config.norm_num_groups
        self.conv_in = Conv2d(config.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], groups, config.mid_block_add_attention)
        self.up_blocks = [
            UpBlock(ch[max(i - 1, 0)], ch[i], config.layers_per_block + 1, groups, i < len(ch) - 1)
            for i in range(len(ch))
        ]
        self.conv_norm_out = GroupNorm(groups, ch[-1])
        self.conv_out = Conv2d(ch[-1], config.out_channels, 3, padding=1)

    def __call__(self, z: mx.array) -> mx.array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(silu(self.conv_norm_out(x)))


# ---------------------------------------------------------------------------------------------
# The model and its loading.


class Flux2VAE(nn.Module):
    """``AutoencoderKLFlux2``; the latent normalisation lives in :func:`pack`/:func:`unpack`."""

    # Raw files: BF16 [I, from the file size: MODEL_NOTES#checkpoint-layout]; the FLUX.2 VAE files
    # it matches are F32 (336 MB), so both are taken, but not F16 (no release; a BF16 retag reads
    # as it). The bn buffers are no parameters: check_latent_stats compares them to the constants.
    dtype_rule: ClassVar[DtypeRule] = DtypeRule(("BF16", "F32"), fp8=False, skip=(BN_PREFIX,))

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        c = config.latent_channels
        if config.use_quant_conv:
            self.quant_conv = Conv2d(2 * c, 2 * c, 1)
        if config.use_post_quant_conv:
            self.post_quant_conv = Conv2d(c, c, 1)

    @property
    def dtype(self) -> mx.Dtype:
        return self.decoder.conv_in.weight.dtype

    def decode_raw(self, z: mx.array, strip_pixels: int | None = None) -> mx.array:
        """Raw latents (B, H/8, W/8, 32) -> image (B, H, W, 3) fp32, not clamped.

        ``z`` is cast to the model dtype first. ``strip_pixels=None`` evaluates the whole
        graph at once (the oracle); an int runs the bounded-memory path
        (:func:`vae_strips.decoder_strips`) with about that many output pixels per strip.
        """
        z = z.astype(self.dtype)
        if "post_quant_conv" in self:
            z = self.post_quant_conv(z)
        if strip_pixels is None:
            return self.decoder(z).astype(mx.float32)
        scale = self.config.scale_factor
        rows = max(1, strip_pixels // (z.shape[2] * scale * scale))
        return decoder_strips(self.decoder, z, rows)

    def encode_raw(self, x: mx.array, strip_pixels: int | None = None) -> mx.array:
        """Image (B, H, W, 3) in [-1, 1] -> raw latent mean (B, H/8, W/8, 32) fp32.

        ``x`` is cast to the model dtype first. ``strip_pixels=None`` evaluates the whole
        graph at once (the oracle); an int runs the bounded-memory path
        (:func:`vae_strips.encoder_strips`) with about that many input pixels per strip (whole
        multiples of 8 rows, at least 8).
        """
        x = x.astype(self.dtype)
        if strip_pixels is None:
            h = self.encoder(x)
        else:
            scale = self.config.scale_factor
            rows = max(1, strip_pixels // (x.shape[2] * scale)) * scale
            h = encoder_strips(self.encoder, x, rows)
        if "quant_conv" in self:
            h = self.quant_conv(h)
        return h[..., : self.config.latent_channels].astype(mx.float32)

    @classmethod
    def from_pretrained(cls, component_dir: Path | str, dtype: mx.Dtype = mx.bfloat16) -> Flux2VAE:
        """Load ``vae/`` (diffusers layout, or converted). Warns if the bn buffers are not the
        constants."""
        model = cls.build(component_dir)
        tensors = load_safetensors(component_files(component_dir))  # lazy: only bn is read
        bn = {k: v for k, v in tensors.items() if k.startswith(BN_PREFIX)}
        check_latent_stats(bn, model.config.batch_norm_eps, str(component_dir))
        return load_component(model, component_dir, dtype)

    @classmethod
    def build(cls, component_dir: Path | str) -> Flux2VAE:
        """The float skeleton (lazy arrays, no memory yet) of a component folder, its
        config.json first checked against the weight files' headers."""
        return cls(checked_config(VAEConfig, component_dir))

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """diffusers or converted tensors -> parameters. Pure, and idempotent whenever one
        kernel shows its layout (see :func:`kernel_layout`): drops the ``bn.*`` buffers and,
        when the kernels are in diffusers layout (O, I, kh, kw), transposes them to MLX's
        (O, kh, kw, I)."""
        weights = {k: v for k, v in weights.items() if not k.startswith(BN_PREFIX)}
        if kernel_layout(weights) == "mlx":
            return weights
        return {k: v.transpose(0, 2, 3, 1) if v.ndim == 4 else v for k, v in weights.items()}

    def quant_predicate(self, path: str, module: nn.Module) -> bool | dict:
        """Never quantized: small (84M parameters) and conv-heavy."""
        return False


def kernel_layout(weights: dict[str, mx.array]) -> str:
    """``"diffusers"`` (O, I, k, k) or ``"mlx"`` (O, k, k, I): the layout of every conv kernel.

    A square kernel shows its layout unless its input channels equal its size:
    ``encoder.conv_in`` (128, 3, 3, 3) reads the same both ways, so the other kernels decide.
    All kernels of one dict share one layout (else a ``CheckpointError`` naming a key). A dict
    whose every kernel is ambiguous is taken as diffusers, the layout of the source files
    (sanitize is then not idempotent; a real VAE always has unambiguous kernels).
    """
    layout, witness = None, None
    for key, value in weights.items():
        if value.ndim != 4:
            continue
        _, a, b, c = value.shape
        if a == b == c:
            continue
        found = "diffusers" if b == c else "mlx" if a == b else None
        if found is None:
            continue  # square in neither layout: load_strict names its shape
        if layout is None:
            layout, witness = found, key
        elif found != layout:
            raise CheckpointError(
                f"{key} {tuple(value.shape)} is a {found}-layout conv kernel, but {witness} "
                f"{tuple(weights[witness].shape)} is {layout}-layout: one checkpoint must not "
                "mix them"
            )
    return layout or "diffusers"


def check_latent_stats(bn: dict[str, mx.array], eps: float, source: str) -> None:
    """Warn unless the bn buffers hold the Ideogram constants (MODEL_NOTES#latent-normalization):
    ``running_mean = LATENT_SHIFT`` and ``sqrt(running_var + eps) = LATENT_SCALE`` within 1e-6,
    plus the rounding of the buffers' own dtype when they are stored below fp32."""
    keys = ("bn.running_mean", "bn.running_var")
    if any(k not in bn for k in keys):
        warnings.warn(
            f"{source}: no bn.running_mean/running_var; cannot check them against the latent "
            "constants (decoding uses the constants)",
            stacklevel=3,
        )
        return
    mean, var = bn[keys[0]], bn[keys[1]]
    ulp = 0.0 if mean.dtype in (mx.float32, mx.float64) else float(mx.finfo(mean.dtype).eps)
    shift, scale = LATENT_SHIFT.astype(np.float64), LATENT_SCALE.astype(np.float64)
    if mean.shape != shift.shape or var.shape != scale.shape:
        diff = math.inf
    else:
        mean = np.array(mean.astype(mx.float32), np.float64)
        std = np.sqrt(np.array(var.astype(mx.float32), np.float64) + eps)
        diff = max(
            float(np.max(np.abs(mean - shift) - ulp * np.abs(shift))),
            float(np.max(np.abs(std - scale) - ulp * scale)),
        )
    if diff > BN_TOLERANCE:
        warnings.warn(
            f"{source}: bn.running_mean/running_var differ from the Ideogram latent constants "
            f"(by {diff:.3g} beyond tolerance); decoding uses the constants "
            "(docs/MODEL_NOTES.md#latent-normalization)",
            stacklevel=3,
        )


# ---------------------------------------------------------------------------------------------
# Pipeline entry points.


def decode(
    vae: Flux2VAE,
    latents: mx.array | np.ndarray,
    grid_h: int,
    grid_w: int,
    strip_pixels: int | None = DEFAULT_STRIP_PIXELS,
) -> np.ndarray:
    """Packed normalised latents (B, gh * gw, 128) -> uint8 RGB (B, 16 gh, 16 gw, 3)
    (MODEL_NOTES#vae-decode).

    fp32 denormalisation, unpatchify, cast to the VAE dtype, decoder, fp32, clamp, round half
    to even. ``strip_pixels`` selects the bounded-memory decode (None: whole-graph decode).
    """
    z = unpack(mx.array(latents), grid_h, grid_w)
    return to_uint8(vae.decode_raw(z, strip_pixels))


def encode(
    vae: Flux2VAE,
    image: mx.array | np.ndarray,
    strip_pixels: int | None = DEFAULT_STRIP_PIXELS,
) -> mx.array:
    """RGB (B, H, W, 3), uint8 or float in [-1, 1], H and W multiples of 16 -> packed normalised
    latents (B, H/16 * W/16, 128) fp32 (MODEL_NOTES#vae-encode: the posterior mean, no sampling).

    ``strip_pixels`` selects the bounded-memory encode (None: whole-graph encode).
    """
    image = np.asarray(image)
    if image.dtype == np.uint8:
        image = from_uint8(image)
    step = vae.config.scale_factor * PATCH
    if image.ndim != 4 or image.shape[1] % step or image.shape[2] % step:
        raise InputError(f"image shape {image.shape}: expected (B, H, W, 3), H and W % {step} == 0")
    return pack(vae.encode_raw(mx.array(image.astype(np.float32)), strip_pixels))


def count_parameters(vae: Flux2VAE) -> int:
    return sum(v.size for _, v in tree_flatten(vae.parameters()))
