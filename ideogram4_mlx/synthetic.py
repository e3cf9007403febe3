"""Synthetic Ideogram 4 checkpoints in the exact layout of `ideogram-ai/ideogram-4-fp8`.

The real weights are gated, so every loading, conversion and generation test runs on folders made
here, through the same code that reads the real snapshot. Folder and file names, config keys,
safetensors key names, shapes and dtypes follow spec section A; only the sizes (SyntheticSpec) and
the values (seeded random) differ. Files are streamed tensor by tensor and chunk by chunk, so even
the full-size 9.3 GB transformer file is written with bounded memory.

    write_synthetic_checkpoint("/tmp/ideo4-tiny")                       # whole checkpoint, < 2 s
    write_synthetic_checkpoint(dst, "full", components=("transformer",))  # one real-size DiT file
"""

import functools
import json
import os
import shutil
import tempfile
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from statistics import NormalDist

import numpy as np
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from tqdm import tqdm

from ideogram4_mlx.constants import LATENT_SCALE, LATENT_SHIFT
from ideogram4_mlx.files import move_into_place
from ideogram4_mlx.hub import check_components

COMPONENTS = (
    "transformer",
    "unconditional_transformer",
    "text_encoder",
    "tokenizer",
    "vae",
    "scheduler",
)

# Versions recorded in the real snapshot's configs (spec A.1, D.5); fixed so output is reproducible.
DIFFUSERS_VERSION = "0.42.1"
TRANSFORMERS_VERSION = "5.8.0"

DIT_IN_CHANNELS = 128  # 32 VAE channels x 2x2 patch
LATENT_CHANNELS = 32
NUM_TEXT_TAPS = 13  # QWEN3_VL_ACTIVATION_LAYERS has 13 entries, the last is layer 35
FP8_MAX = 448.0


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
    # VAE (AutoencoderKLFlux2); latent_channels is always 32 so the DiT in_channels is 128
    vae_block_out_channels: tuple[int, int, int, int]
    vae_layers_per_block: int
    vae_norm_num_groups: int
    # Qwen3-VL vision tower: stored in the real file, never run; tiny defaults keep files small.
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
                raise ValueError(f"SyntheticSpec: {message} (got {self})")

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


