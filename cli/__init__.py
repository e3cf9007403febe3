"""The `ideo4-mlx` command line. Installed as `ideogram4_mlx.cli`.

Each command parses options and calls one library function; no logic lives here.
"""

import click

from ideogram4_mlx import __version__
from ideogram4_mlx.cli.caption import verify_caption
from ideogram4_mlx.cli.convert import convert
from ideogram4_mlx.cli.crosscheck import crosscheck
from ideogram4_mlx.cli.generate import generate
from ideogram4_mlx.cli.models import models
from ideogram4_mlx.cli.synth import synth


@click.group()
@click.version_option(__version__, prog_name="ideo4-mlx")
def main() -> None:
    """Ideogram 4 on MLX."""


main.add_command(generate)
main.add_command(synth)
main.add_command(verify_caption)
main.add_command(crosscheck)
main.add_command(convert)
main.add_command(models)
