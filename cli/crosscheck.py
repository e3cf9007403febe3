"""`ideo4-mlx crosscheck MODEL`: the MLX pipeline vs the PyTorch reference, stage by stage."""

import click

from ideogram4_mlx.cli.errors import Command
from ideogram4_mlx.cli.options import edit_options, pipeline_options
from ideogram4_mlx.sampler import DEFAULT_PRESET, PRESETS

MINIMAL_CAPTION = (
    '{"high_level_description":"a test","compositional_deconstruction":'
    '{"background":"plain","elements":[]}}'
)


@click.command(
    "crosscheck", cls=Command, short_help="Compare the MLX pipeline with the PyTorch reference."
)
@pipeline_options("memory", model_argument=True, dtype="float32")
@click.option(
    "--prompt",
    default=MINIMAL_CAPTION,
    show_default=False,
    help="Caption or plain text (default: a minimal JSON caption).",
)
@click.option(
    "--width",
    type=int,
    help="Image width: a multiple of 16, 256..2048 (default 256, or the --image's own size).",
)
@click.option("--height", type=int, help="Image height, as --width.")
@click.option(
    "--preset",
    type=click.Choice(list(PRESETS)),
    default=DEFAULT_PRESET,
    show_default=True,
    help="Sampler preset (the same default as generate; V4_TURBO_12 is the quickest).",
)
@click.option("--steps", "num_steps", type=int, default=None, help="Override the preset's steps.")
@click.option("--seed", default=0, show_default=True, help="Seeds the shared noise (numpy).")
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="Where the PyTorch reference runs (MLX uses its default device).",
)
@edit_options
def crosscheck(options, prompt, width, height, preset, num_steps, seed, device, **edit):
    """Run the MLX pipeline and the PyTorch reference on the same prompt and noise, and print
    the difference at each stage (token ids, text features, time grid, first velocity, final
    latents, image) beside the parity tests' bound for the --dtype, then PASS, or FAIL naming
    the stages out of bounds (exit status 1). With --image (and --mask, --expand) the same for
    an edit, plus the encoded input image. Each stage's start and end go to stderr.

    MODEL is the original fp8 snapshot: a folder or a repo id (not a folder written by
    `ideo4-mlx convert`). Needs the `reference` extra (torch + diffusers).

    \b
    Example (on a synthetic checkpoint):
      ideo4-mlx synth /tmp/ideo4-tiny
      ideo4-mlx crosscheck /tmp/ideo4-tiny --preset V4_TURBO_12
      ideo4-mlx crosscheck /tmp/ideo4-tiny --image examples/photo.jpg --mask examples/mask.png \\
          --steps 4
    """
    try:
        # torch is optional: only this command needs it.
        from ideogram4_mlx.reference.crosscheck import crosscheck as run
    except ImportError as e:
        raise click.ClickException(
            f"crosscheck needs the reference extra ({e}): pip install 'ideogram4-mlx[reference]'"
        ) from e
    result = run(
        options, prompt, width, height, preset, num_steps, seed=seed, device=device,
        progress=lambda line: click.echo(line, err=True), **edit,
    )  # fmt: skip
    for line in result.lines():
        click.echo(line)
    if not result.passed:
        click.get_current_context().exit(1)
