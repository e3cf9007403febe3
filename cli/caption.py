"""`ideo4-mlx verify-caption FILE`: print the official verifier's findings."""

import sys
from pathlib import Path

import click

import ideogram4_mlx
from ideogram4_mlx.caption import verify_file
from ideogram4_mlx.cli.errors import Command

PACKAGE_DIR = Path(ideogram4_mlx.__file__).parent
# examples/ is installed as ideogram4_mlx/examples; in a source checkout it sits next to the
# package folder.
EXAMPLE_DIRS = (PACKAGE_DIR / "examples", PACKAGE_DIR.parent / "examples")
EXAMPLE = "poster.json"


def examples_hint() -> str:
    """One line naming an example caption that passes, wherever the examples are."""
    for folder in EXAMPLE_DIRS:
        if (folder / EXAMPLE).is_file():
            return f"see {folder / EXAMPLE} for a caption that passes (more examples in {folder})"
    return f"see examples/{EXAMPLE} in the ideogram4-mlx repository for a caption that passes"


@click.command(
    "verify-caption",
    cls=Command,
    short_help="Check a JSON caption against the official caption rules.",
)
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
def verify_caption(path: str) -> None:
    """Check the JSON caption file PATH against the official caption rules.

    Prints one line per finding and exits with status 1 when there are any; prints
    "ok" otherwise.

    \b
    Example:
      ideo4-mlx verify-caption examples/poster.json
    """
    findings = verify_file(path)  # InputError: too long, not UTF-8, unreadable
    for finding in findings:
        click.echo(f"{path}: {finding}")
    if findings:
        click.echo(examples_hint())
        sys.exit(1)
    click.echo(f"{path}: ok")
