"""FLOP model of one generation, per stage, so measured times become achieved TFLOP/s.

Counts are multiply-adds x 2 of the matmuls, convolutions and attention products that the
MLX code runs (``tests/test_flops.py`` checks them against counts taken while the code runs);
norms, activations and other elementwise work are left out (< 1% at full size). Benchmark
tooling, outside the package: scripts here import it as ``from flops import ...``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ideogram4_mlx.constants import PIXELS_PER_TOKEN
from ideogram4_mlx.text_encoder import TAP_LAYERS, TextEncoderConfig
from ideogram4_mlx.transformer import TransformerConfig
from ideogram4_mlx.vae import VAEConfig


def image_tokens(width: int, height: int) -> int:
    return (width // PIXELS_PER_TOKEN) * (height // PIXELS_PER_TOKEN)


def dit_pass_flops(cfg: TransformerConfig, n_image: int, n_text: int = 0) -> int:
    """One DiT forward over ``[n_text text][n_image image]`` tokens (batch 1, no padding)."""
    d, f, a = cfg.hidden_size, cfg.intermediate_size, cfg.adaln_dim
    length = n_text + n_image
    per_token_block = 2 * (3 * d * d + d * d + 3 * d * f)  # qkv, o, w1/w3/w2
    attention = 4 * length * length * d  # Q K^T and P V over all heads
    per_row_block = 2 * a * 4 * d  # adaln_modulation: once per sample, not per token
    blocks = cfg.num_layers * (length * per_token_block + attention + per_row_block)
    embed = 2 * length * cfg.in_channels * d + 2 * n_text * cfg.llm_features_dim * d
    timestep = 2 * (2 * d * d + d * a)  # t_embedding mlp_in/mlp_out, adaln_proj
    final = 2 * a * d + 2 * length * d * cfg.in_channels
    return blocks + embed + timestep + final


def cfg_step_flops(cfg: TransformerConfig, n_image: int, n_text: int, guided: bool = True) -> int:
    """One sampler step: the conditional pass, plus the unconditional one unless g == 1."""
    cond = dit_pass_flops(cfg, n_image, n_text)
    return cond + (dit_pass_flops(cfg, n_image, 0) if guided else 0)


def text_encoder_flops(cfg: TextEncoderConfig, n_text: int) -> int:
    """The Qwen3-VL decoder up to the last tapped layer, causal attention, batch 1."""
    d, hd = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    per_token = 2 * (d * q + 2 * d * kv + q * d + 3 * d * cfg.intermediate_size)
    # Causal scores: query i sees i + 1 keys; MLX computes the full square and masks it.
    attention = 4 * n_text * n_text * q
    return (TAP_LAYERS[-1] + 1) * (n_text * per_token + attention)


def vae_decode_flops(cfg: VAEConfig, width: int, height: int) -> int:
    """The FLUX.2 decoder from the (H/8, W/8, 32) latent to pixels."""
    ch = cfg.decoder_channels[::-1]
    hw = (height // 8) * (width // 8)

    def conv(n_pixels: int, c_in: int, c_out: int, k: int = 3) -> int:
        return 2 * n_pixels * k * k * c_in * c_out

    def resnet(n_pixels: int, c_in: int, c_out: int) -> int:
        shortcut = conv(n_pixels, c_in, c_out, 1) if c_in != c_out else 0
        return conv(n_pixels, c_in, c_out) + conv(n_pixels, c_out, c_out) + shortcut

    total = conv(hw, cfg.latent_channels, cfg.latent_channels, 1) if cfg.use_post_quant_conv else 0
    total += conv(hw, cfg.latent_channels, ch[0])
    total += 2 * resnet(hw, ch[0], ch[0])
    if cfg.mid_block_add_attention:
        total += 4 * 2 * hw * ch[0] * ch[0] + 4 * hw * hw * ch[0]
    n_pixels = hw
    for i, c_out in enumerate(ch):
        c_in = ch[max(i - 1, 0)]
        total += resnet(n_pixels, c_in, c_out)
        total += cfg.layers_per_block * resnet(n_pixels, c_out, c_out)
        if i < len(ch) - 1:
            n_pixels *= 4
            total += conv(n_pixels, c_out, c_out)
    return total + conv(n_pixels, ch[-1], cfg.out_channels)


@dataclass(frozen=True)
class GenerationFlops:
    encode: int
    denoise_step: int
    denoise: int
    decode: int

    @property
    def total(self) -> int:
        return self.encode + self.denoise + self.decode


def generation_flops(
    width: int,
    height: int,
    n_text: int,
    guidance: tuple[float, ...],
    dit: TransformerConfig | None = None,
    text: TextEncoderConfig | None = None,
    vae: VAEConfig | None = None,
) -> GenerationFlops:
    """Every stage of one image; defaults are the real model's configs."""
    dit, text, vae = dit or TransformerConfig(), text or TextEncoderConfig(), vae or VAEConfig()
    n_img = image_tokens(width, height)
    steps = [cfg_step_flops(dit, n_img, n_text, guided=g != 1.0) for g in guidance]
    return GenerationFlops(
        encode=text_encoder_flops(text, n_text),
        denoise_step=cfg_step_flops(dit, n_img, n_text),
        denoise=sum(steps),
        decode=vae_decode_flops(vae, width, height),
    )
