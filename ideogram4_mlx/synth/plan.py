"""What a synthetic checkpoint holds: its sizes (SyntheticSpec, presets) and its tensors.

Every tensor of every safetensors file is planned here by name, dtype, shape and how its values
are drawn; the writer only streams the plan. Cheap to import (no `tokenizers`, no writer), so
the command line can list presets and components.
"""

from dataclasses import dataclass, replace

import numpy as np

from ideogram4_mlx.constants import LATENT_SCALE, LATENT_SHIFT, PACKED_CHANNELS, VAE_CHANNELS
from ideogram4_mlx.errors import InputError

COMPONENTS = (
    "transformer",
    "unconditional_transformer",
    "text_encoder",
    "tokenizer",
    "vae",
    "scheduler",
)
# Written only when asked for: the prompt-enhancer lm_head, which the real checkpoint does not
# ship (diffusers keeps it in its own repo, diffusers/qwen3-vl-8b-instruct-lm-head).
OPTIONAL_COMPONENTS = ("prompt_enhancer_head",)
ALL_COMPONENTS = COMPONENTS + OPTIONAL_COMPONENTS

NUM_TEXT_TAPS = 13  # QWEN3_VL_ACTIVATION_LAYERS has 13 entries, the last is layer 35
# Little-endian numpy storage of each safetensors dtype (BF16 and F8_E4M3 as their raw bits).
NUMPY_DTYPES = {"I64": "<i8", "F32": "<f4", "BF16": "<u2", "F8_E4M3": "u1"}


