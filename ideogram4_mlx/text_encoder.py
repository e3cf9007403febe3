"""The Ideogram 4 prompt encoder: Qwen3-VL-8B's text decoder, tapped at 13 layers
(MODEL_NOTES#text-encoder).

``Qwen3VLTextEncoder`` is the text half of ``Qwen3VLModel`` (the vision tower is never used).
Module attribute names equal the checkpoint keys under ``language_model.``, so the fp8 file
loads without a mapping table. Tokenizing and caching prompts is ``prompt.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ideogram4_mlx.config import BaseConfig, CheckpointError, HeaderCheck
from ideogram4_mlx.layers import RMSNorm, apply_rope, rope_cos_sin, silu
from ideogram4_mlx.weights import (
    DtypeRule,
    checked_config,
    dequantize_fp8_weights,
    load_component,
    strip_prefixes,
)

# 0-based decoder layers whose outputs (residual stream, before the final norm) are the
# features; diffusers calls this QWEN3_VL_ACTIVATION_LAYERS (MODEL_NOTES#text-encoder-taps).
TAP_LAYERS = (0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 35)

LM_PREFIXES = ("model.language_model.", "language_model.")
UNUSED_PREFIXES = ("visual.", "model.visual.", "lm_head.")
# Quantization (``quant_predicate``): the token embedding stays in float.
FLOAT_MODULES = frozenset({"embed_tokens"})


@dataclass(frozen=True)
class TextEncoderConfig(BaseConfig):
    """The ``text_config`` of ``text_encoder/config.json``; the defaults are Qwen3-VL-8B."""

    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    vocab_size: int = 151936
    rope_theta: float = 5_000_000

    layer_fields: ClassVar[tuple[str, ...]] = ("num_hidden_layers",)
    weight_prefixes: ClassVar[tuple[str, ...]] = LM_PREFIXES

    def __post_init__(self):
        if self.num_hidden_layers <= TAP_LAYERS[-1]:
            raise CheckpointError(
                f"text encoder has {self.num_hidden_layers} layers; the Ideogram 4 features "
                f"tap layer {TAP_LAYERS[-1]}, so at least {TAP_LAYERS[-1] + 1} are needed"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )

    @property
    def features_dim(self) -> int:
        """Width of one token's features: 13 taps x hidden_size (53248 for the real model)."""
        return self.hidden_size * len(TAP_LAYERS)

    def header_checks(self) -> list[HeaderCheck]:
        """Each size against a tensor of the checkpoint (rows: the same when quantized)."""
        layer = "layers.0.self_attn."
        return [
            HeaderCheck("num_hidden_layers", self.num_hidden_layers, "layers."),
            HeaderCheck("vocab_size", self.vocab_size, "embed_tokens.weight"),
            HeaderCheck("hidden_size", self.hidden_size, "embed_tokens.weight", axis=1),
            HeaderCheck("head_dim", self.head_dim, layer + "q_norm.weight"),
            HeaderCheck(
                "num_attention_heads x head_dim",
                self.num_attention_heads * self.head_dim,
                layer + "q_proj.weight",
            ),
            HeaderCheck(
                "num_key_value_heads x head_dim",
                self.num_key_value_heads * self.head_dim,
                layer + "k_proj.weight",
            ),
            HeaderCheck(
                "intermediate_size", self.intermediate_size, "layers.0.mlp.gate_proj.weight"
            ),
        ]

    @classmethod
    def from_dict(cls, d: dict) -> TextEncoderConfig:
        """From a whole ``Qwen3VLConfig`` dict or its ``text_config``; unknown keys are ignored.

        ``rope_theta`` is read from ``rope_parameters`` (transformers >= 5) or, in older
        configs, from ``text_config.rope_theta`` or the top level.
        """
        text = d.get("text_config", d)
        if not isinstance(text, dict):
            raise CheckpointError(f"text_config is {type(text).__name__}, expected an object")
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise CheckpointError(f"rope_parameters is {type(rope).__name__}, expected an object")
        if rope.get("rope_type", "default") != "default":
            raise CheckpointError(
                f"rope_type {rope['rope_type']!r} is not supported (Qwen3-VL uses 'default')"
            )
        theta = rope.get("rope_theta", text.get("rope_theta", d.get("rope_theta")))
        return super().from_dict(text if theta is None else {**text, "rope_theta": theta})


