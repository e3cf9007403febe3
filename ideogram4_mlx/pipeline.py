"""Text-to-image: encode the prompt, denoise with two DiTs, decode with the VAE (spec §E, §I).

Each stage is visible and timed: ``encode`` (Qwen3-VL taps), ``denoise`` (Euler + CFG over the
conditional and unconditional DiTs), ``decode`` (FLUX.2 VAE). Unless ``keep_in_memory`` is set,
the text encoder is freed before denoising and the DiTs before decoding.
"""

from __future__ import annotations

import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image

from ideogram4_mlx import __version__
from ideogram4_mlx.caption import PLAIN_PROMPT_WARNING, is_json_prompt, verify_raw
from ideogram4_mlx.constants import PACKED_CHANNELS, PIXELS_PER_TOKEN, dtype_name
from ideogram4_mlx.hub import resolve_model
from ideogram4_mlx.prompt import PromptEncoder
from ideogram4_mlx.quantization import conversion_record
from ideogram4_mlx.sampler import (
    DEFAULT_PRESET,
    Schedule,
    VelocityFn,
    denoise,
    resolve_schedule,
)
from ideogram4_mlx.transformer import Ideogram4Transformer, sequence_ids
from ideogram4_mlx.vae import Flux2VAE, decode

MIN_SIDE, MAX_SIDE, MAX_ASPECT = 256, 2048, 6.0
MAX_SEED = 2**63 - 1


class CaptionError(ValueError):
    """The caption verifier reported findings and strict checking was requested."""


def check_size(width: int, height: int) -> tuple[int, int]:
    """Validate the image size (spec §E.5) and return the token grid (grid_h, grid_w)."""
    for name, side in (("width", width), ("height", height)):
        if side % PIXELS_PER_TOKEN or not MIN_SIDE <= side <= MAX_SIDE:
            raise ValueError(
                f"{name} {side} is not supported: use a multiple of {PIXELS_PER_TOKEN} "
                f"between {MIN_SIDE} and {MAX_SIDE}"
            )
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise ValueError(f"aspect ratio {width}x{height} is wider than {MAX_ASPECT:g}:1")
    return height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN


def check_request(
    width: int,
    height: int,
    seed: int | None = None,
    preset: str = DEFAULT_PRESET,
    num_steps: int | None = None,
    guidance_schedule: Sequence[float] | None = None,
    mu: float | None = None,
    std: float | None = None,
) -> tuple[int, int, Schedule]:
    """Every check that needs no model: size, seed range, schedule. Returns (gh, gw, schedule)."""
    grid_h, grid_w = check_size(width, height)
    if seed is not None and not 0 <= int(seed) <= MAX_SEED:
        raise ValueError(f"seed {seed} is out of range: use 0..{MAX_SEED}")
    schedule = resolve_schedule(height, width, preset, num_steps, guidance_schedule, mu, std)
    return grid_h, grid_w, schedule


def check_caption(prompt: str, strict: bool = False) -> list[str]:
    """Caption findings (spec §G.2); warns, or raises ``CaptionError`` when ``strict``."""
    findings = verify_raw(prompt) if is_json_prompt(prompt) else [PLAIN_PROMPT_WARNING]
    if findings and strict:
        raise CaptionError("caption check failed: " + "; ".join(findings))
    for finding in findings:
        warnings.warn(f"caption: {finding}", stacklevel=3)
    return findings


@dataclass
class GenerationResult:
    image: Image.Image
    latents: np.ndarray  # (1, H/16 * W/16, 128) float32: final packed normalised latents
    metadata: dict  # everything needed to reproduce the image
    stats: dict = field(default_factory=dict)  # per stage: seconds, peak memory (GB)


class Stage:
    """Times a stage and records MLX's peak memory within it."""

    def __init__(self, stats: dict, name: str, verbose: bool):
        self.stats, self.name, self.verbose = stats, name, verbose

    def __enter__(self):
        mx.reset_peak_memory()
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        record = {
            "seconds": round(time.perf_counter() - self.start, 3),
            "peak_gb": round(mx.get_peak_memory() / 1e9, 3),
        }
        self.stats[self.name] = record
        if self.verbose and exc[0] is None:
            print(f"[{self.name}] {record['seconds']:.1f} s, peak {record['peak_gb']:.2f} GB")


