"""Option parsers shared by several commands."""

import click

from ideogram4_mlx.dtypes import parse_dtype
from ideogram4_mlx.hub import DEFAULT_REPO
from ideogram4_mlx.lora import LoRAError
from ideogram4_mlx.lora_spec import parse_lora_option


def show_warning(message, category, filename, lineno, file=None, line=None):
    """``warnings.showwarning`` for commands: one ``warning: ...`` line, no source location."""
    click.echo(f"warning: {message}", err=True)


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


def _lora_specs(target: str):
    def parse(ctx, param, values: tuple[str, ...]):
        try:
            return [parse_lora_option(v, target) for v in values]
        except LoRAError as e:
            raise click.BadParameter(str(e)) from None

    return parse


def lora_options(function):
    """``--lora``, ``--lora-uncond``, ``--fuse-lora``, ``--lora-allow-partial``."""
    options = [
        click.option(
            "--lora",
            "loras",
            multiple=True,
            callback=_lora_specs("cond"),
            metavar="FILE[:SCALE]",
            help="A LoRA for the conditional DiT (repeatable): a .safetensors file or a Hub "
            "repo (owner/name or owner/name/file.safetensors); SCALE defaults to 1. Layouts: "
            "diffusers/PEFT, ai-toolkit, kohya, DiffSynth-Studio.",
        ),
        click.option(
            "--lora-uncond",
            "uncond_loras",
            multiple=True,
            callback=_lora_specs("uncond"),
            metavar="FILE[:SCALE]",
            help="A LoRA for the unconditional DiT (repeatable). Off by default: LoRAs are "
            "trained on the conditional DiT, and one on the unconditional DiT too pushes CFG "
            "off (mosaics).",
        ),
        click.option(
            "--fuse-lora",
            is_flag=True,
            help="Merge the LoRAs into the float weights at load (a little faster per step; "
            "not with a quantized checkpoint or --low-memory). Default: unfused, exact.",
        ),
        click.option(
            "--lora-allow-partial",
            is_flag=True,
            help="Apply a LoRA some of whose modules match no layer (warns with the count); "
            "otherwise that is an error.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function
