"""`ideo4-mlx generate`: one image for one prompt, with its settings stored in the PNG."""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import click
from click.core import ParameterSource
from tqdm import tqdm

from ideogram4_mlx.caption import is_json_prompt
from ideogram4_mlx.constants import parse_dtype
from ideogram4_mlx.hub import DEFAULT_REPO, ModelAccessError
from ideogram4_mlx.metadata import read_metadata, replay_kwargs, save_png
from ideogram4_mlx.pipeline import check_caption, check_request, load
from ideogram4_mlx.previews import preview_callback
from ideogram4_mlx.sampler import DEFAULT_PRESET, PRESETS


def _read_prompt_file(ctx, param, path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise click.BadParameter(f"{path} is not UTF-8 text ({e})") from e
    except OSError as e:
        raise click.BadParameter(f"cannot read {path}: {e.strerror}") from e
    if path.suffix.lower() == ".json" or is_json_prompt(raw):
        try:
            json.loads(raw)  # unstripped, so the error position is the file's
        except json.JSONDecodeError as e:
            raise click.BadParameter(
                f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
            ) from e
    return _check_prompt(ctx, param, raw.strip())


def _check_prompt(ctx, param, text: str | None) -> str | None:
    if text is not None and not text.strip():
        raise click.BadParameter("the prompt is empty")
    return text


def _parse_guidance(ctx, param, value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        weights = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a comma-separated list of numbers (e.g. 7,7,3)"
        ) from None
    if not all(math.isfinite(w) for w in weights):
        raise click.BadParameter(f"{value!r}: weights must be finite numbers")
    return weights


def _progress(previews):
    """The denoising callback: step previews (optional), then a tqdm bar on stderr."""
    bar = None

    def callback(step, num_steps, latents):
        nonlocal bar
        if previews is not None:
            previews(step, num_steps, latents)
        if bar is None:
            bar = tqdm(total=num_steps, desc="denoise", unit="step", file=sys.stderr)
        bar.update(1)
        if step + 1 == num_steps:
            bar.close()

    return callback


def _show_warning(message, category, filename, lineno, file=None, line=None):
    click.echo(f"warning: {message}", err=True)


@click.command()
@click.option("--prompt", callback=_check_prompt, help="A JSON caption (recommended) or text.")
@click.option(
    "--prompt-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    callback=_read_prompt_file,
    help="Read the prompt from a UTF-8 file instead (surrounding whitespace is stripped). "
    "A .json file, or one starting with '{', must be valid JSON; other files are plain text.",
)
@click.option(
    "--from-metadata",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Replay a PNG written by this command: its prompt, model, dtype, size, seed, preset, "
    "steps, guidance schedule, mu and std. Options given on the command line override the "
    "stored ones; --model drops the stored revision, --preset the stored steps, guidance, mu "
    "and std, --steps the stored guidance.",
)
@click.option(
    "--model",
    default=DEFAULT_REPO,
    show_default=True,
    help="A local checkpoint folder or a Hugging Face repo id.",
)
@click.option("--revision", help="Hub revision (branch, tag or commit) of a repo id.")
@click.option(
    "--dtype",
    type=click.Choice(["bfloat16", "float32"]),
    default="bfloat16",
    show_default=True,
    callback=lambda ctx, param, value: parse_dtype(value),
    help="Weights and activations (latents are always float32).",
)
@click.option(
    "--preset",
    type=click.Choice(list(PRESETS)),
    default=DEFAULT_PRESET,
    show_default=True,
    help="Sampler preset; --steps, --guidance-schedule, --mu and --std override it.",
)
@click.option(
    "--width",
    type=int,
    default=1024,
    show_default=True,
    help="Multiple of 16 in 256..2048; aspect ratio at most 6:1.",
)
@click.option("--height", type=int, default=1024, show_default=True, help="As --width.")
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    help="Noise seed, below 2**63. Default: a random seed, printed and stored in the PNG.",
)
@click.option(
    "--steps",
    "--num-steps",
    "num_steps",
    type=click.IntRange(min=1),
    help="Denoising steps (default: the preset's). Without --guidance-schedule the preset's "
    "shape is kept: its main weight, then its final polish weight.",
)
@click.option(
    "--guidance-schedule",
    callback=_parse_guidance,
    help="Comma-separated CFG weights in CHRONOLOGICAL order: the first value is the first "
    "(noisiest) step. One value per step, or one value for every step. Note: official and "
    "mflux tuples list the last step first.",
)
@click.option("--mu", type=float, help="Mean of the logit-normal time grid (default: preset's).")
@click.option("--std", type=float, help="Its standard deviation, > 0 (default: preset's).")
@click.option(
    "--strict-caption",
    is_flag=True,
    help="Fail (before loading any model) if the caption checker has findings, "
    "plain-text prompts included; otherwise findings are warnings.",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default="ideogram4.png",
    show_default=True,
    help="PNG to write, with the settings in an 'ideogram4-mlx' text chunk. Written to a "
    "temporary file in the same folder and renamed at the end; missing folders are created. "
    "An existing file is an error (checked before generating) unless --force.",
)
@click.option("--force", "overwrite", is_flag=True, help="Replace an existing --output file.")
@click.option(
    "--stepwise-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Save a preview PNG of the latents after every step (step_001.png, ...). Each "
    "preview is a full VAE decode, and the VAE sits in memory next to both DiTs while "
    "denoising: slower and more peak memory.",
)
@click.option(
    "--low-memory",
    is_flag=True,
    help="Stream the DiT blocks from disk on every pass instead of holding both DiTs in "
    "memory: same image, far lower peak, one read of the DiT files per step.",
)
@click.option("--verbose", is_flag=True, help="Print each stage's time and peak memory.")
@click.pass_context
def generate(
    ctx: click.Context,
    prompt: str | None,
    prompt_file: str | None,
    from_metadata: Path | None,
    strict_caption: bool,
    output: Path,
    overwrite: bool,
    stepwise_dir: Path | None,
    low_memory: bool,
    verbose: bool,
    **settings,
) -> None:
    """Generate one image from a prompt, or replay one with --from-metadata."""
    if prompt is not None and prompt_file is not None:
        raise click.UsageError("give either --prompt or --prompt-file, not both")
    prompt = prompt if prompt is not None else prompt_file
    if prompt is None and from_metadata is None:
        raise click.UsageError("give --prompt or --prompt-file (or --from-metadata)")
    if output.suffix.lower() != ".png":
        raise click.BadParameter(
            "the image is written as PNG: use a .png name", param_hint="--output"
        )
    if output.exists() and not overwrite:
        raise click.ClickException(f"{output} already exists; pass --force to replace it")
    explicit = {k: v for k, v in settings.items() if _given(ctx, k)}
    if prompt is not None:
        explicit["prompt"] = prompt
    with warnings.catch_warnings():
        warnings.filterwarnings("always", message="caption:")
        warnings.showwarning = _show_warning
        try:
            if from_metadata is None:
                kwargs = {**settings, "prompt": prompt}
            else:
                kwargs = replay_kwargs(read_metadata(from_metadata), explicit)
            model, dtype, revision = (kwargs.pop(k) for k in ("model", "dtype", "revision"))
            _check_before_loading(kwargs, strict_caption)
            pipe = load(model, dtype=dtype, revision=revision, low_memory=low_memory)
            previews = None
            if stepwise_dir is not None:
                previews = preview_callback(pipe, stepwise_dir, kwargs["width"], kwargs["height"])
            result = pipe.generate(
                **kwargs,
                strict_caption=strict_caption,
                callback=_progress(previews),
                verbose=verbose,
            )
            save_png(result.image, output, result.metadata, overwrite)
        except (ValueError, ModelAccessError, OSError) as e:  # CaptionError, CheckpointError
            raise click.ClickException(str(e)) from e
    if verbose:
        total = sum(s["seconds"] for s in result.stats.values())
        click.echo(f"[total] {total:.1f} s")
    click.echo(f"{output} (seed {result.metadata['seed']})")


def _given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) not in (
        ParameterSource.DEFAULT,
        ParameterSource.DEFAULT_MAP,
    )


def _check_before_loading(kwargs: dict, strict_caption: bool) -> None:
    """The pipeline's own checks, run before ``load`` so a mistake never waits for a download."""
    names = ("width", "height", "seed", "preset", "num_steps", "guidance_schedule", "mu", "std")
    check_request(**{k: kwargs[k] for k in names})
    if strict_caption:
        check_caption(kwargs["prompt"], strict=True)  # raises on findings, silent otherwise
