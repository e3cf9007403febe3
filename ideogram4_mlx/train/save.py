"""Saving a trained LoRA in the diffusers/PEFT layout (what ``lora.read_lora`` reads and
diffusers' ``load_lora_weights`` loads): ``transformer.layers.N.attention.to_q.lora_A.weight``
(r, in) and ``...lora_B.weight`` (out, r), split ``to_q``/``to_k``/``to_v`` and ``to_out.0``
names, the peft ``LoraConfig`` (rank, alpha, targets; keys prefixed ``transformer.``) in the
``lora_adapter_metadata`` header entry and the training settings in ``ideogram4_mlx_training``."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ideogram4_mlx.files import write_file
from ideogram4_mlx.lora import METADATA_KEY, TRAINING_KEY
from ideogram4_mlx.train.step import FUSED_QKV, LoRASettings, _Trainable

PREFIX = "transformer."
# Our module names -> diffusers' (the fused qkv's thirds are to_q, to_k, to_v).
DIFFUSERS_NAMES = {FUSED_QKV: ("attention.to_q", "attention.to_k", "attention.to_v")}
DIFFUSERS_NAMES["attention.o"] = ("attention.to_out.0",)


def diffusers_names(path: str) -> tuple[str, ...]:
    """``layers.3.attention.qkv`` -> the diffusers module names of its adapter's pairs."""
    block, name = path.rsplit(".", 2)[0], ".".join(path.rsplit(".", 2)[1:])
    if name not in DIFFUSERS_NAMES:
        return (path,)
    return tuple(f"{block}.{n}" for n in DIFFUSERS_NAMES[name])


def lora_state(model: nn.Module, dtype: mx.Dtype = mx.bfloat16) -> dict[str, mx.array]:
    """The adapters of ``model`` in diffusers/PEFT names, cast to ``dtype``."""
    state = {}
    for path, module in model.named_modules():
        if not isinstance(module, _Trainable):
            continue
        adapter = module.adapter
        pairs = zip(adapter.lora_A, adapter.lora_B, strict=True)
        for name, (a, b) in zip(diffusers_names(path), pairs, strict=True):
            state[f"{PREFIX}{name}.lora_A.weight"] = a.astype(dtype)
            state[f"{PREFIX}{name}.lora_B.weight"] = b.astype(dtype)
    return state


def peft_config(settings: LoRASettings) -> dict:
    """The peft ``LoraConfig`` fields diffusers and ``read_lora`` read back."""
    block = "layers.0."  # peft matches target_modules as dot-bounded suffixes of names
    targets = [n[len(block) :] for t in settings.targets for n in diffusers_names(block + t)]
    return {
        "r": settings.rank,
        "lora_alpha": settings.alpha,
        "target_modules": targets,
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "bias": "none",
    }


def save_lora(
    path: Path | str,
    model: nn.Module,
    settings: LoRASettings,
    training: dict | None = None,
    dtype: mx.Dtype = mx.bfloat16,
    force: bool = False,
) -> Path:
    """Write ``model``'s adapters to ``path`` (bf16 by default, as trainers save) atomically
    (``files.write_file``: never half-written, never through a link; an existing file raises
    ``FileExistsError`` unless ``force``). ``training``: settings to record (JSON-able)."""
    state = lora_state(model, dtype)
    metadata = {
        "format": "pt",
        # keys prefixed ``transformer.``, as diffusers' save_lora_weights writes them: its
        # load_lora_weights keeps only the prefixed entries (unprefixed ones: a default config)
        METADATA_KEY: json.dumps(
            {f"{PREFIX}{k}": v for k, v in peft_config(settings).items()}, sort_keys=True
        ),
        TRAINING_KEY: json.dumps({"seed": settings.seed, **(training or {})}, sort_keys=True),
    }
    mx.eval(state)
    return write_file(path, lambda f: mx.save_safetensors(f, state, metadata=metadata), force)
