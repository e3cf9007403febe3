"""`ideo4-mlx generate`: one image for one prompt, with its settings stored in the PNG."""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import click
import mlx.core as mx
import numpy as np
from click.core import ParameterSource
from PIL import Image
from tqdm import tqdm

from ideogram4_mlx.caption import is_json_prompt, parse_json, read_text_file
from ideogram4_mlx.cli.magic import checked_magic_options, magic_options
from ideogram4_mlx.cli.options import lora_options, model_options, parse_expand, show_warning
from ideogram4_mlx.distributed import MAX_IMAGES, DataGroup, DistributedError, image_seeds
from ideogram4_mlx.edit import MAX_MASK_TOKENS
from ideogram4_mlx.files import write_file
from ideogram4_mlx.hub import ModelAccessError
from ideogram4_mlx.magic.options import check_idea
from ideogram4_mlx.metadata import (
    LOAD_KEYS,
    check_output,
    png_bytes,
    read_metadata,
    replay,
    save_png,
)
from ideogram4_mlx.pipeline import load
from ideogram4_mlx.previews import StepPreviews
from ideogram4_mlx.request import GenerationRequest, ResolvedRequest
from ideogram4_mlx.sampler import DEFAULT_PRESET, PRESETS


def _read_prompt_file(ctx, param, path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        raw = read_text_file(path, encoding="utf-8-sig")
    except ValueError as e:  # too long (/dev/zero), not UTF-8, unreadable
        raise click.BadParameter(str(e)) from e
    if path.suffix.lower() == ".json" or is_json_prompt(raw):
        try:
            parse_json(raw)  # unstripped, so the error position is the file's
        except json.JSONDecodeError as e:
            raise click.BadParameter(
                f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
            ) from e
        except ValueError as e:  # too deep
            raise click.BadParameter(f"{path}: {e}") from e
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


@click.command(short_help="Generate an image from a prompt, or replay a PNG.")
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
    "stored ones; --model drops the stored revision; --preset brings the new preset's steps, "
    "guidance, mu and std except those the image set explicitly; --steps reshapes a "
    "preset-shaped guidance schedule. An edit replays when given the same --image (and "
    "--mask) again: they are checked against the SHA-256 fingerprints stored in the PNG.",
)
@model_options
@lora_options
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
    help="Multiple of 16 in 256..2048; aspect ratio at most 6:1. Default: 1024, or the "
    "--image's own size (rounded to a multiple of 16, scaled into the limits) plus --expand.",
)
@click.option("--height", type=int, help="As --width.")
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    help="Noise seed, below 2**63. Default: a random seed, printed and stored in the PNG.",
)
@click.option(
    "--steps",
    "--num-steps",
    "num_steps",
    type=int,
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
    "--magic-prompt",
    is_flag=True,
    help="Treat the prompt as an idea: expand it into a JSON caption first (see "
    "`ideo4-mlx magic-prompt`); the PNG stores the idea and the caption, and a replay uses "
    "the caption.",
)
@magic_options
@click.option(
    "--image",
    type=click.Path(path_type=Path),
    help="Start from this image (image-to-image): resized and centre-cropped to the output "
    "size. EXIF rotation applied, transparency composited on white.",
)
@click.option(
    "--strength",
    type=float,
    help="How much of --image to redraw, in (0, 1]: the steps run from the time S(strength) "
    "of the preset's grid; 1 starts from noise. Default: 0.6, or 1 with --mask or --expand.",
)
@click.option(
    "--mask",
    type=click.Path(path_type=Path),
    help="Inpainting: white (luminance >= 128) = regenerate, black = keep. Same size as "
    "--image. A 16x16-pixel token is regenerated if any of its pixels is white.",
)
@click.option(
    "--mask-grow",
    type=click.IntRange(0, MAX_MASK_TOKENS),
    default=0,
    show_default=True,
    help="Grow the regenerated region by this many tokens (16 px each) in every direction.",
)
@click.option(
    "--mask-feather",
    type=click.IntRange(0, MAX_MASK_TOKENS),
    default=0,
    show_default=True,
    help="Blend this many more rings of tokens around the region (weights falling to 0).",
)
@click.option(
    "--paste-back",
    is_flag=True,
    help="Keep every unmasked pixel of the input exactly in the output (the model's pixels "
    "only where the mask, grown by --mask-grow, is white).",
)
@click.option(
    "--expand",
    callback=parse_expand,
    help="Outpainting: add LEFT,TOP,RIGHT,BOTTOM pixels (multiples of 16; one value for all "
    "four) around --image and generate them. With --width/--height, the image is fitted "
    "into the output size minus the border.",
)
@click.option(
    "--allow-invalid-caption",
    is_flag=True,
    help="Run a prompt that starts with '{' but is not valid JSON as plain text (otherwise "
    "an error).",
)
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
@click.option(
    "--force",
    is_flag=True,
    help="Replace an existing --output file, and write previews into a non-empty --stepwise-dir.",
)
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
    "memory: same image, far lower peak, one read of the DiT files per step (the smallest "
    "--memory-limit).",
)
@click.option(
    "--memory-limit",
    type=click.FloatRange(min=0, min_open=True),
    metavar="GB",
    help="Memory budget for denoising, in GB: as many DiT blocks stay resident as fit, the "
    "rest are streamed from disk each step (same image). Default: the machine's (MLX's "
    "recommended working set on a Mac, 60% of RAM elsewhere).",
)
@click.option(
    "--distributed",
    is_flag=True,
    help="CFG-parallel on the two ranks mlx.launch started: rank 0 runs the text encoder, the "
    "conditional DiT and the VAE and writes the image, rank 1 the unconditional DiT. The same "
    "image as one process. Example: mlx.launch -n 2 --backend ring -- ideo4-mlx generate "
    "--distributed ... (--hostfile hosts.json for two Macs).",
)
@click.option(
    "--num-images",
    type=click.IntRange(1, MAX_IMAGES),
    default=1,
    show_default=True,
    help="Make N images with seeds SEED, SEED+1, ... (a random start without --seed), written "
    "as OUTPUT-<seed>.png; the models load once and the images run one after another (a "
    "batch measured no faster). With --distributed the images are spread over the ranks "
    "(each holds both DiTs) and rank 0 writes them all.",
)
@click.option(
    "--seeds",
    callback=lambda ctx, param, value: _parse_seeds(value),
    help="Comma-separated seeds, one image each (instead of --seed/--num-images).",
)
@click.option("--verbose", is_flag=True, help="Print each stage's time and peak memory.")
@click.pass_context
def generate(
    ctx: click.Context,
    prompt_file: str | None,
    from_metadata: Path | None,
    output: Path,
    force: bool,
    stepwise_dir: Path | None,
    low_memory: bool,
    memory_limit: float | None,
    distributed: bool,
    num_images: int,
    seeds: list[int] | None,
    verbose: bool,
    magic_head: str | None,
    magic_model: str | None,
    loras: list,
    uncond_loras: list,
    fuse_lora: bool,
    lora_allow_partial: bool,
    **settings,
) -> None:
    """Generate one image from a prompt, or replay one with --from-metadata.

    \b
    Examples:
      ideo4-mlx generate --prompt-file examples/poster.json --seed 42 --output poster.png
      ideo4-mlx generate --from-metadata poster.png --seed 43 --output poster-43.png
      ideo4-mlx generate --prompt-file examples/poster.json --image photo.jpg --strength 0.5
      ideo4-mlx generate --prompt-file examples/poster.json --image photo.jpg --mask m.png
      ideo4-mlx generate --prompt-file examples/poster.json --image photo.jpg --expand 0,0,256,0
    """
    if settings["prompt"] is not None and prompt_file is not None:
        raise click.UsageError("give either --prompt or --prompt-file, not both")
    if prompt_file is not None:
        settings["prompt"] = prompt_file
    if settings["prompt"] is None and from_metadata is None:
        raise click.UsageError("give --prompt or --prompt-file (or --from-metadata)")
    if output.suffix.lower() != ".png":
        raise click.BadParameter(
            "the image is written as PNG: use a .png name", param_hint="--output"
        )
    magic = {k: settings.pop(k) for k in MAGIC_OPTIONS}
    explicit = {k: v for k, v in settings.items() if _given(ctx, k)}
    if prompt_file is not None:
        explicit["prompt"] = prompt_file
    with warnings.catch_warnings():
        warnings.filterwarnings("always", message="caption:")
        warnings.showwarning = show_warning
        try:
            magic = checked_magic_options(magic)  # bounded: before anything loads
            if settings["magic_prompt"] and settings["prompt"] is not None:
                check_idea(settings["prompt"])
            given = [*loras, *uncond_loras]
            if from_metadata is None:
                load_kwargs = {k: settings.pop(k) for k in LOAD_KEYS}
                load_kwargs.update(loras=given, fuse_lora=fuse_lora)
                request = GenerationRequest(**settings)
            else:
                load_kwargs, request = replay(read_metadata(from_metadata), explicit, given)
                load_kwargs["fuse_lora"] = load_kwargs["fuse_lora"] or fuse_lora
        except (ValueError, OSError, ModelAccessError) as e:
            raise click.ClickException(str(e)) from e
        if num_images > 1 or seeds is not None:
            _generate_many(
                request,
                output,
                force,
                verbose,
                num_images,
                seeds,
                distributed,
                dict(
                    **load_kwargs,
                    low_memory=low_memory,
                    memory_limit=memory_limit,
                    magic_head=magic_head,
                    magic_model=magic_model,
                    lora_allow_partial=lora_allow_partial,
                ),
                magic,
            )
            return
        resolved, previews = _preflight(request, output, force, stepwise_dir)
        try:
            # One image per process: free each model after its stage (lowest peak memory).
            pipe = load(
                **load_kwargs,
                keep_in_memory=False,
                low_memory=low_memory,
                memory_limit=memory_limit,
                magic_head=magic_head,
                magic_model=magic_model,
                lora_allow_partial=lora_allow_partial,
                distributed=distributed,
            )
            pipe.magic_options = magic
            if pipe.cfg is not None and pipe.cfg.rank != 0:
                _run(pipe, resolved, None, verbose)  # its DiT's passes; rank 0 writes the image
                return
            result = _run(pipe, resolved, previews, verbose)
            save_png(result.image, output, result.metadata, force)
        except (ValueError, ModelAccessError, OSError, DistributedError) as e:
            raise click.ClickException(str(e)) from e
    if verbose:
        total = sum(s["seconds"] for s in result.stats.values())
        click.echo(f"[total] {total:.1f} s")
    if from_metadata is not None and not (set(explicit) - {"model", "revision", "image", "mask"}):
        click.echo(_compare(from_metadata, output), err=True)
    click.echo(f"{output} (seed {result.metadata['seed']})")


