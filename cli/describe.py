"""`ideo4-mlx describe IMAGE`: an image -> a JSON caption, written on this machine."""

from __future__ import annotations

from pathlib import Path

import click
import mlx.core as mx

from ideogram4_mlx.cli.errors import Command
from ideogram4_mlx.cli.options import caption_output_options, pipeline_options, report_dtype
from ideogram4_mlx.describe.options import DEFAULT_TEMPERATURE, prepare
from ideogram4_mlx.magic.options import DEFAULT_MAX_TOKENS, MAX_TEMPERATURE
from ideogram4_mlx.pipeline import load


@click.command("describe", cls=Command, short_help="Describe an image as a JSON caption.")
@click.argument("image", type=click.Path(path_type=Path))
@pipeline_options()
@click.option(
    "--idea",
    help="How a new picture should differ (e.g. 'at night, in snow'): the caption describes "
    "the image with that change (what `generate --remix` does).",
)
@click.option("--keep-bboxes", is_flag=True, help="Keep element bounding boxes (0..1000 grid).")
@click.option("--seed", type=int, help="Sampling seed, 0..2**63-1 (with --temperature > 0).")
@click.option(
    "--temperature",
    type=float,
    default=DEFAULT_TEMPERATURE,
    show_default=True,
    help=f"Sampling temperature, 0..{MAX_TEMPERATURE:g} (0: greedy, the same caption each run).",
)
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling, 0..1.")
@click.option(
    "--max-tokens",
    type=int,
    default=DEFAULT_MAX_TOKENS,
    show_default=True,
    help="Longest caption, in tokens (32..4096).",
)
@click.option(
    "--system-prompt",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A file with another system prompt.",
)
@click.option(
    "--magic-head",
    help="The lm_head: a folder or repo id (default: the checkpoint's prompt_enhancer_head/, "
    "else diffusers/qwen3-vl-8b-instruct-lm-head).",
)
@caption_output_options
def describe(image, options, idea, seed, magic_head, caption_output, **settings):
    """Describe IMAGE as a JSON caption in Ideogram 4's schema with the checkpoint's own
    Qwen3-VL (its vision tower, its text encoder and the prompt-enhancer lm_head), under the
    magic prompt's grammar: the caption always passes `verify-caption`. EXIF
    rotation is applied and transparency composited on white, as for `generate --image`.
    Prints the caption, or writes it to --output.

    \b
    Examples:
      ideo4-mlx describe photo.jpg -o photo.json
      ideo4-mlx describe photo.jpg --idea "the same street in winter" -o winter.json
    """
    prepare(image, idea, seed, **settings)  # every input before the model loads
    pipe = load(options, magic_head=magic_head)
    report_dtype()
    mx.reset_peak_memory()
    caption = pipe.describe(image, idea, seed, on_text=caption_output.stream, **settings)
    caption_output.finish(caption, "describe")
