"""Flow-matching Euler sampler with asymmetric CFG (MODEL_NOTES#sampler). Pure functions, numpy
in fp32.

Time convention: t = 0 is pure noise, t = 1 is clean data; the model predicts
``v = x0 - noise`` and each Euler step is ``z += v * (t_next - t_cur)``.

Guidance schedules here are CHRONOLOGICAL: entry 0 is the first (noisiest) step. The
official code and mflux store them in loop-index order (entry 0 = last step); use
``guidance_from_index_order`` to convert.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import mlx.core as mx
import numpy as np

from ideogram4_mlx.errors import InputError

# logSNR limits of the schedule: t_min = sigmoid(-18/2), t_max = sigmoid(15/2).
T_MIN = 1.0 / (1.0 + math.exp(0.5 * 18))
T_MAX = 1.0 / (1.0 + math.exp(0.5 * -15))
# The mean of the logit-normal grid is shifted by 0.5*ln(pixels / 512^2).
BASE_RESOLUTION_PIXELS = 512 * 512
# The official loop skips the unconditional pass when the weight is 1 within this tolerance.
GUIDANCE_ONE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Preset:
    """A named sampler setting (official ``sampler_configs.py``)."""

    name: str
    num_steps: int
    mu: float
    std: float
    guidance: tuple[float, ...]  # chronological: guidance[0] is the first step


def _preset(name: str, num_steps: int, mu: float, std: float, polish_steps: int) -> Preset:
    guidance = (7.0,) * (num_steps - polish_steps) + (3.0,) * polish_steps
    return Preset(name, num_steps, mu, std, guidance)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        _preset("V4_QUALITY_48", 48, 0.0, 1.5, polish_steps=3),
        _preset("V4_DEFAULT_20", 20, 0.0, 1.75, polish_steps=2),
        _preset("V4_TURBO_12", 12, 0.5, 1.75, polish_steps=1),
    )
}
DEFAULT_PRESET = "V4_DEFAULT_20"


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def guidance_from_index_order(schedule: Sequence[float]) -> tuple[float, ...]:
    """Official/mflux loop-index order (entry 0 = last step) -> chronological order
    (MODEL_NOTES#guidance-order)."""
    return tuple(float(g) for g in reversed(schedule))


def schedule_mean(mu: float, height: int, width: int) -> float:
    """Resolution-aware mean: ``mu + 0.5 * ln(H*W / 512^2)``."""
    return mu + 0.5 * math.log(height * width / BASE_RESOLUTION_PIXELS)


def time_grid(
    num_steps: int, height: int, width: int, mu: float, std: float, strength: float = 1.0
) -> np.ndarray:
    """``S[0..N]`` float32, from ``t_max`` (S[0], clean end) down to ``t_min`` (S[N], noise end).

    A float32 linspace feeds float64 ndtri and sigmoid, then the result is clamped and cast
    to float32 (official ``scheduler.py``; MODEL_NOTES#time-grid). ``strength`` s < 1 is
    image-to-image (DiffSynth's ``denoising_strength``, MODEL_NOTES#image-to-image):
    ``u = linspace(0, s)``, so all N steps are spent between ``S(s)`` (S[N], the start) and
    ``t_max``. The linspace stays float32 (DiffSynth's is float64: ~1e-7 apart) so that s = 1
    is the text-to-image grid.
    """
    if num_steps < 1:
        raise InputError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 < strength <= 1:
        raise InputError(f"strength must be in (0, 1], got {strength}")
    mean = schedule_mean(mu, height, width)
    u = np.linspace(0, strength, num_steps + 1, dtype=np.float32).astype(np.float64)
    normal = NormalDist()
    z = np.array([-math.inf if v <= 0 else math.inf if v >= 1 else normal.inv_cdf(v) for v in u])
    with np.errstate(over="ignore"):
        s = 1.0 - 1.0 / (1.0 + np.exp(-(mean + std * z)))
    return np.clip(s, T_MIN, T_MAX).astype(np.float32)


def model_times(grid: np.ndarray) -> np.ndarray:
    """The t fed to the model at each step, chronological: ``S[N], S[N-1], ..., S[1]``."""
    return grid[:0:-1].copy()


@dataclass(frozen=True)
class Schedule:
    """Everything the loop needs, resolved: the grid and one guidance weight per step."""

    grid: np.ndarray  # S[0..N] float32
    guidance: tuple[float, ...]  # chronological, len N
    mu: float
    std: float
    strength: float = 1.0  # < 1: image-to-image, the grid starts at S(strength)

    @property
    def num_steps(self) -> int:
        return len(self.guidance)

    @property
    def start_time(self) -> float:
        """The model time of the starting latents: ``t_min`` for text-to-image, ``S(s)`` for
        image-to-image (MODEL_NOTES#image-to-image)."""
        return float(self.grid[-1])


def resolve_schedule(
    height: int,
    width: int,
    preset: str = DEFAULT_PRESET,
    num_steps: int | None = None,
    guidance_schedule: Sequence[float] | None = None,
    mu: float | None = None,
    std: float | None = None,
    strength: float = 1.0,
) -> Schedule:
    """Apply overrides to a preset (``strength``: see :func:`time_grid`).

    ``guidance_schedule`` is chronological and must have ``num_steps`` entries (or one entry,
    used for every step). Changing ``num_steps`` without a schedule keeps the preset's shape:
    its main weight, then its polish weight for the preset's number of final steps.
    """
    p = get_preset(preset)
    steps = p.num_steps if num_steps is None else int(num_steps)
    if guidance_schedule is None:
        main, last = p.guidance[0], p.guidance[-1]
        polish = min(sum(1 for g in p.guidance if g != main), steps)
        guidance = (main,) * (steps - polish) + (last,) * polish
    else:
        guidance = tuple(float(g) for g in guidance_schedule)
        if len(guidance) == 1:
            guidance = guidance * steps
        if len(guidance) != steps:
            raise InputError(
                f"guidance_schedule has {len(guidance)} entries but num_steps is {steps}; "
                "give one weight per step (chronological) or a single weight"
            )
    mu = p.mu if mu is None else float(mu)
    std = p.std if std is None else float(std)
    if std <= 0:
        raise InputError(f"std must be > 0, got {std}")
    grid = time_grid(steps, height, width, mu, std, strength)
    return Schedule(grid, guidance, mu, std, float(strength))


VelocityFn = Callable[[mx.array, float], mx.array]
GuidedFn = Callable[[mx.array, float, float], mx.array]


def skips_uncond(g: float) -> bool:
    """The official loop skips the unconditional pass when the weight is 1."""
    return abs(g - 1) <= GUIDANCE_ONE_TOLERANCE


def uses_uncond(guidance: Sequence[float]) -> bool:
    """Whether any step of a guidance schedule calls the unconditional DiT."""
    return not all(skips_uncond(g) for g in guidance)


def combine(v_cond: mx.array, v_uncond: mx.array, g: float) -> mx.array:
    """``g * v_cond + (1 - g) * v_uncond`` in fp32 (MODEL_NOTES#asymmetric-cfg)."""
    g32 = mx.array(g, dtype=mx.float32)
    return g32 * v_cond + (1 - g32) * v_uncond


def guide(cond: VelocityFn, uncond: VelocityFn) -> GuidedFn:
    """The CFG velocity of one process holding both DiTs."""

    def guided(z: mx.array, t: float, g: float) -> mx.array:
        v = cond(z, t).astype(mx.float32)
        if skips_uncond(g):
            return v
        return combine(v, uncond(z, t).astype(mx.float32), g)

    return guided


def noised(x0: mx.array, noise: mx.array, t: float) -> mx.array:
    """The flow-matching path ``t * x0 + (1 - t) * noise`` in fp32; t = 1 is x0
    (MODEL_NOTES#noise-and-the-flow-path)."""
    t32 = mx.array(t, dtype=mx.float32)
    return t32 * x0.astype(mx.float32) + (1 - t32) * noise.astype(mx.float32)


@dataclass(frozen=True)
class KnownLatents:
    """Inpainting: tokens with ``mask`` weight 0 follow the input image.

    After every step the latents become ``m * z + (1 - m) * noised(x0, noise, t)`` at the time
    ``t`` reached, with the same noise the run started from; after the last step the known
    part is ``x0`` itself (t = 1, not ``t_max``), so a kept token ends as the input's latent
    exactly. Weights between 0 and 1 (a feathered edge) blend the two.
    """

    x0: mx.array  # (1, N, 128) fp32: the encoded input
    noise: mx.array  # (1, N, 128) fp32
    mask: mx.array  # (1, N, 1) fp32: 1 = regenerate, 0 = keep

    def blend(self, z: mx.array, t: float) -> mx.array:
        known = self.x0 if t >= 1 else noised(self.x0, self.noise, t)
        return self.mask * z + (1 - self.mask) * known


def euler_steps(
    start: mx.array,
    schedule: Schedule,
    cond: VelocityFn,
    uncond: VelocityFn,
    known: KnownLatents | None = None,
    guided: GuidedFn | None = None,
) -> Iterator[tuple[int, float, mx.array]]:
    """Euler from ``schedule.start_time`` to ``t_max`` with ``v = g*v_cond + (1-g)*v_uncond``
    (MODEL_NOTES#denoising-loop, #asymmetric-cfg), one step per iteration: yields
    ``(step, t, z)`` with the model time ``t`` reached and the latents ``z`` (1, N, 128) fp32,
    unevaluated: the caller evaluates them (``mx.eval``).

    ``start`` is the noise (text-to-image) or the noised input (image-to-image, see
    :func:`noised`). ``cond(z, t)`` and ``uncond(z, t)`` return the velocity (same shape as
    ``z``); latents, the CFG combination and the step are fp32. The unconditional call is
    skipped when ``g == 1``. The last step ends at ``t_max``, never at 1
    (MODEL_NOTES#denoising-loop). ``known`` pins the kept tokens of an inpainting run after every
    step. ``guided(z, t, g)`` replaces the cond/uncond pair (CFG-parallel ranks,
    ``distributed.py``).
    """
    z = mx.array(start).astype(mx.float32)
    grid, n = schedule.grid, schedule.num_steps
    guided = guided or guide(cond, uncond)
    for step in range(n):
        i = n - 1 - step  # the official loop index
        t_cur, t_next = grid[i + 1], grid[i]
        v = guided(z, float(t_cur), schedule.guidance[step])
        z = z + v * mx.array(t_next - t_cur, dtype=mx.float32)
        if known is not None:
            z = known.blend(z, 1.0 if step == n - 1 else float(t_next))
        yield step, float(t_next), z


def denoise(
    start: mx.array,
    schedule: Schedule,
    cond: VelocityFn,
    uncond: VelocityFn,
    callback: Callable[[int, int, mx.array], None] | None = None,
    known: KnownLatents | None = None,
) -> mx.array:
    """All of :func:`euler_steps`, evaluating each step; ``callback(step, num_steps, z)``."""
    z = mx.array(start).astype(mx.float32)
    for step, _, z in euler_steps(start, schedule, cond, uncond, known):
        mx.eval(z)
        if callback is not None:
            callback(step, schedule.num_steps, z)
    return z
