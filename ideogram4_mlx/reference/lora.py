"""LoRAs on the diffusers DiT, applied the way diffusers applies them (needs the `reference`
extra with peft): ``Ideogram4LoraLoaderMixin.lora_state_dict`` (its ai-toolkit/kohya/fused-qkv
converter), ``load_lora_adapter`` with the ``transformer.`` prefix, ``set_adapters`` scales.

Two inputs diffusers 0.42 does not read are normalised first, and only these:
- peft adapter names in keys (``lora_A.default.weight``, some DiffSynth-Studio files): its converter
  leaves them over and raises, so ``.default`` is dropped before the file reaches it;
- keys with no ``transformer.`` prefix that the converter does not rename (split ``to_q`` names):
  ``load_lora_weights`` would keep no key and load nothing, so they load with ``prefix=None``.
"""

from __future__ import annotations

from pathlib import Path

import peft  # noqa: F401  (diffusers' load_lora_adapter needs it: fail here, by name)
import torch
from diffusers import Ideogram4Transformer2DModel
from diffusers.loaders.lora_pipeline import Ideogram4LoraLoaderMixin
from safetensors import safe_open
from safetensors.torch import load_file

PREFIX = "transformer"
ADAPTER_NAME_INFIX = ".default."


def reference_lora_state_dict(path: Path | str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(state dict in diffusers names, adapter metadata) of a LoRA file, as diffusers reads it."""
    path = str(Path(path).expanduser())
    with safe_open(path, framework="pt") as f:
        named = any(ADAPTER_NAME_INFIX in k for k in f.keys())
    if not named:
        return Ideogram4LoraLoaderMixin.lora_state_dict(path, return_lora_metadata=True)
    state = {k.replace(ADAPTER_NAME_INFIX, "."): v for k, v in load_file(path).items()}
    state, _ = Ideogram4LoraLoaderMixin.lora_state_dict(state, return_lora_metadata=True)
    return state, None  # DiffSynth-Studio files carry no adapter metadata


def load_reference_loras(
    model: Ideogram4Transformer2DModel, loras: list[tuple[Path | str, float]]
) -> list[str]:
    """Load each ``(file, scale)`` as its own peft adapter (``lora0``, ``lora1``, ...) and make
    them all active with their scales; returns the adapter names (for ``set_adapters``)."""
    names, first = [], len(getattr(model, "peft_config", {}))
    for i, (path, _) in enumerate(loras):
        state, metadata = reference_lora_state_dict(path)
        prefix = PREFIX if any(k.startswith(f"{PREFIX}.") for k in state) else None
        name = f"lora{first + i}"
        model.load_lora_adapter(state, prefix=prefix, adapter_name=name, metadata=metadata)
        names.append(name)
    model.set_adapters(names, weights=[float(scale) for _, scale in loras])
    return names
