"""The VAE's bounded-memory forwards: the path ``vae.decode`` and ``vae.encode`` take by default.

Every activation is held as horizontal row strips (:class:`RowStrips`) and each layer of
``vae.py``'s modules runs strip by strip: a 3x3 conv reads one halo row from each neighbouring
strip, so the convs are exact, and GroupNorm applies the moments of the whole activation,
accumulated exactly (fp32 per strip, combined in float64) while its strips are produced. Only
the mid-block attention, which is global, runs on the whole low-resolution tensor, its queries
chunked. The results equal those of the whole-image forwards (``Encoder.__call__``,
``Decoder.__call__``, the oracle) up to summation order; tests/test_vae.py compares the two.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ideogram4_mlx.errors import InputError
from ideogram4_mlx.layers import group_moments, silu, upsample_nearest

ATTENTION_CHUNK_SCORES = 2**25  # fp32 attention scores per query chunk


def conv_rows(conv: nn.Module, x: mx.array, pad_top: int, pad_bottom: int) -> mx.array:
    """A 3x3 stride-1 conv on a window of rows: zero rows only where the window meets the image
    border (``pad_*``); interior windows carry one real halo row instead."""
    return conv(mx.pad(x, [(0, 0), (pad_top, pad_bottom), (1, 1), (0, 0)]), padding=0)


class RowStrips:
    """An NHWC activation held as a list of evaluated row strips, with the GroupNorm moments
    of the whole tensor accumulated as strips are appended."""

    def __init__(self, groups: int):
        self.groups = groups
        self.parts: list[mx.array | None] = []
        self.moments: list[tuple[int, np.ndarray, np.ndarray]] = []
        self._stats = None

    @classmethod
    def split(cls, x: mx.array, rows: int, groups: int) -> RowStrips:
        strips = cls(groups)
        for start in range(0, x.shape[1], rows):
            strips.append(x[:, start : start + rows])
        return strips

    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, i: int) -> mx.array:
        return self.parts[i]

    def append(self, x: mx.array) -> None:
        mean, m2 = group_moments(x, self.groups)
        mx.eval(x, mean, m2)
        count = x.size // (x.shape[0] * self.groups)
        self.moments.append((count, np.array(mean, np.float64), np.array(m2, np.float64)))
        self.parts.append(x)

    @property
    def stats(self) -> tuple[mx.array, mx.array]:
        """(mean, var) (B, G) fp32 over all strips: Chan's parallel combination in float64."""
        if self._stats is None:
            counts = np.array([n for n, _, _ in self.moments], np.float64)[:, None, None]
            means = np.stack([m for _, m, _ in self.moments])
            total = counts.sum()
            mean = (counts * means).sum(0) / total
            m2 = sum(m2 for _, _, m2 in self.moments) + (counts * (means - mean) ** 2).sum(0)
            self._stats = (
                mx.array(mean.astype(np.float32)),
                mx.array((m2 / total).astype(np.float32)),
            )
        return self._stats

    def window(self, i: int) -> tuple[mx.array, int, int]:
        """Strip ``i`` plus one halo row from each neighbour, and the number of rows (0 or 1)
        that fall outside the image at the top and bottom."""
        parts = [self.parts[i]]
        top = bottom = 1
        if i > 0:
            parts.insert(0, self.parts[i - 1][:, -1:])
            top = 0
        if i + 1 < len(self.parts):
            parts.append(self.parts[i + 1][:, :1])
            bottom = 0
        return mx.concatenate(parts, axis=1), top, bottom

    def release(self, i: int) -> None:
        if 0 <= i < len(self.parts):
            self.parts[i] = None


def resnet_strips(block: nn.Module, x: RowStrips) -> RowStrips:
    """A ``ResnetBlock`` on row strips (consumes ``x``)."""
    h = RowStrips(x.groups)
    for i in range(len(x)):
        rows, top, bottom = x.window(i)
        h.append(conv_rows(block.conv1, silu(block.norm1(rows, x.stats)), top, bottom))
    y = RowStrips(x.groups)
    for i in range(len(x)):
        rows, top, bottom = h.window(i)
        y.append(
            block.shortcut(x[i])
            + conv_rows(block.conv2, silu(block.norm2(rows, h.stats)), top, bottom)
        )
        x.release(i)
        h.release(i - 1)
    return y


