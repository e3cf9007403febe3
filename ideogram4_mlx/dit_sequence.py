"""Where each token of the DiT's sequence sits, computed on the host: the packed
``[left padding][text][image]`` layout with its position, segment and indicator ids, the MRoPE
cos/sin tables and the timestep sinusoid (float64, rounded to fp32, as the reference forms
them). ``transformer.py`` runs the model on them.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from ideogram4_mlx.layers import rope_inv_freq

# Token roles (MODEL_NOTES#token-roles): indicator values, and the segment id that marks padding.
LLM_TOKEN_INDICATOR = 3
OUTPUT_IMAGE_INDICATOR = 2
PADDING_INDICATOR = 0
PADDING_SEGMENT_ID = -1
# Image grid positions start here so they never collide with text positions
# (MODEL_NOTES#token-roles, #mrope-positions).
IMAGE_POSITION_OFFSET = 65536
# The timestep is scaled to [0, 1e4] before the sinusoid (Ideogram4EmbedScalar).
TIMESTEP_SCALE = 1e4


def mrope_axis_of_slot(head_dim: int, mrope_section: tuple[int, int, int]) -> np.ndarray:
    """Axis (0=t, 1=h, 2=w) feeding each frequency slot: interleaved h at 1 mod 3, w at 2 mod 3."""
    axis = np.zeros(head_dim // 2, dtype=np.int64)
    for a in (1, 2):
        axis[np.arange(a, mrope_section[a] * 3, 3)] = a
    return axis


def mrope_cos_sin(
    position_ids: np.ndarray, head_dim: int, theta: float, mrope_section: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables (B, L, head_dim) fp32 for (t, h, w) position ids of shape (B, L, 3)."""
    inv_freq = rope_inv_freq(head_dim, theta)
    axis = mrope_axis_of_slot(head_dim, mrope_section)
    pos = position_ids.astype(np.float32)[..., axis]  # (B, L, head_dim/2): each slot's own axis
    angles = (pos * inv_freq).astype(np.float64)  # the fp32 product, evaluated exactly below
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def timestep_sinusoid(t: np.ndarray, dim: int) -> np.ndarray:
    """``concat(sin(s*w), cos(s*w))`` (B, dim) fp32 with ``s = 1e4 * bf16(t)``
    (MODEL_NOTES#timestep-embedding)."""
    t = np.asarray(mx.array(np.asarray(t, dtype=np.float32)).astype(mx.bfloat16).astype(mx.float32))
    half = dim // 2
    freq = np.exp(
        (
            np.arange(half, dtype=np.float32) * np.float32(-math.log(TIMESTEP_SCALE) / (half - 1))
        ).astype(np.float64)
    ).astype(np.float32)
    angles = ((np.float32(TIMESTEP_SCALE) * t)[:, None] * freq).astype(np.float64)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1).astype(np.float32)


def sequence_ids(
    text_lengths: list[int], grid_h: int, grid_w: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Packed ``[left padding][text][image]`` layout for a batch of prompts
    (MODEL_NOTES#sequence-layout).

    Returns ``position_ids`` (B, L, 3), ``segment_ids`` (B, L) and ``indicator`` (B, L), int32,
    with ``L = max(text_lengths) + grid_h * grid_w``. An empty ``text_lengths`` entry of 0 is an
    image-only row; ``sequence_ids([0], ...)`` is the unconditional layout.
    """
    t_max = max(text_lengths)
    n_img = grid_h * grid_w
    rows, cols = np.divmod(np.arange(n_img), grid_w)
    image_pos = np.stack([np.zeros_like(rows), rows, cols], axis=1) + IMAGE_POSITION_OFFSET
    batch = len(text_lengths)
    position_ids = np.zeros((batch, t_max + n_img, 3), dtype=np.int32)
    segment_ids = np.full((batch, t_max + n_img), PADDING_SEGMENT_ID, dtype=np.int32)
    indicator = np.full((batch, t_max + n_img), PADDING_INDICATOR, dtype=np.int32)
    for b, n in enumerate(text_lengths):
        start = t_max - n
        position_ids[b, start:t_max] = np.arange(n)[:, None]
        position_ids[b, t_max:] = image_pos
        indicator[b, start:t_max] = LLM_TOKEN_INDICATOR
        indicator[b, t_max:] = OUTPUT_IMAGE_INDICATOR
        segment_ids[b, start:] = 1
    return position_ids, segment_ids, indicator
