"""`ideo4-mlx synth`: write a synthetic checkpoint in the layout of ideogram-ai/ideogram-4-fp8."""

import dataclasses
from pathlib import Path

import click

from ideogram4_mlx.cli.errors import Command
from ideogram4_mlx.cli.options import components_option
from ideogram4_mlx.errors import InputError
from ideogram4_mlx.synth.configs import dit_config
from ideogram4_mlx.synth.layouts import DIT_FILE_FORMATS, convert_layout, write_dit_files
from ideogram4_mlx.synth.layouts import LAYOUTS as CHECKPOINT_LAYOUTS
from ideogram4_mlx.synth.lora import LAYOUTS, write_synthetic_lora
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
    "--lora",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write a small random LoRA (rank 4, every block's attention and feed-forward) "
    "that fits this checkpoint's DiT to this .safetensors file, to try --lora and lora-info.",
)
@click.option(
    "--lora-layout",
    type=click.Choice(LAYOUTS),
    default="diffusers",
    show_default=True,
    help="The trainer's layout --lora is written in.",
)
@click.option(
    "--layout",
    type=click.Choice(list(CHECKPOINT_LAYOUTS)),
    default="fp8",
    show_default=True,
    help="The release whose layout DST has: fp8 (ideogram-ai/ideogram-4-fp8), nf4 "
    "(ideogram-ai/ideogram-4-nf4, split attention names), nf4-fused (its older snapshots), "
    "nf4-diffusers (ideogram-ai/ideogram-4-nf4-diffusers).",
)
@click.option(
    "--dit-files",
    type=click.Choice(DIT_FILE_FORMATS),
    default=None,
    help="Also write both DiTs as single files in DST/diffusion_models/, named as the "
    "published ones: Comfy-Org's repacks (comfy-fp8, comfy-nvfp4) or GGUF files of one type, "
    "for convert --transformer / --unconditional-transformer.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace DST if it is empty or holds only checkpoint files (an earlier synth), and "
    "the --lora file if it exists.",
)
def synth(
    dst: Path,
    preset: str,
    seed: int,
    components,
    dit_layers,
    lora: Path | None,
    lora_layout: str,
    layout: str,
    dit_files: str | None,
    force: bool,
) -> None:
    """Write a seeded synthetic Ideogram 4 checkpoint at DST: the folder layout, configs, dtypes
    and tokenizer of ideogram-ai/ideogram-4-fp8 (or of another release: --layout) with small
    random weights. Every command accepts it, so the whole tool can be tried without the real
    model (images are noise).

    \b
    Example:
      ideo4-mlx synth /tmp/ideo4-tiny --lora /tmp/ideo4-tiny-lora.safetensors
      ideo4-mlx generate --model /tmp/ideo4-tiny --dtype float32 --width 256 --height 256 \\
          --prompt "a cat" --output /tmp/cat.png
      ideo4-mlx lora-info /tmp/ideo4-tiny-lora.safetensors --model /tmp/ideo4-tiny
      ideo4-mlx synth /tmp/ideo4-nf4 --layout nf4 --dit-files gguf-Q4_K
    """
    # Imported here so other commands never load the writer and `tokenizers` (test tooling).
    from ideogram4_mlx.synth.writer import write_synthetic_checkpoint

    spec = SYNTHETIC_PRESETS[preset]
    if dit_layers is not None:
        spec = dataclasses.replace(spec, dit_num_layers=dit_layers)
    if lora is not None:  # checked first: a refused LoRA must not leave a new checkpoint
        lora = lora.expanduser()
        if lora.is_symlink() or (lora.exists() and not (force and lora.is_file())):
            raise InputError(f"{lora} already exists; pass --force to replace the file")
    if dit_files is not None and not {"transformer", "unconditional_transformer"} <= set(
        components
    ):
        raise InputError("--dit-files writes both DiTs: keep them in --components")
    path = write_synthetic_checkpoint(
        dst, spec, seed=seed, components=components, force=force, progress=True
    )
    if dit_files is not None:
        for written in write_dit_files(path, path, dit_files):
            click.echo(str(written))
    convert_layout(path, layout, force=True)  # DST was just written by this command
    click.echo(str(path))
    if lora is not None:
        lora = write_synthetic_lora(lora, dit_config(spec), lora_layout, seed=seed, force=force)
        click.echo(str(lora))
