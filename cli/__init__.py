"""The `ideo4-mlx` command line. Installed as `ideogram4_mlx.cli`."""

import click

from ideogram4_mlx import __version__


@click.group()
@click.version_option(__version__, prog_name="ideo4-mlx")
def main() -> None:
    """Ideogram 4 on MLX."""
