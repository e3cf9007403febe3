"""CFG-parallel generation on two ranks (``mx.distributed``, started by ``mlx.launch``).

Rank 0 holds the text encoder, the conditional DiT and the VAE; rank 1 the unconditional DiT
only. Both ranks run the same Euler loop on the same latents: each computes its own pass,
one ``all_gather`` per step swaps the two velocities (one latent tensor each way), and both
combine them with the single-process formula, so both hold the same latents and rank 0's
image equals the single-process image bit for bit. The starting latents (and an inpainting
run's input latents) are sent from rank 0 once.

A rank blocked in an exchange waits as long as its peer is silent: a :class:`Watchdog` ends
the process when a distributed run makes no progress for ``IDEO4_RANK_TIMEOUT`` seconds (a
hung rank, a machine gone from the network), and ``mlx.launch`` then stops the others.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from ideogram4_mlx.errors import Ideo4Error
from ideogram4_mlx.sampler import GuidedFn, KnownLatents, VelocityFn, combine, skips_uncond
from ideogram4_mlx.transformer import DIT_COMPONENTS

CFG_RANKS = 2
HEADER_BYTES = 1 << 20  # a safetensors file's header (tensor names, dtypes, offsets) fits
RANK_TIMEOUT_ENV = "IDEO4_RANK_TIMEOUT"
# Seconds without progress before a rank gives up: room for the other rank to load a model
# (rank 1 waits while rank 0 loads and runs the text encoder) or run one slow step.
DEFAULT_RANK_TIMEOUT = 1800.0
MAX_RANK_TIMEOUT = 7 * 24 * 3600.0
WATCHDOG_EXIT = 3  # the exit status of a rank the watchdog ends


class DistributedError(Ideo4Error, RuntimeError):
    """The ranks cannot run together: no launcher, a wrong rank count, other checkpoints."""


def checkpoint_fingerprint(checkpoint_dir: Path) -> bytes:
    """SHA-256 over both DiT folders' config.json and each weight file's name, size and
    header: the same checkpoint gives the same digest on any machine, in milliseconds."""
    digest = hashlib.sha256()
    for folder, _ in DIT_COMPONENTS:
        path = Path(checkpoint_dir) / folder
        if not (path / "config.json").is_file():  # no unconditional DiT: a schedule of 1
            digest.update(f"{folder}: absent".encode())
            continue
        digest.update((path / "config.json").read_bytes())
        for file in sorted(path.glob("*.safetensors")):
            digest.update(f"{file.name}:{file.stat().st_size}:".encode())
            with open(file, "rb") as f:
                digest.update(f.read(HEADER_BYTES))
    return digest.digest()


def rank_timeout() -> float:
    """``IDEO4_RANK_TIMEOUT`` (seconds), else :data:`DEFAULT_RANK_TIMEOUT`."""
    value = os.environ.get(RANK_TIMEOUT_ENV)
    if value is None:
        return DEFAULT_RANK_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_RANK_TIMEOUT):
        raise DistributedError(
            f"{RANK_TIMEOUT_ENV}={value!r} is not a timeout: give seconds, a number in "
            f"(0, {MAX_RANK_TIMEOUT:.0f}]"
        )
    return seconds


class Watchdog:
    """Ends this process when a distributed run makes no progress for ``timeout`` seconds.

    MLX's collectives block until the peer answers, and a peer that hangs (or a machine that
    drops off the network without closing its sockets) never does. While armed
    (:meth:`watching`), every :meth:`beat` restarts the clock; a daemon thread prints what
    this rank was waiting for and exits with :data:`WATCHDOG_EXIT` when it runs out (the
    blocked main thread cannot be interrupted otherwise). Disarmed between generations, so an
    application may hold a distributed pipeline idle for as long as it likes.
    """

    def __init__(self, rank: int, timeout: float):
        self.rank, self.timeout = rank, timeout
        self.what = ""
        self.last = time.monotonic()
        self.armed = 0
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    @contextmanager
    def watching(self, what: str) -> Iterator[None]:
        with self.lock:
            self.armed += 1
            if self.thread is None:
                self.thread = threading.Thread(target=self._watch, name="ideo4-watchdog")
                self.thread.daemon = True
                self.thread.start()
        self.beat(what)
        try:
            yield
        finally:
            with self.lock:
                self.armed -= 1

    def beat(self, what: str) -> None:
        self.what, self.last = what, time.monotonic()

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout / 4))
            idle = time.monotonic() - self.last
            if self.armed and idle > self.timeout:
                sys.stderr.write(
                    f"ideo4-mlx: rank {self.rank}: no progress for {idle:.0f} s ({self.what}): "
                    "another rank has stopped or the link between the machines is down; "
                    f"exiting (set {RANK_TIMEOUT_ENV}=SECONDS to wait longer than "
                    f"{self.timeout:g})\n"
                )
                sys.stderr.flush()
                os._exit(WATCHDOG_EXIT)


def join_ranks(checkpoint_dir: Path):
    """The group of ranks ``mlx.launch`` started and this rank's :class:`Watchdog`, after
    checking that every rank loads the same checkpoint (a fingerprint gathered from all).
    ``DistributedError`` for one process (no launcher) or different checkpoints."""
    timeout = rank_timeout()
    group = mx.distributed.init()
    if group.size() == 1:
        raise DistributedError(
            "--distributed needs two ranks started by mlx.launch (found one process): "
            "mlx.launch -n 2 --backend ring -- ideo4-mlx generate --distributed ... (or "
            "--hostfile hosts.json for two Macs)"
        )
    watchdog = Watchdog(group.rank(), timeout)
    mine = np.frombuffer(checkpoint_fingerprint(checkpoint_dir), np.uint8)
    with watchdog.watching("joining the ranks"):
        every = np.array(mx.distributed.all_gather(mx.array(mine)[None], group=group))
    if not (every == every[0]).all():
        raise DistributedError(
            f"rank {group.rank()}: the ranks load different checkpoints (the DiT configs or "
            f"weight files differ; this rank has {checkpoint_dir}): give every rank the same "
            "--model"
        )
    return group, watchdog


class CFGGroup:
    """The two ranks of a CFG-parallel run. Rank 0 leads: it holds the text encoder, the
    conditional DiT and the VAE, and its latents are the run's."""

    def __init__(self, group, watchdog: Watchdog):
        self.group, self.watchdog = group, watchdog
        self.rank = group.rank()

    @classmethod
    def start(cls, checkpoint_dir: Path) -> CFGGroup:
        """Join the two ranks ``mlx.launch`` started (same checkpoint on both)."""
        group, watchdog = join_ranks(checkpoint_dir)
        if group.size() != CFG_RANKS:
            raise DistributedError(
                f"CFG-parallel runs on exactly {CFG_RANKS} ranks (one DiT each); mlx.launch "
                f"started {group.size()}: launch with -n {CFG_RANKS}"
            )
        return cls(group, watchdog)

    @property
    def leads(self) -> bool:
        """Rank 0: the rank that encodes the prompt and the input image and decodes."""
        return self.rank == 0

    def share(self, x: mx.array) -> mx.array:
        """Rank 0's ``x`` on both ranks, fp32 (rank 1's gives only the shape); exact: ``x + 0``."""
        mine = x if self.leads else mx.zeros_like(x)
        return mx.distributed.all_sum(mine.astype(mx.float32), group=self.group)

    def share_start(
        self, start: mx.array, known: KnownLatents | None
    ) -> tuple[mx.array, KnownLatents | None]:
        """Rank 0's starting latents (1, N, 128) and an inpainting edit's known latents on both
        ranks. Rank 1's stand in for shapes (it has no VAE to encode the input image); the
        mask is the request's, the same on both."""
        start = self.share(start)
        if known is not None:
            known = replace(known, x0=self.share(known.x0), noise=self.share(known.noise))
        return start, known

    def guided(self, cond: VelocityFn | None, uncond: VelocityFn | None) -> GuidedFn:
        """The CFG velocity: this rank's pass (rank 0 the conditional ``cond``, rank 1 the
        unconditional ``uncond``, which it skips at g = 1), swapped with the other rank's and
        combined exactly as one process combines them."""
        mine = cond if self.leads else uncond

        def guided(z: mx.array, t: float, g: float) -> mx.array:
            if not self.leads and skips_uncond(g):
                # Zeros that wait for z: the ranks must run their collectives in one order,
                # and a swap that depends on nothing may run before the starting latents'.
                v = mx.depends(mx.zeros_like(z), z)
            else:
                v = mine(z, t)
            v_cond, v_uncond = self.swap(v)
            return v_cond if skips_uncond(g) else combine(v_cond, v_uncond, g)

        return guided

    def swap(self, velocity: mx.array) -> tuple[mx.array, mx.array]:
        """(v_cond, v_uncond), both fp32, from rank 0's and rank 1's velocity (1, N, 128)."""
        both = mx.distributed.all_gather(velocity.astype(mx.float32), group=self.group)
        return both[:1], both[1:]


class DataGroup:
    """Data-parallel ranks for many images: each rank holds both DiTs and makes its share of
    the images; the PNGs (with their metadata) are gathered to rank 0, which writes them."""

    def __init__(self, group, watchdog: Watchdog):
        self.group, self.watchdog = group, watchdog
        self.rank, self.size = group.rank(), group.size()

    @classmethod
    def start(cls, checkpoint_dir: Path) -> DataGroup:
        """Join the ranks ``mlx.launch`` started (same checkpoint on all)."""
        return cls(*join_ranks(checkpoint_dir))

    def share(self, items: list) -> list:
        """This rank's items: every ``size``-th, starting at its rank."""
        return items[self.rank :: self.size]

    def gather(self, blobs: list[bytes], total: int) -> list[bytes]:
        """Every rank's ``blobs`` (its :meth:`share` of ``total`` items), back in item order."""
        # The slowest rank may still be making an image: the watchdog allows it one timeout.
        with self.watchdog.watching("gathering the images from the other ranks"):
            return self._gather(blobs, total)

    def _gather(self, blobs: list[bytes], total: int) -> list[bytes]:
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
