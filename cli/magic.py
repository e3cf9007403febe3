"""`ideo4-mlx magic-prompt IDEA`: a plain idea -> a JSON caption, written on this machine."""

from __future__ import annotations

import click
import mlx.core as mx

from ideogram4_mlx.cli.errors import Command
from ideogram4_mlx.cli.options import caption_output_options, pipeline_options, report_dtype
from ideogram4_mlx.magic.options import check_idea, check_target
from ideogram4_mlx.pipeline import load


@click.command("magic-prompt", cls=Command, short_help="Expand a plain idea into a JSON caption.")
@click.argument("idea")
@pipeline_options("magic")
@click.option(
    "--width",
    type=int,
    default=1024,
    show_default=True,
    help="Target width, 1..2048 (the aspect ratio is what counts).",
)
@click.option("--height", type=int, default=1024, show_default=True, help="Target height, 1..2048.")
@click.option("--seed", type=int, help="Sampling seed, 0..2**63-1 (default: random).")
@caption_output_options
def magic_prompt(idea, options, width, height, seed, caption_output):
    """Expand IDEA into a JSON caption in Ideogram 4's schema with the checkpoint's own text
    encoder and the prompt-enhancer lm_head, under a grammar: the caption always passes
    `verify-caption`. Prints it, or writes it to --output.

    \b
    Example:
      ideo4-mlx magic-prompt "a fox reading a sign that says OPEN" --width 1536 -o fox.json
    """
    idea = check_idea(idea)  # every input before the model loads
    check_target(width, height, seed)
    pipe = load(options)
    report_dtype()
    mx.reset_peak_memory()
    caption = pipe.expand(idea, width, height, seed, on_text=caption_output.stream)
    caption_output.finish(caption, "expand")
