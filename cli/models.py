"""`ideo4-mlx models [PATH...]`: the Ideogram 4 checkpoints on this machine, as tables."""

from pathlib import Path

import click

from ideogram4_mlx.catalog import Checkpoint, list_models
from ideogram4_mlx.cli.errors import Command
from ideogram4_mlx.files import format_size


@click.command("models", cls=Command, short_help="List the Ideogram 4 checkpoints on this machine.")
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path), metavar="[PATH]...")
def models(paths: tuple[Path, ...]) -> None:
    """List the Ideogram 4 snapshots in the Hugging Face cache, and describe each checkpoint
    folder PATH (an original snapshot in any format convert reads, or an `ideo4-mlx convert`
    output): its components with dtype, format or quantization and size on disk. A PATH that
    is a DiT file (GGUF, a Comfy repack), or a folder holding such files (ComfyUI/models), is
    listed with its format and stored types.

    Downloads go to the Hugging Face cache: $HF_HUB_CACHE, by default $HF_HOME/hub
    (~/.cache/huggingface/hub). The fp8 snapshot takes about 27.5 GB. A listed path can be
    given to --model to work offline.

    \b
    Examples:
      ideo4-mlx models
      ideo4-mlx models ~/models/ideo4-q4
      ideo4-mlx models ~/ComfyUI/models/diffusion_models
    """
    found = list_models(paths)
    if not found.cached:
        click.echo(f"Hugging Face cache ({found.cache_dir}): no Ideogram 4 snapshot")
    else:
        click.echo(f"Hugging Face cache ({found.cache_dir}):")
        rows = [("repo", "revision", "size", "state", "path")]
        for c in found.cached:
            revision = c.revision[:12] + (f" ({', '.join(c.refs)})" if c.refs else "")
            ck = c.checkpoint
            rows.append((c.repo_id, revision, format_size(ck.size), state(ck), str(ck.path)))
        echo_table(rows)
    if found.files:
        click.echo("\nDiT files (convert --transformer / --unconditional-transformer):")
        rows = [("file", "format", "stored as", "size")]
        for f in found.files:
            stored = f.quantization if f.problem is None else f"unreadable: {f.problem}"
            rows.append((str(f.path), f.format, stored, format_size(f.size)))
        echo_table(rows)
    for checkpoint in found.folders:
        click.echo(f"\n{checkpoint.path}: {format_size(checkpoint.size)}, {state(checkpoint)}")
        rows = [("component", "dtype", "quantization", "size")]
        for c in checkpoint.components:
            rows.append((c.name, c.dtype, c.quantization, format_size(c.size)))
        echo_table(rows)


def state(checkpoint: Checkpoint) -> str:
    if checkpoint.problem is not None:
        return f"unreadable: {checkpoint.problem}"
    text = f"converted from {checkpoint.source}" if checkpoint.converted else "original"
    if checkpoint.missing:
        text += f"; incomplete, missing {', '.join(checkpoint.missing)}"
    return text


def echo_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
