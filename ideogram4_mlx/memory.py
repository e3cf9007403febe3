"""A memory budget for denoising: how many DiT blocks stay resident, the rest streamed.

The pipeline runs its stages one after another and frees each model after its stage (text
encoder, then both DiTs, then the VAE), so the budget binds where the DiTs run: both DiTs'
resident parameters, one streamed block at a time when any streams, and one block's
activations (blocks run one after another). Everything is estimated from the weight files'
headers and the config, before anything loads; the activation model is an upper bound of
``benchmarks/results/pipeline_memory.json`` (see :func:`activation_bytes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx

from ideogram4_mlx.environment import KEEP_FRACTION, physical_memory
from ideogram4_mlx.transformer import (
    CHECKPOINT_PREFIXES,
    DIT_COMPONENTS,
    FFN_TOKENS,
    LOW_MEMORY_FFN_TOKENS,
    LOW_MEMORY_SCORE_BYTES,
    SCORE_BYTES,
    TEXT_INPUT_MODULES,
    TransformerConfig,
    block_index,
)
from ideogram4_mlx.weights import QUANTIZED_DTYPE, component_files, strip_prefixes, tensor_headers

# Activations: fp32 widths of (tokens, hidden) alive at a block's peak, beyond the chunked
# feed-forward and the attention scores. 13 bounds every measured row (11.3-12.4 widths at
# 1024^2 and 2048^2, fp32; bf16 needs less), see activation_bytes.
ACTIVATION_WIDTHS = 13
ACTIVATION_ITEMSIZE = 4  # fp32: SiLU and the softmax compute in fp32 whatever the dtype
# Safetensors dtype -> bytes per element in the file.
FILE_ITEMSIZE = {"F8_E4M3": 1, "BF16": 2, "F16": 2, "F32": 4, QUANTIZED_DTYPE: 4}


@dataclass(frozen=True)
class DiTSizes:
    """What one DiT takes in memory (bytes), from its files' headers."""

    resident: int  # parameters outside the blocks (the text projection only if it is read)
    blocks: tuple[int, ...]  # each block's parameters in memory
    stream_extra: int  # the largest block's transient file bytes while it is converted
    config: TransformerConfig

    @property
    def largest_block(self) -> int:
        return max(self.blocks, default=0)


def dit_sizes(component_dir: Path | str, dtype: mx.Dtype, text_input: bool = True) -> DiTSizes:
    """Bytes of a DiT component folder as ``from_pretrained`` would hold it in ``dtype``:
    packed quantized weights as stored, every float (and fp8, dequantized) tensor in ``dtype``."""
    component_dir = Path(component_dir)
    config = TransformerConfig.from_file(component_dir / "config.json")
    headers = strip_prefixes(tensor_headers(component_files(component_dir)), CHECKPOINT_PREFIXES)
    resident = 0
    blocks = [0] * config.num_layers
    transient = [0] * config.num_layers
    for key, (file_dtype, shape, _) in headers.items():
        if key.startswith(TEXT_INPUT_MODULES) and not text_input:
            continue
        count = math.prod(shape)
        if file_dtype == QUANTIZED_DTYPE:
            held = 4 * count
        elif key.endswith(".weight_scale"):
            held = 0  # folded into its fp8 weight at load
        else:
            held = count * dtype.size
        index = block_index(key)
        if index is None or index >= config.num_layers:
            resident += held
            continue
        blocks[index] += held
        if file_dtype != QUANTIZED_DTYPE and FILE_ITEMSIZE.get(file_dtype, 4) != dtype.size:
            transient[index] += count * FILE_ITEMSIZE.get(file_dtype, 4)
    return DiTSizes(resident, tuple(blocks), max(transient, default=0), config)


def activation_bytes(config: TransformerConfig, tokens: int, streaming: bool) -> int:
    """Upper bound on one DiT block's activations (bytes) for ``tokens`` (text + image),
    with the attention-score budget and feed-forward chunk that mode sets (``streaming``: the
    low-memory ones). Fitted above the measured full-width rows (fp32, MLX peak minus
    resident): low-memory 0.56 / 1.43 / 4.33 GB at 1324 / 5096 / 17384 tokens, estimated
    0.69 / 1.59 / 4.53; resident 0.93 / 1.76 / 4.33, estimated 1.19 / 2.09 / 5.04."""
    score_budget, ffn_tokens = (
        (LOW_MEMORY_SCORE_BYTES, LOW_MEMORY_FFN_TOKENS) if streaming else (SCORE_BYTES, FFN_TOKENS)
    )
    # The whole score budget and chunk even for shorter sequences: the measured intercepts
    # (0.25 GB low-memory, 0.64 GB resident) are that size, not the smaller exact terms.
    ffn = 3 * ffn_tokens * config.intermediate_size * ACTIVATION_ITEMSIZE
    widths = ACTIVATION_WIDTHS * tokens * config.hidden_size * ACTIVATION_ITEMSIZE
    return score_budget + ffn + widths


def denoise_bytes(sizes: tuple[DiTSizes, ...], resident: tuple[int, ...], tokens: int) -> int:
    """Estimated peak while denoising with the first ``resident[i]`` blocks of DiT i kept:
    every DiT's resident parts and kept blocks, plus, for the DiT running (one at a time), its
    activations and, when it streams, its largest streamed block with its transient bytes."""
    held = sum(s.resident + sum(s.blocks[:k]) for s, k in zip(sizes, resident, strict=True))
    running = 0
    for s, k in zip(sizes, resident, strict=True):
        streams = k < len(s.blocks)
        stream = max(s.blocks[k:], default=0) + s.stream_extra if streams else 0
        running = max(running, stream + activation_bytes(s.config, tokens, streams))
    return held + running


