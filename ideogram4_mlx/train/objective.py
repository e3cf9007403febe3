"""The flow-matching objective Ideogram 4 trainers use (MODEL_NOTES#training-objective).

Our time convention throughout: t = 0 is noise, t = 1 is clean (the sampler's). With clean
packed latents ``x1`` and standard normal noise ``x0``:

- the noisy input is ``z_t = t * x1 + (1 - t) * x0`` (DiffSynth-Studio's ``add_noise`` with
  its sigma = 1 - t);
- the target is the velocity the DiT predicts, ``v = x1 - x0`` (clean minus noise: DiffSynth's
  and ai-toolkit's ``noise - latents`` for the negated output), so the sampler's Euler step
  ``z += (t_next - t) * v`` lands exactly on ``z_{t_next}``;
- t is drawn uniformly from DiffSynth's 1000-entry table, the model times of the inference
  time grid (logit-normal quantiles, mu 0, std 1.5, mean shifted for 1024^2), and the
  per-sample MSE is weighted by DiffSynth's bell-shaped weight, mean 1 over the table.

Pure functions on numpy (times, weights) and MLX arrays (the loss); latents (B, N, 128) fp32.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ideogram4_mlx.errors import InputError
from ideogram4_mlx.sampler import model_times, time_grid

# DiffSynth-Studio: ``scheduler.set_timesteps(1000, training=True)`` with the Ideogram4
# template's defaults (image_resolution (1024, 1024), mu 0, std 1.5).
TRAIN_TIMESTEPS = 1000
TRAIN_MU = 0.0
TRAIN_STD = 1.5
TRAIN_SIZE = 1024
# The loss weightings: DiffSynth's bell weight ("bell"), or none (ai-toolkit's default).
WEIGHTINGS = ("bell", "none")


def training_times(
    height: int = TRAIN_SIZE,
    width: int = TRAIN_SIZE,
    mu: float = TRAIN_MU,
    std: float = TRAIN_STD,
    num_timesteps: int = TRAIN_TIMESTEPS,
) -> np.ndarray:
    """The table t is drawn from: (num_timesteps,) float32, the model times of a
    ``num_timesteps``-step inference grid (``S[N] .. S[1]``, t_min up to just below t_max).

    DiffSynth's ``set_timesteps_ideogram4`` builds the same table (its linspace is float64,
    ours float32: ~1e-7 apart) and always for 1024^2; ``height``/``width`` shift the mean as
    inference does for other sizes (MODEL_NOTES#training-objective)."""
    return model_times(time_grid(num_timesteps, height, width, mu, std))


def sample_times(rng: np.random.Generator, batch: int, table: np.ndarray) -> np.ndarray:
    """(batch,) float32 times, each an entry of ``table`` drawn uniformly (DiffSynth's
    ``torch.randint`` over the table's indices), from the seeded ``rng``."""
    return np.asarray(table, np.float32)[rng.integers(0, len(table), size=batch)]


def bell_weights(table: np.ndarray) -> np.ndarray:
    """DiffSynth's (and ai-toolkit's ``linear_timesteps``) bell-shaped loss weight of each
    entry of ``table`` (num,) -> (num,) float32, mean 1 over the table: with sigma = 1 - t,
    ``y = exp(-2 (sigma - 1/2)^2)``, minus its minimum, scaled to mean 1. Highest at t = 1/2."""
    sigma = 1.0 - np.asarray(table, np.float64)
    y = np.exp(-2.0 * (sigma - 0.5) ** 2)
    y = y - y.min()
    return (y * (len(y) / y.sum())).astype(np.float32)


def time_weights(t: np.ndarray, table: np.ndarray, weighting: str = "bell") -> np.ndarray:
    """(B,) float32 loss weights of times ``t`` (B,) drawn from ``table``: the weight of the
    nearest entry (DiffSynth looks it up by argmin), or ones for ``weighting="none"``."""
    check_weighting(weighting)
    t = np.asarray(t, np.float32).reshape(-1)
    if weighting == "none":
        return np.ones_like(t)
    index = np.abs(np.asarray(table, np.float32)[None] - t[:, None]).argmin(axis=1)
    return bell_weights(table)[index]


def noisy_latents(x1: mx.array, x0: mx.array, t: mx.array | np.ndarray) -> mx.array:
    """``z_t = t * x1 + (1 - t) * x0`` (B, N, C) fp32 from clean ``x1`` and noise ``x0``
    (B, N, C) at times ``t`` (B,)."""
    t = mx.array(np.asarray(t, np.float32)).reshape(-1, 1, 1)
    return t * x1.astype(mx.float32) + (1 - t) * x0.astype(mx.float32)


def velocity_target(x1: mx.array, x0: mx.array) -> mx.array:
    """The DiT's velocity target ``x1 - x0`` (clean minus noise), (B, N, C) fp32."""
    return x1.astype(mx.float32) - x0.astype(mx.float32)


def flow_loss(
    prediction: mx.array, target: mx.array, weights: mx.array | np.ndarray | None = None
) -> mx.array:
    """Scalar fp32 loss: the MSE of each sample over its (N, C) values, times its weight
    (B,) (None: 1), averaged over the batch. For B = 1 this is DiffSynth's
    ``mse_loss(pred, target) * training_weight(t)``."""
    per_sample = mx.mean(mx.square(prediction.astype(mx.float32) - target), axis=(1, 2))
    if weights is not None:
        per_sample = per_sample * mx.array(np.asarray(weights, np.float32))
    return mx.mean(per_sample)


def check_weighting(weighting: str) -> str:
    if weighting not in WEIGHTINGS:
        raise InputError(f"unknown weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")
    return weighting
