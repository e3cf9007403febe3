"""The unconditional DiT as a delta on the conditional one: one DiT's weights in memory.

A delta file is an ai-toolkit-layout LoRA on the conditional DiT (``lora.py`` reads it):
``diffusion_model.<module>.lora_A.weight`` (r, in), ``.lora_B.weight`` (out, r) and ``.alpha``
per linear, with our checkpoint's names (fused ``attention.qkv``, ``attention.o``), plus full
differences ``diffusion_model.<module>.diff`` (weight) and ``.diff_b`` (bias) for the tensors a
low-rank update does not fit (norms, biases, the image-indicator embedding), as kohya and
ai-toolkit write them. ``convert --uncond-as-lora`` writes one (``ideogram4_mlx.convert.delta``);
ostris' ``ideogram_4_unconditional_lora`` is read the same way (its key layout is not published:
whatever ``read_lora`` takes, with or without ``diff`` keys).

:class:`DeltaDiT` runs the unconditional pass through the conditional DiT with the delta on, for
that pass only: the low-rank terms are unfused adapters whose scale is 0 outside the pass (so the
conditional pass runs the same ops on the same weights, bit for bit), and the full differences
swap in precomputed ``W_cond + diff`` arrays (small tensors, fp32 sum, one rounding) for the pass.

    uncond = load_uncond_delta("ostris/ideogram_4_unconditional_lora", cond_dit)
    cond_fn, uncond_fn = velocity_fns(cond_dit, uncond, features, grid_h, grid_w)
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ideogram4_mlx.errors import InputError
from ideogram4_mlx.hub import resolve_file
from ideogram4_mlx.lora import (
    Adapters,
    LoRAError,
    LoRAFile,
    attach,
    linear_shapes,
    match,
    read_lora,
)
from ideogram4_mlx.step_cache import BlockCache
from ideogram4_mlx.transformer import (
    TEXT_INPUT_MODULES,
    Ideogram4Transformer,
    PreparedSequence,
)

DELTA_FILE = "unconditional_delta.safetensors"  # what `convert --uncond-as-lora` writes in DST
REPORT_FILE = "unconditional_delta.json"  # its per-layer reconstruction errors
FORMAT = "ideogram4-mlx unconditional delta"  # the safetensors metadata "format" it writes
# The name its adapters carry on the conditional DiT (set_scale finds them by it).
ADAPTER_NAME = "unconditional delta"


def delta_path(source: str | Path) -> Path:
    """A delta file: a path, a converted folder holding :data:`DELTA_FILE`, or a Hub repo
    (``owner/name`` with one .safetensors file, or ``owner/name/file.safetensors``)."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        if (folder / DELTA_FILE).is_file():
            return folder / DELTA_FILE
        raise FileNotFoundError(
            f"{folder} holds no {DELTA_FILE}; write one with `ideo4-mlx convert SRC DST "
            "--uncond-as-lora RANK` or name the delta file"
        )
    return resolve_file(source)


def read_uncond_delta(source: str | Path, dit: nn.Module) -> LoRAFile:
    """Read a delta (see :func:`delta_path`) and check it strictly against ``dit`` (the
    conditional DiT, or its lazy skeleton from ``Ideogram4Transformer.build``): every low-rank
    module and every full difference must name a parameter of that shape (``LoRAError`` naming
    the key otherwise)."""
    lora = read_lora(delta_path(source))
    check_delta(lora, dit)
    return lora


def check_delta(lora: LoRAFile, dit: nn.Module) -> None:
    """Strict shapes, as for LoRAs: see :func:`read_uncond_delta`."""
    if not lora.deltas and not lora.diffs:
        raise LoRAError(f"{lora.name} holds no LoRA pair and no .diff key: not a delta")
    match(lora, linear_shapes(dit), diffs=True)
    params = dict(tree_flatten(dit.parameters()))
    modules = dict(dit.named_modules())
    for target, diff in lora.diffs.items():
        key = lora.diff_sources[target]
        module = modules.get(target.rpartition(".")[0])
        if isinstance(module, nn.QuantizedLinear) and target.endswith(".weight"):
            raise LoRAError(
                f"{lora.name}: {key} is a full difference of {target}, which is quantized here: "
                "it cannot be added; use a float checkpoint or a low-rank delta "
                "(`convert --uncond-as-lora RANK`)"
            )
        if target not in params:
            raise LoRAError(
                f"{lora.name}: {key} names {target}, which the DiT does not have: a delta for "
                "another model or layout"
            )
        if tuple(diff.shape) != tuple(params[target].shape):
            raise LoRAError(
                f"{lora.name}: {key} has shape {tuple(diff.shape)}, but {target} is "
                f"{tuple(params[target].shape)}: a delta for another model or size"
            )


