"""The Ideogram 4 single-stream DiT (MODEL_NOTES#transformer).

One class serves both ``transformer/`` (conditional: ``[text][image]``) and
``unconditional_transformer/`` (image tokens only). Module attribute names equal the
checkpoint keys, so the fp8 files load without a mapping table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from ideogram4_mlx.config import BaseConfig, CheckpointError, HeaderCheck
from ideogram4_mlx.dit_sequence import (
    LLM_TOKEN_INDICATOR,
    OUTPUT_IMAGE_INDICATOR,
    mrope_cos_sin,
    timestep_sinusoid,
)
from ideogram4_mlx.errors import InputError
from ideogram4_mlx.layers import RMSNorm, apply_rope, silu
from ideogram4_mlx.step_cache import BlockCache
from ideogram4_mlx.weights import (
    DtypeRule,
    WeightStream,
    checked_config,
    dequantize_fp8_weights,
    load_component,
    strip_prefixes,
)

QK_NORM_EPS = 1e-5
LLM_COND_NORM_EPS = 1e-6
FINAL_NORM_EPS = 1e-6
# Attention scores materialised at once, per layer (see ``attention``): 256 MiB keeps 1024^2
# activations near 1 GB in bf16 (all 18 heads at once would be 2 x 0.9 GB); low memory: 64 MiB.
SCORE_BYTES = 1 << 28
LOW_MEMORY_SCORE_BYTES = 1 << 26
# The feed-forward runs over at most this many tokens at a time (see ``FeedForward``): 2
# chunks at 1024^2 with a 1000-token caption, 5 at 2048^2; big enough to keep matmuls efficient.
FFN_TOKENS = 4096
LOW_MEMORY_FFN_TOKENS = 2048

CHECKPOINT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
# What ``from_pretrained(text_input=False)`` leaves unread (the unconditional branch).
TEXT_INPUT_MODULES = ("llm_cond_norm.", "llm_cond_proj.")
# The checkpoint's two DiT folders and whether each reads text features: the conditional one on
# [text][image], the unconditional one on image tokens only (MODEL_NOTES#unconditional-branch).
DIT_COMPONENTS = (("transformer", True), ("unconditional_transformer", False))
# What a DiT shares with the rest of its checkpoint: the packed latent channels (the VAE's) and
# the text features' width (the text encoder's taps); a DiT swapped in must have the same.
INTERFACE_KEYS = ("in_channels", "llm_features_dim")
# Quantization (``quant_predicate``): small but sensitive layers stay in float: the indicator
# embedding, the timestep/AdaLN path (it scales every block), the 128-channel input projection
# and the output layer. The text-feature projection (53248 -> 4608) sees features of very
# different scales: at least 8 bits.
FLOAT_MODULES = frozenset(
    {
        "embed_image_indicator",
        "t_embedding",
        "adaln_proj",
        "adaln_modulation",
        "final_layer",
        "input_proj",
    }
)
TEXT_PROJECTION_BITS = 8


@dataclass(frozen=True)
class TransformerConfig(BaseConfig):
    """Mirrors ``transformer/config.json`` (diffusers names); the defaults are the real model."""

    in_channels: int = 128
    num_layers: int = 34
    attention_head_dim: int = 256
    num_attention_heads: int = 18
    intermediate_size: int = 12288
    adaln_dim: int = 512
    llm_features_dim: int = 53248
    rope_theta: float = 5_000_000
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    norm_eps: float = 1e-5

    layer_fields: ClassVar[tuple[str, ...]] = ("num_layers",)
    weight_prefixes: ClassVar[tuple[str, ...]] = CHECKPOINT_PREFIXES

    def __post_init__(self):
        h, w = self.mrope_section[1], self.mrope_section[2]
        if 3 * max(h, w) > self.attention_head_dim // 2:
            raise CheckpointError(
                f"mrope_section {list(self.mrope_section)} needs head_dim >= {6 * max(h, w)}, "
                f"got attention_head_dim {self.attention_head_dim}"
            )

    @property
    def hidden_size(self) -> int:
        return self.attention_head_dim * self.num_attention_heads

    def header_checks(self) -> list[HeaderCheck]:
        """Each size against a tensor of the checkpoint (rows: the same when quantized)."""
        heads = "num_attention_heads x attention_head_dim"
        return [
            HeaderCheck("num_layers", self.num_layers, "layers."),
            HeaderCheck(
                "attention_head_dim", self.attention_head_dim, "layers.0.attention.norm_q.weight"
            ),
            HeaderCheck(heads, self.hidden_size, "input_proj.weight"),
            HeaderCheck("in_channels", self.in_channels, "final_layer.linear.weight"),
            HeaderCheck(
                "intermediate_size", self.intermediate_size, "layers.0.feed_forward.w1.weight"
            ),
            HeaderCheck("adaln_dim", self.adaln_dim, "adaln_proj.weight"),
            HeaderCheck("llm_features_dim", self.llm_features_dim, "llm_cond_norm.weight"),
        ]


# ---------------------------------------------------------------------------------------------
# Layers (RMSNorm, SiLU and RoPE are ``layers``'s).


def attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None, score_bytes: int
) -> mx.array:
    """SDPA on (B, H, L, D), taken in pieces whose (rows, L) scores fit in ``score_bytes``.

    MLX has no fused kernel for head_dim 256 with long queries (CPU, and Metal before NAX), so
    it materialises the scores: 18 x L^2 x 2 bytes, 0.9 GB at 1024^2 but 11 GB at 2048^2.
    Heads are taken in groups; where one head's scores alone are over budget (2048^2: 0.6 GB
    in bf16), its queries are split too. Heads and softmax rows are independent, so both are
    the same arithmetic as one call.
    """
    b, heads, length, _ = q.shape
    per_head = b * length * k.shape[2] * q.itemsize
    if heads * per_head <= score_bytes:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    # One at a time: evaluated together, their norm and RoPE temporaries would coexist
    # (measured with this: 9.5 x L x D floats at the attention's peak, 17384 tokens).
    for a in (q, k, v):
        mx.eval(a)
    group = max(1, min(heads, score_bytes // per_head))
    pieces = 1 if group > 1 else -(-per_head // score_bytes)
    rows = -(-length // pieces)
    out = []
    for h in range(0, heads, group):
        part = slice(h, h + group)
        done = []
        for r in range(0, length, rows):
            o = mx.fast.scaled_dot_product_attention(
                q[:, part, r : r + rows],
                k[:, part],
                v[:, part],
                scale=scale,
                mask=None if mask is None else mask[:, :, r : r + rows],
            )
            mx.eval(o)  # one piece's scores at a time
            done.append(o)
        out.append(done[0] if len(done) == 1 else mx.concatenate(done, axis=2))
    return mx.concatenate(out, axis=1)


class Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.qkv = nn.Linear(hidden_size, 3 * num_heads * head_dim, bias=False)
        self.o = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.norm_q = RMSNorm(head_dim, QK_NORM_EPS)
        self.norm_k = RMSNorm(head_dim, QK_NORM_EPS)
        self.score_bytes = SCORE_BYTES

    def __call__(
        self, x: mx.array, cos: mx.array, sin: mx.array, mask: mx.array | None
    ) -> mx.array:
        b, length, _ = x.shape
        qkv = self.qkv(x).reshape(b, length, 3, self.num_heads, self.head_dim)
        q = apply_rope(self.norm_q(qkv[:, :, 0]), cos, sin).transpose(0, 2, 1, 3)
        k = apply_rope(self.norm_k(qkv[:, :, 1]), cos, sin).transpose(0, 2, 1, 3)
        v = qkv[:, :, 2].transpose(0, 2, 1, 3)
        o = attention(q, k, v, self.head_dim**-0.5, mask, self.score_bytes)
        return self.o(o.transpose(0, 2, 1, 3).reshape(b, length, -1))


class FeedForward(nn.Module):
    def __init__(self, dims: int, hidden_dims: int):
        super().__init__()
        self.w1 = nn.Linear(dims, hidden_dims, bias=False)
        self.w2 = nn.Linear(hidden_dims, dims, bias=False)
        self.w3 = nn.Linear(dims, hidden_dims, bias=False)
        self.chunk_tokens: int | None = FFN_TOKENS  # tokens per evaluated chunk

    def __call__(self, x: mx.array) -> mx.array:
        length = x.shape[1]
        if self.chunk_tokens is None or length <= self.chunk_tokens:
            return self.swiglu(x)
        # Tokens are independent here, so chunking bounds the three (L, 12288) intermediates
        # (fp32 inside SiLU; 2.5 GB at 2048^2 unchunked) to one chunk's worth, at no cost in
        # accuracy.
        # Equal-sized chunks: a BLAS may take other kernels (other rounding) for 1-2 rows.
        chunks = math.ceil(length / self.chunk_tokens)
        size = math.ceil(length / chunks)
        out = []
        for start in range(0, length, size):
            part = self.swiglu(x[:, start : start + size])
            mx.eval(part)
            out.append(part)
        return mx.concatenate(out, axis=1)

    def swiglu(self, x: mx.array) -> mx.array:
        return self.w2(silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Sandwich-norm block with AdaLN scale and tanh gate, no shift (MODEL_NOTES#dit-block)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        hidden, eps = config.hidden_size, config.norm_eps
        self.attention = Attention(hidden, config.num_attention_heads, config.attention_head_dim)
        self.feed_forward = FeedForward(hidden, config.intermediate_size)
        self.attention_norm1 = RMSNorm(hidden, eps)
        self.attention_norm2 = RMSNorm(hidden, eps)
        self.ffn_norm1 = RMSNorm(hidden, eps)
        self.ffn_norm2 = RMSNorm(hidden, eps)
        self.adaln_modulation = nn.Linear(config.adaln_dim, 4 * hidden)

    def __call__(
        self, h: mx.array, c: mx.array, cos: mx.array, sin: mx.array, mask: mx.array | None
    ) -> mx.array:
        scale_msa, gate_msa, scale_mlp, gate_mlp = mx.split(self.adaln_modulation(c), 4, axis=-1)
        a = self.attention(self.attention_norm1(h) * (1 + scale_msa), cos, sin, mask)
        h = h + mx.tanh(gate_msa) * self.attention_norm2(a)
        f = self.feed_forward(self.ffn_norm1(h) * (1 + scale_mlp))
        return h + mx.tanh(gate_mlp) * self.ffn_norm2(f)


class TimestepEmbedding(nn.Module):
    def __init__(self, dims: int):
        super().__init__()
        self.mlp_in = nn.Linear(dims, dims)
        self.mlp_out = nn.Linear(dims, dims)

    def __call__(self, sinusoid: mx.array) -> mx.array:
        return self.mlp_out(silu(self.mlp_in(sinusoid)))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int, adaln_dim: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, out_channels)
        self.adaln_modulation = nn.Linear(adaln_dim, hidden_size)

    def __call__(self, h: mx.array, c: mx.array) -> mx.array:
        # Double SiLU: c is already SiLU(adaln_proj(t_cond)) (MODEL_NOTES#dit-forward-pass).
        scale = 1 + self.adaln_modulation(silu(c))
        return self.linear(mx.fast.layer_norm(h, None, None, FINAL_NORM_EPS) * scale)


@dataclass(frozen=True)
class PreparedSequence:
    """Per-image constants of one DiT input layout (see :meth:`Ideogram4Transformer.prepare`)."""

    image_mask: mx.array  # (B, L, 1) 1 at image slots
    # Per-token tensors are kept narrow: (L, D) copies would hold 3 x 0.16 GB over the whole
    # denoise at 2048^2 (bf16); run() widens them for a moment each pass.
    text: mx.array | None  # (B, L', D) projected text features of the leading L' slots
    image_index: mx.array  # (B, L) int32, 1 at image slots: the indicator-embedding row
    cos: mx.array  # (B, L, 1, head_dim)
    sin: mx.array
    mask: mx.array | None  # (B, 1, L, L) bool, None when every token attends to every token

    def arrays(self) -> list[mx.array]:
        return [a for a in vars(self).values() if a is not None]


class Ideogram4Transformer(nn.Module):
    """The DiT. Inputs follow MODEL_NOTES#dit-forward-pass; the output is the velocity
    (B, L, 128) in fp32."""

    # Raw files (MODEL_NOTES#dit-keys): every nn.Linear F8_E4M3 + F32 scale [V], the rest BF16
    # [I, pinned by the file's exact byte count]; a BF16 repack stores its weights as BF16.
    dtype_rule: ClassVar[DtypeRule] = DtypeRule()

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.input_proj = nn.Linear(config.in_channels, hidden)
        self.llm_cond_norm = RMSNorm(config.llm_features_dim, LLM_COND_NORM_EPS)
        self.llm_cond_proj = nn.Linear(config.llm_features_dim, hidden)
        self.t_embedding = TimestepEmbedding(hidden)
        self.adaln_proj = nn.Linear(hidden, config.adaln_dim)
        self.embed_image_indicator = nn.Embedding(2, hidden)
        self.layers = [TransformerBlock(config) for _ in range(config.num_layers)]
        self.final_layer = FinalLayer(hidden, config.in_channels, config.adaln_dim)
        self.stream: WeightStream | None = None  # set by from_pretrained when blocks stream
        # Blocks 0 .. resident_blocks - 1 keep their weights; the rest stream (from_pretrained).
        self.resident_blocks = config.num_layers

    @property
    def streamed_blocks(self) -> int:
        """How many blocks are read from disk on every pass (0: all resident)."""
        return len(self.layers) - self.resident_blocks

    @property
    def dtype(self) -> mx.Dtype:
        return self.input_proj.weight.dtype

    def rope_tables(self, position_ids: np.ndarray) -> tuple[mx.array, mx.array]:
        """cos, sin as (B, L, 1, head_dim) in the compute dtype."""
        cfg = self.config
        cos, sin = mrope_cos_sin(
            np.asarray(position_ids), cfg.attention_head_dim, cfg.rope_theta, cfg.mrope_section
        )
        return (
            mx.array(cos)[:, :, None].astype(self.dtype),
            mx.array(sin)[:, :, None].astype(self.dtype),
        )

    def conditioning(self, t: np.ndarray | mx.array) -> mx.array:
        """The shared AdaLN input ``c = SiLU(adaln_proj(t_cond))`` (B, 1, adaln_dim)."""
        sinusoid = timestep_sinusoid(np.asarray(t).reshape(-1), self.config.hidden_size)
        t_cond = self.t_embedding(mx.array(sinusoid).astype(self.dtype))
        return silu(self.adaln_proj(t_cond))[:, None]

    def prepare(
        self,
        llm_features: mx.array | None,
        position_ids: np.ndarray | mx.array,
        segment_ids: np.ndarray | mx.array,
        indicator: np.ndarray | mx.array,
    ) -> PreparedSequence:
        """Everything about one sequence layout that does not change between sampler steps:
        RoPE tables, attention mask, role masks and the projected text features. Computing
        them once per image, not once per step, is exact (the same ops on the same inputs).

        Args:
            llm_features: (B, L', llm_features_dim) text features at text positions, covering
                the first L' <= L positions (the text prefix suffices), or None when the
                sequence has no text (unconditional branch): same result, no wasted work.
            position_ids: (B, L, 3) int (t, h, w); segment_ids: (B, L) int; indicator: (B, L) int.
        """
        dtype = self.dtype
        indicator = mx.array(indicator)
        is_image = indicator == OUTPUT_IMAGE_INDICATOR
        text = None
        if llm_features is not None:
            if self.llm_cond_proj is None:
                raise ValueError(
                    "this DiT was loaded with text_input=False (the unconditional branch) and "
                    "takes no text features; pass llm_features=None or load it with text_input"
                )
            # The image slots' text contribution is exactly 0, so the 53248-wide projection
            # runs on the leading [padding][text] slots only.
            n = llm_features.shape[1]
            m_txt = (indicator[:, :n] == LLM_TOKEN_INDICATOR)[..., None].astype(dtype)
            f = self.llm_cond_norm(llm_features.astype(dtype) * m_txt)
            text = self.llm_cond_proj(f) * m_txt
        cos, sin = self.rope_tables(position_ids)
        prepared = PreparedSequence(
            image_mask=is_image[..., None].astype(dtype),
            text=text,
            image_index=is_image.astype(mx.int32),
            cos=cos,
            sin=sin,
            mask=segment_mask(segment_ids),
        )
        mx.eval(prepared.arrays())
        return prepared

    def run(
        self,
        x: mx.array,
        t: np.ndarray | mx.array,
        seq: PreparedSequence,
        cache: BlockCache | None = None,
    ) -> mx.array:
        """Velocity (B, L, 128) float32 for latents ``x`` (B, L, 128) at model time ``t`` (B,)
        in [0, 1] (rounded to bf16 before the embedding, as the reference does); only image
        positions are meaningful. ``cache`` (one per branch and generation) may skip blocks
        1..N-1 (see :class:`BlockCache`); threshold 0 runs every block, bit for bit."""
        m_img = seq.image_mask
        # Biases are masked after the projection, or they leak into other roles
        # (MODEL_NOTES#dit-forward-pass).
        h = self.input_proj(x.astype(self.dtype) * m_img) * m_img
        if seq.text is not None:
            # 0 beyond the text prefix, as the full-length text input is there.
            pad = [(0, 0), (0, h.shape[1] - seq.text.shape[1]), (0, 0)]
            h = h + mx.pad(seq.text, pad)
        h = h + self.embed_image_indicator(seq.image_index)
        c = self.conditioning(t)
        if self.stream is not None:
            self.stream.open()
        first = self.block(0, h, c, seq)
        # Block 0's residual, only where a cache compares it (it holds h through the pass).
        residual = first - h if cache is not None and cache.threshold > 0 else None
        if residual is not None and cache.reusable(residual):
            h = cache.reuse(first)
        else:
            h = first
            for i in range(1, len(self.layers)):
                h = self.block(i, h, c, seq)
            if cache is not None:
                cache.store(residual, h - first)
        return self.final_layer(h, c).astype(mx.float32)

    def block(self, i: int, h: mx.array, c: mx.array, seq: PreparedSequence) -> mx.array:
        """Block ``i`` on ``h``; a streamed block's weights are read now and dropped after."""
        layer = self.layers[i]
        if self.stream is None or i < self.resident_blocks:
            return layer(h, c, seq.cos, seq.sin, seq.mask)
        layer.update(self.stream.take(f"layers.{i}."))
        h = layer(h, c, seq.cos, seq.sin, seq.mask)
        mx.eval(h)
        drop_parameters(layer)
        return h

    def __call__(
        self,
        x: mx.array,
        t: np.ndarray | mx.array,
        llm_features: mx.array | None,
        position_ids: np.ndarray | mx.array,
        segment_ids: np.ndarray | mx.array,
        indicator: np.ndarray | mx.array,
    ) -> mx.array:
        """One forward: ``run(x, t, prepare(llm_features, position_ids, ...))`` (see both)."""
        return self.run(x, t, self.prepare(llm_features, position_ids, segment_ids, indicator))

    @classmethod
    def from_pretrained(
        cls,
        component_dir: Path | str,
        dtype: mx.Dtype = mx.bfloat16,
        low_memory: bool = False,
        text_input: bool = True,
        resident_blocks: int | None = None,
    ) -> Ideogram4Transformer:
        """Load ``transformer/`` or ``unconditional_transformer/`` (fp8, bf16, split-qkv names).

        ``resident_blocks=k`` keeps the first k DiT blocks in memory and streams the others:
        each pass reads a streamed block's weights from disk just before it runs and frees
        them after (``streamed_blocks`` says how many). None (the default, or any k >= the
        block count) keeps all; 0 streams all, which is what ``low_memory`` means. Whenever a
        block streams, attention scores are bounded to ``LOW_MEMORY_SCORE_BYTES`` and the
        feed-forward runs over ``LOW_MEMORY_FFN_TOKENS`` tokens at a time, in every block. The
        same results: the streamed weights and grouped heads bit for bit; the feed-forward
        chunks are the same dot products (bit for bit at real chunk sizes here, within fp32
        rounding where a BLAS switches kernels).

        ``text_input=False`` is for the unconditional branch, which only ever sees image
        tokens (MODEL_NOTES#unconditional-branch): its text projection (``llm_cond_norm``,
        ``llm_cond_proj``, 245M parameters) is checked like every other key but never read, and
        ``prepare`` then refuses text features. Exact: with no text slots that projection
        contributes nothing.
        """
        component_dir = Path(component_dir)
        model = cls.build(component_dir)
        model.resident_blocks = resident_block_count(resident_blocks, low_memory, len(model.layers))

        def resident(key: str) -> bool:
            if not text_input and key.startswith(TEXT_INPUT_MODULES):
                return False
            return block_index(key) is None or block_index(key) < model.resident_blocks

        load_component(model, component_dir, dtype, resident)
        if not text_input:
            model.llm_cond_norm = model.llm_cond_proj = None  # their lazy arrays are never read
        if model.streamed_blocks:
            model.stream_from(WeightStream(component_dir, model.sanitize, dtype))
        return model

    def stream_from(self, stream) -> None:
        """Read the blocks past ``resident_blocks`` from ``stream`` on every pass (a
        ``WeightStream``, or a DiT file's) instead of holding them, with attention scores and
        the feed-forward bounded as ``from_pretrained`` says."""
        self.stream = stream
        for layer in self.layers[self.resident_blocks :]:
            drop_parameters(layer)
        for layer in self.layers:
            layer.attention.score_bytes = LOW_MEMORY_SCORE_BYTES
            layer.feed_forward.chunk_tokens = LOW_MEMORY_FFN_TOKENS

    @classmethod
    def build(cls, component_dir: Path | str, headers=None) -> Ideogram4Transformer:
        """The float skeleton (lazy arrays, no memory yet) of a component folder, its
        config.json first checked against the weight files' headers (or ``headers``: a
        single-file source's, ``weights.checked_config``)."""
        return cls(checked_config(TransformerConfig, component_dir, headers))

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Checkpoint tensors -> module parameters. Pure and idempotent.

        Strips repack prefixes, dequantizes fp8 pairs (exact reference rounding), fuses diffusers'
        split ``to_q/to_k/to_v`` into ``qkv`` and renames ``to_out.0`` to ``o``.
        """
        weights = dequantize_fp8_weights(strip_prefixes(weights, CHECKPOINT_PREFIXES))
        weights.pop("rotary_emb.inv_freq", None)
        out = {}
        for key, value in weights.items():
            if ".attention.to_q." in key:
                names = [key.replace(".to_q.", f".{n}.") for n in ("to_q", "to_k", "to_v")]
                missing = [n for n in names if n not in weights]
                if missing:
                    raise CheckpointError(
                        f"split attention weights incomplete: {missing[0]} is missing"
                    )
                out[key.replace(".to_q.", ".qkv.")] = mx.concatenate(
                    [weights[n] for n in names], axis=0
                )
            elif ".attention.to_k." in key or ".attention.to_v." in key:
                continue
            else:
                out[key.replace(".attention.to_out.0.", ".attention.o.")] = value
        return out

    def quant_predicate(self, path: str, module: nn.Module) -> bool | dict:
        """False keeps the layer at ``path`` in float, True quantizes it at the plan's bits,
        ``{"bits": b}`` at no fewer than b bits."""
        parts = set(path.split("."))
        if parts & FLOAT_MODULES:
            return False
        return {"bits": TEXT_PROJECTION_BITS} if "llm_cond_proj" in parts else True


def resident_block_count(resident_blocks: int | None, low_memory: bool, num_layers: int) -> int:
    """The checked k of ``from_pretrained`` for a DiT of ``num_layers`` blocks (None and
    k >= num_layers: all); ``low_memory`` is k = 0."""
    if resident_blocks is None:
        return 0 if low_memory else num_layers
    if isinstance(resident_blocks, bool) or not isinstance(resident_blocks, int | np.integer):
        raise InputError(
            f"resident_blocks must be an integer >= 0 or None, got {resident_blocks!r}"
        )
    if resident_blocks < 0:
        raise InputError(
            f"resident_blocks must be >= 0 (0 streams every block), got {resident_blocks}"
        )
    if low_memory and resident_blocks:
        raise InputError(
            f"low_memory streams every block (resident_blocks=0) but resident_blocks="
            f"{resident_blocks} was given too; pass one of them"
        )
    return min(int(resident_blocks), num_layers)


def block_index(key: str) -> int | None:
    """N for a parameter key ``layers.N.*``; None for the parameters outside the blocks."""
    if not key.startswith("layers."):
        return None
    return int(key.split(".", 2)[1])


def drop_parameters(module: nn.Module) -> None:
    """Release a streamed module's weights (replaced by empty arrays until the next pass)."""
    module.update(tree_map(lambda _: EMPTY, module.parameters()))


EMPTY = mx.array([], dtype=mx.float32)


def segment_mask(segment_ids: np.ndarray | mx.array) -> mx.array | None:
    """Block-diagonal bool mask (B, 1, L, L), True = may attend; None when every id is equal."""
    seg = np.asarray(segment_ids)
    if (seg == seg[:, :1]).all():
        return None
    seg = mx.array(seg)
    return (seg[:, :, None] == seg[:, None, :])[:, None]


def check_swappable(component_dir: Path | str, checkpoint_dit_dir: Path | str) -> None:
    """``InputError`` (config files only, before any weights load) naming the first
    ``INTERFACE_KEYS`` entry in which the DiT at ``component_dir`` differs from the
    checkpoint's ``transformer/`` at ``checkpoint_dit_dir``."""
    swapped = TransformerConfig.from_file(Path(component_dir) / "config.json")
    base = TransformerConfig.from_file(Path(checkpoint_dit_dir) / "config.json")
    for key in INTERFACE_KEYS:
        if getattr(swapped, key) != getattr(base, key):
            raise InputError(
                f"--transformer {component_dir}: its config.json has {key} "
                f"{getattr(swapped, key)}, the checkpoint's DiT {getattr(base, key)}: it was "
                "made for another text encoder or VAE; use a DiT of this checkpoint's family"
            )
