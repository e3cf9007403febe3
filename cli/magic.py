"""`ideo4-mlx magic-prompt IDEA`: a plain idea -> a JSON caption, written on this machine."""

from __future__ import annotations

from pathlib import Path

import click
import mlx.core as mx

from ideogram4_mlx.cli.options import model_options
from ideogram4_mlx.files import write_file
from ideogram4_mlx.hub import ModelAccessError
from ideogram4_mlx.pipeline import load


def magic_options(function):
    """The expansion options shared by `magic-prompt` and `generate --magic-prompt`."""
    options = [
        click.option(
            "--max-tokens",
            type=click.IntRange(32, 4096),
            default=1024,
            show_default=True,
            help="Longest caption, in tokens.",
        ),
        click.option(
            "--temperature",
            type=click.FloatRange(0, 2),
            default=1.0,
            show_default=True,
            help="Sampling temperature (0: greedy).",
        ),
        click.option(
            "--top-p",
            type=click.FloatRange(0, 1),
            default=1.0,
            show_default=True,
            help="Nucleus sampling: keep the most likely tokens up to this mass (1: all).",
        ),
        click.option("--keep-bboxes", is_flag=True, help="Keep element bounding boxes."),
        click.option(
            "--system-prompt",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="A file with another system prompt.",
        ),
        click.option(
            "--magic-model",
            help="Expand with another mlx-lm chat model (a folder or repo id, e.g. a quantized "
            "Qwen3 instruct) instead of the checkpoint's text encoder + lm_head.",
        ),
        click.option(
            "--magic-head",
            help="The lm_head: a folder or repo id (default: the checkpoint's "
            "prompt_enhancer_head/, else diffusers/qwen3-vl-8b-instruct-lm-head).",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@click.command("magic-prompt", short_help="Expand a plain idea into a JSON caption.")
@click.argument("idea")
@model_options
@click.option("--width", type=int, default=1024, show_default=True, help="Target width.")
@click.option("--height", type=int, default=1024, show_default=True, help="Target height.")
@click.option("--seed", type=click.IntRange(min=0), help="Sampling seed (default: random).")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the caption here (atomically) instead of printing it.",
)
@click.option("--force", is_flag=True, help="Replace an existing --output file.")
@click.option("--verbose", is_flag=True, help="Stream the caption as it is written.")
@magic_options
def magic_prompt(
    idea, model, revision, dtype, output, force, verbose, magic_head, magic_model, **options
):
    """Expand IDEA into a JSON caption in Ideogram 4's schema with the checkpoint's own text
    encoder and the prompt-enhancer lm_head, under a grammar: the caption always passes
    `verify-caption`. Prints it, or writes it to --output.

    \b
    Example:
      ideo4-mlx magic-prompt "a fox reading a sign that says OPEN" --width 1536 -o fox.json
    """
    if output is not None and output.exists() and not force:
        raise click.ClickException(f"{output} already exists; pass --force to replace it")
    stream = (lambda text: click.echo(text, nl=False, err=True)) if verbose else None
    try:
        pipe = load(
            model, dtype=dtype, revision=revision, magic_head=magic_head, magic_model=magic_model
        )
        mx.reset_peak_memory()
        caption = pipe.expand(idea, on_text=stream, **options)
    except (ValueError, ModelAccessError, OSError) as e:
        raise click.ClickException(str(e)) from e
    if verbose:
        click.echo(f"\n[expand] peak {mx.get_peak_memory() / 1e9:.2f} GB", err=True)
    if output is None:
        click.echo(caption)
        return
    try:
        write_file(output, lambda f: f.write((caption + "\n").encode("utf-8")), force)
    except OSError as e:
        raise click.ClickException(str(e)) from e
    click.echo(str(output))
