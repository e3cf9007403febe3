"""The `ideo4-mlx` command line. Installed as `ideogram4_mlx.cli`.

Each command parses options and calls one library function; no logic lives here.
"""

import click

from ideogram4_mlx.cli.caption import verify_caption
from ideogram4_mlx.cli.convert import convert
from ideogram4_mlx.cli.crosscheck import crosscheck
from ideogram4_mlx.cli.describe import describe
from ideogram4_mlx.cli.generate import generate
from ideogram4_mlx.cli.lora import lora_info
from ideogram4_mlx.cli.magic import magic_prompt
from ideogram4_mlx.cli.models import models
from ideogram4_mlx.cli.serve import serve
from ideogram4_mlx.cli.synth import synth
from ideogram4_mlx.cli.train import train_lora
from ideogram4_mlx.version import __version__


class Commands(click.Group):
    """Lists each command's whole first sentence (click cuts it near 60 columns with "...")."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit=1000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=Commands)
@click.version_option(__version__, prog_name="ideo4-mlx")
def main() -> None:
    """Ideogram 4 text-to-image on MLX.

    \b
    Examples:
      ideo4-mlx verify-caption examples/poster.json
      ideo4-mlx generate --prompt-file examples/poster.json --output poster.png
      ideo4-mlx models

    Run `ideo4-mlx COMMAND --help` for a command's options and an example.
    """


main.add_command(generate)
main.add_command(synth)
main.add_command(verify_caption)
main.add_command(crosscheck)
main.add_command(convert)
main.add_command(models)
main.add_command(magic_prompt)
main.add_command(describe)
main.add_command(lora_info)
main.add_command(serve)
main.add_command(train_lora)
