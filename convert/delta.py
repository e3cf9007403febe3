"""``convert --uncond-as-lora RANK|full``: the unconditional DiT as a delta on the conditional one.

Per parameter of the DiT, ``D = W_uncond - W_cond`` in fp32, both as the conversion stores them
(any baked LoRA merged, rounded to the output dtype). A linear's weight becomes a truncated SVD
``D ~ up @ down`` (``up = U_r sqrt(S_r)``, ``down = sqrt(S_r) V_r^T``, alpha = r, stored in the
output dtype); every other tensor (norms, biases, the indicator embedding) an exact ``.diff``
/ ``.diff_b`` in fp32. ``full`` stores every parameter as an exact fp32 difference. The text
projection is left out: the unconditional pass never reads it. Key layout: see
``ideogram4_mlx.uncond_delta``; the report gives each tensor's relative reconstruction error
``||D - up @ down|| / ||D||`` (Frobenius, with the factors as stored).

One tensor pair is in memory at a time, plus the factors written so far (rank 64 on the real
model: ~0.4 GB in bf16). ``full`` keeps every difference until the file is written (~37 GB in
fp32 on the real model): it is for exactness checks and small models.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from tqdm import tqdm

from ideogram4_mlx.config import CheckpointError
from ideogram4_mlx.convert.checks import check_keys
from ideogram4_mlx.dtypes import parse_dtype
from ideogram4_mlx.errors import InputError
from ideogram4_mlx.lora import MAX_RANK, fused_weight
from ideogram4_mlx.transformer import TEXT_INPUT_MODULES, Ideogram4Transformer
from ideogram4_mlx.uncond_delta import DELTA_FILE, FORMAT, REPORT_FILE
from ideogram4_mlx.weights import check_raw_dtypes, component_files, load_safetensors

PREFIX = "diffusion_model."  # ai-toolkit's prefix for the DiT
COND, UNCOND = "transformer", "unconditional_transformer"


def check_rank(rank: int | str | None) -> int | str | None:
    """``None``, ``"full"`` or a rank 1 .. MAX_RANK (an int or its text)."""
    if rank is None or rank == "full":
        return rank
    try:
        value = int(rank)
    except (TypeError, ValueError):
        value = 0
    if isinstance(rank, bool) or not 1 <= value <= MAX_RANK or str(value) != str(rank).strip():
        raise InputError(
            f"--uncond-as-lora {rank!r}: give a rank from 1 to {MAX_RANK}, or full (exact)"
        )
    return value


def delta_bytes(src_dir: Path, rank: int | str, dtype: mx.Dtype) -> int:
    """The size of the delta file, from the conditional DiT's skeleton."""
    model = Ideogram4Transformer.build(src_dir / COND)
    modules = dict(model.named_modules())
    total = 0
    for key, value in tree_flatten(model.parameters()):
        if key.startswith(TEXT_INPUT_MODULES):
            continue
        path, _, leaf = key.rpartition(".")
        if rank != "full" and leaf == "weight" and isinstance(modules.get(path), nn.Linear):
            out, inp = value.shape
            total += min(rank, out, inp) * (out + inp) * dtype.size + 4
        else:
            total += value.size * 4
    return total


def dit_weights(src_dir: Path, name: str, expected: dict) -> dict[str, mx.array]:
    """One raw DiT's sanitized tensors (lazy), keys and shapes checked against ``expected``."""
    files = component_files(src_dir / name)
    key_files = check_raw_dtypes(files, Ideogram4Transformer.dtype_rule)
    model = Ideogram4Transformer.build(src_dir / name)
    try:
        weights = model.sanitize(load_safetensors(files))
    except CheckpointError as e:
        raise CheckpointError(f"{src_dir / name}: {e}") from None
    check_keys(weights, expected, key_files, src_dir / name)
    return weights


