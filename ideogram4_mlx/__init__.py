"""Ideogram 4 on MLX: ``from ideogram4_mlx import load``."""

from ideogram4_mlx.pipeline import (
    Generation,
    GenerationResult,
    Ideogram4Pipeline,
    Step,
    load,
)
from ideogram4_mlx.pipeline_options import PipelineOptions
from ideogram4_mlx.request import GenerationRequest
from ideogram4_mlx.version import __version__

__all__ = [
    "Generation",
    "GenerationRequest",
    "GenerationResult",
    "Ideogram4Pipeline",
    "PipelineOptions",
    "Step",
    "load",
    "__version__",
]
