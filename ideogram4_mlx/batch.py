"""Many images of one request: their seeds, each rank's share, the PNGs gathered to rank 0.

The CLI (``--num-images``, ``--seeds``) and the server (the OpenAI ``n``) draw seeds here, so
image ``i`` of a request with seed ``s`` has seed ``s + i`` wherever it is made.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import replace

import mlx.core as mx

from ideogram4_mlx.distributed import DataGroup
from ideogram4_mlx.errors import InputError
from ideogram4_mlx.generation import GenerationResult
from ideogram4_mlx.metadata import png_bytes
from ideogram4_mlx.request import MAX_SEED, GenerationRequest, ResolvedRequest

MAX_IMAGES = 256  # one command's images: a bound on what --num-images / --seeds can ask
SEED_BITS = 31  # a seed crosses the ranks as int32 pieces of this many bits


def image_seeds(
    seed: int | None,
    num_images: int = 1,
    seeds: Sequence[int] | None = None,
    group: DataGroup | None = None,
) -> list[int]:
    """``seeds`` as given (different, each in 0..2**63-1), else ``seed, seed + 1, ...``; with
    no seed, a random start (rank 0's on every rank of ``group``). ``ValueError`` naming the
    problem for more than ``MAX_IMAGES`` images or a seed out of range."""
    count = len(seeds) if seeds else num_images
    if not 1 <= count <= MAX_IMAGES:
        raise InputError(f"{count} images: use 1..{MAX_IMAGES} per request")
    if seeds:
        chosen = [int(s) for s in seeds]
        if len(set(chosen)) != len(chosen):
            raise InputError(f"the seeds {list(seeds)} repeat: give different seeds")
    else:
        start = seed
        if start is None:
            start = random.randint(0, MAX_SEED - count + 1)
            if group is not None:
                start = _agree(start, group)
        chosen = [int(start) + i for i in range(count)]
    bad = [s for s in chosen if not 0 <= s <= MAX_SEED]
    if bad:
        raise InputError(f"seed {bad[0]} is out of range: the seeds must be in 0..{MAX_SEED}")
    return chosen


def image_requests(
    request: GenerationRequest, num_images: int = 1, seeds: Sequence[int] | None = None
) -> list[GenerationRequest]:
    """``request`` once per seed of :func:`image_seeds` (its own seed is the first)."""
    return [replace(request, seed=s) for s in image_seeds(request.seed, num_images, seeds)]


def _agree(start: int, group: DataGroup) -> int:
    """Rank 0's ``start`` on every rank (int32 pieces: all_sum of rank 0's and zeros)."""
    mask = (1 << SEED_BITS) - 1
    pieces = [(start >> (SEED_BITS * i)) & mask for i in range(3)]
    mine = mx.array(pieces if group.rank == 0 else [0, 0, 0], dtype=mx.int32)
    with group.watchdog.watching("agreeing on the first seed"):
        summed = mx.distributed.all_sum(mine, group=group.group).tolist()
    return sum(int(p) << (SEED_BITS * i) for i, p in enumerate(summed))


class ImageBatch:
    """The images of one request with seeds ``seeds``, made one after another by one pipeline
    (the models load once), or spread over the ranks of ``group`` (each holds both DiTs):
    :meth:`run` returns the PNG files, with their metadata, in seed order on rank 0."""

    def __init__(
        self,
        check: Callable[[GenerationRequest], ResolvedRequest],
        request: GenerationRequest,
        num_images: int = 1,
        seeds: Sequence[int] | None = None,
        group: DataGroup | None = None,
    ):
        self.check, self.request, self.group = check, request, group
        self.seeds = image_seeds(request.seed, num_images, seeds, group)

    @property
    def writes(self) -> bool:
        """Whether this process receives the images (rank 0, or no ranks)."""
        return self.group is None or self.group.rank == 0

    def run(self, generate: Callable[[ResolvedRequest], GenerationResult]) -> list[bytes] | None:
        """``generate`` this process's share of the images (validated once: an edit's inputs
        are read once for all); every PNG on rank 0, None on the others."""
        base = self.check(self.request)
        requests = [base.with_seed(seed) for seed in self.seeds]
        mine = (
            range(len(requests)) if self.group is None else self.group.share(range(len(requests)))
        )
        blobs = []
        for i in mine:
            result = generate(requests[i])
            blobs.append(png_bytes(result.image, result.metadata))
        if self.group is not None:
            blobs = self.group.gather(blobs, len(requests))
        return blobs if self.writes else None
