"""Option parsers shared by several commands, and the load options as one decorator."""

import functools
import json
from pathlib import Path

import click
import mlx.core as mx
from click.core import ParameterSource

from ideogram4_mlx.caption import is_json_prompt, parse_json, read_text_file
from ideogram4_mlx.dtypes import DTYPES, dtype_name, parse_dtype
from ideogram4_mlx.edit import MAX_MASK_TOKENS
from ideogram4_mlx.environment import default_dtype
from ideogram4_mlx.errors import InputError
from ideogram4_mlx.files import write_file
from ideogram4_mlx.hub import DEFAULT_REPO
from ideogram4_mlx.lora import LoRAError
from ideogram4_mlx.lora_spec import parse_lora_option
from ideogram4_mlx.magic.options import (
    DEFAULT_MAX_TOKENS,
    MAX_TEMPERATURE,
    MAX_TOKENS_LIMIT,
    MIN_MAX_TOKENS,
    MagicOptions,
)
from ideogram4_mlx.ocr import ENGINES
from ideogram4_mlx.pipeline_options import PipelineOptions
from ideogram4_mlx.text_check import TEXT_THRESHOLD
from ideogram4_mlx.text_retry import MAX_TRIES, text_check_from


def show_warning(message, category, filename, lineno, file=None, line=None):
    """``warnings.showwarning`` for commands: one ``warning: ...`` line, no source location."""
    click.echo(f"warning: {message}", err=True)


def report_dtype() -> None:
    """One stderr line naming the dtype the backend chose, for a command whose ``--dtype``
    (default: the backend's) was not given, nor a PNG to replay (its dtype is stored)."""
    ctx = click.get_current_context()
    if not given(ctx, "dtype") and ctx.params.get("from_metadata") is None:
        dtype, why = default_dtype()
        click.echo(f"dtype: {dtype_name(dtype)} ({why}; --dtype to choose)", err=True)


def read_prompt_file(ctx, param, path: Path | None) -> str | None:
    """``--prompt-file``: the file's text (bounded, UTF-8), valid JSON when it looks like it."""
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
    return check_prompt(ctx, param, raw.strip())


def check_prompt(ctx, param, text: str | None) -> str | None:
    """``--prompt``: not empty."""
    if text is not None and not text.strip():
        raise click.BadParameter("the prompt is empty")
    return text


def comma_list(kind: type = str, example: str = "a,b", valid=None, one_for: int | None = None):
    """A click callback parsing ``a,b,c`` into a tuple of ``kind`` (None stays None): names
    from ``valid`` when given; one value stands for ``one_for`` when given. The values' ranges
    are the library's to check."""

    def parse(ctx, param, value: str | None) -> tuple | None:
        if value is None:
            return None
        try:
            items = tuple(kind(v.strip()) for v in value.split(",") if v.strip())
        except ValueError:
            items = ()
        if not items:
            raise click.BadParameter(f"{value!r} is not a comma-separated list (e.g. {example})")
        unknown = [v for v in items if valid is not None and v not in valid]
        if unknown:
            raise click.BadParameter(
                f"unknown name(s) {', '.join(unknown)}; valid: {', '.join(valid)}"
            )
        if one_for is not None and len(items) == 1:
            items *= one_for
        return items

    return parse


def components_option(valid: tuple[str, ...]):
    """``a,b,c`` -> a tuple of names from ``valid`` (:func:`comma_list`)."""
    return comma_list(str, ",".join(valid[:2]), valid=valid)


