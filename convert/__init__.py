"""Checkpoint conversion (fp8 snapshot -> MLX weights). Installed as `ideogram4_mlx.convert`."""

from ideogram4_mlx.convert.convert import COMPONENTS, SHARD_BYTES, convert

__all__ = ["COMPONENTS", "SHARD_BYTES", "convert"]
