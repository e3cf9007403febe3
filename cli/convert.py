"""`ideo4-mlx convert`: an fp8 snapshot -> an MLX folder (bf16, 8/6/4-bit, a mixed recipe or
one of MLX's float formats mxfp4/mxfp8/nvfp4)."""

import warnings
from pathlib import Path

import click

from ideogram4_mlx.cli.errors import Command
from ideogram4_mlx.cli.options import components_option, show_warning
from ideogram4_mlx.convert import COMPONENTS
from ideogram4_mlx.convert import convert as convert_checkpoint
from ideogram4_mlx.dtypes import DTYPE_ALIASES, DTYPES
from ideogram4_mlx.quantization import FLOAT_MODES, GROUP_SIZES, MODES, QUANTIZE_CHOICES, RECIPES
from ideogram4_mlx.sources import SOURCE_FAMILIES


@click.command(cls=Command, short_help="Convert the fp8 checkpoint to MLX (bf16 or quantized).")
@click.argument("src")
@click.argument("dst", type=click.Path(path_type=Path))
@click.option(
    "--dtype",
    type=click.Choice([*DTYPE_ALIASES, *DTYPES]),
    default=None,
    help="Dtype of every unquantized tensor (and of affine scales and biases). "
    "Default: bf16; with --quantize keep fp16 for the DiTs whose layers are kept (the "
    "sources' fp16 scales stay exact), bf16 for the rest.",
)
@click.option(
    "--quantize",
    type=click.Choice([*QUANTIZE_CHOICES, "none", "keep"]),
    default=None,
    help="Quantize the DiTs and the text encoder: 8, 6 or 4 bits (affine), or MLX's float "
    "formats mxfp8, mxfp4 (groups of 32) or nvfp4 (groups of 16). none: float (what a 4-bit "
    "source, nf4 or Q4_K, should use: re-quantizing loses twice). keep: copy the weights a "
    "source stores the way MLX does (GGUF Q8_0, Q4_0, Q4_1) as they are, the rest float.",
)
@click.option(
    "--group-size",
    type=click.Choice(sorted({str(g) for m in MODES.values() for g in m.group_sizes}, key=int)),
    default=None,
    help=f"Affine quantization group size: {', '.join(map(str, GROUP_SIZES))} (default 64); "
    f"fixed for {', '.join(FLOAT_MODES)}.",
)
@click.option(
    "--recipe",
    type=click.Choice(list(RECIPES)),
    default=None,
    help="Mixed precision instead of --quantize: "
    + "; ".join(f"{name}: {r.description}" for name, r in RECIPES.items()),
)
@click.option(
    "--components",
    callback=components_option(COMPONENTS),
    default=None,
    help=f"Comma-separated sub-folders to write (default: all of {', '.join(COMPONENTS)}).",
)
@click.option("--revision", default=None, help="Hub revision when SRC is a repo id.")
@click.option(
    "--lora",
    "loras",
    multiple=True,
    metavar="FILE[:SCALE]",
    help="Bake a LoRA into the conditional DiT (repeatable): merged in fp32 before "
    "quantizing, recorded in its config. Every LoRA module must match a layer.",
)
@click.option(
    "--uncond-as-lora",
    metavar="RANK|full",
    default=None,
    help="Write the unconditional DiT as a delta on the conditional one instead of a second "
    "DiT: a rank-RANK truncated SVD per linear of W_uncond - W_cond plus exact diffs of the "
    "small tensors (full: exact diffs of all), in DST/unconditional_delta.safetensors, with "
    "each layer's reconstruction error in DST/unconditional_delta.json. "
    "unconditional_transformer/ is left out unless --components names it.",
)
@click.option(
    "--transformer",
    "transformer_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Read the conditional DiT from this single file instead of SRC/transformer: a Comfy "
    "repack (ideogram4_fp8_scaled / nvfp4_mixed .safetensors) or a GGUF file. Its config comes "
    "from SRC/transformer/config.json (only that is downloaded for a repo id).",
)
@click.option(
    "--unconditional-transformer",
    "uncond_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Likewise for the unconditional DiT.",
)
@click.option(
    "--from",
    "source_format",
    type=click.Choice(SOURCE_FAMILIES),
    default=None,
    help="The format the DiTs (SRC's, or the files given) must hold; detected from the files "
    "by default. The text encoder and VAE are read in whatever format they hold.",
)
@click.option(
    "--force", is_flag=True, help="Replace DST if it is an earlier conversion or an empty folder."
)
def convert(
    src,
    dst,
    dtype,
    quantize,
    group_size,
    recipe,
    components,
    revision,
    force,
    loras,
    uncond_as_lora,
    transformer_file,
    uncond_file,
    source_format,
) -> None:
    """Convert the Ideogram 4 checkpoint SRC (repo id or folder) into an MLX folder DST: bf16 by
    default, or quantized with --quantize or --recipe. Load DST with generate --model DST.

    SRC may be the fp8 release, the nf4 release (either key naming) or its diffusers repo; the
    DiTs may come from single files (--transformer, --unconditional-transformer: Comfy repacks,
    GGUF files), the other components from SRC.

    \b
    Example:
      ideo4-mlx convert ideogram-ai/ideogram-4-fp8 ~/models/ideo4-q4 --quantize 4
      ideo4-mlx convert ideogram-ai/ideogram-4-fp8 ~/models/ideo4-mxfp4 --quantize mxfp4
      ideo4-mlx generate --model ~/models/ideo4-q4 --prompt-file examples/poster.json
      ideo4-mlx convert ideogram-ai/ideogram-4-fp8 ~/m/styled --lora style.safetensors:0.8
      ideo4-mlx convert ideogram-ai/ideogram-4-fp8 ~/m/one-dit --uncond-as-lora 64
      ideo4-mlx convert ideogram-ai/ideogram-4-nf4 ~/models/ideo4-bf16
      ideo4-mlx convert ideogram-ai/ideogram-4-nf4 ~/m/gguf-q8 \\
          --transformer ideogram4-transformer-Q8_0.gguf \\
          --unconditional-transformer ideogram4-unconditional_transformer-Q8_0.gguf
    """
    with warnings.catch_warnings():
        warnings.showwarning = show_warning  # stale lock / partial folder reports: one line each
        path = convert_checkpoint(
            src,
            dst,
            dtype=dtype,
            quantize=int(quantize) if quantize and quantize.isdigit() else quantize,
            group_size=None if group_size is None else int(group_size),
            recipe=recipe,
            components=components,
            force=force,
            revision=revision,
            loras=list(loras),
            uncond_as_lora=uncond_as_lora,
            files=dict(
                (name, path)
                for name, path in (
                    ("transformer", transformer_file),
                    ("unconditional_transformer", uncond_file),
                )
                if path is not None
            ),
            source_format=source_format,
        )
    click.echo(str(path))