@dataclass(frozen=True)
class SyntheticSpec:
    """Sizes of a synthetic checkpoint. Everything else (names, dtypes, fixed dims) is real."""

    # both DiTs (transformer/ and unconditional_transformer/)
    dit_num_layers: int
    dit_num_attention_heads: int
    dit_attention_head_dim: int
    dit_intermediate_size: int
    dit_adaln_dim: int
    # text encoder (Qwen3-VL text decoder); the DiT's llm_features_dim = 13 * text_hidden_size
    text_hidden_size: int
    text_num_layers: int
    text_num_attention_heads: int
    text_num_key_value_heads: int
    text_head_dim: int
    text_intermediate_size: int
    # VAE (AutoencoderKLFlux2); latent_channels is always VAE_CHANNELS (DiT in_channels 128)
    vae_block_out_channels: tuple[int, int, int, int]
    vae_layers_per_block: int
    vae_norm_num_groups: int
    # Qwen3-VL vision tower (run only by describe); tiny defaults keep files small.
    vision_depth: int = 1
    vision_hidden_size: int = 32
    vision_num_heads: int = 2
    vision_intermediate_size: int = 64
    vision_num_position_embeddings: int = 16
    vision_deepstack_visual_indexes: tuple[int, ...] = (0,)
    # Embedding rows; None = the shipped tokenizer's size rounded up to a multiple of 128.
    text_vocab_size: int | None = None

    def __post_init__(self):
        checks = [
            (
                self.text_num_layers >= 36,
                "text_num_layers must be >= 36 so all 13 tap layers exist",
            ),
            (self.dit_attention_head_dim % 2 == 0, "dit_attention_head_dim must be even (RoPE)"),
            (self.text_head_dim % 2 == 0, "text_head_dim must be even (RoPE)"),
            (
                self.text_num_attention_heads % self.text_num_key_value_heads == 0,
                "text_num_attention_heads must be a multiple of text_num_key_value_heads",
            ),
            (
                all(c % self.vae_norm_num_groups == 0 for c in self.vae_block_out_channels),
                "every vae_block_out_channels entry must be a multiple of vae_norm_num_groups",
            ),
            (
                int(self.vision_num_position_embeddings**0.5) ** 2
                == self.vision_num_position_embeddings,
                "vision_num_position_embeddings must be a perfect square",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(f"SyntheticSpec: {message} (got {self})")

    @property
    def dit_hidden_size(self) -> int:
        return self.dit_num_attention_heads * self.dit_attention_head_dim

    @property
    def llm_features_dim(self) -> int:
        return NUM_TEXT_TAPS * self.text_hidden_size


_REAL_VISION = dict(
    vision_depth=27,
    vision_hidden_size=1152,
    vision_num_heads=16,
    vision_intermediate_size=4304,
    vision_num_position_embeddings=2304,
    vision_deepstack_visual_indexes=(8, 16, 24),
)
_FULL_WIDTH = SyntheticSpec(
    dit_num_layers=2,
    dit_num_attention_heads=18,
    dit_attention_head_dim=256,
    dit_intermediate_size=12288,
    dit_adaln_dim=512,
    text_hidden_size=4096,
    text_num_layers=36,
    text_num_attention_heads=32,
    text_num_key_value_heads=8,
    text_head_dim=128,
    text_intermediate_size=12288,
    vae_block_out_channels=(128, 256, 512, 512),
    vae_layers_per_block=2,
    vae_norm_num_groups=32,
    text_vocab_size=151936,
    **_REAL_VISION,
)
SYNTHETIC_PRESETS: dict[str, SyntheticSpec] = {
    "tiny": SyntheticSpec(
        dit_num_layers=2,
        dit_num_attention_heads=2,
        # 128 keeps the real mrope_section [24, 20, 20] (60 interleaved h/w slots) exercised.
        dit_attention_head_dim=128,
        dit_intermediate_size=256,
        dit_adaln_dim=32,
        text_hidden_size=64,
        text_num_layers=36,
        text_num_attention_heads=4,
        text_num_key_value_heads=2,
        text_head_dim=16,
        text_intermediate_size=128,
        vae_block_out_channels=(32, 32, 64, 64),
        vae_layers_per_block=1,
        vae_norm_num_groups=8,
    ),
    "full-width": _FULL_WIDTH,
    "full": replace(_FULL_WIDTH, dit_num_layers=34),
}


def resolve_spec(spec: SyntheticSpec | str) -> SyntheticSpec:
    if isinstance(spec, SyntheticSpec):
        return spec
    if spec not in SYNTHETIC_PRESETS:
        raise InputError(f"unknown preset {spec!r}; valid presets: {', '.join(SYNTHETIC_PRESETS)}")
    return SYNTHETIC_PRESETS[spec]


@dataclass(frozen=True)
class TensorPlan:
    """One tensor of a safetensors file and how its values are drawn.

    init: "fp8" (E4M3 codes of N(0,1) rows, each row's peak pinned to 448), "scale" (F32 row
    scales giving weights of std ~1/sqrt(fan_in)), "normal" (BF16 N(mean, std)), "const" (values).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    init: str
    mean: float = 0.0
    std: float = 1.0
    fan_in: int = 1
    values: tuple = ()

    @property
    def rows_cols(self) -> tuple[int, int]:
        rows = self.shape[0] if self.shape else 1
        return rows, int(np.prod(self.shape[1:], dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return (
            int(np.prod(self.shape, dtype=np.int64)) * np.dtype(NUMPY_DTYPES[self.dtype]).itemsize
        )


# Tensor lists. Values keep a forward pass in range: linear weights std 1/sqrt(fan_in) (so
# activations keep their scale), norm weights 1 + 0.1 N, biases 0.02 N, the image indicator
# 0.5 N (comparable to input_proj outputs), text embeddings 0.05 N (the first decoder layer adds
# O(1) and the taps are re-normalized by llm_cond_norm).


def dit_tensors(spec: SyntheticSpec) -> list[TensorPlan]:
    """Both DiT files: fused qkv/o, every nn.Linear F8_E4M3 + F32 weight_scale
    (MODEL_NOTES#dit-keys)."""
    d, a, f = spec.dit_hidden_size, spec.dit_adaln_dim, spec.dit_intermediate_size
    out = [
        *_fp8_linear("input_proj", d, PACKED_CHANNELS),
        _norm("llm_cond_norm", spec.llm_features_dim),
        *_fp8_linear("llm_cond_proj", d, spec.llm_features_dim),
        *_fp8_linear("t_embedding.mlp_in", d, d),
        *_fp8_linear("t_embedding.mlp_out", d, d),
        *_fp8_linear("adaln_proj", a, d),
        _normal("embed_image_indicator.weight", (2, d), std=0.5),
        *_fp8_linear("final_layer.linear", PACKED_CHANNELS, d),
        *_fp8_linear("final_layer.adaln_modulation", d, a),
    ]
    for i in range(spec.dit_num_layers):
        p = f"layers.{i}."
        out += [
            *_fp8_linear(p + "attention.qkv", 3 * d, d, bias=False),
            *_fp8_linear(p + "attention.o", d, d, bias=False),
            _norm(p + "attention.norm_q", spec.dit_attention_head_dim),
            _norm(p + "attention.norm_k", spec.dit_attention_head_dim),
            *_fp8_linear(p + "feed_forward.w1", f, d, bias=False),
            *_fp8_linear(p + "feed_forward.w2", d, f, bias=False),
            *_fp8_linear(p + "feed_forward.w3", f, d, bias=False),
            *[_norm(p + n, d) for n in ("attention_norm1", "attention_norm2")],
            *[_norm(p + n, d) for n in ("ffn_norm1", "ffn_norm2")],
            *_fp8_linear(p + "adaln_modulation", 4 * d, a),
        ]
    return out


def text_encoder_tensors(spec: SyntheticSpec, vocab_size: int) -> list[TensorPlan]:
    """Qwen3VLModel state dict: FP8 LM linears, no lm_head, plus the vision tower
    (MODEL_NOTES#text-encoder-keys)."""
    h, hd, ff = spec.text_hidden_size, spec.text_head_dim, spec.text_intermediate_size
    q, kv = spec.text_num_attention_heads * hd, spec.text_num_key_value_heads * hd
    lm = "language_model."
    out = [_normal(lm + "embed_tokens.weight", (vocab_size, h), std=0.05), _norm(lm + "norm", h)]
    for i in range(spec.text_num_layers):
        p = f"{lm}layers.{i}."
        out += [
            *_fp8_linear(p + "self_attn.q_proj", q, h, bias=False),
            *_fp8_linear(p + "self_attn.k_proj", kv, h, bias=False),
            *_fp8_linear(p + "self_attn.v_proj", kv, h, bias=False),
            *_fp8_linear(p + "self_attn.o_proj", h, q, bias=False),
            _norm(p + "self_attn.q_norm", hd),
            _norm(p + "self_attn.k_norm", hd),
            *_fp8_linear(p + "mlp.gate_proj", ff, h, bias=False),
            *_fp8_linear(p + "mlp.up_proj", ff, h, bias=False),
            *_fp8_linear(p + "mlp.down_proj", h, ff, bias=False),
            _norm(p + "input_layernorm", h),
            _norm(p + "post_attention_layernorm", h),
        ]
    return out + _vision_tensors(spec)


def prompt_enhancer_head_tensors(spec: SyntheticSpec, vocab_size: int) -> list[TensorPlan]:
    """``Ideogram4PromptEnhancerHead``: one bias-free ``lm_head`` (vocab, hidden). BF16 like the
    Qwen3-VL-8B-Instruct head it holds [I: the repo's dtype is not stated; a bf16 save]."""
    h = spec.text_hidden_size
    return [_normal("lm_head.weight", (vocab_size, h), std=h**-0.5)]


def _vision_tensors(spec: SyntheticSpec) -> list[TensorPlan]:
    # transformers' Qwen3VLVisionModel keys and shapes (MODEL_NOTES#vision-tower; the reference
    # loads them strictly). Visual dtypes are [?]: nn.Linear weights FP8 + scale like
    # the LM (the official swap converts every nn.Linear); patch embed, norms, pos_embed BF16.
    c, ff, out_h = spec.vision_hidden_size, spec.vision_intermediate_size, spec.text_hidden_size
    merged = c * 4  # spatial_merge_size 2 -> 2x2 patches per merged token
    patch = (c, 3, 2, 16, 16)  # (hidden, rgb, temporal_patch, patch, patch)
    v = "visual."
    out = [
        _normal(v + "patch_embed.proj.weight", patch, std=(3 * 2 * 16 * 16) ** -0.5),
        _normal(v + "patch_embed.proj.bias", (c,), std=0.02),
        _normal(v + "pos_embed.weight", (spec.vision_num_position_embeddings, c), std=0.02),
    ]
    for i in range(spec.vision_depth):
        p = f"{v}blocks.{i}."
        out += [
            *_affine_norm(p + "norm1", c),
            *_affine_norm(p + "norm2", c),
            *_fp8_linear(p + "attn.qkv", 3 * c, c),
            *_fp8_linear(p + "attn.proj", c, c),
            *_fp8_linear(p + "mlp.linear_fc1", ff, c),
            *_fp8_linear(p + "mlp.linear_fc2", c, ff),
        ]
    mergers = [(v + "merger.", c)]
    mergers += [
        (f"{v}deepstack_merger_list.{j}.", merged)
        for j in range(len(spec.vision_deepstack_visual_indexes))
    ]
    for p, norm_width in mergers:
        out += [
            *_affine_norm(p + "norm", norm_width),
            *_fp8_linear(p + "linear_fc1", merged, merged),
            *_fp8_linear(p + "linear_fc2", out_h, merged),
        ]
    return out


def vae_tensors(spec: SyntheticSpec) -> list[TensorPlan]:
    """AutoencoderKLFlux2 state dict in diffusers naming, BF16 except the bn buffers
    (MODEL_NOTES#vae-keys)."""
    ch, n = spec.vae_block_out_channels, spec.vae_layers_per_block
    out = _conv("encoder.conv_in", ch[0], 3, 3)
    prev = ch[0]
    for i, c in enumerate(ch):
        for j in range(n):
            out += _resnet(f"encoder.down_blocks.{i}.resnets.{j}", prev if j == 0 else c, c)
        if i < len(ch) - 1:
            out += _conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", c, c, 3)
        prev = c
    out += _mid_block("encoder.mid_block", ch[-1])
    out += _affine_norm("encoder.conv_norm_out", ch[-1])
    out += _conv("encoder.conv_out", 2 * VAE_CHANNELS, ch[-1], 3)
    out += _conv("quant_conv", 2 * VAE_CHANNELS, 2 * VAE_CHANNELS, 1)
    out += _conv("post_quant_conv", VAE_CHANNELS, VAE_CHANNELS, 1)
    out += _conv("decoder.conv_in", ch[-1], VAE_CHANNELS, 3)
    out += _mid_block("decoder.mid_block", ch[-1])
    prev = ch[-1]
    for i, c in enumerate(reversed(ch)):
        for j in range(n + 1):
            out += _resnet(f"decoder.up_blocks.{i}.resnets.{j}", prev if j == 0 else c, c)
        if i < len(ch) - 1:
            out += _conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", c, c, 3)
        prev = c
    out += _affine_norm("decoder.conv_norm_out", ch[0])
    out += _conv("decoder.conv_out", 3, ch[0], 3)
    # F32 (the real dtype is [?]) to hold the constants exactly (MODEL_NOTES#latent-normalization).
    var = LATENT_SCALE.astype(np.float64) ** 2 - 1e-4
    bn = (PACKED_CHANNELS,)
    return out + [
        TensorPlan("bn.running_mean", "F32", bn, "const", values=tuple(LATENT_SHIFT.tolist())),
        TensorPlan("bn.running_var", "F32", bn, "const", values=tuple(var.tolist())),
        TensorPlan("bn.num_batches_tracked", "I64", (), "const", values=(0,)),
    ]


def _resnet(name: str, cin: int, cout: int) -> list[TensorPlan]:
    out = _affine_norm(f"{name}.norm1", cin) + _conv(f"{name}.conv1", cout, cin, 3)
    out += _affine_norm(f"{name}.norm2", cout) + _conv(f"{name}.conv2", cout, cout, 3)
    return out + (_conv(f"{name}.conv_shortcut", cout, cin, 1) if cin != cout else [])


def _mid_block(name: str, c: int) -> list[TensorPlan]:
    attn = f"{name}.attentions.0."
    out = _resnet(f"{name}.resnets.0", c, c) + _affine_norm(attn + "group_norm", c)
    for proj in ("to_q", "to_k", "to_v", "to_out.0"):
        out += [_normal(attn + proj + ".weight", (c, c), std=c**-0.5), _bias(attn + proj, c)]
    return out + _resnet(f"{name}.resnets.1", c, c)


def _fp8_linear(name: str, out: int, inp: int, bias: bool = True) -> list[TensorPlan]:
    weight = TensorPlan(f"{name}.weight", "F8_E4M3", (out, inp), "fp8", fan_in=inp)
    scale = TensorPlan(f"{name}.weight_scale", "F32", (out,), "scale", fan_in=inp)
    return [weight, scale] + ([_bias(name, out)] if bias else [])


def _conv(name: str, out: int, inp: int, k: int) -> list[TensorPlan]:
    weight = _normal(f"{name}.weight", (out, inp, k, k), std=(inp * k * k) ** -0.5)
    return [weight, _bias(name, out)]


def _affine_norm(name: str, n: int) -> list[TensorPlan]:
    return [_norm(name, n), _bias(name, n)]


def _norm(name: str, n: int) -> TensorPlan:
    return _normal(f"{name}.weight", (n,), mean=1.0, std=0.1)


def _bias(name: str, n: int) -> TensorPlan:
    return _normal(f"{name}.bias", (n,), std=0.02)


def _normal(name: str, shape: tuple[int, ...], mean: float = 0.0, std: float = 1.0) -> TensorPlan:
    return TensorPlan(name, "BF16", tuple(shape), "normal", mean=mean, std=std)