def edit_options(function):
    """``--image``, ``--strength``, ``--mask``, ``--mask-grow``, ``--mask-feather``,
    ``--paste-back``, ``--expand``: a ``GenerationRequest``'s edit fields."""
    options = [
        click.option(
            "--image",
            type=click.Path(path_type=Path),
            help="Start from this image (image-to-image): resized and centre-cropped to the "
            "output size. EXIF rotation applied, transparency composited on white.",
        ),
        click.option(
            "--strength",
            type=float,
            help="How much of --image to redraw, in (0, 1]: the steps run from the time "
            "S(strength) of the preset's grid; 1 starts from noise. Default: 0.6 (0.7 with "
            "--remix), or 1 with --mask or --expand.",
        ),
        click.option(
            "--mask",
            type=click.Path(path_type=Path),
            help="Inpainting: white (luminance >= 128) = regenerate, black = keep. Same size "
            "as --image. A 16x16-pixel token is regenerated if any of its pixels is white.",
        ),
        click.option(
            "--mask-grow",
            type=int,
            default=0,
            show_default=True,
            help=f"Grow the regenerated region by this many tokens (16 px each, "
            f"0..{MAX_MASK_TOKENS}) in every direction.",
        ),
        click.option(
            "--mask-feather",
            type=int,
            default=0,
            show_default=True,
            help=f"Blend this many more rings of tokens (0..{MAX_MASK_TOKENS}) around the "
            "region (weights falling to 0).",
        ),
        click.option(
            "--paste-back",
            is_flag=True,
            help="Keep every unmasked pixel of the input exactly in the output (the model's "
            "pixels only where the mask, grown by --mask-grow, is white).",
        ),
        click.option(
            "--expand",
            callback=comma_list(int, "0,0,256,0", one_for=4),
            help="Outpainting: add LEFT,TOP,RIGHT,BOTTOM pixels (multiples of 16; one value "
            "for all four) around --image and generate them. With --width/--height, the "
            "image is fitted into the output size minus the border.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def given(ctx: click.Context, name: str) -> bool:
    """Whether option ``name`` was given on the command line (not a default)."""
    return ctx.get_parameter_source(name) not in (
        ParameterSource.DEFAULT,
        ParameterSource.DEFAULT_MAP,
        None,
    )


def _lora_specs(target: str):
    def parse(ctx, param, values: tuple[str, ...]):
        try:
            return [parse_lora_option(v, target) for v in values]
        except LoRAError as e:
            raise click.BadParameter(str(e)) from None

    return parse


def _model_group(argument: bool, dtype: str | None) -> list:
    model = (
        click.argument("model")
        if argument
        else click.option(
            "--model",
            default=DEFAULT_REPO,
            show_default=True,
            help="A local checkpoint folder or a Hugging Face repo id.",
        )
    )
    return [
        model,
        click.option("--revision", help="Hub revision (branch, tag or commit) of a repo id."),
        click.option(
            "--dtype",
            type=click.Choice(list(DTYPES)),
            default=dtype,
            show_default=dtype is not None,
            callback=lambda ctx, param, value: None if value is None else parse_dtype(value),
            help="Weights and activations (latents are always float32)."
            + (
                ""
                if dtype is not None
                else " Default: float32 on MLX's CPU backend (bfloat16 and quantized matmuls "
                "are 10-50x slower there), bfloat16 on Metal and CUDA."
            ),
        ),
    ]


MEMORY_GROUP = [
    click.option(
        "--memory-limit",
        type=click.FloatRange(min=0),
        metavar="GB",
        help="Memory budget for denoising, in GB: as many DiT blocks stay resident as fit, the "
        "rest are streamed from disk each step (same image); 0 streams them all (as "
        "--low-memory). Default: the machine's (MLX's recommended working set on a Mac, 60% "
        "of RAM elsewhere).",
    ),
    click.option(
        "--low-memory",
        is_flag=True,
        help="Stream the DiT blocks from disk on every pass instead of holding both DiTs in "
        "memory: same image, far lower peak, one read of the DiT files per step (the smallest "
        "--memory-limit).",
    ),
]
LORA_GROUP = [
    click.option(
        "--lora",
        "loras",
        multiple=True,
        callback=_lora_specs("cond"),
        metavar="FILE[:SCALE]",
        help="A LoRA for the conditional DiT (repeatable): a .safetensors file or a Hub "
        "repo (owner/name or owner/name/file.safetensors); SCALE defaults to 1. Layouts: "
        "diffusers/PEFT, ai-toolkit, kohya, DiffSynth-Studio.",
    ),
    click.option(
        "--lora-uncond",
        "uncond_loras",
        multiple=True,
        callback=_lora_specs("uncond"),
        metavar="FILE[:SCALE]",
        help="A LoRA for the unconditional DiT (repeatable). Off by default: LoRAs are "
        "trained on the conditional DiT, and one on the unconditional DiT too pushes CFG "
        "off (mosaics).",
    ),
    click.option(
        "--fuse-lora",
        is_flag=True,
        help="Merge the LoRAs into the float weights at load (a little faster per step; "
        "not with a quantized checkpoint or --low-memory). Default: unfused, exact.",
    ),
    click.option(
        "--lora-allow-partial",
        is_flag=True,
        help="Apply a LoRA some of whose modules match no layer (warns with the count); "
        "otherwise that is an error.",
    ),
]
MAGIC_GROUP = [
    click.option(
        "--max-tokens",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        show_default=True,
        help=f"Magic prompt: longest caption, in tokens ({MIN_MAX_TOKENS}..{MAX_TOKENS_LIMIT}).",
    ),
    click.option(
        "--temperature",
        type=float,
        default=1.0,
        show_default=True,
        help=f"Magic prompt: sampling temperature, 0..{MAX_TEMPERATURE:g} (0: greedy).",
    ),
    click.option(
        "--top-p",
        type=float,
        default=1.0,
        show_default=True,
        help="Magic prompt: nucleus sampling, 0..1: keep the most likely tokens up to this "
        "mass (1: all).",
    ),
    click.option("--keep-bboxes", is_flag=True, help="Magic prompt: keep element bounding boxes."),
    click.option(
        "--system-prompt",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="Magic prompt: a file with another system prompt.",
    ),
    click.option(
        "--magic-model",
        help="Expand with another mlx-lm chat model (a folder or repo id, e.g. a quantized "
        "Qwen3 instruct) instead of the checkpoint's text encoder + lm_head.",
    ),
    click.option(
        "--magic-head",
        help="The magic prompt's lm_head: a folder or repo id (default: the checkpoint's "
        "prompt_enhancer_head/, else diffusers/qwen3-vl-8b-instruct-lm-head).",
    ),
]
DISTRIBUTED_GROUP = [
    click.option(
        "--distributed",
        is_flag=True,
        help="Use the two ranks mlx.launch started: for one image CFG-parallel (rank 0 runs "
        "the text encoder, the conditional DiT and the VAE and writes the image, rank 1 the "
        "unconditional DiT; the same image as one process), for several images each rank "
        "makes its share. Example: mlx.launch -n 2 --backend ring -- ideo4-mlx generate "
        "--distributed ... (--hostfile hosts.json for two Macs).",
    ),
]
TRANSFORMER_GROUP = [
    click.option(
        "--transformer",
        metavar="PATH_OR_REPO",
        help="Another conditional DiT in place of the checkpoint's (e.g. a distilled one): a "
        "folder with its config.json and weights (as a checkpoint's transformer/, raw or "
        "converted), a checkpoint folder whose transformer/ is taken, a repo id "
        "(owner/name[@REVISION]), or a single DiT file loaded without converting: a .gguf "
        "(Q8_0/Q4_0/... layers MLX holds exactly stay quantized) or a .safetensors (a Comfy "
        "repack, the fp8 file), read with the checkpoint's transformer/config.json. Recorded "
        "in the metadata and replayed. A single-branch DiT "
        "wants its own steps (e.g. --steps 8) and guidance 1 (see --single-branch).",
    ),
    click.option(
        "--single-branch/--no-single-branch",
        default=None,
        help="The conditional DiT was distilled to run without CFG: guidance 1 on every step "
        "unless --guidance-schedule is given (then the unconditional DiT never loads). "
        "Default: on for --transformer fal/ideogram-v4-instant or fal/ideogram-v4-fast (their "
        "cards say no CFG), else off.",
    ),
]
UNCOND_GROUP = [
    click.option(
        "--uncond",
        default="checkpoint",
        show_default=True,
        metavar="checkpoint|self|DELTA|FILE",
        help="What runs the unconditional (CFG) pass: the checkpoint's "
        "unconditional_transformer/ (or the delta `convert --uncond-as-lora` left in its "
        "place); 'self': the conditional DiT on image tokens only, as DiffSynth-Studio runs "
        "without that folder (one DiT in memory; an approximation, another image); or a DELTA "
        "(a file, a folder from `convert --uncond-as-lora`, or a Hub repo such as "
        "ostris/ideogram_4_unconditional_lora) on the conditional DiT's weights for that pass "
        "only (one DiT in memory); or a whole unconditional DiT FILE (.gguf, or a .safetensors "
        "holding the DiT's tensors), loaded as --transformer loads one. A schedule of guidance "
        "1 (--guidance-schedule 1) loads none.",
    ),
]
MAGIC_FIELDS = ("max_tokens", "temperature", "top_p", "keep_bboxes", "system_prompt")
GROUPS = {
    "memory": MEMORY_GROUP,
    "lora": LORA_GROUP,
    "magic": MAGIC_GROUP,
    "transformer": TRANSFORMER_GROUP,
    "uncond": UNCOND_GROUP,
}
# Every load option a command can take, by the PipelineOptions field or flag it sets.
LOAD_PARAMETERS = {
    "model": ("model", "revision", "dtype"),
    "memory": ("memory_limit", "low_memory"),
    "lora": ("loras", "uncond_loras", "fuse_lora", "lora_allow_partial"),
    "magic": (*MAGIC_FIELDS, "magic_model", "magic_head"),
    "distributed": ("distributed",),
    "transformer": ("transformer", "single_branch"),
    "uncond": ("uncond",),
}


def pipeline_options(
    *groups: str, model_argument: bool = False, dtype: str | None = None, **defaults
):
    """The load options as click options, turned into one :class:`PipelineOptions` passed to
    the command as ``options``. ``groups``: which besides ``--model/--revision/--dtype``
    (``memory``, ``lora``, ``magic``, ``distributed``, ``transformer``, ``uncond``);
    ``model_argument``: MODEL is an argument; ``dtype``: its default (None: the backend's, see
    :func:`report_dtype`); ``defaults``: other PipelineOptions fields the command
    sets (e.g. ``keep_in_memory``). Bad values are a usage error naming the option."""
    declared = _model_group(model_argument, dtype)
    for group in groups:
        declared += DISTRIBUTED_GROUP if group == "distributed" else GROUPS[group]
    names = [n for g in ("model", *groups) for n in LOAD_PARAMETERS[g]]

    def decorate(function):
        @functools.wraps(function)
        def command(*args, **kwargs):
            values = {n: kwargs.pop(n) for n in names}
            kwargs["options"] = _options(values, defaults)
            return function(*args, **kwargs)

        for option in reversed(declared):
            command = option(command)
        return command

    return decorate


def _options(values: dict, defaults: dict) -> PipelineOptions:
    if values.pop("low_memory", False):
        if values.get("memory_limit") is not None:
            raise click.UsageError("give --low-memory or --memory-limit, not both")
        values["memory_limit"] = 0
    loras = [*values.pop("loras", ()), *values.pop("uncond_loras", ())]
    magic = {k: values.pop(k) for k in MAGIC_FIELDS if k in values}
    # LoRAError, MagicPromptError, a bad memory limit: the command's handler (cli/errors.py)
    return PipelineOptions(
        **values, **defaults, loras=loras, magic_options=MagicOptions(**magic)
    ).validate()


def text_check_options(function):
    """``--check-text``, ``--retry-text``, ``--ocr``, ``--text-threshold`` as one
    ``text_check`` (a ``text_retry.TextCheck``, None without a check) passed to the command;
    below ``pipeline_options``. A retry makes one image in one process: not with
    ``--num-images``, ``--seeds``, ``--distributed`` or ``--stepwise-dir``."""
    options = [
        click.option(
            "--check-text",
            is_flag=True,
            help="Read the image's text back with an OCR engine and score every text element "
            "of the caption (a plain prompt: its quoted strings), in its bbox when it has one; "
            "one line per element, the scores stored in the PNG (docs/TEXT_CHECK.md).",
        ),
        click.option(
            "--retry-text",
            type=click.IntRange(1, MAX_TRIES),
            help="Check the text, and while an element scores under --text-threshold try the "
            "next seed, up to N images; keep the best (every try's scores in its PNG, the "
            "kept seed replays it).",
        ),
        click.option(
            "--ocr",
            type=click.Choice(["auto", *ENGINES]),
            help="OCR engine for --check-text/--retry-text. Default auto: Apple's Vision on "
            "macOS, else RapidOCR, else Tesseract (pip install 'ideogram4-mlx[ocr]').",
        ),
        click.option(
            "--text-threshold",
            type=float,
            help=f"Score (0..1, 1 = the same text) an element needs to count as found "
            f"[default: {TEXT_THRESHOLD}].",
        ),
    ]

    @functools.wraps(function)
    def command(*args, check_text, retry_text, ocr, text_threshold, **kwargs):
        try:
            kwargs["text_check"] = text_check_from(check_text, retry_text or 0, ocr, text_threshold)
        except InputError as e:
            raise click.UsageError(f"{e} (--check-text, --retry-text)") from e
        if kwargs["text_check"] is not None and kwargs["text_check"].tries > 1:
            many = kwargs.get("num_images", 1) > 1 or kwargs.get("seeds")
            other = many and "--num-images/--seeds (--check-text scores each)"
            other = other or kwargs["options"].distributed and "--distributed"
            other = other or kwargs.get("stepwise_dir") and "--stepwise-dir"
            if other:
                raise click.UsageError(
                    f"--retry-text keeps one image of one process: not with {other}"
                )
        return function(*args, **kwargs)

    for option in reversed(options):
        command = option(command)
    return command


def caption_output_options(function):
    """``--output``/``-o``, ``--force``, ``--verbose`` of a command that writes one caption
    (magic-prompt, describe); the command gets a :class:`CaptionOutput` as ``caption_output``.
    An existing ``--output`` is refused here, before any model loads."""
    options = [
        click.option(
            "--output",
            "-o",
            type=click.Path(dir_okay=False, path_type=Path),
            help="Write the caption here (atomically) instead of printing it.",
        ),
        click.option("--force", is_flag=True, help="Replace an existing --output file."),
        click.option("--verbose", is_flag=True, help="Stream the caption as it is written."),
    ]

    @functools.wraps(function)
    def command(*args, output, force, verbose, **kwargs):
        if output is not None and output.exists() and not force:
            raise click.ClickException(f"{output} already exists; pass --force to replace it")
        return function(*args, caption_output=CaptionOutput(output, force, verbose), **kwargs)

    for option in reversed(options):
        command = option(command)
    return command


class CaptionOutput:
    """Where a caption command's result goes: streamed to stderr with ``--verbose``, then
    printed, or written to ``--output`` atomically."""

    def __init__(self, output: Path | None, force: bool, verbose: bool):
        self.output, self.force, self.verbose = output, force, verbose
        self.stream = (lambda text: click.echo(text, nl=False, err=True)) if verbose else None

    def finish(self, caption: str, stage: str) -> None:
        if self.verbose:
            click.echo(f"\n[{stage}] peak {mx.get_peak_memory() / 1e9:.2f} GB", err=True)
        if self.output is None:
            click.echo(caption)
            return
        data = (caption + "\n").encode("utf-8")
        write_file(self.output, lambda f: f.write(data), self.force)
        click.echo(str(self.output))
