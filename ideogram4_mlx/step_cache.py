"""Step caching for the DiT (``--cache-threshold``): First Block Cache, one per CFG branch.

Diffusers' ``hooks/first_block_cache.py`` (after ParaAttention's First Block Cache; TeaCache
and Cache-DiT's DBCache are relatives): a pass whose first block barely moved since the last
full pass reuses what the other blocks added then. ``Ideogram4Transformer.run`` applies it.
"""

from __future__ import annotations

import mlx.core as mx


class BlockCache:
    """First Block Cache for one branch over one generation (``run(..., cache=)``).

    After block 0, its residual ``r = out0 - in0`` is compared with the one of the last full
    pass: when ``mean|r - r_full| / mean|r_full| < threshold`` the other blocks are skipped and
    the output is ``out0`` plus what they added at that full pass (``h_N - out0``). The rule
    and measure are diffusers' ``hooks/first_block_cache.py`` (from ParaAttention); a skipped
    pass stores nothing, so each comparison is with the last full pass. Threshold 0 never
    skips and stores nothing: bit for bit the uncached run. Counts the two kinds of pass.
    """

    def __init__(self, threshold: float = 0.0):
        self.threshold = float(threshold)
        self.first_residual: mx.array | None = None  # block 0's r at the last full pass
        self.rest_residual: mx.array | None = None  # what blocks 1..N-1 added then
        self.full_passes = 0
        self.cached_passes = 0

    def reusable(self, residual: mx.array) -> bool:
        """Whether block 0's ``residual`` (B, L, D) is within the threshold of the stored one
        (evaluates it: the decision is made on the host)."""
        ref = self.first_residual
        if self.threshold <= 0 or ref is None or ref.shape != residual.shape:
            return False
        ref32 = ref.astype(mx.float32)
        change = mx.abs(residual.astype(mx.float32) - ref32).mean() / mx.abs(ref32).mean()
        return change.item() < self.threshold

    def reuse(self, first: mx.array) -> mx.array:
        """Block N-1's output estimated from block 0's ``first`` (a cached pass)."""
        self.cached_passes += 1
        return first + self.rest_residual

    def store(self, residual: mx.array | None, rest: mx.array) -> None:
        """A full pass: block 0's ``residual`` and what blocks 1..N-1 added (``rest``); at
        threshold 0 only counted."""
        self.full_passes += 1
        if self.threshold <= 0:
            return
        self.first_residual, self.rest_residual = residual, rest
        mx.eval(residual, rest)  # two (B, L, D) arrays held, not the pass's graph

    def counts(self) -> dict:
        return {"full_passes": self.full_passes, "cached_passes": self.cached_passes}
