"""One generation in flight: the stages of one image (expand, encode, encode_image, denoise,
decode) as a step iterator, and the velocity functions the sampler calls.

``Ideogram4Pipeline.start`` makes a :class:`Generation` from the request and the
:class:`Components` it uses (an encoder, the DiTs, the VAE, a release hook); its steps are what
the CLI's bar, the server's events, previews (``preview``) and ``generate``'s callback consume,
and ``result()`` decodes the image. Each stage is timed (:class:`Stage`). On CFG-parallel ranks
the :class:`CFGGroup` shares rank 0's starting latents and swaps the two velocities.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image

from ideogram4_mlx.constants import PACKED_CHANNELS
from ideogram4_mlx.distributed import CFGGroup
from ideogram4_mlx.dit_sequence import sequence_ids
from ideogram4_mlx.errors import InputError
from ideogram4_mlx.metadata import save_png
from ideogram4_mlx.prompt import MAX_TEXT_TOKENS
from ideogram4_mlx.request import MAX_SEED, GenerationRequest, ResolvedRequest
from ideogram4_mlx.sampler import KnownLatents, VelocityFn, euler_steps, noised, uses_uncond
from ideogram4_mlx.step_cache import BlockCache
from ideogram4_mlx.transformer import Ideogram4Transformer
from ideogram4_mlx.vae import Flux2VAE, decode, encode
from ideogram4_mlx.version import __version__


@dataclass
class GenerationResult:
    image: Image.Image
    latents: np.ndarray  # (1, H/16 * W/16, 128) float32: final packed normalised latents
    metadata: dict  # everything needed to reproduce the image
    stats: dict = field(default_factory=dict)  # per stage: seconds, peak memory (GB)
    request: GenerationRequest | None = None  # the request as run (its seed drawn)
    # text_check.TextReport when the lettering was checked (text_retry.generate_checked)
    text_scores: object | None = None

    def save(self, path: Path | str, force: bool = False) -> Path:
        """Write the PNG with its metadata (replayable), atomically; see ``save_png``."""
        return save_png(self.image, path, self.metadata, force)


Report = Callable[[str], None]
DiTs = tuple[Ideogram4Transformer | None, Ideogram4Transformer | None]


@dataclass(frozen=True)
class Components:
    """What a generation uses, handed over by whoever holds the models (the pipeline's
    ``start``). Each model loads on first call; ``release`` frees one after its stage."""

    encode: Callable[[str], mx.array]  # prompt -> text features (1, T, 13*D) fp32, evaluated
    # (cond, uncond) planned for that many tokens, the second only if a step calls it (bool);
    # None: not held
    dits: Callable[[int, bool], DiTs]
    vae: Callable[[], Flux2VAE]
    release: Callable[[str], None]  # "describe", "text_encoder", "transformers" or "vae"
    expand: Callable[[str, int, int, int | None], str]  # magic prompt: idea, w, h, seed -> caption
    settings: Callable[[], dict]  # what the models add to the metadata (model, dtype, LoRAs)
    cfg: CFGGroup | None = None  # CFG-parallel ranks (None: one process)
    # remix: image, idea, seed -> the caption describing the image (steered by the idea)
    describe: Callable[[Image.Image, str | None, int | None], str] | None = None


class Stage:
    """Times a stage and records MLX's peak memory within it; ``report`` gets a line when it
    starts and one when it ends (with the peak memory when ``verbose``)."""

    def __init__(self, stats: dict, name: str, report: Report | None, verbose: bool):
        self.stats, self.name, self.report, self.verbose = stats, name, report, verbose

    def __enter__(self):
        mx.reset_peak_memory()
        self.start = time.perf_counter()
        if self.report is not None and self.name != "denoise":  # denoise has its own bar
            self.report(f"[{self.name}] ...")

    def __exit__(self, *exc):
        record = {
            "seconds": round(time.perf_counter() - self.start, 3),
            "peak_gb": round(mx.get_peak_memory() / 1e9, 3),
        }
        self.stats[self.name] = record
        if self.report is None or exc[0] is not None:
            return
        line = f"[{self.name}] {record['seconds']:.1f} s"
        self.report(line + (f", peak {record['peak_gb']:.2f} GB" if self.verbose else ""))


@dataclass(frozen=True)
class Step:
    """One denoising step: ``latents`` (1, N, 128) fp32 at model time ``t``, unevaluated."""

    index: int  # 0-based
    num_steps: int
    t: float
    latents: mx.array


class Generation:
    """One request in flight: ``for step in generation: mx.eval(step.latents)``, then
    :meth:`result`. Progress bars, previews (:meth:`preview`) and callbacks are consumers of
    the steps.

    The prompt is encoded when iteration starts; the text encoder is released before the
    first step and the DiTs after the last (``release`` may keep them in memory).
    """

    def __init__(
        self,
        components: Components,
        resolved: ResolvedRequest,
        noise: np.ndarray | None = None,
        verbose: bool = False,
        report: Report | None = None,
    ):
        resolved.warn()
        request = resolved.request  # size, strength and input fingerprints filled in
        n = resolved.grid_h * resolved.grid_w
        if noise is None:
            seed = random.randint(0, MAX_SEED) if request.seed is None else int(request.seed)
            request = replace(request, seed=seed)
            self.noise = mx.random.normal((1, n, PACKED_CHANNELS), key=mx.random.key(seed))
        else:
            request = replace(request, seed=None)
            self.noise = mx.array(check_noise(noise, resolved.grid_h, resolved.grid_w))
        self.components, self.request, self.resolved = components, request, resolved
        self.verbose, self.report = verbose, report
        self.given_noise = noise is not None
        self.idea: str | None = None  # the magic prompt's idea, once expanded
        self.remix: dict | None = None  # a remix's description, idea and input, once described
        self.stats: dict = {}
        self.metadata_extra: dict = {}  # what the run adds to the metadata (step caching)
        self.latents: mx.array | None = None
        self.done = False

    @property
    def num_steps(self) -> int:
        return self.resolved.schedule.num_steps

    @property
    def leads(self) -> bool:
        """Whether this process encodes and decodes: one process, or a CFG-parallel rank 0
        (rank 1 holds the unconditional DiT only)."""
        return self.components.cfg is None or self.components.cfg.leads

    def __iter__(self) -> Iterator[Step]:
        cfg = self.components.cfg
        if cfg is None:
            yield from self._steps()
            return
        # CFG-parallel: every step waits for the other rank; the watchdog ends this rank if
        # one step (or the other rank's encoding, before the first) takes over its timeout.
        with cfg.watchdog.watching("waiting for the other rank before the first step"):
            for step in self._steps():
                cfg.watchdog.beat(f"step {step.index + 1} of {step.num_steps}")
                yield step

    def _steps(self) -> Iterator[Step]:
        self._expand()
        features = self._encode()
        start, known = self._start_latents()
        yield from self._denoise(features, start, known)
        self.done = True

    def _expand(self) -> None:
        """The magic prompt: the request's idea becomes a caption, kept as ``idea``. A remix:
        the input (as fitted to the output) is described, steered by the request's idea."""
        if self.request.remix and self.leads:
            self._describe()
        if not (self.request.magic_prompt and self.leads):
            return
        with Stage(self.stats, "expand", self.report, self.verbose):
            idea, r = self.request.prompt, self.request
            caption = self.components.expand(idea, r.width, r.height, r.seed)
            self.idea, self.request = idea, replace(r, prompt=caption, magic_prompt=False)

    def _describe(self) -> None:
        """A remix's caption: what the output starts from, described; the describe model is
        released before the text encoder loads (``release`` may keep it)."""
        c, r = self.components, self.request
        with Stage(self.stats, "describe", self.report, self.verbose):
            canvas = Image.fromarray(self.resolved.edit.canvas)
            caption = c.describe(canvas, r.idea, r.seed)
            c.release("describe")
        self.remix = {"description": caption, "idea": r.idea, "image_sha256": r.image_sha256}
        self.request = replace(r, prompt=caption, remix=False, idea=None)

    def _encode(self) -> mx.array | None:
        """The prompt's text features (1, T, 13*D); None where no text encoder is held."""
        if not self.leads:
            return None
        c = self.components
        with Stage(self.stats, "encode", self.report, self.verbose):
            features = c.encode(self.request.prompt)
            c.release("text_encoder")
        return features

    def _start_latents(self) -> tuple[mx.array, KnownLatents | None]:
        """The latents the first step starts from (1, N, 128): the noise, or an edit's input
        image noised to the schedule's start; and an inpainting edit's known latents."""
        r, cfg = self.resolved, self.components.cfg
        start, known = self.noise, None
        if r.edit is not None:
            # A CFG-parallel rank 1 has no VAE: the noise stands in until rank 0's arrive.
            x0 = self._encode_image() if self.leads else self.noise
            start = noised(x0, self.noise, r.schedule.start_time)
            if r.edit.token_mask is not None:
                mask = mx.array(r.edit.token_mask.reshape(1, -1, 1))
                known = KnownLatents(x0, self.noise, mask)
        if cfg is not None:  # both ranks start from rank 0's latents (and its noise)
            start, known = cfg.share_start(start, known)
        return start, known

    def _encode_image(self) -> mx.array:
        """An edit's input image as latents (1, N, 128); the VAE is released after."""
        c = self.components
        with Stage(self.stats, "encode_image", self.report, self.verbose):
            x0 = encode(c.vae(), self.resolved.edit.canvas[None])
            mx.eval(x0)
            c.release("vae")
        return x0

    def _denoise(
        self, features: mx.array | None, start: mx.array, known: KnownLatents | None
    ) -> Iterator[Step]:
        """The Euler loop from ``start``; the DiTs are released after the last step."""
        c, r = self.components, self.resolved
        with Stage(self.stats, "denoise", self.report, self.verbose):
            n_text = MAX_TEXT_TOKENS if features is None else features.shape[1]
            dits = c.dits(r.grid_h * r.grid_w + n_text, uses_uncond(r.schedule.guidance))
            caches = tuple(BlockCache(self.request.cache_threshold) for _ in dits)
            cond, uncond = velocity_fns(*dits, features, r.grid_h, r.grid_w, caches)
            guided = None if c.cfg is None else c.cfg.guided(cond, uncond)
            for index, t, z in euler_steps(start, r.schedule, cond, uncond, known, guided):
                self.latents = z
                yield Step(index, self.num_steps, t, z)
                check_finite(z, index)  # after the caller's evaluation: no extra work
            mx.eval(self.latents)
            c.release("transformers")
        # Passes per branch: full (every block) and cached (block 0 only).
        branches = zip(("cond", "uncond"), dits, caches, strict=True)
        passes = {name: cache.counts() for name, dit, cache in branches if dit is not None}
        self.stats["denoise"].update(passes)
        if self.request.cache_threshold:
            self.metadata_extra["cache_passes"] = passes

    def preview(self, latents: mx.array) -> Image.Image:
        """``latents`` (1, N, 128), a step's, decoded with this generation's VAE: one full
        decode, the raw canvas (an edit is not pasted back)."""
        r = self.resolved
        return Image.fromarray(decode(self.components.vae(), latents, r.grid_h, r.grid_w)[0])

    def result(self) -> GenerationResult | None:
        """Decode the final latents; the image, its metadata and per-stage stats (None on a
        CFG-parallel rank 1, which has no VAE: rank 0 writes the image)."""
        if not self.done:
            raise RuntimeError("iterate over all the denoising steps before result()")
        c, r = self.components, self.resolved
        if not self.leads:
            return None
        with Stage(self.stats, "decode", self.report, self.verbose):
            pixels = decode(c.vae(), self.latents, r.grid_h, r.grid_w)
            c.release("vae")
            if r.edit is not None:
                pixels = r.edit.paste(pixels[0])[None]
        metadata = {
            **self.request.to_metadata(),
            "noise": "given" if self.given_noise else "seeded",
            **c.settings(),
            "caption_findings": r.caption_findings,
            **({"idea": self.idea} if self.idea is not None else {}),
            **({"remix": self.remix} if self.remix is not None else {}),
            **self.metadata_extra,
            "version": __version__,
        }
        image = Image.fromarray(pixels[0])
        return GenerationResult(image, np.array(self.latents), metadata, self.stats, self.request)


