"""`ideo4-mlx verify-caption FILE`: print the official verifier's findings."""

import sys

import click

from ideogram4_mlx.caption import verify_file


@click.command("verify-caption")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
def verify_caption(path: str) -> None:
    """Check a JSON caption file against the official caption rules (exit 1 on findings)."""
    try:
        findings = verify_file(path)
    except UnicodeDecodeError as e:
        raise click.ClickException(
            f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8"
        ) from e
    for finding in findings:
        click.echo(f"{path}: {finding}")
    if findings:
        sys.exit(1)
    click.echo(f"{path}: ok")
