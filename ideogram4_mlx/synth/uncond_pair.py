"""A synthetic checkpoint whose unconditional DiT is the conditional one plus a known delta
(test tooling): every linear weight gets a rank-``rank`` update plus small noise, every other
tensor (norms, biases, the indicator embedding) a small dense change, so the error of a
rank-k delta (``convert --uncond-as-lora k``) can be measured against what was put in.

    from ideogram4_mlx.synth.uncond_pair import write_synthetic_pair
    pair = write_synthetic_pair("/tmp/ideo4-pair", rank=4)
    pair.floors["layers.0.feed_forward.w1.weight"]  # the best error any rank >= 4 can reach

The unconditional DiT is written as a BF16 repack (every tensor BF16, the layout
``Ideogram4Transformer.sanitize`` reads as it is); its rounding to bf16 is part of the noise,
and ``floors`` include it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from ideogram4_mlx.errors import InputError
from ideogram4_mlx.synth.plan import COMPONENTS, SyntheticSpec
from ideogram4_mlx.synth.writer import write_synthetic_checkpoint
from ideogram4_mlx.weights import dequantize_fp8_weights

DIT_FILE = "diffusion_pytorch_model.safetensors"


@dataclass(frozen=True)
class SyntheticPair:
    path: Path
    rank: int
    # Per linear weight: ||D - L|| / ||D|| with D = W_uncond (as stored) - W_cond and L the
    # rank-``rank`` part put in: no rank >= ``rank`` approximation of D is worse than this.
    floors: dict[str, float] = field(default_factory=dict)


def write_synthetic_pair(
    dst,
    spec: SyntheticSpec | str = "tiny",
    *,
    rank: int = 4,
    strength: float = 0.5,
    noise: float = 1e-3,
    seed: int = 0,
    components=COMPONENTS,
    force: bool = False,
) -> SyntheticPair:
    """Write a synthetic checkpoint (``write_synthetic_checkpoint``) and replace its
    ``unconditional_transformer/`` by ``W_cond + L + N`` per linear weight: ``L`` of rank
    ``rank`` with RMS ``strength`` times the weight's, ``N`` Gaussian with RMS ``noise`` times
    it; other tensors ``W_cond + strength * RMS(W_cond) * N(0, 1) / 10``."""
    if "transformer" not in components or "unconditional_transformer" not in components:
        raise InputError("a pair needs both transformer and unconditional_transformer")
    root = write_synthetic_checkpoint(dst, spec, seed=seed, components=components, force=force)
    cond = dequantize_fp8_weights(mx.load(str(root / "transformer" / DIT_FILE)))
    rng = np.random.default_rng([seed, rank, 0x0DE17A])
    uncond, floors = {}, {}
    for key in sorted(cond):
        w = np.array(cond[key].astype(mx.float32))
        rms = float(np.sqrt(np.mean(w**2))) or 1.0
        if w.ndim == 2 and key != "embed_image_indicator.weight":
            out, inp = w.shape
            u = rng.standard_normal((out, rank))
            v = rng.standard_normal((rank, inp))
            low = (strength * rms / np.sqrt(rank)) * (u @ v)
            dense = noise * rms * rng.standard_normal(w.shape)
            uncond[key] = mx.array((w + low + dense).astype(np.float32)).astype(mx.bfloat16)
            d = np.array(uncond[key].astype(mx.float32)).astype(np.float64) - w
            floors[key] = float(np.linalg.norm(d - low) / np.linalg.norm(d))
        else:
            change = (strength / 10) * rms * rng.standard_normal(w.shape)
            uncond[key] = mx.array((w + change).astype(np.float32)).astype(mx.bfloat16)
    target = root / "unconditional_transformer" / DIT_FILE
    mx.save_safetensors(str(target), uncond, metadata={"format": "pt"})
    config_path = root / "unconditional_transformer" / "config.json"
    config = json.loads(config_path.read_text())
    if config.pop("ideogram_fp8_weight_only", None) is not None:  # no longer fp8
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    return SyntheticPair(root, rank, floors)
