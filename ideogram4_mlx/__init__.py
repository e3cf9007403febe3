"""Ideogram 4 on MLX: ``from ideogram4_mlx import load``."""

__version__ = "0.1.0"

from ideogram4_mlx.pipeline import (  # noqa: E402
    Generation,
    GenerationResult,
    Ideogram4Pipeline,
    Step,
    load,
)
from ideogram4_mlx.request import GenerationRequest  # noqa: E402

__all__ = [
    "Generation",
    "GenerationRequest",
    "GenerationResult",
    "Ideogram4Pipeline",
    "Step",
    "load",
    "__version__",
]
