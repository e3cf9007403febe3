"""`ideo4-mlx lora-info FILE`: what a LoRA file holds and where it lands."""

from pathlib import Path

import click

from ideogram4_mlx.cli.errors import Command
from ideogram4_mlx.hub import resolve_file
from ideogram4_mlx.lora import linear_shapes, read_lora
from ideogram4_mlx.lora_info import describe
from ideogram4_mlx.transformer import Ideogram4Transformer, TransformerConfig


@click.command(
    "lora-info", cls=Command, short_help="Show a LoRA file's layout, ranks and matched layers."
)
@click.argument("source")
@click.option(
    "--model",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Match against this checkpoint folder's DiT (default: the real Ideogram 4 shapes).",
)
@click.option(
    "--uncond", is_flag=True, help="Match against the unconditional DiT of --model instead."
)
def lora_info(source: str, model: Path | None, uncond: bool) -> None:
    """Describe the LoRA SOURCE (a .safetensors file, or a Hub repo owner/name[/file]): the
    layout detected (diffusers/PEFT, ai-toolkit, kohya, DiffSynth-Studio), ranks, alpha/rank,
    the modules it targets, and how many match the DiT's layers. Reads no model weights.

    \b
    Example:
      ideo4-mlx lora-info my-style.safetensors --model ~/models/ideo4-q4
    """
    lora = read_lora(resolve_file(source))
    if model is None:
        dit, against = Ideogram4Transformer(TransformerConfig()), "Ideogram 4 (real shapes)"
    else:
        name = "unconditional_transformer" if uncond else "transformer"
        dit, against = Ideogram4Transformer.build(model / name), str(model / name)
    shapes = linear_shapes(dit)  # lazy skeleton: shapes only, no memory
    for line in describe(lora, shapes, against):
        click.echo(line)