def check_limit(memory_limit: float, unit: str = "bytes") -> float:
    """A memory limit must be a finite number > 0 (of ``unit``); else a ``ValueError`` naming it."""
    if isinstance(memory_limit, bool) or not isinstance(memory_limit, int | float):
        raise ValueError(f"memory limit must be a number of {unit}, got {memory_limit!r}")
    if not math.isfinite(memory_limit) or memory_limit <= 0:
        raise ValueError(
            f"memory limit must be a finite number of {unit} > 0, got {memory_limit!r}"
        )
    return memory_limit


def plan_from_sizes(
    sizes: tuple[DiTSizes, ...], memory_limit_bytes: float, tokens: int
) -> tuple[int, ...]:
    """Blocks of each DiT to keep resident: the most whose :func:`denoise_bytes` fits in the
    limit, added one block at a time to the DiT with fewer kept (equal blocks cost the same
    memory and the same reads), in block order. All blocks when everything fits; 0 each (the
    low-memory mode) when nothing more fits, even if that too is over the limit."""
    check_limit(memory_limit_bytes)
    full = tuple(len(s.blocks) for s in sizes)
    if denoise_bytes(sizes, full, tokens) <= memory_limit_bytes:
        return full
    kept = [0] * len(sizes)
    while True:
        open_ = [i for i, s in enumerate(sizes) if kept[i] < len(s.blocks)]
        if not open_:
            break
        i = min(open_, key=lambda j: (kept[j], j))
        trial = list(kept)
        trial[i] += 1
        if denoise_bytes(sizes, tuple(trial), tokens) > memory_limit_bytes:
            break
        kept = trial
    return tuple(kept)


class DenoisePlan(NamedTuple):
    """Resident blocks of each DiT and the estimated denoising peak (bytes) with them."""

    cond: int
    uncond: int
    estimate: int


def checkpoint_sizes(checkpoint_dir: Path | str, dtype: mx.Dtype) -> tuple[DiTSizes, ...]:
    """:func:`dit_sizes` of both DiTs of a checkpoint (reads their configs and file headers)."""
    checkpoint_dir = Path(checkpoint_dir)
    return tuple(dit_sizes(checkpoint_dir / name, dtype, text) for name, text in DIT_COMPONENTS)


def plan_denoise(
    checkpoint_dir: Path | str,
    dtype: mx.Dtype,
    memory_limit_bytes: float,
    tokens: int,
    sizes: tuple[DiTSizes, ...] | None = None,
) -> DenoisePlan:
    """:func:`plan_resident_blocks` with its estimate (for :func:`cache_limit`); ``sizes``:
    the checkpoint's :func:`checkpoint_sizes` when the caller has read them already."""
    check_limit(memory_limit_bytes)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
        raise ValueError(f"tokens must be an integer > 0, got {tokens!r}")
    if sizes is None:
        sizes = checkpoint_sizes(checkpoint_dir, dtype)
    cond, uncond = plan_from_sizes(sizes, memory_limit_bytes, tokens)
    return DenoisePlan(cond, uncond, denoise_bytes(sizes, (cond, uncond), tokens))


def plan_resident_blocks(
    checkpoint_dir: Path | str, dtype: mx.Dtype, memory_limit_bytes: float, tokens: int
) -> tuple[int, int]:
    """``(cond_k, uncond_k)``: how many blocks of ``transformer/`` and
    ``unconditional_transformer/`` stay resident (``from_pretrained(resident_blocks=k)``) so
    that denoising a ``tokens``-long sequence (caption + image tokens) stays within
    ``memory_limit_bytes`` by this module's estimate (0 and 0, the low-memory mode, when even
    that does not fit). The text encoder and the VAE are not counted: they run before and
    after denoising and are freed (``keep_in_memory=False``)."""
    plan = plan_denoise(checkpoint_dir, dtype, memory_limit_bytes, tokens)
    return plan.cond, plan.uncond


def default_memory_limit() -> int:
    """The budget when none is given: on Metal, MLX's recommended working set (what macOS lets
    the GPU keep resident: about 65-75% of a Mac's memory); elsewhere ``KEEP_FRACTION`` (60%)
    of RAM, the share ``environment.fits_in_memory`` grants the weights."""
    if mx.metal.is_available():
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        recommended = info.get("max_recommended_working_set_size")
        if recommended:
            return int(recommended)
    return int(KEEP_FRACTION * physical_memory())


def cache_limit(memory_limit_bytes: float, planned_bytes: int) -> int:
    """MLX's buffer-cache limit under a budget: what the plan leaves free of it. The cache
    keeps freed buffers for reuse (each streamed block reuses the last one's), but counts in
    the process's memory while MLX's active-memory peak does not; capped so the two together
    stay within the limit."""
    check_limit(memory_limit_bytes)
    return max(0, int(memory_limit_bytes) - int(planned_bytes))


def set_cache_limit(limit_bytes: int) -> int:
    """``mx.set_cache_limit``: at most ``limit_bytes`` of freed buffers are kept for reuse
    (0: none, freed memory goes back at once). Returns the previous limit."""
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int) or limit_bytes < 0:
        raise ValueError(
            f"cache limit must be an integer number of bytes >= 0, got {limit_bytes!r}"
        )
    return mx.set_cache_limit(limit_bytes)
