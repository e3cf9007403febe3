"""The Ideogram 4 prompt encoder: Qwen3-VL-8B's text decoder, tapped at 13 layers (spec §D).

``Qwen3VLTextEncoder`` is the text half of ``Qwen3VLModel`` (the vision tower is never used).
Module attribute names equal the checkpoint keys under ``language_model.``, so the fp8 file
loads without a mapping table. ``PromptEncoder`` owns the tokenizer, the chat template, the
model and a small cache of encoded prompts.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

# PreTrainedTokenizerFast, not AutoTokenizer: the auto mapping imports torch when it is installed.
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ideogram4_mlx.quantization import load_component
from ideogram4_mlx.transformer import RMSNorm, apply_rope, rope_inv_freq, silu
from ideogram4_mlx.weights import (
    CheckpointError,
    dequantize_fp8_weights,
    read_json,
    strip_prefixes,
)

# 0-based decoder layers whose outputs (residual stream, before the final norm) are the
# features; diffusers calls this QWEN3_VL_ACTIVATION_LAYERS (spec §D.2).
TAP_LAYERS = (0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 35)
# diffusers, mflux and DiffSynth cap the templated prompt at 2048 tokens (the official code
# allows 8192). We follow the ports so that one prompt gives the same image in all of them.
MAX_TEXT_TOKENS = 2048
# Any id works for padding slots: they are masked out of attention and zeroed in the output.
PAD_TOKEN_ID = 0

LM_PREFIXES = ("model.language_model.", "language_model.")
UNUSED_PREFIXES = ("visual.", "model.visual.", "lm_head.")


@dataclass(frozen=True)
class TextEncoderConfig:
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

    @classmethod
    def from_dict(cls, d: dict) -> TextEncoderConfig:
        """From a whole ``Qwen3VLConfig`` dict or its ``text_config``; unknown keys are ignored.

        ``rope_theta`` is read from ``rope_parameters`` (transformers >= 5) or, in older
        configs, from ``text_config.rope_theta`` or the top level.
        """
        text = d.get("text_config", d)
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        if rope.get("rope_type", "default") != "default":
            raise CheckpointError(
                f"rope_type {rope['rope_type']!r} is not supported (Qwen3-VL uses 'default')"
            )
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in text.items() if k in known}
        theta = rope.get("rope_theta", text.get("rope_theta", d.get("rope_theta")))
        if theta is not None:
            kwargs["rope_theta"] = theta
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: Path) -> TextEncoderConfig:
        return cls.from_dict(read_json(path))


# ---------------------------------------------------------------------------------------------
# The decoder. Own blocks instead of mlx_lm.models.qwen3's: that block uses mx.fast.rms_norm
# (one rounding; HF rounds before the weight multiply, spec §D.4), mx.fast.rope with one scalar
# offset per batch (no left-padding positions; HF rounds cos/sin to bf16 first) and a two-rounding
# SiLU. The names and the math are otherwise the same.


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
        # QK-norm per head, then RoPE (spec §D.3); GQA is native in MLX's SDPA.
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
    """(B, T) RoPE positions: real tokens count from 0, left-padding slots get 0 (spec §D.3)."""
    return np.maximum(np.arange(length)[None] - np.asarray(pad)[:, None], 0)


def padded_causal_mask(pad: np.ndarray, length: int) -> mx.array:
    """(B, 1, T, T) bool: causal, left-padding keys hidden; padding queries see only themselves,
    so their rows stay finite (spec §I.16)."""
    i = np.arange(length)
    mask = (i[None, :] <= i[:, None])[None] & (i[None, None, :] >= np.asarray(pad)[:, None, None])
    mask |= np.eye(length, dtype=bool)[None]
    return mx.array(mask[:, None])


def rope_cos_sin(position_ids: np.ndarray, head_dim: int, theta: float) -> tuple[np.ndarray, ...]:
    """cos/sin (B, T, head_dim) fp32 for (B, T) positions: text-only MRoPE is plain 1-D RoPE
    (all three axes share the id, spec §D.3). fp32 angles, as HF forms them, then exact cos/sin.
    """
    angles = position_ids.astype(np.float32)[..., None] * rope_inv_freq(head_dim, theta)
    angles = np.concatenate([angles, angles], axis=-1).astype(np.float64)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def stack_taps(taps: list[mx.array], attention_mask: mx.array | np.ndarray | None) -> mx.array:
    """13 x (B, T, D) -> (B, T, 13*D), interleaved: feature ``d*13 + slot`` (spec §D.2).

    Padding rows are set to 0 with ``where`` (not a multiply), so nothing there can be NaN.
    """
    b, length, _ = taps[0].shape
    features = mx.stack(taps, axis=-1).reshape(b, length, -1)
    if attention_mask is None:
        return features
    keep = mx.array(np.asarray(attention_mask).astype(bool))[..., None]
    return mx.where(keep, features, mx.zeros((), features.dtype))


class Qwen3VLTextEncoder(nn.Module):
    """Qwen3-VL's text decoder returning the Ideogram 4 prompt features (spec §D.2-D.3)."""

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
        """Load ``text_encoder/``: fp8 + per-row scales (dequantized once, spec §A.2) or plain
        bf16 weights, one file or shards with an index. ``dtype`` is the compute dtype."""
        component_dir = Path(component_dir)
        config = TextEncoderConfig.from_file(component_dir / "config.json")
        model = cls(config)
        return load_component(model, component_dir, sanitize, dtype)


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Checkpoint tensors -> ``Qwen3VLTextEncoder`` parameters. Pure and idempotent.

    Keeps ``language_model.*`` (prefix stripped), drops the vision tower and any LM head,
    drops the final ``norm`` (never applied to the features, spec §D.2) and dequantizes fp8.
    """
    kept = {k: v for k, v in weights.items() if not k.startswith(UNUSED_PREFIXES)}
    kept = strip_prefixes(kept, LM_PREFIXES)
    kept.pop("norm.weight", None)
    return dequantize_fp8_weights(kept)


# ---------------------------------------------------------------------------------------------
# Prompts -> token ids -> cached features.


def canonical_prompt(prompt: str) -> str:
    """A JSON-object caption minified with literal UTF-8 and its key order kept; else as given."""
    try:
        obj = json.loads(prompt)
    except ValueError:
        return prompt
    if not isinstance(obj, dict):
        return prompt
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of one prompt in the Qwen3-VL chat template, no system prompt (spec §D.1).

    Raises ValueError when the result is longer than ``MAX_TEXT_TOKENS``.
    """
    messages = [{"role": "user", "content": [{"type": "text", "text": canonical_prompt(prompt)}]}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) > MAX_TEXT_TOKENS:
        raise ValueError(
            f"prompt is {len(ids)} tokens long in the chat template; the limit is "
            f"{MAX_TEXT_TOKENS} tokens. Shorten the prompt."
        )
    return ids


