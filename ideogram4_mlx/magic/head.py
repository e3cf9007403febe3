"""The prompt-enhancer ``lm_head`` (diffusers' ``Ideogram4PromptEnhancerHead``, repo
``diffusers/qwen3-vl-8b-instruct-lm-head``) as an MLX module: loaded for the magic prompt and
converted (quantized like the text encoder) by ``ideo4-mlx convert``. No mlx-lm import here, so
the converter does not pull it in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import mlx.core as mx
import mlx.nn as nn

from ideogram4_mlx.config import BaseConfig, HeaderCheck
from ideogram4_mlx.weights import DtypeRule, checked_config

HEAD_FOLDER = "prompt_enhancer_head"  # the head bundled inside a checkpoint folder


@dataclass(frozen=True)
class HeadConfig(BaseConfig):
    """``config.json`` of ``Ideogram4PromptEnhancerHead`` (its defaults are Qwen3-VL-8B's)."""

    hidden_size: int = 4096
    vocab_size: int = 151936

    def header_checks(self) -> list[HeaderCheck]:
        # Rows only: a quantized head packs its columns (hidden_size * bits / 32); the strict
        # load checks every shape against the skeleton anyway.
        return [HeaderCheck("vocab_size", self.vocab_size, "lm_head.weight")]


class PromptEnhancerHead(nn.Module):
    """The bias-free ``lm_head`` (vocab, hidden) of diffusers' ``Ideogram4PromptEnhancerHead``."""

    # [I] the repo's dtype is not documented (MODEL_NOTES#prompt-enhancer): a diffusers save
    # keeps the model's float dtype.
    dtype_rule: ClassVar[DtypeRule] = DtypeRule(floats=("BF16", "F16", "F32"), fp8=False)

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        return dict(weights)

    def quant_predicate(self, path: str, module: nn.Module) -> bool | dict:
        return True

    @classmethod
    def build(cls, component_dir: Path | str) -> PromptEnhancerHead:
        """The float skeleton of a head folder, its config.json checked against the weights."""
        return cls(checked_config(HeadConfig, component_dir))