class Ideogram4Pipeline:
    """Loads components on demand from one checkpoint folder; see :func:`load`."""

    def __init__(
        self,
        model_dir: Path,
        dtype: mx.Dtype = mx.bfloat16,
        keep_in_memory: bool = False,
        model_id: str | None = None,
        revision: str | None = None,
        low_memory: bool = False,
    ):
        self.model_dir = Path(model_dir)
        self.low_memory = low_memory
        self.dtype = dtype
        self.keep_in_memory = keep_in_memory
        self.model_id = model_id or str(self.model_dir)
        self.revision = revision
        self._prompt_encoder: PromptEncoder | None = None
        self._dits: tuple[Ideogram4Transformer, Ideogram4Transformer] | None = None
        self._vae: Flux2VAE | None = None

    # -- components -------------------------------------------------------------------------

    def prompt_encoder(self) -> PromptEncoder:
        """The tokenizer and prompt cache; the text encoder itself loads in :meth:`encode`."""
        if self._prompt_encoder is None:
            self._prompt_encoder = PromptEncoder.from_pretrained(
                self.model_dir, dtype=self.dtype, load_model=False
            )
        return self._prompt_encoder

    def encode(self, prompt: str) -> mx.array:
        """Text features (1, T, 13*D) fp32; the text encoder loads only for an uncached prompt."""
        encoder = self.prompt_encoder()
        if not encoder.is_cached(prompt):
            encoder.load_model()
        features = encoder.encode(prompt).features
        mx.eval(features)
        return features

    def dits(self) -> tuple[Ideogram4Transformer, Ideogram4Transformer]:
        if self._dits is None:
            # The unconditional branch sees image tokens only: its text projection is not read.
            self._dits = tuple(
                Ideogram4Transformer.from_pretrained(
                    self.model_dir / name, self.dtype, self.low_memory, text_input=text
                )
                for name, text in (("transformer", True), ("unconditional_transformer", False))
            )
        return self._dits

    def vae(self) -> Flux2VAE:
        if self._vae is None:
            self._vae = Flux2VAE.from_pretrained(self.model_dir / "vae", self.dtype)
        return self._vae

    def release(self, *names: str) -> None:
        """Free components ("text_encoder", "transformers", "vae") unless keep_in_memory."""
        if self.keep_in_memory:
            return
        if "text_encoder" in names and self._prompt_encoder is not None:
            self._prompt_encoder.release_model()  # the tokenizer and the feature cache stay
        if "transformers" in names:
            self._dits = None
        if "vae" in names:
            self._vae = None
        mx.clear_cache()

    def quantization(self) -> dict | None:
        """What ``ideo4-mlx convert`` recorded for the DiTs (None for a raw fp8 snapshot)."""
        record = conversion_record(self.model_dir / "transformer")
        return None if record is None else record.get("quantization")

    # -- generation ---------------------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        width: int = 1024,
        height: int = 1024,
        preset: str = DEFAULT_PRESET,
        seed: int | None = None,
        num_steps: int | None = None,
        guidance_schedule: Sequence[float] | None = None,
        mu: float | None = None,
        std: float | None = None,
        noise: np.ndarray | None = None,
        strict_caption: bool = False,
        callback: Callable[[int, int, mx.array], None] | None = None,
        verbose: bool = False,
    ) -> GenerationResult:
        """One image for one prompt.

        Args:
            prompt: a JSON caption (recommended) or plain text.
            width, height: multiples of 16 in 256..2048, aspect ratio at most 6:1.
            preset: ``V4_QUALITY_48``, ``V4_DEFAULT_20`` or ``V4_TURBO_12``; ``num_steps``,
                ``guidance_schedule`` (chronological: entry 0 = first step), ``mu`` and
                ``std`` override it.
            seed: seeds the noise; None picks a random seed (recorded in the metadata).
            noise: (1, H/16 * W/16, 128) float32 in the packed layout; replaces the seeded
                draw (for parity with other implementations).
            strict_caption: caption findings raise ``CaptionError`` before any model loads.
            callback: ``callback(step, num_steps, latents)`` after every denoising step.
        """
        grid_h, grid_w, schedule = check_request(
            width, height, seed, preset, num_steps, guidance_schedule, mu, std
        )
        findings = check_caption(prompt, strict_caption)
        if noise is None:
            seed = random.randint(0, MAX_SEED) if seed is None else int(seed)
            z = mx.random.normal((1, grid_h * grid_w, PACKED_CHANNELS), key=mx.random.key(seed))
        else:
            z = mx.array(check_noise(noise, grid_h, grid_w))
            seed = None

        stats: dict = {}
        with Stage(stats, "encode", verbose):
            features = self.encode(prompt)
            self.release("text_encoder")
        with Stage(stats, "denoise", verbose):
            latents = self.denoise(features, z, grid_h, grid_w, schedule, callback)
            self.release("transformers")
        with Stage(stats, "decode", verbose):
            pixels = decode(self.vae(), latents, grid_h, grid_w)
            self.release("vae")

        metadata = {
            "prompt": prompt,
            "preset": preset,
            "width": width,
            "height": height,
            "seed": seed,
            "noise": "given" if seed is None else "seeded",
            "num_steps": schedule.num_steps,
            "guidance_schedule": list(schedule.guidance),
            "mu": schedule.mu,
            "std": schedule.std,
            "model": self.model_id,
            "revision": self.revision,
            "dtype": dtype_name(self.dtype),
            "quantization": self.quantization(),
            "caption_findings": findings,
            "version": __version__,
        }
        return GenerationResult(Image.fromarray(pixels[0]), np.array(latents), metadata, stats)

    def denoise(
        self,
        features: mx.array,
        noise: mx.array,
        grid_h: int,
        grid_w: int,
        schedule: Schedule,
        callback: Callable[[int, int, mx.array], None] | None = None,
    ) -> mx.array:
        """Euler + CFG from the noise to the final packed latents (1, N, 128) fp32."""
        cond, uncond = velocity_fns(*self.dits(), features, grid_h, grid_w)
        return denoise(noise, schedule, cond, uncond, callback)


