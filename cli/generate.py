"""`ideo4-mlx generate`: one image for one prompt, with its settings stored in the PNG."""

from __future__ import annotations

import io
import sys
import warnings
from pathlib import Path

import click
import mlx.core as mx
from tqdm import tqdm

from ideogram4_mlx.batch import MAX_IMAGES, ImageBatch
from ideogram4_mlx.cli.errors import REPORTED, Command
from ideogram4_mlx.cli.options import (
    check_prompt,
    comma_list,
    edit_options,
    given,
    pipeline_options,
    read_prompt_file,
    report_dtype,
    show_warning,
    text_check_options,
)
from ideogram4_mlx.distributed import DataGroup
from ideogram4_mlx.edit import REMIX_STRENGTH
from ideogram4_mlx.errors import Ideo4Error
from ideogram4_mlx.files import write_file
from ideogram4_mlx.metadata import (
    check_output,
    compare_replay,
    read_metadata,
    replay,
    save_png,
)
from ideogram4_mlx.pipeline import load
from ideogram4_mlx.pipeline_options import STORED
from ideogram4_mlx.previews import StepPreviews
from ideogram4_mlx.request import GenerationRequest
from ideogram4_mlx.sampler import DEFAULT_PRESET, PRESETS
from ideogram4_mlx.text_retry import METADATA_KEY, generate_checked, score_table, with_scores


