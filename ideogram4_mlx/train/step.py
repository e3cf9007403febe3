"""One LoRA training step on the DiT: trainable A/B adapters on its linears, the
flow-matching loss (``objective``), gradients over the adapters only, an AdamW update.

The adapters follow peft's ``LoraLayer``: ``y = W x + (alpha / r) * B (A x)``, A (r, in)
kaiming-uniform (peft's ``a = sqrt(5)``: U(-1/sqrt(in), 1/sqrt(in))), B (out, r) zeros, so
training starts at the base model. The fused ``attention.qkv`` carries three pairs, one per
q/k/v row third, as peft trains diffusers' split ``to_q``/``to_k``/``to_v``; that is the
layout ``save.save_lora`` writes and ``lora.read_lora`` reads back. A and B are fp32 whatever
the base's dtype (the optimizer updates them in fp32); the term is added in the base's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from ideogram4_mlx.dit_sequence import sequence_ids
from ideogram4_mlx.errors import InputError
from ideogram4_mlx.lora import linear_shapes
from ideogram4_mlx.train.objective import flow_loss, noisy_latents, velocity_target
from ideogram4_mlx.transformer import (
    Ideogram4Transformer,
    PreparedSequence,
    TransformerBlock,
)

# The linears of each block a LoRA trains by default: attention and MLP (peft's usual targets
# on diffusers' names to_q/to_k/to_v, to_out.0, w1, w2, w3). DiffSynth's example also trains
# ``adaln_modulation``, which may be added.
DEFAULT_TARGETS = (
    "attention.qkv",
    "attention.o",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
)
BLOCK_TARGETS = (*DEFAULT_TARGETS, "adaln_modulation")
FUSED_QKV = "attention.qkv"  # three adapters, one per q/k/v third
NO_LIMIT = 1 << 62  # attention score budget while training: one SDPA call, no evaluation inside


@dataclass(frozen=True)
class LoRASettings:
    """What ``add_lora`` attaches: rank r, alpha (scale alpha / r), block linears, seed of A."""

    rank: int = 16
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise InputError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise InputError(f"LoRA alpha must be a finite number > 0, got {self.alpha!r}")
        unknown = [t for t in self.targets if t not in BLOCK_TARGETS]
        if unknown or not self.targets:
            raise InputError(
                f"LoRA targets {list(unknown) or '(none)'} are not block linears; choose from "
                f"{', '.join(BLOCK_TARGETS)}"
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRAAdapter(nn.Module):
    """The trainable pairs of one linear: ``lora_A[i]`` (r, in), ``lora_B[i]`` (out / parts, r);
    the output is their terms joined along the output rows, times ``scale``."""

    def __init__(self, in_dims: int, out_dims: int, rank: int, scale: float, parts: int, key):
        super().__init__()
        bound = 1 / math.sqrt(in_dims)  # kaiming_uniform_(a=sqrt(5)), as peft initialises A
        keys = mx.random.split(key, parts)
        self.lora_A = [mx.random.uniform(-bound, bound, (rank, in_dims), key=k) for k in keys]
        self.lora_B = [mx.zeros((out_dims // parts, rank)) for _ in range(parts)]
        self.scale = scale

    def __call__(self, x: mx.array) -> mx.array:
        x = x.astype(mx.float32)
        terms = [(x @ a.T) @ b.T for a, b in zip(self.lora_A, self.lora_B, strict=True)]
        return (terms[0] if len(terms) == 1 else mx.concatenate(terms, axis=-1)) * self.scale


class _Trainable:
    adapter: LoRAAdapter

    def __call__(self, x: mx.array) -> mx.array:
        y = super().__call__(x)
        return y + self.adapter(x).astype(y.dtype)


class TrainableLoRALinear(_Trainable, nn.Linear):
    """``nn.Linear`` (frozen, same parameter names) plus a trainable :class:`LoRAAdapter`."""


class TrainableLoRAQuantizedLinear(_Trainable, nn.QuantizedLinear):
    """``nn.QuantizedLinear`` (frozen) plus a trainable :class:`LoRAAdapter` (QLoRA)."""


class CheckpointedBlock(TransformerBlock):
    """A block whose activations are recomputed in the backward pass (``mx.checkpoint``):
    memory for one block's inputs instead of all its intermediates, for ~1/3 more compute."""

    def __call__(self, h, c, cos, sin, mask):
        def inner(params, h, c, cos, sin):
            self.update(params)
            return TransformerBlock.__call__(self, h, c, cos, sin, mask)

        return mx.checkpoint(inner)(self.trainable_parameters(), h, c, cos, sin)