# ---------------------------------------------------------------------------------------------
# The decoder. Own blocks instead of mlx_lm.models.qwen3's: that block uses mx.fast.rms_norm (one
# rounding; HF rounds before the weight multiply, MODEL_NOTES#bf16-rounding), mx.fast.rope with one
# scalar offset per batch (no left-padding positions; HF rounds cos/sin to bf16 first) and a
# two-rounding SiLU. The names and the math are otherwise the same.


class Attention(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        hidden, head_dim = config.hidden_size, config.head_dim
        self.head_dim = head_dim
        self.q_proj = nn.Linear(hidden, config.num_attention_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, config.num_key_value_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, config.num_key_value_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(head_dim, config.rms_norm_eps)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, mask: mx.array | str) -> mx.array:
        b, length, _ = x.shape
        shape = (b, length, -1, self.head_dim)
        # QK-norm per head, then RoPE (MODEL_NOTES#text-encoder-forward); MLX's SDPA does GQA.
        q = apply_rope(self.q_norm(self.q_proj(x).reshape(shape)), cos, sin)
        k = apply_rope(self.k_norm(self.k_proj(x).reshape(shape)), cos, sin)
        v = self.v_proj(x).reshape(shape)
        o = mx.fast.scaled_dot_product_attention(
            q.transpose(0, 2, 1, 3),
            k.transpose(0, 2, 1, 3),
            v.transpose(0, 2, 1, 3),
            scale=self.head_dim**-0.5,
            mask=mask,
        )
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(b, length, -1))