@click.command(cls=Command, short_help="Generate an image from a prompt, or replay a PNG.")
@click.option("--prompt", callback=check_prompt, help="A JSON caption (recommended) or text.")
@click.option(
    "--prompt-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    callback=read_prompt_file,
    help="Read the prompt from a UTF-8 file instead (surrounding whitespace is stripped). "
    "A .json file, or one starting with '{', must be valid JSON; other files are plain text.",
)
@click.option(
    "--from-metadata",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Replay a PNG written by this command: its prompt, model, dtype, size, seed, preset, "
    "steps, guidance schedule, mu and std, and a --transformer it used (a folder checked "
    "against its stored fingerprint). Options given on the command line override the "
    "stored ones; --model drops the stored revision; --preset brings the new preset's steps, "
    "guidance, mu and std except those the image set explicitly; --steps reshapes a "
    "preset-shaped guidance schedule. An edit replays when given the same --image (and "
    "--mask) again: they are checked against the SHA-256 fingerprints stored in the PNG.",
)
@pipeline_options("memory", "lora", "magic", "distributed", "transformer", "uncond")
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
    type=int,
    help="Noise seed, 0..2**63-1. Default: a random seed, printed and stored in the PNG.",
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
    callback=comma_list(float, "7,7,3"),
    help="Comma-separated CFG weights in CHRONOLOGICAL order: the first value is the first "
    "(noisiest) step. One value per step, or one value for every step. Note: official and "
    "mflux tuples list the last step first.",
)
@click.option("--mu", type=float, help="Mean of the logit-normal time grid (default: preset's).")
@click.option("--std", type=float, help="Its standard deviation, > 0 (default: preset's).")
@click.option(
    "--cache-threshold",
    type=float,
    default=0.0,
    show_default=True,
    help="Step caching (First Block Cache, per CFG branch): a pass whose first DiT block moved "
    "less than T (relative) since the last full pass reuses what the other blocks added then. "
    "0 is off (bit for bit); peers use 0.05-0.12. Faster, but its effect on quality is "
    "unmeasured here; the PNG records T and the passes that ran.",
)
@click.option(
    "--magic-prompt",
    is_flag=True,
    help="Treat the prompt as an idea: expand it into a JSON caption first (see "
    "`ideo4-mlx magic-prompt`); the PNG stores the idea and the caption, and a replay uses "
    "the caption.",
)
@click.option(
    "--remix",
    type=click.Path(path_type=Path),
    metavar="IMAGE",
    help="Describe this image with the checkpoint's Qwen3-VL (see `ideo4-mlx describe`), then "
    f"run image-to-image from that caption at --strength (default {REMIX_STRENGTH:g}: the "
    "layout and colours stay, the content is redrawn from the description). --keep-bboxes "
    "and --max-tokens apply to the description. The PNG stores it as the prompt: --from-metadata "
    "with --image IMAGE replays without describing again.",
)
@click.option("--idea", help="With --remix: what the new picture changes (e.g. 'in winter').")
@edit_options
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
    callback=comma_list(int, "1,5,9"),
    help="Comma-separated seeds, one image each (instead of --seed/--num-images).",
)
@text_check_options
@click.option("--verbose", is_flag=True, help="Print each stage's time and peak memory.")
@click.pass_context
def generate(
    ctx: click.Context,
    options,
    prompt_file: str | None,
    from_metadata: Path | None,
    output: Path,
    force: bool,
    stepwise_dir: Path | None,
    num_images: int,
    seeds: tuple[int, ...] | None,
    text_check,
    verbose: bool,
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
      ideo4-mlx generate --remix photo.jpg --idea "the same street in winter" -o winter.png
      ideo4-mlx generate --prompt-file examples/poster.json --check-text --retry-text 4
    """
    if settings["prompt"] is not None and prompt_file is not None:
        raise click.UsageError("give either --prompt or --prompt-file, not both")
    if prompt_file is not None:
        settings["prompt"] = prompt_file
    _remix(settings, from_metadata)
    if settings["prompt"] is None and from_metadata is None:
        raise click.UsageError("give --prompt or --prompt-file (or --from-metadata, --remix)")
    if output.suffix.lower() != ".png":
        raise click.BadParameter(
            "the image is written as PNG: use a .png name", param_hint="--output"
        )
    explicit = {k: v for k, v in settings.items() if given(ctx, k) or k == "prompt" and v}
    explicit.update({k: getattr(options, k) for k in STORED if given(ctx, k)})
    with warnings.catch_warnings():
        warnings.filterwarnings("always", message="caption:")
        warnings.showwarning = show_warning
        if from_metadata is None:
            request = GenerationRequest(**settings)
        else:
            options, request = replay(read_metadata(from_metadata), explicit, options)
        request = options.shape_request(request)  # a single-branch DiT: guidance 1
        if num_images > 1 or seeds is not None:
            _generate_many(options, request, output, force, verbose, num_images, seeds, text_check)
            return
        result = _generate_one(options, request, output, force, stepwise_dir, verbose, text_check)
    if result is None:  # a CFG-parallel rank 1: rank 0 writes the image
        return
    if verbose:
        total = sum(s["seconds"] for s in result.stats.values())
        click.echo(f"[total] {total:.1f} s")
    if from_metadata is not None and not (set(explicit) - {"model", "revision", "image", "mask"}):
        click.echo(compare_replay(from_metadata, output), err=True)
    click.echo(f"{output} (seed {result.metadata['seed']})")


def _remix(settings: dict, from_metadata: Path | None) -> None:
    """``--remix IMAGE``: the request's input image, described into its (empty) prompt."""
    image = settings.pop("remix")
    settings["remix"] = image is not None
    if image is None:
        return
    if settings["image"] is not None:
        raise click.UsageError("--remix IMAGE is the input image: not with --image")
    if from_metadata is not None:
        raise click.UsageError(
            "a replay reuses the stored description: give --from-metadata with --image"
        )
    settings["image"] = image
    settings["prompt"] = settings["prompt"] or ""


def _generate_one(options, request, output, force, stepwise_dir, verbose, text_check):
    """Every check that needs no model, all reported at once before anything loads; then the
    image, written to ``output`` (None on a CFG-parallel rank 1)."""
    problems, resolved, previews = [], None, None
    try:
        check_output(output, force)
    except OSError as e:
        problems.append(str(e))
    try:
        resolved = request.validate()
    except REPORTED as e:  # CaptionError, an unreadable --image or --mask
        problems.append(str(e))
    if stepwise_dir is not None and resolved is not None:
        try:
            previews = StepPreviews(stepwise_dir, force)
        except OSError as e:
            problems.append(str(e))
    problems += _engine_problem(text_check)
    if problems:
        raise click.ClickException("\n".join(problems))
    # One image per process: free each model after its stage (lowest peak memory); with
    # retries the machine's keep-in-memory default (the models stay for the next seed).
    keep = False if text_check is None or text_check.tries == 1 else None
    pipe = load(options, keep_in_memory=keep)
    report_dtype()
    run = lambda request: _run(pipe, request, previews, verbose)  # noqa: E731
    if text_check is not None:
        result = generate_checked(run, resolved, text_check, _stderr)
    else:
        result = run(resolved)
    if result is None:  # a CFG-parallel rank 1: its DiT's passes; rank 0 writes the image
        return None
    save_png(result.image, output, result.metadata, force)
    return result


def _generate_many(options, request, output, force, verbose, num_images, seeds, text_check):
    """Several seeds with one loaded pipeline; spread over the ranks with --distributed."""
    problems = _engine_problem(text_check)
    if problems:
        raise click.ClickException(problems[0])
    pipe = load(options, keep_in_memory=None, distributed=False)  # lazy: nothing loads yet
    report_dtype()
    group = DataGroup.start(pipe.checkpoint_dir) if options.distributed else None
    batch = ImageBatch(pipe.check, request, num_images, seeds, group)
    outputs = [output.with_name(f"{output.stem}-{seed}{output.suffix}") for seed in batch.seeds]
    if batch.writes:
        problems = []
        for path in outputs:
            try:
                check_output(path, force)
            except OSError as e:
                problems.append(str(e))
        if problems:
            raise click.ClickException("\n".join(problems))

    def make(request):
        result = _run(pipe, request, None, verbose)
        return result if text_check is None else with_scores(result, text_check.check(result))

    blobs = batch.run(make)
    for path, blob, seed in zip(outputs, blobs or [], batch.seeds, strict=False):
        write_file(path, lambda f, blob=blob: f.write(blob), force)
        click.echo(f"{path} (seed {seed})")
    if text_check is not None and blobs:
        records = [read_metadata(io.BytesIO(blob))[METADATA_KEY] for blob in blobs]
        for line in score_table(records):
            click.echo(line)


def _engine_problem(text_check) -> list[str]:
    """The OCR engine's absence, as a problem reported before anything loads."""
    try:
        if text_check is not None:
            text_check.engine()
    except Ideo4Error as e:
        return [str(e)]
    return []


def _stderr(line: str) -> None:
    click.echo(line, err=True)


def _run(pipe, request, previews: StepPreviews | None, verbose: bool):
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
