"""Option parsers shared by several commands."""

import click

from ideogram4_mlx.constants import parse_dtype
from ideogram4_mlx.hub import DEFAULT_REPO


def components_option(valid: tuple[str, ...]):
    """A click callback parsing ``a,b,c`` into a tuple of names from ``valid`` (None stays None)."""

    def parse(ctx, param, value: str | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        names = tuple(n.strip() for n in value.split(",") if n.strip())
        unknown = [n for n in names if n not in valid]
        if unknown:
            raise click.BadParameter(
                f"unknown component(s) {', '.join(unknown)}; valid: {', '.join(valid)}"
            )
        return names

    return parse


def model_options(function):
    """``--model``, ``--revision`` and ``--dtype``: which checkpoint, and how to run it."""
    options = [
        click.option(
            "--model",
            default=DEFAULT_REPO,
            show_default=True,
            help="A local checkpoint folder or a Hugging Face repo id.",
        ),
        click.option("--revision", help="Hub revision (branch, tag or commit) of a repo id."),
        click.option(
            "--dtype",
            type=click.Choice(["bfloat16", "float32"]),
            default="bfloat16",
            show_default=True,
            callback=lambda ctx, param, value: parse_dtype(value),
            help="Weights and activations (latents are always float32; float32 is the fast "
            "one on MLX's CPU backend).",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def parse_expand(ctx, param, value: str | None) -> tuple[int, int, int, int] | None:
    """``--expand LEFT,TOP,RIGHT,BOTTOM`` (or one value for all four) -> a 4-tuple of ints."""
    if value is None:
        return None
    try:
        sides = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not LEFT,TOP,RIGHT,BOTTOM in pixels (e.g. 0,0,256,0)"
        ) from None
    if len(sides) == 1:
        sides *= 4
    if len(sides) != 4:
        raise click.BadParameter(f"{value!r}: give 4 numbers LEFT,TOP,RIGHT,BOTTOM (or one)")
    return sides