def velocity_fns(
    cond_dit: Ideogram4Transformer | None,
    uncond_dit: Ideogram4Transformer | None,
    features: mx.array | None,
    grid_h: int,
    grid_w: int,
    caches: tuple[BlockCache | None, BlockCache | None] = (None, None),
) -> tuple[VelocityFn | None, VelocityFn | None]:
    """The sampler's ``cond(z, t)`` and ``uncond(z, t)`` for one image: ``[text][image]`` through
    the conditional DiT, image tokens only through the unconditional one (None for a DiT this
    process does not hold: a CFG-parallel rank). Layout constants (RoPE tables, masks,
    projected text) are prepared here once, not per step. ``caches`` (cond, uncond): each
    branch's step cache for this image (``step_cache.BlockCache``), None for none."""
    cond = uncond = None
    if cond_dit is not None:
        n_text = features.shape[1]
        cond_seq = cond_dit.prepare(features, *sequence_ids([n_text], grid_h, grid_w))

        def cond(z: mx.array, t: float) -> mx.array:
            # z may hold a batch of images of this prompt (B, L, 128): the prepared layout
            # (B = 1) broadcasts over it.
            text_slots = mx.zeros((z.shape[0], n_text, PACKED_CHANNELS), mx.float32)
            x = mx.concatenate([text_slots, z], axis=1)
            return cond_dit.run(x, np.array([t], np.float32), cond_seq, caches[0])[:, n_text:]

    if uncond_dit is not None:
        uncond_seq = uncond_dit.prepare(None, *sequence_ids([0], grid_h, grid_w))

        def uncond(z: mx.array, t: float) -> mx.array:
            return uncond_dit.run(z, np.array([t], np.float32), uncond_seq, caches[1])

    return cond, uncond


class NonFiniteError(InputError):
    """The latents became NaN or infinite: the image would be black."""


def check_finite(latents: mx.array, index: int) -> None:
    if not mx.all(mx.isfinite(latents)).item():
        raise NonFiniteError(
            f"the latents are NaN or infinite after step {index + 1}: the weights or settings "
            "overflow; try --dtype float32, check the checkpoint, or use moderate mu, std and "
            "guidance values"
        )


def check_noise(noise: np.ndarray, grid_h: int, grid_w: int) -> np.ndarray:
    expected = (1, grid_h * grid_w, PACKED_CHANNELS)
    noise = np.asarray(noise, dtype=np.float32)
    if noise.shape != expected:
        raise InputError(f"noise has shape {noise.shape}; this size needs {expected}")
    return noise