def _parse_seeds(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        seeds = [int(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of seeds") from None
    if not 1 <= len(seeds) <= MAX_IMAGES or len(set(seeds)) != len(seeds):
        raise click.BadParameter(f"give 1..{MAX_IMAGES} different seeds", param_hint="--seeds")
    return seeds


def _generate_many(
    request, output, force, verbose, num_images, seeds, distributed, load_kwargs, magic
) -> None:
    """Several seeds with one loaded pipeline; spread over the ranks with --distributed."""
    try:
        pipe = load(**load_kwargs, keep_in_memory=None)  # lazy: nothing loads yet
        pipe.magic_options = magic
        group = DataGroup.start(pipe.checkpoint_dir) if distributed else None
        chosen = image_seeds(request.seed, num_images, seeds, group)
        outputs = [output.with_name(f"{output.stem}-{seed}{output.suffix}") for seed in chosen]
        rank = 0 if group is None else group.rank
        if rank == 0:
            problems = []
            for path in outputs:
                try:
                    check_output(path, force)
                except OSError as e:
                    problems.append(str(e))
            if problems:
                raise click.ClickException("\n".join(problems))
        base = pipe.check(request)  # the inputs of an edit are read once for all images
        requests = [base.with_seed(seed) for seed in chosen]
        indices = list(range(len(requests)))
        mine = indices if group is None else group.share(indices)
        blobs = []
        for i in mine:
            result = _run(pipe, requests[i], None, verbose)
            blobs.append(png_bytes(result.image, result.metadata))
        if group is not None:
            blobs = group.gather(blobs, len(requests))
        if rank != 0:
            return
        for path, blob, seed in zip(outputs, blobs, chosen, strict=True):
            write_file(path, lambda f, blob=blob: f.write(blob), force)
            click.echo(f"{path} (seed {seed})")
    except (ValueError, ModelAccessError, OSError, DistributedError) as e:
        raise click.ClickException(str(e)) from e


def _preflight(
    request: GenerationRequest, output: Path, force: bool, stepwise_dir: Path | None
) -> tuple[ResolvedRequest, StepPreviews | None]:
    """Every check that needs no model, all of them reported at once, before anything loads;
    the resolved request (the pipeline does not validate it again)."""
    problems, resolved, previews = [], None, None
    try:
        check_output(output, force)
    except OSError as e:
        problems.append(str(e))
    try:
        resolved = request.validate()
    except (ValueError, OSError) as e:  # CaptionError, an unreadable --image or --mask
        problems.append(str(e))
    if stepwise_dir is not None and resolved is not None:
        try:
            previews = StepPreviews(stepwise_dir, force)
        except OSError as e:
            problems.append(str(e))
    if problems:
        raise click.ClickException("\n".join(problems))
    return resolved, previews


def _compare(original: Path, replayed: Path) -> str:
    """How a replay's pixels compare with the image it replays."""
    with Image.open(original) as a, Image.open(replayed) as b:
        old, new = np.asarray(a.convert("RGB"), np.int16), np.asarray(b, np.int16)
    if old.shape != new.shape:
        return f"replay: {replayed} and {original} differ in size"
    diff = np.abs(old - new).max(axis=-1)
    if not diff.any():
        return f"replay: identical to {original}"
    return (
        f"replay: differs from {original} in {100 * (diff > 0).mean():.1f}% of pixels, "
        f"by at most {int(diff.max())} levels"
    )


def _run(
    pipe, request: GenerationRequest | ResolvedRequest, previews: StepPreviews | None, verbose: bool
):
    """Stage lines and a progress bar on stderr (and previews), then the image."""
    report = lambda line: click.echo(line, err=True)  # noqa: E731
    generation = pipe.start(request, verbose=verbose, report=report)
    steps = tqdm(
        generation, total=generation.num_steps, desc="denoise", unit="step", file=sys.stderr
    )
    for step in steps:
        mx.eval(step.latents)
        if previews is not None:
            previews.save(generation, step)
    return generation.result()


# expand()'s options (cli/magic.py), not request fields: they shape the caption, which is stored.
MAGIC_OPTIONS = ("max_tokens", "temperature", "top_p", "keep_bboxes", "system_prompt")


def _given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) not in (
        ParameterSource.DEFAULT,
        ParameterSource.DEFAULT_MAP,
    )
