"""Ideogram 4 on MLX."""

__version__ = "0.1.0"
