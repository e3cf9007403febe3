"""`ideo4-mlx magic-prompt IDEA`: a plain idea -> a JSON caption, written on this machine."""

from __future__ import annotations

from pathlib import Path

import click
import mlx.core as mx

from ideogram4_mlx.cli.errors import Command
from ideogram4_mlx.cli.options import model_options
from ideogram4_mlx.files import write_file
from ideogram4_mlx.magic.options import (
    DEFAULT_MAX_TOKENS,
    MAX_TEMPERATURE,
    MAX_TOKENS_LIMIT,
    MIN_MAX_TOKENS,
    check_idea,
    check_sampling,
    check_system_prompt,
    check_target,
)
from ideogram4_mlx.pipeline import load


def magic_options(function):
    """The expansion options shared by `magic-prompt` and `generate --magic-prompt` (checked
    by ``checked_magic_options`` before anything loads)."""
    options = [
        click.option(
            "--max-tokens",
            type=int,
            default=DEFAULT_MAX_TOKENS,
            show_default=True,
            help=f"Longest caption, in tokens ({MIN_MAX_TOKENS}..{MAX_TOKENS_LIMIT}).",
        ),
        click.option(
            "--temperature",
            type=float,
            default=1.0,
            show_default=True,
            help=f"Sampling temperature, 0..{MAX_TEMPERATURE:g} (0: greedy).",
        ),
        click.option(
            "--top-p",
            type=float,
            default=1.0,
            show_default=True,
            help="Nucleus sampling, 0..1: keep the most likely tokens up to this mass (1: all).",
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


def checked_magic_options(options: dict) -> dict:
    """``magic_options``' values checked by the library's rules (``MagicPromptError``), the
    system prompt file read (bounded): what ``pipe.expand`` gets."""
    check_sampling(options["temperature"], options["top_p"], options["max_tokens"])
    return {**options, "system_prompt": check_system_prompt(options["system_prompt"])}


@click.command("magic-prompt", cls=Command, short_help="Expand a plain idea into a JSON caption.")
@click.argument("idea")
@model_options
@click.option(
    "--width",
    type=int,
    default=1024,
    show_default=True,
    help="Target width, 1..2048 (the aspect ratio is what counts).",
)
@click.option("--height", type=int, default=1024, show_default=True, help="Target height, 1..2048.")
@click.option("--seed", type=int, help="Sampling seed, 0..2**63-1 (default: random).")
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
    idea = check_idea(idea)  # every input before the model loads
    check_target(options["width"], options["height"], options["seed"])
    options = checked_magic_options(options)
    pipe = load(
        model, dtype=dtype, revision=revision, magic_head=magic_head, magic_model=magic_model
    )
    mx.reset_peak_memory()
    caption = pipe.expand(idea, on_text=stream, **options)
    if verbose:
        click.echo(f"\n[expand] peak {mx.get_peak_memory() / 1e9:.2f} GB", err=True)
    if output is None:
        click.echo(caption)
        return
    write_file(output, lambda f: f.write((caption + "\n").encode("utf-8")), force)
    click.echo(str(output))