def velocity_fns(
    cond_dit: Ideogram4Transformer,
    uncond_dit: Ideogram4Transformer,
    features: mx.array,
    grid_h: int,
    grid_w: int,
) -> tuple[VelocityFn, VelocityFn]:
    """The sampler's ``cond(z, t)`` and ``uncond(z, t)`` for one image: ``[text][image]`` through
    the conditional DiT, image tokens only through the unconditional one. Layout constants
    (RoPE tables, masks, projected text) are prepared here once, not per step."""
    n_text = features.shape[1]
    cond_seq = cond_dit.prepare(features, *sequence_ids([n_text], grid_h, grid_w))
    uncond_seq = uncond_dit.prepare(None, *sequence_ids([0], grid_h, grid_w))
    text_slots = mx.zeros((1, n_text, PACKED_CHANNELS), mx.float32)

    def cond(z: mx.array, t: float) -> mx.array:
        x = mx.concatenate([text_slots, z], axis=1)
        return cond_dit.run(x, np.array([t], np.float32), cond_seq)[:, n_text:]

    def uncond(z: mx.array, t: float) -> mx.array:
        return uncond_dit.run(z, np.array([t], np.float32), uncond_seq)

    return cond, uncond


def check_noise(noise: np.ndarray, grid_h: int, grid_w: int) -> np.ndarray:
    expected = (1, grid_h * grid_w, PACKED_CHANNELS)
    noise = np.asarray(noise, dtype=np.float32)
    if noise.shape != expected:
        raise ValueError(f"noise has shape {noise.shape}; this size needs {expected}")
    return noise


def load(
    model: str | Path,
    dtype: mx.Dtype = mx.bfloat16,
    keep_in_memory: bool = False,
    revision: str | None = None,
    low_memory: bool = False,
) -> Ideogram4Pipeline:
    """A pipeline for a local checkpoint folder or a Hugging Face repo id.

    Components load on first use. A repo id is downloaded with huggingface_hub (only the
    files the pipeline reads). ``low_memory`` streams the DiT blocks from disk on every pass
    instead of keeping both DiTs resident (same images; one read of the DiT files per step).
    """
    model_dir, model_id, revision = resolve_model(model, revision)
    return Ideogram4Pipeline(model_dir, dtype, keep_in_memory, model_id, revision, low_memory)