def write_uncond_delta(
    src_dir: Path, out_dir: Path, rank: int | str, settings: dict, progress: bool = True
) -> dict:
    """Write :data:`DELTA_FILE` and :data:`REPORT_FILE` into ``out_dir``; returns the report."""
    dtype = parse_dtype(settings["dtype"])
    model = Ideogram4Transformer.build(src_dir / COND)
    expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
    other = Ideogram4Transformer.build(src_dir / UNCOND)
    if other.config != model.config:
        raise CheckpointError(
            f"{src_dir}: {UNCOND}/config.json and {COND}/config.json give different sizes; "
            "a delta needs two DiTs of one shape"
        )
    modules = dict(model.named_modules())
    cond = dit_weights(src_dir, COND, expected)
    uncond = dit_weights(src_dir, UNCOND, expected)
    baked = {name: baked_deltas(settings, name) for name in (COND, UNCOND)}

    tensors: dict[str, mx.array] = {}
    layers: dict[str, dict] = {}
    keys = [k for k in sorted(expected) if not k.startswith(TEXT_INPUT_MODULES)]
    for key in tqdm(keys, desc="unconditional delta", disable=not progress):
        wc = stored(cond.pop(key), baked[COND].get(key), dtype)
        wu = stored(uncond.pop(key), baked[UNCOND].get(key), dtype)
        d = wu - wc
        path, _, leaf = key.rpartition(".")
        norm = float(np.linalg.norm(d))
        entry = {
            "shape": list(d.shape),
            "relative_delta": norm / (float(np.linalg.norm(wu)) or 1.0),
        }
        if rank != "full" and leaf == "weight" and isinstance(modules.get(path), nn.Linear):
            up, down, r, s = truncated_svd(d, rank)
            up, down = mx.array(up).astype(dtype), mx.array(down).astype(dtype)
            approx = np.array(up.astype(mx.float32)) @ np.array(down.astype(mx.float32))
            error = float(np.linalg.norm(d - approx)) / norm if norm else 0.0
            tensors[f"{PREFIX}{path}.lora_A.weight"] = down
            tensors[f"{PREFIX}{path}.lora_B.weight"] = up
            tensors[f"{PREFIX}{path}.alpha"] = mx.array(float(r))
            entry.update(kind="lora", rank=r, relative_error=error, error_by_rank=curve(s))
        else:
            suffix = "diff" if leaf == "weight" else "diff_b" if leaf == "bias" else None
            if suffix is None:
                raise CheckpointError(f"{key}: a DiT parameter that is no weight or bias")
            tensors[f"{PREFIX}{path}.{suffix}"] = mx.array(d)
            entry.update(kind="diff", relative_error=0.0)
        mx.eval(list(tensors.values())[-3:])
        layers[key] = entry

    lora = [e["relative_error"] for e in layers.values() if e["kind"] == "lora"]
    report = {
        "format": FORMAT,
        "rank": rank,
        "source": settings["source"],
        "dtype": settings["dtype"],
        "file": DELTA_FILE,
        "summary": {
            "low_rank_layers": len(lora),
            "diff_tensors": len(layers) - len(lora),
            "max_relative_error": max(lora, default=0.0),
            "mean_relative_error": float(np.mean(lora)) if lora else 0.0,
            "values": int(sum(t.size for t in tensors.values())),
        },
        "layers": layers,
    }
    metadata = {"format": FORMAT, "rank": str(rank), "source": str(settings["source"])}
    mx.save_safetensors(str(out_dir / DELTA_FILE), tensors, metadata=metadata)
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def baked_deltas(settings: dict, name: str) -> dict[str, list]:
    """The LoRAs baked into DiT ``name``, by parameter key (as ``convert_component`` does)."""
    deltas: dict[str, list] = {}
    for lora, scale in settings.get("loras", {}).get(name, []):
        for target, items in lora.deltas.items():
            deltas.setdefault(f"{target}.weight", []).extend((d, scale) for d in items)
    return deltas


def stored(value: mx.array, deltas: list | None, dtype: mx.Dtype) -> np.ndarray:
    """A tensor as the conversion stores it (baked LoRAs merged, rounded to ``dtype``), fp32."""
    if deltas:
        value = fused_weight(value.astype(mx.float32), deltas)
    return np.array(value.astype(dtype).astype(mx.float32))


def truncated_svd(d: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """``(up (out, r), down (r, in), r, singular values)`` with ``up @ down`` the best rank-r
    approximation of ``d`` (fp32 SVD); the singular values are split evenly (their square
    roots on each side) so that neither factor's range strains a bf16 store."""
    u, s, vt = np.linalg.svd(d.astype(np.float32), full_matrices=False)
    r = min(rank, s.size)
    root = np.sqrt(s[:r])
    return u[:, :r] * root, root[:, None] * vt[:r], r, s


def curve(s: np.ndarray) -> dict[str, float]:
    """The exact-arithmetic error of the best rank-k approximation, ``sqrt(sum_{i>k} s_i^2) /
    ||D||``, at k = 1, 2, 4, ... below full rank: what another RANK would give."""
    energy = np.cumsum((s.astype(np.float64) ** 2)[::-1])[::-1]  # energy[k] = sum_{i>=k}
    total = energy[0] if s.size and energy[0] > 0 else 1.0
    ranks = [2**i for i in range(int(np.log2(max(s.size, 1))) + 1) if 2**i < s.size]
    return {str(k): float(np.sqrt(energy[k] / total)) for k in ranks}