def pad_left(rows: list[list[int]], pad_id: int = PAD_TOKEN_ID) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad id lists to (B, T_max) ids and a 0/1 attention mask (int32)."""
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), length), dtype=np.int32)
    for b, row in enumerate(rows):
        ids[b, length - len(row) :] = row
        mask[b, length - len(row) :] = 1
    return ids, mask


class EncodedPrompts(NamedTuple):
    features: mx.array  # (B, T_max, 13*D) float32, left-padded, padding rows 0
    lengths: list[int]  # real tokens per row; row b holds them in [T_max - lengths[b], T_max)


class PromptEncoder:
    """Tokenizer + text encoder + an LRU cache of encoded prompts (keyed by the prompt alone).

    ``release_model()`` frees the model and keeps the cache: cached prompts still encode, a new
    prompt raises ``RuntimeError`` until ``load_model()`` is called (nothing reloads behind the
    caller's back, so peak memory stays under the pipeline's control).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        model: Qwen3VLTextEncoder | None,
        cache_size: int = 4,
        model_dir: Path | str | None = None,
        dtype: mx.Dtype = mx.bfloat16,
    ):
        self.tokenizer = tokenizer
        self.model = model
        self.cache_size = cache_size
        self.model_dir = model_dir
        self.dtype = dtype
        # canonical prompt -> (n, 13*D) features in the model dtype (bf16 halves the memory).
        self._cache: OrderedDict[str, mx.array] = OrderedDict()

    @classmethod
    def from_pretrained(
        cls, checkpoint_dir: Path | str, dtype: mx.Dtype = mx.bfloat16, cache_size: int = 4
    ) -> PromptEncoder:
        """Load ``tokenizer/`` and ``text_encoder/`` of a checkpoint folder (offline)."""
        checkpoint_dir = Path(checkpoint_dir)
        tokenizer_dir = checkpoint_dir / "tokenizer"
        if not tokenizer_dir.is_dir():
            raise CheckpointError(f"{tokenizer_dir}: tokenizer folder not found")
        tokenizer = PreTrainedTokenizerFast.from_pretrained(
            str(tokenizer_dir), local_files_only=True
        )
        model_dir = checkpoint_dir / "text_encoder"
        model = Qwen3VLTextEncoder.from_pretrained(model_dir, dtype=dtype)
        return cls(tokenizer, model, cache_size=cache_size, model_dir=model_dir, dtype=dtype)

    def token_ids(self, prompt: str) -> list[int]:
        """``prompt_token_ids`` with this encoder's tokenizer."""
        return prompt_token_ids(self.tokenizer, prompt)

    def release_model(self) -> None:
        """Free the text encoder's weights; the tokenizer and the cache stay."""
        self.model = None
        mx.clear_cache()

    def load_model(self) -> None:
        """(Re)load the text encoder after ``release_model()``."""
        if self.model is None:
            if self.model_dir is None:
                raise RuntimeError("this PromptEncoder was built without a model folder")
            self.model = Qwen3VLTextEncoder.from_pretrained(self.model_dir, dtype=self.dtype)

    def encode(self, prompts: str | Sequence[str]) -> EncodedPrompts:
        """Features of one prompt or a batch (left padding); repeated prompts hit the cache."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts to encode")
        keys = [canonical_prompt(p) for p in prompts]
        rows = {k: self._cache[k] for k in keys if k in self._cache}
        missing = list(dict.fromkeys(k for k in keys if k not in rows))
        if missing:
            rows.update(self._run(missing))
        for key in keys:
            self._remember(key, rows[key])

        lengths = [rows[k].shape[0] for k in keys]
        t_max = max(lengths)
        features = mx.stack(
            [mx.pad(rows[k], [(t_max - n, 0), (0, 0)]) for k, n in zip(keys, lengths, strict=True)]
        )
        return EncodedPrompts(features.astype(mx.float32), lengths)

    def _run(self, prompts: list[str]) -> dict[str, mx.array]:
        ids = [self.token_ids(p) for p in prompts]  # length errors before any model work
        if self.model is None:
            raise RuntimeError(
                f"the text encoder was released and {len(prompts)} prompt(s) are not cached, "
                f"e.g. {prompts[0][:60]!r}; call load_model() first"
            )
        input_ids, mask = pad_left(ids)
        taps = self.model.hidden_taps(input_ids, None if mask.all() else mask)
        features = stack_taps(taps, mask)
        mx.eval(features)
        t_max = input_ids.shape[1]
        rows = zip(prompts, ids, strict=True)
        return {p: features[b, t_max - len(row) :] for b, (p, row) in enumerate(rows)}

    def _remember(self, key: str, row: mx.array) -> None:
        if self.cache_size <= 0:
            return
        self._cache[key] = row
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
