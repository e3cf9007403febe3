"""`ideo4-mlx synth`: write a synthetic checkpoint in the layout of ideogram-ai/ideogram-4-fp8."""

import dataclasses
from pathlib import Path

import click

from ideogram4_mlx.cli.errors import Command
from ideogram4_mlx.cli.options import components_option
from ideogram4_mlx.synth.plan import ALL_COMPONENTS, COMPONENTS, SYNTHETIC_PRESETS


@click.command(cls=Command, short_help="Write a synthetic checkpoint with random weights.")
@click.argument("dst", type=click.Path(path_type=Path))
@click.option(
    "--preset",
    type=click.Choice(list(SYNTHETIC_PRESETS)),
    default="tiny",
    show_default=True,
    help="Sizes of the checkpoint.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of all weights.")
@click.option(
    "--components",
    default=",".join(COMPONENTS),
    show_default=True,
    callback=components_option(ALL_COMPONENTS),
    help="Comma-separated sub-folders to write (model_index.json is always written); "
    "prompt_enhancer_head adds the magic-prompt lm_head.",
)
@click.option("--dit-layers", type=click.IntRange(min=1), help="Override the preset's DiT depth.")
@click.option(
    "--force",
    is_flag=True,
    help="Replace DST if it is empty or holds only checkpoint files (an earlier synth).",
)
def synth(dst: Path, preset: str, seed: int, components, dit_layers, force: bool) -> None:
    """Write a seeded synthetic Ideogram 4 checkpoint at DST: the folder layout, configs, dtypes
    and tokenizer of ideogram-ai/ideogram-4-fp8 with small random weights. Every command
    accepts it, so the whole tool can be tried without the real model (images are noise).

    \b
    Example:
      ideo4-mlx synth /tmp/ideo4-tiny
      ideo4-mlx generate --model /tmp/ideo4-tiny --dtype float32 --width 256 --height 256 \\
          --prompt "a cat" --output /tmp/cat.png
    """
    # Imported here so other commands never load the writer and `tokenizers` (test tooling).
    from ideogram4_mlx.synth.writer import write_synthetic_checkpoint

    spec = SYNTHETIC_PRESETS[preset]
    if dit_layers is not None:
        spec = dataclasses.replace(spec, dit_num_layers=dit_layers)
    path = write_synthetic_checkpoint(
        dst, spec, seed=seed, components=components, force=force, progress=True
    )
    click.echo(str(path))
