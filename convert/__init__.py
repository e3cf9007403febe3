"""Checkpoint conversion (fp8 snapshot -> MLX weights). Installed as `ideogram4_mlx.convert`."""
