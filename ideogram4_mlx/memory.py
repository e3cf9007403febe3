"""Memory policy, in one place: the machine's default budget, whether the models stay loaded
between images, how many DiT blocks stay resident while denoising (the rest streamed), and
MLX's buffer-cache limit. :class:`MemoryBudget` holds it for one pipeline.

Everything is estimated from the weight files' headers and the configs before anything loads,
by one byte rule (:func:`held_bytes`). The pipeline runs its stages one after another and frees
each model after its stage (text encoder, then both DiTs, then the VAE), so the budget binds
where the DiTs run: both DiTs' resident parameters, one streamed block at a time when any
streams, and one block's activations (blocks run one after another). The activation model is an
upper bound of ``benchmarks/results/pipeline_memory.json`` (see :func:`activation_bytes`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx

from ideogram4_mlx.dit_file import DiTFile, as_source, file_sizes
from ideogram4_mlx.environment import physical_memory
from ideogram4_mlx.errors import InputError
from ideogram4_mlx.text_encoder import LM_PREFIXES, UNUSED_PREFIXES
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
from ideogram4_mlx.vae import BN_PREFIX
from ideogram4_mlx.weights import (
    FLOAT_MODE_SCALES_DTYPE,
    QUANTIZED_DTYPE,
    SCALE_SUFFIX,
    component_files,
    strip_prefixes,
    tensor_headers,
)

GB = 10**9  # the unit of --memory-limit and load(memory_limit=)
# The largest limit taken (1 PB): no machine has it, so a larger one is a typo or bytes given
# as GB; below it every byte count is exact in a float (< 2**53).
MAX_LIMIT_BYTES = 10**15
# The share of RAM the models' weights may take and still stay loaded between images.
KEEP_FRACTION = 0.6
# Activations: fp32 widths of (tokens, hidden) alive at a block's peak, beyond the chunked
# feed-forward and the attention scores. 13 bounds every measured row (11.3-12.4 widths at
# 1024^2 and 2048^2, fp32; bf16 needs less), see activation_bytes.
ACTIVATION_WIDTHS = 13
ACTIVATION_ITEMSIZE = 4  # fp32: SiLU and the softmax compute in fp32 whatever the dtype
# Safetensors dtype -> bytes per element in the file.
FILE_ITEMSIZE = {
    "F8_E4M3": 1,
    "BF16": 2,
    "F16": 2,
    "F32": 4,
    QUANTIZED_DTYPE: 4,
    FLOAT_MODE_SCALES_DTYPE: 1,
}
# Loaded as stored, never cast to the load dtype (``weights.cast_floats`` casts floats only).
STORED_AS_IS = (QUANTIZED_DTYPE, FLOAT_MODE_SCALES_DTYPE)
# What the load of the models outside the DiTs keeps of their files, as their ``sanitize``
# does: (prefixes stripped, keys then dropped). The text encoder drops the vision tower, any LM
# head and the final norm (MODEL_NOTES#text-encoder-taps), the VAE its bn buffers
# (MODEL_NOTES#latent-normalization).
OTHER_MODELS = {
    "text_encoder": (LM_PREFIXES, (*UNUSED_PREFIXES, "norm.weight")),
    "vae": ((), (BN_PREFIX,)),
}


def check_limit(memory_limit: object, unit: str = "GB") -> int:
    """The one check of a memory limit, for every interface: ``memory_limit`` in ``unit``
    (``"GB"``, 10^9 bytes, as ``--memory-limit`` and ``load(memory_limit=)`` take it, or
    ``"bytes"``) -> whole bytes (rounded, at least 1).

    It must be an int or float (not a bool), finite, > 0 and at most ``MAX_LIMIT_BYTES``
    (10^6 GB); else a ``ValueError`` naming the value. 0 is refused too: streaming every DiT
    block is ``low_memory`` (``PipelineOptions``' memory limit 0, checked there).
    """
    scale = {"GB": GB, "bytes": 1}[unit]
    if isinstance(memory_limit, bool) or not isinstance(memory_limit, int | float):
        raise InputError(f"memory limit must be a number of {unit}, got {memory_limit!r}")
    if not (math.isfinite(memory_limit) and 0 < memory_limit <= MAX_LIMIT_BYTES / scale):
        raise InputError(
            f"memory limit must be a finite number of {unit} > 0 and at most "
            f"{MAX_LIMIT_BYTES / scale:g}, got {memory_limit!r}"
        )
    return max(1, round(memory_limit * scale))


def default_memory_limit() -> int:
    """The budget when none is given: on Metal, MLX's recommended working set (what macOS lets
    the GPU keep resident: about 65-75% of a Mac's memory); elsewhere ``KEEP_FRACTION`` (60%)
    of RAM, the share :meth:`MemoryBudget.keep_models` grants the weights."""
    if mx.metal.is_available():
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        recommended = info.get("max_recommended_working_set_size")
        if recommended:
            return int(recommended)
    return int(KEEP_FRACTION * physical_memory())


# -- the byte rule -----------------------------------------------------------------------------


def held_bytes(key: str, file_dtype: str, shape: tuple[int, ...], dtype: mx.Dtype) -> int:
    """The byte rule: what one checkpoint tensor takes in memory once loaded in ``dtype``.
    Packed quantized weights (U32) and float-mode scales (U8) as stored; an fp8
    ``.weight_scale`` nothing, folded into its weight at load (MODEL_NOTES#fp8-dequantization);
    every other tensor, fp8 weights dequantized, ``dtype``'s bytes per element
    (``weights.cast_floats``)."""
    count = math.prod(shape)
    if file_dtype in STORED_AS_IS:
        return FILE_ITEMSIZE[file_dtype] * count
    if key.endswith(SCALE_SUFFIX):
        return 0
    return count * dtype.size


def kept_headers(
    component_dir: Path, strip: tuple[str, ...] = (), dropped: tuple[str, ...] = ()
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{key: (file dtype, shape)}`` of the tensors a component's load keeps: keys without
    their ``strip`` prefix, those then starting with one of ``dropped`` left out."""
    headers = strip_prefixes(tensor_headers(component_files(component_dir)), strip)
    return {
        key: (file_dtype, shape)
        for key, (file_dtype, shape, _) in headers.items()
        if not key.startswith(dropped)
    }


def component_bytes(
    component_dir: Path, dtype: mx.Dtype, strip: tuple[str, ...] = (), dropped: tuple[str, ...] = ()
) -> int:
    """:func:`held_bytes` summed over what a component's load keeps (see :func:`kept_headers`)."""
    kept = kept_headers(component_dir, strip, dropped)
    return sum(held_bytes(key, d, shape, dtype) for key, (d, shape) in kept.items())


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

    @property
    def total(self) -> int:
        """Every parameter, all blocks resident."""
        return self.resident + sum(self.blocks)


def dit_sizes(component_dir: Path | str, dtype: mx.Dtype, text_input: bool = True) -> DiTSizes:
    """Bytes of a DiT component folder as ``from_pretrained`` would hold it in ``dtype``, by
    :func:`held_bytes`; ``text_input=False``: without the text projection, which is not read.
    A single DiT file (a ``dit_file.DiTFile``): its skeleton as ``dit_file`` loads it."""
    if isinstance(component_dir, DiTFile):
        return DiTSizes(*file_sizes(component_dir, dtype, text_input))
    component_dir = Path(component_dir)
    config = TransformerConfig.from_file(component_dir / "config.json")
    dropped = () if text_input else TEXT_INPUT_MODULES
    resident = 0
    blocks = [0] * config.num_layers
    transient = [0] * config.num_layers
    for key, (file_dtype, shape) in kept_headers(
        component_dir, CHECKPOINT_PREFIXES, dropped
    ).items():
        held = held_bytes(key, file_dtype, shape, dtype)
        index = block_index(key)
        if index is None or index >= config.num_layers:
            resident += held
            continue
        blocks[index] += held
        itemsize = FILE_ITEMSIZE.get(file_dtype, 4)
        if file_dtype not in STORED_AS_IS and itemsize != dtype.size:
            transient[index] += math.prod(shape) * itemsize
    return DiTSizes(resident, tuple(blocks), max(transient, default=0), config)


def checkpoint_sizes(
    checkpoint_dir: Path | str, dtype: mx.Dtype, transformer_dir: Path | str | None = None
) -> tuple[DiTSizes, ...]:
    """:func:`dit_sizes` of both DiTs of a checkpoint (reads their configs and file headers);
    ``transformer_dir``: the conditional DiT swapped in (``--transformer``), if any."""
    folders = dit_folders(checkpoint_dir, transformer_dir)
    texts = [text for _, text in DIT_COMPONENTS]
    return tuple(dit_sizes(f, dtype, text) for f, text in zip(folders, texts, strict=True))


def dit_folders(
    checkpoint_dir: Path | str, transformer_dir: Path | str | None = None
) -> tuple[Path, ...]:
    """The folders of the (conditional, unconditional) DiTs: the checkpoint's, the conditional
    one replaced by ``transformer_dir`` when given."""
    folders = [Path(checkpoint_dir) / name for name, _ in DIT_COMPONENTS]
    if transformer_dir is not None:
        folders[0] = as_source(transformer_dir)
    return tuple(folders)


def models_bytes(
    checkpoint_dir: Path | str, dtype: mx.Dtype, sizes: tuple[DiTSizes, ...] | None = None
) -> int:
    """What every model of a checkpoint holds once loaded in ``dtype`` (``keep_in_memory``):
    both DiTs as the denoise plan counts them (``sizes``: their :func:`checkpoint_sizes`, read
    here when not given; None for a DiT not held), the text encoder and the VAE by the same
    rule."""
    checkpoint_dir = Path(checkpoint_dir)
    if sizes is None:
        sizes = checkpoint_sizes(checkpoint_dir, dtype)
    others = sum(
        component_bytes(checkpoint_dir / name, dtype, strip, dropped)
        for name, (strip, dropped) in OTHER_MODELS.items()
    )
    return sum(s.total for s in sizes if s is not None) + others


# -- the denoise plan --------------------------------------------------------------------------


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


def plan_from_sizes(
    sizes: tuple[DiTSizes, ...], limit_bytes: float, tokens: int
) -> tuple[int, ...]:
    """Blocks of each DiT to keep resident: the most whose :func:`denoise_bytes` fits in
    ``limit_bytes`` (from :func:`check_limit`), added one block at a time to the DiT with fewer
    kept (equal blocks cost the same memory and the same reads), in block order. All blocks
    when everything fits; 0 each (the low-memory mode) when nothing more fits, even if that too
    is over the limit."""
    full = tuple(len(s.blocks) for s in sizes)
    if denoise_bytes(sizes, full, tokens) <= limit_bytes:
        return full
    kept = [0] * len(sizes)
    while True:
        open_ = [i for i, s in enumerate(sizes) if kept[i] < len(s.blocks)]
        if not open_:
            break
        i = min(open_, key=lambda j: (kept[j], j))
        trial = list(kept)
        trial[i] += 1
        if denoise_bytes(sizes, tuple(trial), tokens) > limit_bytes:
            break
        kept = trial
    return tuple(kept)


class DenoisePlan(NamedTuple):
    """Resident blocks of each DiT and the estimated denoising peak (bytes) with them."""

    cond: int
    uncond: int
    estimate: int


def plan_denoise(sizes: tuple[DiTSizes, ...], limit_bytes: float, tokens: int) -> DenoisePlan:
    """:func:`plan_from_sizes` for both DiTs (``sizes``: :func:`checkpoint_sizes`) and a
    ``tokens``-long sequence (caption + image tokens), with its estimate (for
    :func:`cache_limit`). The text encoder and the VAE are not counted: they run before and
    after denoising and are freed (``keep_in_memory=False``)."""
    check_tokens(tokens)
    cond, uncond = plan_from_sizes(sizes, limit_bytes, tokens)
    return DenoisePlan(cond, uncond, denoise_bytes(sizes, (cond, uncond), tokens))


def check_tokens(tokens: object) -> int:
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
        raise InputError(f"tokens must be an integer > 0, got {tokens!r}")
    return tokens


def cache_limit(limit_bytes: float, planned_bytes: int) -> int:
    """MLX's buffer-cache limit under a budget: what the plan leaves free of it. The cache
    keeps freed buffers for reuse (each streamed block reuses the last one's), but counts in
    the process's memory while MLX's active-memory peak does not; capped so the two together
    stay within the limit."""
    return max(0, int(limit_bytes) - int(planned_bytes))


def set_cache_limit(limit_bytes: int) -> int:
    """``mx.set_cache_limit``: at most ``limit_bytes`` of freed buffers are kept for reuse
    (0: none, freed memory goes back at once). Returns the previous limit."""
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int) or limit_bytes < 0:
        raise InputError(
            f"cache limit must be an integer number of bytes >= 0, got {limit_bytes!r}"
        )
    return mx.set_cache_limit(limit_bytes)


# -- one pipeline's policy ---------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryBudget:
    """The memory policy of one pipeline over ``checkpoint_dir`` in ``dtype``: ``limit_bytes``
    bounds denoising (checked by :func:`check_limit`; None: :func:`default_memory_limit`),
    ``low_memory`` streams every DiT block whatever the limit. ``dits``: the (folder, under
    ``checkpoint_dir`` or absolute for a swapped-in DiT, text_input) of the (cond, uncond) DiTs
    as they would load, None for one never loaded on its
    own (the conditional DiT running both passes); a folder the checkpoint lacks counts as
    None too. The DiTs' headers are read once, on first use, for both :meth:`keep_models` and
    :meth:`plan`."""

    checkpoint_dir: Path
    dtype: mx.Dtype
    limit_bytes: int | None = None
    low_memory: bool = False
    dits: tuple[tuple[str | Path, bool] | None, ...] = DIT_COMPONENTS  # (folder, text)

    def __post_init__(self):
        limit = default_memory_limit() if self.limit_bytes is None else self.limit_bytes
        object.__setattr__(self, "limit_bytes", check_limit(limit, "bytes"))
        object.__setattr__(self, "checkpoint_dir", Path(self.checkpoint_dir))

    @functools.cached_property
    def sizes(self) -> tuple[DiTSizes | None, ...]:
        """:func:`dit_sizes` of each of ``dits`` (None where it is None or absent)."""
        sizes = []
        for dit in self.dits:
            path = None if dit is None else dit[0]
            if path is not None and not isinstance(path, DiTFile):  # a folder; a file: dit_file
                path = self.checkpoint_dir / path
            present = isinstance(path, DiTFile) or (
                path is not None and (path / "config.json").is_file()
            )
            sizes.append(dit_sizes(path, self.dtype, dit[1]) if present else None)
        return tuple(sizes)

    def models_bytes(self) -> int:
        """:func:`models_bytes` of the checkpoint: every model loaded."""
        return models_bytes(self.checkpoint_dir, self.dtype, self.sizes)

    def keep_models(self) -> bool:
        """``keep_in_memory``'s default: every model stays loaded between images when their
        weights take at most ``KEEP_FRACTION`` of RAM and fit the budget (kept models share it
        with the DiTs, which the plan does not count)."""
        return self.models_bytes() <= min(KEEP_FRACTION * physical_memory(), self.limit_bytes)

    def plan(self, tokens: int, held: tuple[int, ...] = (0, 1)) -> tuple[int, int]:
        """Resident blocks of (cond, uncond) for a ``tokens``-long sequence, planning only the
        DiTs numbered ``held`` (0: cond, 1: uncond; another gets 0): all when the budget holds
        them, none with ``low_memory``; sets MLX's cache limit to what the plan leaves of the
        budget (left alone with ``low_memory``)."""
        if self.low_memory:
            return 0, 0
        check_tokens(tokens)
        sizes = tuple(self.sizes[i] for i in held)
        kept = plan_from_sizes(sizes, self.limit_bytes, tokens)
        set_cache_limit(cache_limit(self.limit_bytes, denoise_bytes(sizes, kept, tokens)))
        resident = dict(zip(held, kept, strict=True))
        return resident.get(0, 0), resident.get(1, 0)

    def streamed(self, plan: tuple[int, ...], dits: tuple[int, ...] = (0, 1)) -> int:
        """How many blocks of the DiTs numbered ``dits`` (0: cond, 1: uncond) ``plan`` streams."""
        return sum(len(self.sizes[i].blocks) - plan[i] for i in dits)
