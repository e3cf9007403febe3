"""Source weights that MLX stores exactly as they are: ``convert --quantize keep`` copies them,
and a GGUF DiT loads with them directly.

Some source formats quantize a weight the way MLX's affine mode does: GGUF's Q8_0, Q4_0 and
Q4_1 are groups of 32 values ``scale * q + bias`` (MODEL_NOTES#gguf-dit-files). Such a weight
is repacked into MLX's layout without dequantizing and quantizing again, so nothing is lost
twice; every other weight is written in float. The plan records each kept layer's bits and
group size like any conversion, so the loader rebuilds the same layers.

Which source tensors make up one parameter is read off the model's own ``sanitize``: it is run
on one-element index arrays, so a fused ``qkv`` shows the three split weights it concatenates.
A fused parameter is kept only when all its parts are stored with the same setting.
"""

from __future__ import annotations

from collections import Counter

import mlx.core as mx
import mlx.nn as nn

from ideogram4_mlx.quantization import MODE

KEEP = "keep"


def parameter_sources(model: nn.Module, keys: list[str]) -> dict[str, list[str]]:
    """``{parameter key: [source keys, in the order sanitize concatenates them]}``."""
    index = {k: mx.array([i], dtype=mx.int32) for i, k in enumerate(keys)}
    mapped = model.sanitize(index)
    return {k: [keys[i] for i in v.tolist()] for k, v in mapped.items() if v.ndim == 1}


def keep_plan(
    model: nn.Module, inp, scales_dtype: str = "float16"
) -> tuple[dict | None, dict[str, list[str]]]:
    """The record's ``quantization`` for a kept conversion and ``{weight key: source keys}`` of
    the kept layers. None when the source stores no weight the way MLX does (all float).

    ``inp``: anything with ``headers()`` and ``exact_spec(key, scales_dtype)`` (``(bits,
    group_size)`` held exactly with scales in ``scales_dtype``, or None): a converter input, a
    GGUF file's reader. The layers the model keeps in float (its ``quant_predicate``: norms'
    neighbours such as ``input_proj``, the AdaLN and final layers) are float here too."""
    keys = sorted(inp.headers())
    specs = {k: inp.exact_spec(k, scales_dtype) for k in keys}
    if not any(specs.values()):
        return None, {}
    sources = parameter_sources(model, keys)
    chosen: dict[str, tuple[int, int] | None] = {}
    for path, module in model.named_modules():
        if not hasattr(module, "to_quantized"):
            continue
        parts = sources.get(f"{path}.weight", [])
        found = {specs.get(k) for k in parts}
        floats = model.quant_predicate(path, module) is False
        chosen[path] = found.pop() if len(found) == 1 and parts and not floats else None
    counts = Counter(spec for spec in chosen.values() if spec is not None)
    if not counts:
        return None, {}
    (bits, group_size), _ = counts.most_common(1)[0]
    overrides = {
        path: False if spec is None else {"bits": spec[0], "group_size": spec[1]}
        for path, spec in chosen.items()
        if spec != (bits, group_size)
    }
    plan = {
        "mode": MODE,
        "bits": bits,
        "group_size": group_size,
        "recipe": KEEP,
        "overrides": dict(sorted(overrides.items())),
    }
    kept = {
        f"{path}.weight": sources[f"{path}.weight"]
        for path, spec in chosen.items()
        if spec is not None
    }
    return plan, kept


def kept_among(kept: dict[str, list[str]], keys) -> tuple[dict[str, list[str]], set[str]]:
    """The kept layers a group of source ``keys`` touches (``{weight key: source keys}``) and
    all their source keys: those are copied as stored, never loaded as floats."""
    keys = set(keys)
    copied = {key: parts for key, parts in kept.items() if keys.intersection(parts)}
    return copied, {part for parts in copied.values() for part in parts}


def kept_tensors(key: str, parts: list[str], inp, dtype: mx.Dtype) -> dict[str, mx.array]:
    """One kept layer in MLX's layout: its parts' packed weights, scales and biases, in the
    order ``sanitize`` fuses them (rows stack: each row's groups are its own)."""
    path = key.rpartition(".")[0]
    exact = [inp.exact(k, dtype) for k in parts]
    return {
        key: mx.concatenate([e["weight"] for e in exact], axis=0),
        f"{path}.scales": mx.concatenate([e["scales"] for e in exact], axis=0).astype(dtype),
        f"{path}.biases": mx.concatenate([e["biases"] for e in exact], axis=0).astype(dtype),
    }