class MLP(nn.Module):
    def __init__(self, dims: int, hidden_dims: int):
        super().__init__()
        self.gate_proj = nn.Linear(dims, hidden_dims, bias=False)
        self.up_proj = nn.Linear(dims, hidden_dims, bias=False)
        self.down_proj = nn.Linear(hidden_dims, dims, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def __call__(self, h: mx.array, cos: mx.array, sin: mx.array, mask: mx.array | str) -> mx.array:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


def left_padding(attention_mask: np.ndarray) -> np.ndarray:
    """Number of leading padding slots per row of a (B, T) 0/1 mask; only left padding is valid."""
    mask = np.asarray(attention_mask).astype(bool)
    pad = (~mask).cumprod(axis=1).sum(axis=1)
    expected = np.arange(mask.shape[1])[None] >= pad[:, None]
    if not (mask == expected).all():
        raise ValueError("attention_mask must be left-padded: zeros, then ones, in every row")
    return pad


def position_ids(pad: np.ndarray, length: int) -> np.ndarray:
    """(B, T) RoPE positions: real tokens count from 0, left-padding slots get 0
    (MODEL_NOTES#text-encoder-forward)."""
    return np.maximum(np.arange(length)[None] - np.asarray(pad)[:, None], 0)


def padded_causal_mask(pad: np.ndarray, length: int) -> mx.array:
    """(B, 1, T, T) bool: causal, left-padding keys hidden; padding queries see only themselves,
    so their rows stay finite (MODEL_NOTES#text-encoder-forward)."""
    i = np.arange(length)
    mask = (i[None, :] <= i[:, None])[None] & (i[None, None, :] >= np.asarray(pad)[:, None, None])
    mask |= np.eye(length, dtype=bool)[None]
    return mx.array(mask[:, None])


def stack_taps(taps: list[mx.array], attention_mask: mx.array | np.ndarray | None) -> mx.array:
    """13 x (B, T, D) -> (B, T, 13*D), interleaved: feature ``d*13 + slot``
    (MODEL_NOTES#text-encoder-taps).

    Padding rows are set to 0 with ``where`` (not a multiply), so nothing there can be NaN.
    """
    b, length, _ = taps[0].shape
    features = mx.stack(taps, axis=-1).reshape(b, length, -1)
    if attention_mask is None:
        return features
    keep = mx.array(np.asarray(attention_mask).astype(bool))[..., None]
    return mx.where(keep, features, mx.zeros((), features.dtype))


class Qwen3VLTextEncoder(nn.Module):
    """Qwen3-VL's text decoder returning the Ideogram 4 prompt features
    (MODEL_NOTES#text-encoder-taps, #text-encoder-forward)."""

    # Raw files (MODEL_NOTES#text-encoder-keys): LM linears F8_E4M3 + F32 scale [V], embedding
    # and norms BF16 [I]; a BF16 repack is all BF16. The vision tower's dtypes are [?] and unread.
    dtype_rule: ClassVar[DtypeRule] = DtypeRule(skip=UNUSED_PREFIXES)

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config) for _ in range(config.num_hidden_layers)]

    @property
    def dtype(self) -> mx.Dtype:
        return self.embed_tokens.weight.dtype

    def hidden_taps(
        self, input_ids: mx.array | np.ndarray, attention_mask: mx.array | np.ndarray | None = None
    ) -> list[mx.array]:
        """Outputs of the decoder layers in ``TAP_LAYERS``: 13 x (B, T, D) in the model dtype.

        Args:
            input_ids: (B, T) token ids, left-padded when rows differ in length.
            attention_mask: (B, T) 1 for real tokens, 0 for (left) padding; None = no padding.
        """
        input_ids = mx.array(np.asarray(input_ids))
        b, length = input_ids.shape
        pad = np.zeros(b, np.int64) if attention_mask is None else left_padding(attention_mask)
        positions = position_ids(pad, length)
        # Text-only MRoPE is 1-D RoPE, the id on all three axes (MODEL_NOTES#text-encoder-forward).
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        cos = mx.array(cos)[:, :, None].astype(self.dtype)
        sin = mx.array(sin)[:, :, None].astype(self.dtype)
        mask = padded_causal_mask(pad, length) if pad.any() else "causal"

        h = self.embed_tokens(input_ids)
        taps = []
        for i, layer in enumerate(self.layers[: TAP_LAYERS[-1] + 1]):
            h = layer(h, cos, sin, mask)
            if i in TAP_LAYERS:
                taps.append(h)
        return taps

    def __call__(
        self, input_ids: mx.array | np.ndarray, attention_mask: mx.array | np.ndarray | None = None
    ) -> mx.array:
        """Prompt features (B, T, 13*D) float32, padding rows 0 (arguments as ``hidden_taps``)."""
        taps = self.hidden_taps(input_ids, attention_mask)
        return stack_taps(taps, attention_mask).astype(mx.float32)

    @classmethod
    def from_pretrained(
        cls, component_dir: Path | str, dtype: mx.Dtype = mx.bfloat16
    ) -> Qwen3VLTextEncoder:
        """Load ``text_encoder/``: fp8 + per-row scales (dequantized once,
        MODEL_NOTES#fp8-dequantization) or plain bf16 weights, one file or shards with an index.
        ``dtype`` is the compute dtype."""
        return load_component(cls.build(component_dir), component_dir, dtype)

    @classmethod
    def build(cls, component_dir: Path | str) -> Qwen3VLTextEncoder:
        """The float skeleton (lazy arrays, no memory yet) of a component folder, its
        config.json first checked against the weight files' headers."""
        return cls(checked_config(TextEncoderConfig, component_dir))

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Checkpoint tensors -> parameters. Pure and idempotent.

        Keeps ``language_model.*`` (prefix stripped), drops the vision tower and any LM head,
        drops the final ``norm`` (never applied to the features, MODEL_NOTES#text-encoder-taps)
        and dequantizes fp8.
        """
        kept = {k: v for k, v in weights.items() if not k.startswith(UNUSED_PREFIXES)}
        kept = strip_prefixes(kept, LM_PREFIXES)
        kept.pop("norm.weight", None)
        return dequantize_fp8_weights(kept)

    def quant_predicate(self, path: str, module: nn.Module) -> bool | dict:
        """False keeps the layer at ``path`` in float, True quantizes it at the plan's bits."""
        return not set(path.split(".")) & FLOAT_MODULES
