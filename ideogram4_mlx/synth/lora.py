"""Seeded random LoRA files for a DiT, in each layout that trainers write (test tooling).

    from ideogram4_mlx.synth.lora import write_synthetic_lora
    write_synthetic_lora("/tmp/k.safetensors", ckpt / "transformer", "kohya", rank=4, alpha=2)

Layouts (what ``ideogram4_mlx.lora.read_lora`` and diffusers' ``Ideogram4LoraLoaderMixin`` read):

- ``diffusers``: ``transformer.layers.N.attention.to_q.lora_A.weight`` (split q/k/v, ``to_out.0``);
  an alpha goes into the header's ``lora_adapter_metadata`` as diffusers' ``save_lora_weights``
  writes it (the peft config, keys prefixed ``transformer.``); no alpha, no metadata (alpha = r);
- ``split``: the same names without a prefix, no alpha;
- ``ai-toolkit``: ``diffusion_model.`` + the checkpoint's names (fused ``attention.qkv``,
  ``attention.o``), ``lora_A``/``lora_B``, a scalar ``.alpha`` per module when alpha is given;
- ``kohya``: as ai-toolkit with ``lora_down``/``lora_up`` and always an ``.alpha`` (default r);
- ``diffsynth``: the checkpoint's names, no prefix, no alpha; ``default_infix`` writes peft's
  in-model key form ``lora_A.default.weight`` (kept by some DiffSynth-Studio exports).

Every tensor (an ``.alpha`` too, as kohya's ``save_dtype`` does) is stored in ``dtype``: fp32, or
the bf16 / fp16 that trainers save (the fp32 values rounded to nearest).

Split layouts get independent ``lora_A`` for q, k and v (as a diffusers-trained LoRA has); fused
ones one ``lora_A`` for the whole ``qkv``. Values: ``down`` ~ N(0, 1/in), ``up`` scaled so that the
update ``alpha / r * up @ down`` has RMS ``strength / sqrt(in)``, i.e. ``strength`` times a
fan-in-scaled weight's (the synthetic DiT's weights are). Values from numpy, written by MLX (numpy
has no bf16); same arguments, same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

import mlx.core as mx
import numpy as np

from ideogram4_mlx.errors import InputError

LAYOUTS = ("diffusers", "split", "ai-toolkit", "kohya", "diffsynth")
# Per-block linears (our names, MODEL_NOTES#dit-keys); adaln_modulation only when asked for.
DEFAULT_MODULES = (
    "attention.qkv",
    "attention.o",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
)
ALL_MODULES = (*DEFAULT_MODULES, "adaln_modulation")
PREFIXES = {
    "diffusers": "transformer.",
    "split": "",
    "ai-toolkit": "diffusion_model.",
    "kohya": "diffusion_model.",
    "diffsynth": "",
}
CONFIG_KEYS = (
    "num_layers",
    "num_attention_heads",
    "attention_head_dim",
    "intermediate_size",
    "adaln_dim",
)
# Our module -> the short names a diffusers training script lists in ``target_modules``.
PEFT_TARGETS = {
    "attention.qkv": ("to_q", "to_k", "to_v"),
    "attention.o": ("to_out.0",),
    "feed_forward.w1": ("w1",),
    "feed_forward.w2": ("w2",),
    "feed_forward.w3": ("w3",),
    "adaln_modulation": ("adaln_modulation",),
}
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def read_config(transformer) -> dict:
    """The DiT sizes from a component folder (its config.json), a config.json path, a dict of
    its contents or a config dataclass (``TransformerConfig``)."""
    if dataclasses.is_dataclass(transformer):
        config = dataclasses.asdict(transformer)
    elif isinstance(transformer, dict):
        config = transformer
    else:
        path = Path(transformer).expanduser()
        path = path / "config.json" if path.is_dir() else path
        config = json.loads(path.read_text())
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise InputError(f"DiT config lacks {', '.join(missing)} (from {transformer!r})")
    return {k: int(config[k]) for k in CONFIG_KEYS}


def block_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of each per-block linear, by our name."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    f, a = config["intermediate_size"], config["adaln_dim"]
    return {
        "attention.qkv": (3 * d, d),
        "attention.o": (d, d),
        "feed_forward.w1": (f, d),
        "feed_forward.w2": (d, f),
        "feed_forward.w3": (f, d),
        "adaln_modulation": (4 * d, a),
    }


def peft_alpha(module: str, alpha: float, pattern: dict[str, float]) -> float:
    """peft's ``alpha_pattern`` rule (``get_pattern_key``): the first key matching a suffix."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return alpha