class DeltaDiT:
    """The unconditional DiT as ``dit`` (the conditional one) plus a delta, on its own passes.

    Same ``prepare``/``run``/``__call__`` as :class:`Ideogram4Transformer` (what
    ``generation.velocity_fns`` uses); ``run`` turns the delta on, runs ``dit`` and turns it
    off again, so the conditional pass through ``dit`` is unchanged. LoRAs already applied to
    ``dit`` unfused (the conditional ones) are off during this pass, as they are absent from a
    separate unconditional DiT; ``uncond_loras`` ``[(lora, scale)]`` are on in this pass only.
    LoRAs fused into ``dit`` cannot be separated and would reach this pass: do not combine.
    Resident DiTs only: a streamed ``dit`` is refused.
    """

    def __init__(
        self,
        dit: Ideogram4Transformer,
        delta: LoRAFile,
        scale: float = 1.0,
        uncond_loras: list[tuple[LoRAFile, float]] = (),
    ):
        check_resident(dit)
        check_delta(delta, dit)
        self.dit, self.delta = dit, delta
        attach(dit, delta, 0.0, ADAPTER_NAME)
        self.pass_scales = {ADAPTER_NAME: float(scale)}
        for lora, s in uncond_loras:
            match(lora, linear_shapes(dit))
            attach(dit, lora, 0.0, lora.name)
            self.pass_scales[lora.name] = float(s)
        self.swapped = self.swapped_parameters(float(scale))

    def swapped_parameters(self, scale: float) -> dict[str, mx.array]:
        """``W_cond + scale * diff`` per full difference (fp32 sum, one rounding), evaluated;
        the text projection's are left out: no text slot reads it on this pass."""
        swapped = {}
        for key, diff in self.delta.diffs.items():
            if key.startswith(TEXT_INPUT_MODULES):
                continue
            base = parameter(self.dit, key)
            total = base.astype(mx.float32) + (diff if scale == 1 else scale * diff)
            swapped[key] = total.astype(base.dtype)
        mx.eval(list(swapped.values()))
        return swapped

    @property
    def config(self):
        return self.dit.config

    @property
    def dtype(self) -> mx.Dtype:
        return self.dit.dtype

    @property
    def stream(self):
        return None

    @property
    def streamed_blocks(self) -> int:
        return 0

    def set_scale(self, name: str, scale: float) -> None:
        """The scale of the delta (:data:`ADAPTER_NAME`) or an unconditional LoRA in this pass."""
        if name not in self.pass_scales:
            raise LoRAError(f"no LoRA named {name} is on the unconditional pass")
        self.pass_scales[name] = float(scale)
        if name == ADAPTER_NAME:
            self.swapped = self.swapped_parameters(float(scale))

    def prepare(
        self,
        llm_features: mx.array | None,
        position_ids: np.ndarray | mx.array,
        segment_ids: np.ndarray | mx.array,
        indicator: np.ndarray | mx.array,
    ) -> PreparedSequence:
        """As :meth:`Ideogram4Transformer.prepare` for image tokens only (no text features)."""
        if llm_features is not None:
            raise InputError(
                "the unconditional branch takes no text features; pass llm_features=None"
            )
        return self.dit.prepare(None, position_ids, segment_ids, indicator)

    def run(
        self,
        x: mx.array,
        t: np.ndarray | mx.array,
        seq: PreparedSequence,
        cache: BlockCache | None = None,
    ) -> mx.array:
        """The unconditional velocity (B, L, 128) float32: ``dit.run`` with the delta on
        (``cache``: this branch's step cache, see ``step_cache.py``)."""
        # Every adapter on dit, the conditional LoRAs' too: each gets its scale for this pass.
        adapters = [
            m.lora
            for _, m in self.dit.named_modules()
            if isinstance(getattr(m, "lora", None), Adapters)
        ]
        saved = [list(a.items) for a in adapters]
        originals = {k: parameter(self.dit, k) for k in self.swapped}
        for a in adapters:
            a.items = [(n, d, self.pass_scales.get(n, 0.0)) for n, d, _ in a.items]
        self.dit.update(tree_unflatten(list(self.swapped.items())))
        try:
            # The graph is built here, so restoring afterwards leaves this pass's arrays as
            # they were when it ran (MLX arrays are immutable; update swaps references).
            return self.dit.run(x, t, seq, cache)
        finally:
            self.dit.update(tree_unflatten(list(originals.items())))
            for a, items in zip(adapters, saved, strict=True):
                a.items = items

    def __call__(self, x, t, llm_features, position_ids, segment_ids, indicator) -> mx.array:
        return self.run(x, t, self.prepare(llm_features, position_ids, segment_ids, indicator))


def check_resident(dit: Ideogram4Transformer) -> None:
    """A delta runs on a resident conditional DiT (all blocks, text projection loaded)."""
    if dit.stream is not None:
        raise InputError(
            f"the unconditional delta needs every block of the conditional DiT resident, "
            f"but {dit.streamed_blocks} stream: raise --memory-limit (the delta saves one "
            "DiT's memory), or use the unconditional checkpoint with streaming"
        )
    if dit.llm_cond_proj is None:
        raise InputError(
            "the unconditional delta applies to the conditional DiT (text_input=True); "
            "this one was loaded as the unconditional branch"
        )


def parameter(model: nn.Module, path: str) -> mx.array:
    """The parameter at a dotted path (``layers.0.attention_norm1.weight``)."""
    node = model
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def load_uncond_delta(
    source: str | Path,
    cond_dit: Ideogram4Transformer,
    scale: float = 1.0,
    uncond_loras: list[tuple[LoRAFile, float]] = (),
) -> DeltaDiT:
    """The unconditional DiT for ``velocity_fns``: ``cond_dit`` plus the delta at ``source``
    (a file, a converted folder with :data:`DELTA_FILE`, or a Hub repo such as
    ``ostris/ideogram_4_unconditional_lora``); see :class:`DeltaDiT`."""
    check_resident(cond_dit)
    return DeltaDiT(cond_dit, read_uncond_delta(source, cond_dit), scale, uncond_loras)
