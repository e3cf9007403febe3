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
from pathlib import Path

import mlx.core as mx
import numpy as np

CFG_RANKS = 2
DIT_FOLDERS = ("transformer", "unconditional_transformer")
HEADER_BYTES = 1 << 20  # a safetensors file's header (tensor names, dtypes, offsets) fits


class DistributedError(RuntimeError):
    """The ranks cannot run together: no launcher, a wrong rank count, other checkpoints."""


def checkpoint_fingerprint(checkpoint_dir: Path) -> bytes:
    """SHA-256 over both DiT folders' config.json and each weight file's name, size and
    header: the same checkpoint gives the same digest on any machine, in milliseconds."""
    digest = hashlib.sha256()
    for folder in DIT_FOLDERS:
        path = Path(checkpoint_dir) / folder
        digest.update((path / "config.json").read_bytes())
        for file in sorted(path.glob("*.safetensors")):
            digest.update(f"{file.name}:{file.stat().st_size}:".encode())
            with open(file, "rb") as f:
                digest.update(f.read(HEADER_BYTES))
    return digest.digest()


class CFGGroup:
    """The two ranks of a CFG-parallel run."""

    def __init__(self, group):
        self.group = group
        self.rank = group.rank()

    @classmethod
    def start(cls, checkpoint_dir: Path) -> CFGGroup:
        """Join the ranks ``mlx.launch`` started and check they load the same checkpoint."""
        group = mx.distributed.init()
        if group.size() == 1:
            raise DistributedError(
                "--distributed needs two ranks started by mlx.launch (found one process): "
                "mlx.launch -n 2 --backend ring -- ideo4-mlx generate --distributed ... (or "
                "--hostfile hosts.json for two Macs)"
            )
        if group.size() != CFG_RANKS:
            raise DistributedError(
                f"CFG-parallel runs on exactly {CFG_RANKS} ranks (one DiT each); mlx.launch "
                f"started {group.size()}: launch with -n {CFG_RANKS}"
            )
        mine = np.frombuffer(checkpoint_fingerprint(checkpoint_dir), np.uint8)
        both = np.array(mx.distributed.all_gather(mx.array(mine)[None], group=group))
        if not (both[0] == both[1]).all():
            raise DistributedError(
                f"rank {group.rank()}: the ranks load different checkpoints (the DiT configs or "
                f"weight files differ; this rank has {checkpoint_dir}): give every rank the "
                "same --model"
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
