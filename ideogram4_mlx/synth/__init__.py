"""Synthetic Ideogram 4 checkpoints in the exact layout of `ideogram-ai/ideogram-4-fp8`.

Test and benchmark tooling, never imported by generation:

- `plan`: sizes (SyntheticSpec, SYNTHETIC_PRESETS) and every tensor to write (cheap import),
- `configs`: the config.json texts,
- `tokenizer`: the BPE tokenizer trained at write time (the only user of `tokenizers`),
- `writer`: `write_synthetic_checkpoint`, streaming safetensors, the fp8/bf16 encoders,
- `nf4`: `write_nf4_checkpoint`, the bitsandbytes 4-bit layouts made from an fp8 snapshot.

    from ideogram4_mlx.synth import write_synthetic_checkpoint
    write_synthetic_checkpoint("/tmp/ideo4-tiny")
"""

import importlib

from ideogram4_mlx.synth.plan import (
    ALL_COMPONENTS,
    COMPONENTS,
    SYNTHETIC_PRESETS,
    SyntheticSpec,
    TensorPlan,
    dit_tensors,
    prompt_enhancer_head_tensors,
    resolve_spec,
    text_encoder_tensors,
    vae_tensors,
)

# Loaded on first use: importing the package (or its plan, for the CLI's option lists) must not
# import the writer or `tokenizers`.
_LAZY = {
    "write_synthetic_checkpoint": "writer",
    "safetensors_header": "writer",
    "decode_e4m3": "writer",
    "encode_e4m3": "writer",
    "tokenizer_files": "tokenizer",
    "text_vocab_size": "tokenizer",
    "write_nf4_checkpoint": "nf4",
}

__all__ = [
    "ALL_COMPONENTS",
    "COMPONENTS",
    "SYNTHETIC_PRESETS",
    "SyntheticSpec",
    "TensorPlan",
    "dit_tensors",
    "prompt_enhancer_head_tensors",
    "resolve_spec",
    "text_encoder_tensors",
    "vae_tensors",
    *_LAZY,
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