def write_synthetic_checkpoint(
    dst,
    spec: SyntheticSpec | str = "tiny",
    *,
    seed: int = 0,
    components=COMPONENTS,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write a seeded synthetic checkpoint folder at `dst` and return its path.

    `spec` is a SyntheticSpec or a SYNTHETIC_PRESETS name. `components` picks the sub-folders
    (model_index.json is always written). Files are built in a temporary sibling folder that is
    renamed into place at the end, so `dst` never holds a half-written checkpoint. The same
    spec and seed give byte-identical files.
    """
    spec = resolve_spec(spec)
    components = check_components(components, COMPONENTS)
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(
            f"{dst} already exists; pass overwrite=True (--force on the command line) to replace it"
        )
    files = _plan_files(spec, components)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent))
    try:
        total = sum(f.size for f in files)
        with tqdm(
            total=total, unit="B", unit_scale=True, desc=dst.name, disable=not progress
        ) as bar:
            for f in files:
                _write_file(tmp, f, seed, bar.update)
        move_into_place(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def resolve_spec(spec: SyntheticSpec | str) -> SyntheticSpec:
    if isinstance(spec, SyntheticSpec):
        return spec
    if spec not in SYNTHETIC_PRESETS:
        raise ValueError(f"unknown preset {spec!r}; valid presets: {', '.join(SYNTHETIC_PRESETS)}")
    return SYNTHETIC_PRESETS[spec]


# ---------------------------------------------------------------------------------------------
# What goes where


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
            int(np.prod(self.shape, dtype=np.int64)) * np.dtype(_NUMPY_DTYPES[self.dtype]).itemsize
        )


@dataclass(frozen=True)
class _File:
    path: str  # relative to the checkpoint root
    text: str | None = None
    tensors: tuple[TensorPlan, ...] = ()

    @property
    def size(self) -> int:
        if self.text is not None:
            return len(self.text.encode("utf-8"))
        return len(safetensors_header(self.tensors)) + sum(t.nbytes for t in self.tensors)


def _plan_files(spec: SyntheticSpec, components: tuple[str, ...]) -> list[_File]:
    files = [_File("model_index.json", text=_diffusers_json(_model_index()))]
    if "scheduler" in components:
        files.append(_File("scheduler/scheduler_config.json", text=_diffusers_json(_scheduler())))
    if "text_encoder" in components:
        vocab = text_vocab_size(spec)
        files.append(_File("text_encoder/config.json", text=_text_encoder_json(spec, vocab)))
        tensors = tuple(text_encoder_tensors(spec, vocab))
        files.append(_File("text_encoder/model.safetensors", tensors=tensors))
    if "tokenizer" in components:
        files += [
            _File(f"tokenizer/{name}", text=text) for name, text in tokenizer_files()["files"]
        ]
    for folder in ("transformer", "unconditional_transformer"):
        if folder in components:
            files.append(_File(f"{folder}/config.json", text=_diffusers_json(_dit_config(spec))))
            tensors = tuple(dit_tensors(spec))
            files.append(_File(f"{folder}/diffusion_pytorch_model.safetensors", tensors=tensors))
    if "vae" in components:
        files.append(_File("vae/config.json", text=_diffusers_json(_vae_config(spec))))
        files.append(
            _File("vae/diffusion_pytorch_model.safetensors", tensors=tuple(vae_tensors(spec)))
        )
    return files


def _write_file(root: Path, f: _File, seed: int, on_bytes) -> None:
    path = root / f.path
    path.parent.mkdir(parents=True, exist_ok=True)
    if f.text is not None:
        path.write_text(f.text, encoding="utf-8", newline="\n")
        on_bytes(len(f.text.encode("utf-8")))
        return
    # The folder is part of the RNG key so the two DiTs get different weights.
    _write_safetensors(path, f.tensors, seed, Path(f.path).parent.name, on_bytes)


# ---------------------------------------------------------------------------------------------
# Configs (diffusers and transformers write sorted keys, indent 2, trailing newline)


def _diffusers_json(config: dict) -> str:
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def _model_index() -> dict:
    dit = ["diffusers", "Ideogram4Transformer2DModel"]
    return {
        "_class_name": "Ideogram4Pipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3VLModel"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],  # [?] a transformers 4.x save says ...Fast
        "transformer": dit,
        "unconditional_transformer": dit,
        "vae": ["diffusers", "AutoencoderKLFlux2"],
    }


def _scheduler() -> dict:
    # Real contents are [?] (spec A.1): diffusers defaults with no shifting, which is what the
    # Ideogram pipeline assumes (it divides by num_train_timesteps and passes its own sigmas).
    return {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "base_image_seq_len": 256,
        "base_shift": 0.5,
        "invert_sigmas": False,
        "max_image_seq_len": 4096,
        "max_shift": 1.15,
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "shift_terminal": None,
        "stochastic_sampling": False,
        "time_shift_type": "exponential",
        "use_beta_sigmas": False,
        "use_dynamic_shifting": False,
        "use_exponential_sigmas": False,
        "use_karras_sigmas": False,
    }


def _dit_config(spec: SyntheticSpec) -> dict:
    return {
        "_class_name": "Ideogram4Transformer2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "adaln_dim": spec.dit_adaln_dim,
        "attention_head_dim": spec.dit_attention_head_dim,
        "in_channels": DIT_IN_CHANNELS,
        "intermediate_size": spec.dit_intermediate_size,
        "llm_features_dim": spec.llm_features_dim,
        "mrope_section": dit_mrope_section(spec.dit_attention_head_dim),
        "norm_eps": 1e-05,
        "num_attention_heads": spec.dit_num_attention_heads,
        "num_layers": spec.dit_num_layers,
        "rope_theta": 5000000,
    }


def dit_mrope_section(head_dim: int) -> list[int]:
    """(t, h, w) sections: the real [24, 20, 20] whenever the 60 interleaved h/w slots fit
    (head_dim >= 120), else scaled down (floor) so slots 1, 4, ... and 2, 5, ... still exist."""
    if head_dim >= 120:
        return [24, 20, 20]
    return [24 * head_dim // 256, 20 * head_dim // 256, 20 * head_dim // 256]


def text_mrope_section(head_dim: int) -> list[int]:
    """Qwen3-VL sections must sum to head_dim/2: the real [24, 20, 20] at head_dim 128; h and w
    are scaled down (floor) and t takes the rest, which keeps the 3-axis interleave valid."""
    hw = 20 * head_dim // 128
    return [head_dim // 2 - 2 * hw, hw, hw]


def _vae_config(spec: SyntheticSpec) -> dict:
    return {
        "_class_name": "AutoencoderKLFlux2",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "batch_norm_eps": 0.0001,
        "batch_norm_momentum": 0.1,
        "block_out_channels": list(spec.vae_block_out_channels),
        "decoder_block_out_channels": None,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3,
        "latent_channels": LATENT_CHANNELS,
        "layers_per_block": spec.vae_layers_per_block,
        "mid_block_add_attention": True,
        "norm_num_groups": spec.vae_norm_num_groups,
        "out_channels": 3,
        "patch_size": [2, 2],
        "sample_size": 1024,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "use_post_quant_conv": True,
        "use_quant_conv": True,
    }


def _text_encoder_json(spec: SyntheticSpec, vocab_size: int) -> str:
    ids = tokenizer_files()["special_ids"]
    text = {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "dtype": "bfloat16",
        "eos_token_id": ids["<|im_end|>"],
        "head_dim": spec.text_head_dim,
        "hidden_act": "silu",
        "hidden_size": spec.text_hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": spec.text_intermediate_size,
        "max_position_embeddings": 262144,
        "model_type": "qwen3_vl_text",
        "num_attention_heads": spec.text_num_attention_heads,
        "num_hidden_layers": spec.text_num_layers,
        "num_key_value_heads": spec.text_num_key_value_heads,
        "pad_token_id": None,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {
            "mrope_interleaved": True,
            "mrope_section": text_mrope_section(spec.text_head_dim),
            "rope_theta": 5000000,
            "rope_type": "default",
        },
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    vision = {
        "deepstack_visual_indexes": list(spec.vision_deepstack_visual_indexes),
        "depth": spec.vision_depth,
        "dtype": "bfloat16",
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": spec.vision_hidden_size,
        "in_channels": 3,
        "initializer_range": 0.02,
        "intermediate_size": spec.vision_intermediate_size,
        "model_type": "qwen3_vl_vision",
        "num_heads": spec.vision_num_heads,
        "num_position_embeddings": spec.vision_num_position_embeddings,
        "out_hidden_size": spec.text_hidden_size,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    config = {
        "architectures": ["Qwen3VLModel"],
        "dtype": "bfloat16",
        "image_token_id": ids["<|image_pad|>"],
        "model_type": "qwen3_vl",
        "text_config": text,
        "tie_word_embeddings": False,
        "transformers_version": TRANSFORMERS_VERSION,
        "video_token_id": ids["<|video_pad|>"],
        "vision_config": vision,
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        # Added after the transformers save: last and out of key order, as DiffSynth mirrors it.
        "ideogram_fp8_weight_only": True,
    }
    return json.dumps(config, indent=2) + "\n"


# ---------------------------------------------------------------------------------------------
# Tensor lists. Values keep a forward pass in range: linear weights std 1/sqrt(fan_in) (so
# activations keep their scale), norm weights 1 + 0.1 N, biases 0.02 N, the image indicator
# 0.5 N (comparable to input_proj outputs), text embeddings 0.05 N (the first decoder layer adds
# O(1) and the taps are re-normalized by llm_cond_norm).


def dit_tensors(spec: SyntheticSpec) -> list[TensorPlan]:
    """Both DiT files (spec A.3): fused qkv/o, every nn.Linear F8_E4M3 + F32 weight_scale."""
    d, a, f = spec.dit_hidden_size, spec.dit_adaln_dim, spec.dit_intermediate_size
    out = [
        *_fp8_linear("input_proj", d, DIT_IN_CHANNELS),
        _norm("llm_cond_norm", spec.llm_features_dim),
        *_fp8_linear("llm_cond_proj", d, spec.llm_features_dim),
        *_fp8_linear("t_embedding.mlp_in", d, d),
        *_fp8_linear("t_embedding.mlp_out", d, d),
        *_fp8_linear("adaln_proj", a, d),
        _normal("embed_image_indicator.weight", (2, d), std=0.5),
        *_fp8_linear("final_layer.linear", DIT_IN_CHANNELS, d),
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
    """Qwen3VLModel state dict (spec A.4): FP8 LM linears, no lm_head, plus the vision tower."""
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


def _vision_tensors(spec: SyntheticSpec) -> list[TensorPlan]:
    # Visual dtypes are [?] in the spec: nn.Linear weights FP8 + scale like the LM (the official
    # swap converts every nn.Linear), the Conv3d patch embed, LayerNorms and pos_embed BF16.
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
    """AutoencoderKLFlux2 state dict in diffusers naming (spec F.3), BF16 except the bn buffers."""
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
    out += _conv("encoder.conv_out", 2 * LATENT_CHANNELS, ch[-1], 3)
    out += _conv("quant_conv", 2 * LATENT_CHANNELS, 2 * LATENT_CHANNELS, 1)
    out += _conv("post_quant_conv", LATENT_CHANNELS, LATENT_CHANNELS, 1)
    out += _conv("decoder.conv_in", ch[-1], LATENT_CHANNELS, 3)
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
    # F32 (real dtype [?]) so the buffers can hold the Ideogram constants exactly (spec F.4).
    var = LATENT_SCALE.astype(np.float64) ** 2 - 1e-4
    return out + [
        TensorPlan("bn.running_mean", "F32", (128,), "const", values=tuple(LATENT_SHIFT.tolist())),
        TensorPlan("bn.running_var", "F32", (128,), "const", values=tuple(var.tolist())),
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


# ---------------------------------------------------------------------------------------------
# Tokenizer: a real byte-level BPE (Qwen2 pre-tokenizer) trained at write time on a built-in
# corpus, with the Qwen special tokens appended in Qwen's order.

QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# (content, special) in the order of ids 151643..151668 of the real vocabulary.
QWEN_ADDED_TOKENS = (
    *[(t, True) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>")],
    *[(t, True) for t in ("<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>")],
    *[(t, True) for t in ("<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")],
    *[(t, True) for t in ("<|image_pad|>", "<|video_pad|>")],
    *[(t, False) for t in ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>")],
    *[(t, False) for t in ("<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")],
    *[(t, False) for t in ("<tool_response>", "</tool_response>", "<think>", "</think>")],
)
BPE_VOCAB_SIZE = 2048 - len(QWEN_ADDED_TOKENS)


@functools.cache
def tokenizer_files() -> dict:
    """{"files": [(name, text)], "special_ids": {token: id}, "vocab_size": ids in use}."""
    vocab, merges = _train_bpe()
    special_ids = {t: len(vocab) + i for i, (t, _) in enumerate(QWEN_ADDED_TOKENS)}
    flags = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False}
    added = [
        {"id": special_ids[t], "content": t, **flags, "special": special}
        for t, special in QWEN_ADDED_TOKENS
    ]
    files = [
        (
            "tokenizer.json",
            json.dumps(_tokenizer_json(vocab, merges, added), indent=2, ensure_ascii=False),
        ),
        (
            "tokenizer_config.json",
            json.dumps(_tokenizer_config(added), indent=2, ensure_ascii=False) + "\n",
        ),
        ("vocab.json", json.dumps(vocab, ensure_ascii=False)),
        ("merges.txt", "#version: 0.2\n" + "".join(m + "\n" for m in merges)),
        # [?] where the real tokenizer/ keeps the template: a transformers >= 4.47 save (the
        # snapshot's configs say 5.8.0) writes chat_template.jinja, not a tokenizer_config key.
        ("chat_template.jinja", _data_text("qwen3_vl_chat_template.jinja")),
    ]
    size = len(vocab) + len(QWEN_ADDED_TOKENS)
    return {"files": files, "special_ids": special_ids, "vocab_size": size}


def text_vocab_size(spec: SyntheticSpec) -> int:
    """Embedding rows of the text encoder: the spec's, or the tokenizer's rounded up to 128."""
    return spec.text_vocab_size or -(-tokenizer_files()["vocab_size"] // 128) * 128


def _train_bpe() -> tuple[dict[str, int], list[str]]:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _qwen_pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_training_corpus(), trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return model["vocab"], merges


def _qwen_pre_tokenizer():
    split = pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False)
    return pre_tokenizers.Sequence(
        [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )


def _tokenizer_json(vocab: dict, merges: list[str], added: list[dict]) -> dict:
    byte_level = {"add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    split = {"type": "Split", "pattern": {"Regex": QWEN_PRETOKENIZE_REGEX}}
    split |= {"behavior": "Isolated", "invert": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [split, {"type": "ByteLevel", **byte_level}],
        },
        "post_processor": {"type": "ByteLevel", **byte_level},
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def _tokenizer_config(added: list[dict]) -> dict:
    fields = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
    decoder = {str(t["id"]): {k: t[k] for k in fields} for t in added}
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [t["content"] for t in added if t["special"]][1:],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 262144,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _training_corpus() -> list[str]:
    """Built-in lines of English prompts, minified JSON captions, accented, CJK and emoji text."""
    return _data_text("tokenizer_corpus.txt").splitlines()


def _data_text(name: str) -> str:
    return (resources.files("ideogram4_mlx") / "data" / name).read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Streaming safetensors writer (header layout as safetensors' own serializer writes it)

_NUMPY_DTYPES = {"I64": "<i8", "F32": "<f4", "BF16": "<u2", "F8_E4M3": "u1"}
# safetensors orders tensors by dtype (larger alignment first), then by name.
_DTYPE_ORDER = ("I64", "F32", "BF16", "F8_E4M3")
CHUNK_ELEMENTS = 1 << 24  # <= 32 MB of output per chunk


def safetensors_header(tensors) -> bytes:
    """The 8-byte length + JSON header for `tensors`, in safetensors' own order and padding."""
    header = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in _ordered(tensors):
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _ordered(tensors) -> list[TensorPlan]:
    return sorted(tensors, key=lambda t: (_DTYPE_ORDER.index(t.dtype), t.name))


def _write_safetensors(path: Path, tensors, seed: int, folder: str, on_bytes) -> None:
    """Stream `tensors` to `path`: worker threads fill chunks and pwrite them at their offsets."""
    header = safetensors_header(tensors)
    workers = min(4, os.cpu_count() or 1)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _pwrite_all(fd, header, 0)
        on_bytes(len(header))
        with ThreadPoolExecutor(workers) as pool:
            pending = deque()
            try:
                for job in _chunk_jobs(_ordered(tensors), seed, folder, len(header)):
                    pending.append(pool.submit(_write_chunk, fd, *job))
                    if len(pending) >= workers + 2:  # bounds memory to a few chunks
                        on_bytes(pending.popleft().result())
                while pending:
                    on_bytes(pending.popleft().result())
            finally:
                for future in pending:
                    future.cancel()
    finally:
        os.close(fd)


def _chunk_jobs(ordered: list[TensorPlan], seed: int, folder: str, offset: int):
    for t in ordered:
        rows, cols = t.rows_cols
        row_bytes = t.nbytes // rows
        step = max(1, CHUNK_ELEMENTS // max(cols, 1))
        key = zlib.crc32(f"{folder}/{t.name}".encode())
        for i, r0 in enumerate(range(0, rows, step)):
            yield t, (seed, key, i), r0, min(rows, r0 + step), offset + r0 * row_bytes
        offset += t.nbytes


def _write_chunk(fd: int, t: TensorPlan, entropy, r0: int, r1: int, offset: int) -> int:
    data = _fill(t, entropy, r0, r1)
    _pwrite_all(fd, data, offset)
    return data.nbytes


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _fill(t: TensorPlan, entropy: tuple[int, int, int], r0: int, r1: int) -> np.ndarray:
    """Rows r0:r1 of `t` as little-endian array, from an RNG stream owned by this chunk."""
    rng = np.random.default_rng(entropy)
    cols = t.rows_cols[1]
    n = (r1 - r0) * cols
    if t.init == "fp8":
        return _fp8_rows(rng, r1 - r0, cols, t.fan_in)
    if t.init == "scale":
        z = _normal_quantiles()[_random_u16(rng, n)]
        return (np.exp(0.1 * z) / (t.fan_in**0.5 * _fp8_sigma(t.fan_in))).astype("<f4")
    if t.init == "normal":
        return _bf16_table(t.mean, t.std)[_random_u16(rng, n)]
    return np.asarray(t.values[r0 * cols : r1 * cols], dtype=_NUMPY_DTYPES[t.dtype])


def _fp8_rows(rng: np.random.Generator, rows: int, cols: int, fan_in: int) -> np.ndarray:
    codes = _fp8_table(fan_in)[_random_u16(rng, rows * cols)].reshape(rows, cols)
    # The official quantizer maps each row's largest |w| to exactly 448 (0x7E); pin it so.
    peak = np.argmax(codes & 0x7F, axis=1)
    r = np.arange(rows)
    codes[r, peak] = (codes[r, peak] & 0x80) | 0x7E
    return codes


def _random_u16(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.bit_generator.random_raw((n + 3) // 4).view("<u2")[:n]


# Values are drawn by inverse-CDF lookup: a uniform 16-bit index picks one of 65536 normal
# quantiles whose encoded form is precomputed. Exact N(0,1) to 1/65536 in probability, and fast
# enough (one gather per element) to write the 9.3 GB DiT at about disk speed.


@functools.cache
def _normal_quantiles() -> np.ndarray:
    normal = NormalDist()
    return np.array([normal.inv_cdf((i + 0.5) / 65536) for i in range(65536)])


def _fp8_sigma(fan_in: int) -> float:
    """Std of the fp8 codes so a row of fan_in draws peaks near 448 (E max|z| ~ sqrt(2 ln n))."""
    return FP8_MAX / np.sqrt(2 * np.log(max(fan_in, 4)))


@functools.cache
def _fp8_table(fan_in: int) -> np.ndarray:
    return encode_e4m3(_normal_quantiles() * _fp8_sigma(fan_in))


@functools.cache
def _bf16_table(mean: float, std: float) -> np.ndarray:
    bits = (mean + std * _normal_quantiles()).astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")


# ---------------------------------------------------------------------------------------------
# FP8 E4M3FN (bias 7, no infinities, 0x7F/0xFF NaN, max 448)


def decode_e4m3(codes) -> np.ndarray:
    """E4M3FN bytes -> float32 (spec A.2 decode)."""
    codes = np.asarray(codes, dtype=np.uint8)
    e = ((codes >> 3) & 0xF).astype(np.int32)
    m = (codes & 0x7).astype(np.float32)
    mag = np.where(e == 0, m / 8 * 2.0**-6, (1 + m / 8) * np.exp2(e - 7))
    mag = np.where((codes & 0x7F) == 0x7F, np.nan, mag)
    return np.where(codes & 0x80, -mag, mag).astype(np.float32)


_E4M3_POSITIVE = decode_e4m3(np.arange(0x7F)).astype(np.float64)  # codes 0x00..0x7E, ascending


def encode_e4m3(x) -> np.ndarray:
    """float -> E4M3FN bytes, round to nearest even, saturating at +-448 (never a NaN code)."""
    x = np.asarray(x, dtype=np.float64)
    if np.isnan(x).any():
        raise ValueError("encode_e4m3: input contains NaN")
    a = np.minimum(np.abs(x), FP8_MAX)
    hi = np.clip(np.searchsorted(_E4M3_POSITIVE, a), 1, 0x7E)
    lo = hi - 1
    d_lo, d_hi = a - _E4M3_POSITIVE[lo], _E4M3_POSITIVE[hi] - a
    take_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    code = np.where(take_hi, hi, lo).astype(np.uint8)
    return code | (np.signbit(x).astype(np.uint8) << 7)