def file_modules(layout: str, name: str, out: int, inp: int) -> list[tuple[str, int, int]]:
    """One of our linears as the layout names it: (file module name, out, in) per LoRA pair."""
    split = layout in ("diffusers", "split")
    if split and name.endswith("attention.qkv"):
        base = name[: -len("qkv")]
        return [(base + p, out // 3, inp) for p in ("to_q", "to_k", "to_v")]
    if split and name.endswith("attention.o"):
        return [(name[: -len("o")] + "to_out.0", out, inp)]
    return [(name, out, inp)]


def write_synthetic_lora(
    path: Path | str,
    transformer_dir_or_config,
    layout: str,
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 0,
    modules: Iterable[str] = DEFAULT_MODULES,
    *,
    layers: Iterable[int] | None = None,
    strength: float = 0.05,
    alpha_pattern: dict[str, float] | None = None,
    default_infix: bool = False,
    dtype: str = "float32",
    force: bool = False,
) -> Path:
    """Write a random LoRA for a DiT (its folder or config, see :func:`read_config`) to ``path``.

    Targets ``modules`` (our per-block names, :data:`ALL_MODULES`) of ``layers`` (default: every
    block; indices beyond the model are allowed, for unmatched-module tests). ``alpha`` is the
    LoRA alpha (None: the layout's default, scale 1); ``alpha_pattern`` (diffusers layout only)
    overrides it per module as peft does. ``dtype`` (:data:`DTYPES`) is what the file stores.
    Refuses a link at ``path``, and an existing file unless ``force``. Returns ``path``.
    """
    if layout not in LAYOUTS:
        raise InputError(f"unknown LoRA layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if alpha is not None and alpha <= 0:
        raise InputError(f"alpha must be > 0, got {alpha}")
    if alpha is not None and layout in ("split", "diffsynth"):
        raise InputError(f"the {layout} layout stores no alpha; pass alpha=None")
    if alpha_pattern and (layout != "diffusers" or alpha is None):
        raise InputError("alpha_pattern needs the diffusers layout and an alpha")
    if default_infix and layout != "diffsynth":
        raise InputError("default_infix (lora_A.default.weight) is a diffsynth-layout option")
    if rank < 1:
        raise InputError(f"rank must be >= 1, got {rank}")
    config = read_config(transformer_dir_or_config)
    shapes = block_shapes(config)
    modules = tuple(modules)
    unknown = [m for m in modules if m not in shapes]
    if unknown:
        raise InputError(f"unknown module {unknown[0]!r}; choose from {', '.join(ALL_MODULES)}")
    if layout == "kohya" and alpha is None:
        alpha = float(rank)
    layers = range(config["num_layers"]) if layers is None else layers
    rng = np.random.default_rng(seed)
    prefix = PREFIXES[layout]
    down_name, up_name = ("lora_down", "lora_up") if layout == "kohya" else ("lora_A", "lora_B")
    infix = ".default" if default_infix else ""
    tensors: dict[str, np.ndarray] = {}
    for i in layers:
        for module in modules:
            out, inp = shapes[module]
            for name, rows, cols in file_modules(layout, f"layers.{i}.{module}", out, inp):
                scale = peft_alpha(name, alpha or rank, alpha_pattern or {}) / rank
                down = rng.standard_normal((rank, cols)) / np.sqrt(cols)
                up = rng.standard_normal((rows, rank)) * strength / (scale * np.sqrt(rank))
                key = prefix + name
                tensors[f"{key}.{down_name}{infix}.weight"] = down.astype(np.float32)
                tensors[f"{key}.{up_name}{infix}.weight"] = up.astype(np.float32)
                if layout in ("ai-toolkit", "kohya") and alpha is not None:
                    tensors[f"{key}.alpha"] = np.array(alpha, np.float32)
    metadata = {"format": "pt"}
    if layout == "diffusers" and alpha is not None:
        metadata[METADATA_KEY] = adapter_metadata(rank, alpha, alpha_pattern or {}, modules)
    arrays = {k: mx.array(v).astype(DTYPES[dtype]) for k, v in tensors.items()}
    return _save(Path(path).expanduser(), arrays, metadata, force)


def adapter_metadata(rank: int, alpha: float, pattern: dict[str, float], modules) -> str:
    """``lora_adapter_metadata`` as diffusers' ``write_lora_layers`` stores it: the peft
    ``LoraConfig`` of the ``transformer`` adapter, keys prefixed, JSON with indent 2, sorted."""
    targets = sorted(t for m in modules for t in PEFT_TARGETS[m])
    config = {
        "alpha_pattern": pattern,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": "gaussian",
        "lora_alpha": alpha,
        "lora_bias": False,
        "lora_dropout": 0.0,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": {},
        "target_modules": targets,
        "use_dora": False,
        "use_rslora": False,
    }
    packed = {f"transformer.{k}": v for k, v in config.items()}
    return json.dumps(packed, indent=2, sort_keys=True)


def _save(path: Path, arrays: dict[str, mx.array], metadata: dict, force: bool) -> Path:
    if path.is_symlink():
        raise FileExistsError(f"{path} is a symbolic link; LoRAs are never written through one")
    if path.exists() and not (force and path.is_file()):
        raise FileExistsError(f"{path} already exists; pass force=True to replace the file")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        with open(tmp, "wb") as f:  # a file object: MLX adds no .safetensors to its name
            mx.save_safetensors(f, arrays, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
