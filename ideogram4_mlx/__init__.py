"""Ideogram 4 on MLX: ``from ideogram4_mlx import load``."""

__version__ = "0.1.0"

from ideogram4_mlx.pipeline import GenerationResult, Ideogram4Pipeline, load  # noqa: E402

__all__ = ["GenerationResult", "Ideogram4Pipeline", "load", "__version__"]
