"""CFG-parallel generation on two ranks (``mx.distributed``, started by ``mlx.launch``).

Rank 0 holds the text encoder, the conditional DiT and the VAE; rank 1 the unconditional DiT
only. Both ranks run the same Euler loop on the same latents: each computes its own pass,
one ``all_gather`` per step swaps the two velocities (one latent tensor each way), and both
combine them with the single-process formula, so both hold the same latents and rank 0's
image equals the single-process image bit for bit. The starting latents (and an inpainting
run's input latents) are sent from rank 0 once.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import mlx.core as mx
import numpy as np

from ideogram4_mlx.transformer import DIT_COMPONENTS

CFG_RANKS = 2
HEADER_BYTES = 1 << 20  # a safetensors file's header (tensor names, dtypes, offsets) fits


class DistributedError(RuntimeError):
    """The ranks cannot run together: no launcher, a wrong rank count, other checkpoints."""


def checkpoint_fingerprint(checkpoint_dir: Path) -> bytes:
    """SHA-256 over both DiT folders' config.json and each weight file's name, size and
    header: the same checkpoint gives the same digest on any machine, in milliseconds."""
    digest = hashlib.sha256()
    for folder, _ in DIT_COMPONENTS:
        path = Path(checkpoint_dir) / folder
        digest.update((path / "config.json").read_bytes())
        for file in sorted(path.glob("*.safetensors")):
            digest.update(f"{file.name}:{file.stat().st_size}:".encode())
            with open(file, "rb") as f:
                digest.update(f.read(HEADER_BYTES))
    return digest.digest()


def join_ranks(checkpoint_dir: Path):
    """The group of ranks ``mlx.launch`` started, after checking that every rank loads the
    same checkpoint (a fingerprint gathered from all). ``DistributedError`` for one process
    (no launcher) or different checkpoints."""
    group = mx.distributed.init()
    if group.size() == 1:
        raise DistributedError(
            "--distributed needs two ranks started by mlx.launch (found one process): "
            "mlx.launch -n 2 --backend ring -- ideo4-mlx generate --distributed ... (or "
            "--hostfile hosts.json for two Macs)"
        )
    mine = np.frombuffer(checkpoint_fingerprint(checkpoint_dir), np.uint8)
    every = np.array(mx.distributed.all_gather(mx.array(mine)[None], group=group))
    if not (every == every[0]).all():
        raise DistributedError(
            f"rank {group.rank()}: the ranks load different checkpoints (the DiT configs or "
            f"weight files differ; this rank has {checkpoint_dir}): give every rank the same "
            "--model"
        )
    return group


class CFGGroup:
    """The two ranks of a CFG-parallel run."""

    def __init__(self, group):
        self.group = group
        self.rank = group.rank()

    @classmethod
    def start(cls, checkpoint_dir: Path) -> CFGGroup:
        """Join the two ranks ``mlx.launch`` started (same checkpoint on both)."""
        group = join_ranks(checkpoint_dir)
        if group.size() != CFG_RANKS:
            raise DistributedError(
                f"CFG-parallel runs on exactly {CFG_RANKS} ranks (one DiT each); mlx.launch "
                f"started {group.size()}: launch with -n {CFG_RANKS}"
            )
        return cls(group)

    def share(self, x: mx.array | None, like: mx.array) -> mx.array:
        """Rank 0's ``x`` on both ranks (rank 1 passes None); exact: ``x + 0``."""
        mine = x if self.rank == 0 else mx.zeros_like(like)
        return mx.distributed.all_sum(mine.astype(mx.float32), group=self.group)

    def swap(self, velocity: mx.array) -> tuple[mx.array, mx.array]:
        """(v_cond, v_uncond), both fp32, from rank 0's and rank 1's velocity (1, N, 128)."""
        both = mx.distributed.all_gather(velocity.astype(mx.float32), group=self.group)
        return both[:1], both[1:]


class DataGroup:
    """Data-parallel ranks for many images: each rank holds both DiTs and makes its share of
    the images; the PNGs (with their metadata) are gathered to rank 0, which writes them."""

    def __init__(self, group):
        self.group = group
        self.rank, self.size = group.rank(), group.size()

    @classmethod
    def start(cls, checkpoint_dir: Path) -> DataGroup:
        """Join the ranks ``mlx.launch`` started (same checkpoint on all)."""
        return cls(join_ranks(checkpoint_dir))

    def share(self, items: list) -> list:
        """This rank's items: every ``size``-th, starting at its rank."""
        return items[self.rank :: self.size]

    def gather(self, blobs: list[bytes], total: int) -> list[bytes]:
        """Every rank's ``blobs`` (its :meth:`share` of ``total`` items), back in item order."""
        per_rank = -(-total // self.size)
        lengths = np.full(per_rank, -1, np.int32)
        lengths[: len(blobs)] = [len(b) for b in blobs]
        every_length = np.array(
            mx.distributed.all_gather(mx.array(lengths)[None], group=self.group)
        )
        width = max(1, int(every_length.max()))
        data = np.zeros((per_rank, width), np.uint8)
        for i, blob in enumerate(blobs):
            data[i, : len(blob)] = np.frombuffer(blob, np.uint8)
        every = np.array(mx.distributed.all_gather(mx.array(data)[None], group=self.group))
        out = [b""] * total
        for rank in range(self.size):
            for i, length in enumerate(every_length[rank]):
                if length >= 0:
                    out[rank + i * self.size] = every[rank, i, :length].tobytes()
        return out


MAX_IMAGES = 256  # one command's images: a bound on what --num-images / --seeds can ask


def image_seeds(
    seed: int | None, num_images: int, seeds: list[int] | None, group: DataGroup | None = None
) -> list[int]:
    """``seeds`` as given, else ``seed, seed + 1, ...``; with no seed, a random start below
    2**31, rank 0's on every rank of ``group``."""
    if seeds:
        chosen = list(seeds)
    else:
        start = seed
        if start is None:
            start = random.randint(0, 2**31 - 1)
            if group is not None:
                mine = mx.array([start if group.rank == 0 else 0], dtype=mx.int32)
                start = int(mx.distributed.all_sum(mine, group=group.group).item())
        chosen = [int(start) + i for i in range(num_images)]
    if not 1 <= len(chosen) <= MAX_IMAGES:
        raise ValueError(f"{len(chosen)} images: use 1..{MAX_IMAGES} per command")
    return chosen