def attention_chunk(z: mx.array) -> int:
    """Queries per chunk so one chunk's fp32 scores hold about ATTENTION_CHUNK_SCORES values."""
    tokens = z.shape[1] * z.shape[2]
    return max(1, ATTENTION_CHUNK_SCORES // tokens)


def mid_block_strips(block: nn.Module, x: RowStrips) -> RowStrips:
    """A ``MidBlock``: the resnets on strips (consumes ``x``); the attention, which is global,
    on the whole tensor with its queries chunked. (A whole-tensor resnet at 256x256x512, a
    2048^2 image's latent, has ~4.5 GiB of fp32 conv temporaries.)"""
    x = resnet_strips(block.resnets[0], x)
    for attn in block.attentions:
        rows = x[0].shape[1]
        whole = mx.concatenate(x.parts, axis=1)
        x = RowStrips.split(attn(whole, attention_chunk(whole)), rows, x.groups)
    return resnet_strips(block.resnets[1], x)


def downsample_strips(layer: nn.Module, x: RowStrips) -> RowStrips:
    """A ``Downsample`` on row strips (consumes ``x``): each output strip is half as tall.
    Output row r reads input rows 2r..2r+2, so a strip (an even number of rows; only the
    last may be odd) reads one halo row from the next strip, a zero row at the bottom."""
    y = RowStrips(x.groups)
    for i in range(len(x)):
        b, n, w, c = x[i].shape
        if n > 1:  # a last strip of one row has no output row of its own
            below = x[i + 1][:, :1] if i + 1 < len(x) else mx.zeros((b, 1, w, c), x[i].dtype)
            rows = mx.concatenate([x[i], below], axis=1)
            y.append(layer.conv(mx.pad(rows, [(0, 0), (0, 0), (0, 1), (0, 0)])))
        x.release(i)
    return y


def upsample_strips(layer: nn.Module, x: RowStrips) -> RowStrips:
    """An ``Upsample`` on row strips (consumes ``x``): each output strip is twice as tall."""
    y = RowStrips(x.groups)
    for i in range(len(x)):
        rows, top, bottom = x.window(i)
        u = upsample_nearest(rows)  # each halo row became two: keep the one next to the strip
        u = u[:, 1 - top : u.shape[1] - (1 - bottom)]
        y.append(conv_rows(layer.conv, u, top, bottom))
        x.release(i - 1)
    return y


def encoder_strips(encoder: nn.Module, x: mx.array, strip_rows: int) -> mx.array:
    """Bounded-memory ``Encoder``; equal to its ``__call__`` up to summation order.

    Every layer runs strip by strip on horizontal strips of ``strip_rows`` image rows (a
    multiple of the scale factor, 8, so every strip but the last stays even at each
    downsampler and the strips halve in step; the last strip may be shorter); only the
    mid-block attention runs on the whole low-resolution tensor. The peak is about two
    full-resolution activations in the compute dtype plus one strip's temporaries or the
    attention's (2.5 GiB in bf16 at 2048^2, where the whole graph would need ~74 GiB:
    benchmarks/results/vae_encoder_memory_cpu.txt).
    """
    if strip_rows <= 0 or strip_rows % encoder.scale_factor:
        raise InputError(
            f"strip_rows {strip_rows}: must be a positive multiple of {encoder.scale_factor} "
            "(the encoder's downsampling) so that every level splits evenly"
        )
    height = x.shape[1]
    h = RowStrips(encoder.conv_norm_out.groups)
    for start in range(0, height, strip_rows):
        rows = x[:, max(start - 1, 0) : start + strip_rows + 1]
        top, bottom = int(start == 0), int(start + strip_rows >= height)
        h.append(conv_rows(encoder.conv_in, rows, top, bottom))
    for block in encoder.down_blocks:
        for resnet in block.resnets:
            h = resnet_strips(resnet, h)
        for down in block.downsamplers:
            h = downsample_strips(down, h)
    h = mid_block_strips(encoder.mid_block, h)
    out = []
    for i in range(len(h)):
        rows, top, bottom = h.window(i)
        out.append(
            conv_rows(encoder.conv_out, silu(encoder.conv_norm_out(rows, h.stats)), top, bottom)
        )
        mx.eval(out[-1])
        h.release(i - 1)
    return mx.concatenate(out, axis=1)


def decoder_strips(decoder: nn.Module, z: mx.array, strip_rows: int) -> mx.array:
    """Bounded-memory ``Decoder``; equal to its ``__call__`` up to summation order.

    Only conv_in (32 channels in) and the mid-block attention run on the whole latent; every
    other activation, the mid block's resnets' included, is kept as strips of ``strip_rows``
    latent rows, doubled at each upsampler. Input strips are freed as soon as the output no
    longer needs them, so the peak is about two full-resolution activations in the compute
    dtype plus one strip's temporaries, instead of the fp32 and im2col temporaries of
    whole-image ops.
    """
    x = RowStrips.split(decoder.conv_in(z), strip_rows, decoder.conv_norm_out.groups)
    x = mid_block_strips(decoder.mid_block, x)  # whole-latent resnets: ~4.5 GiB fp32 at 2048^2
    for block in decoder.up_blocks:
        for resnet in block.resnets:
            x = resnet_strips(resnet, x)
        for up in block.upsamplers:
            x = upsample_strips(up, x)
    out = []
    for i in range(len(x)):
        rows, top, bottom = x.window(i)
        h = conv_rows(decoder.conv_out, silu(decoder.conv_norm_out(rows, x.stats)), top, bottom)
        out.append(h.astype(mx.float32))
        mx.eval(out[-1])
        x.release(i - 1)
    return mx.concatenate(out, axis=1)
