"""Projected peak memory of LoRA training, with and without gradient checkpointing, so
``train-lora --memory-limit`` can pick checkpointing (#31).

peak = the DiT's parameters as held (the base, quantized or not: ``memory.dit_sizes(...).total``
or the loaded model's bytes) + the adapters, their gradients and AdamW's two moments (fp32) + the
activations of one step. Blocks are the only thing that repeats, so the activations are
``num_layers * kept + transient``: ``kept`` what one block keeps for the backward pass (all its
intermediates; with checkpointing only what the checkpointed call holds), ``transient`` one
block's backward on top. Each is ``(widths * tokens * hidden + planes * heads * tokens^2)`` fp32
bytes: widths of (tokens, hidden) and attention-score planes (heads, tokens, tokens), fitted
above the full-width measurements of ``benchmarks/train_memory.py``
(``benchmarks/results/train_memory_cpu.txt``: fp32 on the CPU backend, 1 and 2 blocks at 512^2,
768^2 and 1024^2 plus a 256-token caption). Activations scale with the
compute dtype's item size (bf16: half of fp32, the stated assumption of that results file).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ideogram4_mlx.errors import InputError
from ideogram4_mlx.train.step import DEFAULT_TARGETS, FUSED_QKV
from ideogram4_mlx.transformer import TransformerConfig

MEASURED_ITEMSIZE = 4  # the fits below are fp32 bytes
# (widths, planes): fp32 bytes = (widths * tokens * hidden + planes * heads * tokens^2) * 4.
# Least-squares fits of benchmarks/results/train_memory_cpu.txt (1 and 2 full-width blocks at
# 1280, 2560 and 4352 tokens), scaled up to bound every measured row, then rounded up. Without
# checkpointing a block keeps every intermediate (its attention probabilities are the planes);
# with it, about its input.
KEPT = (20.8, 1.18)  # what one block keeps for the backward pass; fit (20.24, 1.146) x 1.027
TRANSIENT = (24.2, 1.97)  # one block's backward on top; fit (21.87, 1.783) x 1.103
KEPT_CHECKPOINTED = (1.54, 0.046)  # fit (1.350, 0.0403) x 1.138
TRANSIENT_CHECKPOINTED = (41.1, 3.0)  # the block recomputed, then its backward; fit x 1.022
OPTIMIZER_COPIES = 4  # adapters, their gradients, AdamW's two moments: fp32
LORA_ITEMSIZE = 4


@dataclass(frozen=True)
class TrainingMemory:
    """Projected bytes of one training step: what is held, and the activations either way."""

    base: int  # the DiT's parameters as held
    lora: int  # adapters + optimizer state
    activations: int  # without checkpointing
    activations_checkpointed: int
    tokens: int  # per sample, what was planned for (named in the errors)
    rank: int

    def peak(self, checkpoint: bool) -> int:
        acts = self.activations_checkpointed if checkpoint else self.activations
        return self.base + self.lora + acts

    def needs_checkpointing(self, limit_bytes: float) -> bool:
        """Whether training must checkpoint its blocks to stay under ``limit_bytes``: False
        when the projected peak fits without, True when it fits only with; an
        :class:`InputError` naming both peaks when it does not fit either way."""
        if self.peak(False) <= limit_bytes:
            return False
        if self.peak(True) <= limit_bytes:
            return True
        raise InputError(
            f"LoRA training at {self.tokens} tokens, rank {self.rank} needs about "
            f"{self.peak(True) / 1e9:.1f} GB even with gradient checkpointing "
            f"({self.peak(False) / 1e9:.1f} GB without; the DiT holds {self.base / 1e9:.1f} GB), "
            f"over the {limit_bytes / 1e9:.1f} GB limit: quantize the base (convert --quantize "
            "4), train on smaller buckets or a smaller batch, or raise --memory-limit"
        )


def lora_parameters(
    config: TransformerConfig, rank: int, targets: tuple[str, ...] = DEFAULT_TARGETS
) -> int:
    """Trainable parameters of a rank-``rank`` LoRA on ``targets`` of every block
    (``train.step.add_lora``: the fused qkv carries three pairs, one per third)."""
    hidden = config.hidden_size
    attention = config.num_attention_heads * config.attention_head_dim
    shapes = {  # (out, in) of each block linear
        "attention.qkv": (3 * attention, hidden),
        "attention.o": (hidden, attention),
        "feed_forward.w1": (config.intermediate_size, hidden),
        "feed_forward.w2": (hidden, config.intermediate_size),
        "feed_forward.w3": (config.intermediate_size, hidden),
        "adaln_modulation": (4 * hidden, config.adaln_dim),
    }
    per_block = 0
    for target in targets:
        out, inp = shapes[target]
        parts = 3 if target == FUSED_QKV else 1
        per_block += parts * rank * (inp + out // parts)
    return config.num_layers * per_block


def _bytes(fit: tuple[float, float], config: TransformerConfig, tokens: int) -> float:
    widths, planes = fit
    return (
        widths * tokens * config.hidden_size + planes * config.num_attention_heads * tokens**2
    ) * MEASURED_ITEMSIZE


def plan_training_memory(
    config: TransformerConfig,
    tokens: int,
    rank: int,
    base_bytes: int,
    itemsize: int = 2,
    targets: tuple[str, ...] = DEFAULT_TARGETS,
    batch: int = 1,
) -> TrainingMemory:
    """Projected peak pieces of one step over ``tokens`` per sample (text + image of the
    largest bucket) for a rank-``rank`` LoRA on a DiT holding ``base_bytes``, activations in a
    dtype of ``itemsize`` bytes (bf16: 2), ``batch`` samples (activations scale with it:
    measured at batch 1)."""
    for name, value in (("tokens", tokens), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be an integer >= 1, got {value!r}")
    scale = batch * itemsize / MEASURED_ITEMSIZE
    n = config.num_layers

    def acts(kept: tuple[float, float], transient: tuple[float, float]) -> int:
        total = n * _bytes(kept, config, tokens) + _bytes(transient, config, tokens)
        return math.ceil(scale * total)

    lora = OPTIMIZER_COPIES * LORA_ITEMSIZE * lora_parameters(config, rank, targets)
    plain = acts(KEPT, TRANSIENT)
    checkpointed = acts(KEPT_CHECKPOINTED, TRANSIENT_CHECKPOINTED)
    return TrainingMemory(int(base_bytes), lora, plain, checkpointed, tokens, rank)