def add_lora(
    model: Ideogram4Transformer, settings: LoRASettings, checkpoint: bool = False
) -> dict[str, LoRAAdapter]:
    """Freeze ``model`` and attach trainable adapters to ``settings.targets`` in every block;
    returns them by module path (``layers.3.attention.qkv``). ``checkpoint`` recomputes each
    block in the backward pass (:class:`CheckpointedBlock`): the same gradients, less memory."""
    if model.stream is not None:
        raise InputError(
            "this DiT streams its blocks from disk (low_memory / resident_blocks); training "
            "needs every block resident: load it without streaming"
        )
    shapes = linear_shapes(model)
    modules = dict(model.named_modules())
    paths = [
        p for p in shapes if p.startswith("layers.") and p.split(".", 2)[2] in settings.targets
    ]
    model.freeze()
    keys = mx.random.split(mx.random.key(settings.seed), len(paths))
    adapters = {}
    for path, key in zip(paths, keys, strict=True):
        module = modules[path]
        out, inp = shapes[path]
        parts = 3 if path.endswith(FUSED_QKV) else 1
        module.adapter = LoRAAdapter(inp, out, settings.rank, settings.scale, parts, key)
        quantized = isinstance(module, nn.QuantizedLinear)
        module.__class__ = TrainableLoRAQuantizedLinear if quantized else TrainableLoRALinear
        adapters[path] = module.adapter
    for layer in model.layers:
        # The backward pass keeps the whole graph anyway: chunking the feed-forward or the
        # attention (with evaluations inside) saves nothing here.
        layer.feed_forward.chunk_tokens = None
        layer.attention.score_bytes = NO_LIMIT
        if checkpoint:
            layer.__class__ = CheckpointedBlock
    mx.eval(model.trainable_parameters())
    return adapters


@dataclass(frozen=True)
class Batch:
    """One training batch at fixed times and noise."""

    latents: mx.array  # (B, N, 128) clean packed latents x1, N = grid_h * grid_w
    noise: mx.array  # (B, N, 128) standard normal x0
    t: np.ndarray  # (B,) float32 model times in (0, 1), 1 = clean
    weights: np.ndarray | None  # (B,) loss weights (objective.time_weights), None: 1
    seq: PreparedSequence  # the [left padding][text][image] layout, text projected
    n_text: int  # leading text slots (the longest caption)


def prepare_batch(
    model: Ideogram4Transformer,
    latents: mx.array,
    features: mx.array,
    text_lengths: list[int],
    grid: tuple[int, int],
    t: np.ndarray,
    noise: mx.array,
    weights: np.ndarray | None = None,
) -> Batch:
    """A :class:`Batch` from clean latents (B, N, 128), text features (B, T, llm_features_dim)
    laid out ``[left padding][text]`` with T = max(text_lengths), ``grid`` (gh, gw), times
    (B,) and noise (B, N, 128). The text projection runs once here, outside the gradient (it
    is frozen)."""
    b, n, channels = latents.shape
    expected = (b, grid[0] * grid[1], model.config.in_channels)
    if (b, n, channels) != expected or noise.shape != latents.shape:
        raise InputError(
            f"latents {latents.shape} and noise {noise.shape} must both be (B, gh * gw, "
            f"in_channels) = {expected} for the grid {grid}"
        )
    if features.shape[:2] != (b, max(text_lengths)) or len(text_lengths) != b:
        raise InputError(
            f"text features {features.shape} must be (B = {b}, max(text_lengths) = "
            f"{max(text_lengths)}, features) for {len(text_lengths)} text lengths"
        )
    t = np.asarray(t, np.float32).reshape(-1)
    seq = model.prepare(features, *sequence_ids(text_lengths, *grid))
    return Batch(latents, noise, t, weights, seq, max(text_lengths))


def loss_fn(model: Ideogram4Transformer, batch: Batch) -> mx.array:
    """The flow-matching loss (scalar fp32) of ``model`` on ``batch``
    (MODEL_NOTES#training-objective)."""
    z = noisy_latents(batch.latents, batch.noise, batch.t)
    text_slots = mx.zeros((z.shape[0], batch.n_text, z.shape[2]), mx.float32)
    x = mx.concatenate([text_slots, z], axis=1)
    v = model.run(x, batch.t, batch.seq)[:, batch.n_text :]
    return flow_loss(v, velocity_target(batch.latents, batch.noise), batch.weights)


def lora_gradients(model: Ideogram4Transformer, batch: Batch) -> tuple[mx.array, dict]:
    """(loss, gradients) with the gradients over the trainable (LoRA) parameters only, as the
    tree of ``model.trainable_parameters()``."""
    return nn.value_and_grad(model, loss_fn)(model, batch)


def make_optimizer(learning_rate: float = 1e-4, weight_decay: float = 0.01) -> optim.AdamW:
    """AdamW as the trainers use it (DiffSynth-Studio's example: learning rate 1e-4)."""
    return optim.AdamW(learning_rate=learning_rate, weight_decay=weight_decay)


def train_step(model: Ideogram4Transformer, optimizer: optim.Optimizer, batch: Batch) -> mx.array:
    """One step: the loss and its LoRA gradients, an optimizer update; returns the loss
    (evaluated, with the new parameters and optimizer state)."""
    loss, grads = lora_gradients(model, batch)
    optimizer.update(model, grads)
    mx.eval(loss, model.trainable_parameters(), optimizer.state)
    return loss
