"""`ideo4-mlx train-lora DATA OUT`: a LoRA trained on a folder of captioned images."""

import warnings
from pathlib import Path

import click

from ideogram4_mlx.cli.errors import Command
from ideogram4_mlx.cli.options import comma_list, pipeline_options, report_dtype, show_warning
from ideogram4_mlx.pipeline import load
from ideogram4_mlx.request import MAX_SEED, MAX_SIDE, MIN_SIDE
from ideogram4_mlx.train.cache import default_cache_dir, prepare_dataset
from ideogram4_mlx.train.data import DEFAULT_RESOLUTION, preflight
from ideogram4_mlx.train.loop import SCHEDULES, TRAIN_FIELDS, train
from ideogram4_mlx.train.samples import MAX_SAMPLE_PROMPTS, TrainingSamples
from ideogram4_mlx.train.step import BLOCK_TARGETS, DEFAULT_TARGETS


@click.command(
    "train-lora", cls=Command, short_help="Train a LoRA on a folder of captioned images."
)
@click.argument("data", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@pipeline_options("memory", "magic")
@click.option(
    "--rank",
    type=click.IntRange(1, 1024),
    default=16,
    show_default=True,
    help="The LoRA's rank (the inner size of each low-rank update).",
)
@click.option(
    "--alpha",
    type=click.FloatRange(min=0, min_open=True),
    help="The LoRA's alpha: updates are scaled by alpha / rank. Default: the rank.",
)
@click.option(
    "--targets",
    callback=comma_list(str, "attention.qkv,attention.o", valid=BLOCK_TARGETS),
    help="Comma-separated linears of each DiT block to train (of "
    f"{', '.join(BLOCK_TARGETS)}). Default: {','.join(DEFAULT_TARGETS)} (attention and MLP).",
)
@click.option(
    "--learning-rate",
    type=click.FloatRange(min=0, min_open=True),
    default=1e-4,
    show_default=True,
    help="AdamW's peak learning rate.",
)
@click.option(
    "--schedule",
    type=click.Choice(SCHEDULES),
    default="constant",
    show_default=True,
    help="How the learning rate moves after the warmup.",
)
@click.option(
    "--warmup-steps",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Optimizer steps over which the learning rate rises linearly from 0.",
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    help="Optimizer steps to train (a step is --gradient-accumulation batches).",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    help="Passes over the data instead of --steps (default: 1 when neither is given).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Images per batch; a batch holds images of one size bucket.",
)
@click.option(
    "--gradient-accumulation",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Batches whose gradients are summed into one step.",
)
@click.option(
    "--resolution",
    type=click.IntRange(MIN_SIDE, MAX_SIDE),
    default=DEFAULT_RESOLUTION,
    show_default=True,
    help="Training size: each image goes to the bucket of about RESOLUTION^2 pixels "
    "whose aspect ratio is closest to its own (1:1 to 6:1, sides multiples of 16), "
    "resized to cover it and centre-cropped.",
)
@click.option(
    "--flip",
    is_flag=True,
    help="Also train on each image mirrored left-right (its latents cached too). Not "
    "for images with lettering.",
)
@click.option(
    "--seed",
    type=click.IntRange(0, MAX_SEED),
    default=0,
    show_default=True,
    help="Seeds the shuffling, the noise and the timesteps.",
)
@click.option(
    "--sample-prompt",
    "sample_prompts",
    multiple=True,
    help=f"A prompt to render with the LoRA being trained every --sample-every steps, into "
    f"OUT's name with .samples beside it (repeatable, up to {MAX_SAMPLE_PROMPTS}; seed --seed, "
    "size --resolution squared; the unconditional pass runs the trained DiT without text).",
)
@click.option(
    "--sample-every",
    type=click.IntRange(min=1),
    help="Render the --sample-prompt images every this many steps.",
)
@click.option(
    "--sample-steps",
    type=click.IntRange(1, 100),
    default=20,
    show_default=True,
    help="Denoising steps of each sample image.",
)
@click.option(
    "--checkpoint-every",
    type=click.IntRange(min=1),
    help="Every this many steps, save the adapters and the optimizer state to OUT's name "
    "with .state beside it (float32, exact); --resume continues from the last.",
)
@click.option(
    "--gradient-checkpointing",
    is_flag=True,
    help="Recompute each DiT block in the backward pass: less memory, about a third more "
    "time, the same gradients.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue from the last checkpoint of this OUT (same data and settings).",
)
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    help="Where the encoded captions and images are kept. Default: OUT's name with "
    ".cache beside it (my-style.safetensors -> my-style.cache/).",
)
@click.option(
    "--allow-txt",
    is_flag=True,
    help="Accept NAME.txt captions (plain text): expanded to JSON captions by the "
    "magic prompt once, cached in the cache folder (never written into DATA).",
)
@click.option("--force", is_flag=True, help="Replace an existing OUT.")
def train_lora(data, out, options, cache_dir, allow_txt, force, **settings) -> None:
    """Train a LoRA for the conditional DiT on DATA, a folder of images (.jpg, .jpeg, .png,
    .webp), each with NAME.json beside it (an Ideogram 4 caption; see `ideo4-mlx
    verify-caption`), and write it to OUT (.safetensors). Every problem with the folder is
    listed before any model loads. Each caption and each image is encoded once and cached, so
    a second run starts training at once.

    \b
    Example:
      ideo4-mlx train-lora my-photos/ my-style.safetensors --steps 1000 --resolution 1024
    """
    warnings.showwarning = show_warning
    prompts, every = settings.pop("sample_prompts"), settings.pop("sample_every")
    sample_steps = settings.pop("sample_steps")
    if bool(prompts) != (every is not None):
        raise click.UsageError("give --sample-prompt and --sample-every together")
    if options.memory_limit == 0:  # --low-memory streams DiT blocks: training holds them all
        raise click.UsageError(
            "training needs every DiT block in memory: not --low-memory; use "
            "--gradient-checkpointing or --memory-limit GB"
        )
    examples = preflight(data, out, settings["resolution"], allow_txt, force, settings["resume"])
    pipe = load(options, keep_in_memory=False)  # the encoders go before training
    report_dtype()
    samples = None
    if prompts:  # encoded first: the text encoder loads once for them and the captions
        side = settings["resolution"]
        folder = out.with_name(f"{out.stem}.samples")
        samples = TrainingSamples(pipe, list(prompts), folder, (side, side), settings["seed"],
                                  sample_steps)  # fmt: skip
    cache_dir = default_cache_dir(out) if cache_dir is None else cache_dir
    prepared = prepare_dataset(
        pipe, examples, settings["resolution"], cache_dir, settings["flip"], settings["seed"]
    )
    sizes = ", ".join(f"{w}x{h} ({len(i)})" for (w, h), i in prepared.buckets.items())
    click.echo(f"{len(prepared.items)} examples in {cache_dir}: {sizes}", err=True)
    pipe.release("text_encoder", "vae")
    trained = train(
        pipe,
        prepared,
        out,
        force=force,
        resume=settings.pop("resume"),
        state_dir=out.with_name(f"{out.stem}.state"),
        report=lambda line: click.echo(line, err=True),
        samples=samples,
        sample_every=every,
        memory_limit=pipe.memory_limit if options.memory_limit else None,
        **{k: v for k, v in settings.items() if k in TRAIN_FIELDS},
    )
    click.echo(str(trained))
