"""`ideo4-mlx crosscheck MODEL`: the MLX pipeline vs the PyTorch reference, stage by stage."""

import click

from ideogram4_mlx.sampler import DEFAULT_PRESET, PRESETS

MINIMAL_CAPTION = (
    '{"high_level_description":"a test","compositional_deconstruction":'
    '{"background":"plain","elements":[]}}'
)


@click.command("crosscheck")
@click.argument("model")
@click.option(
    "--prompt",
    default=MINIMAL_CAPTION,
    show_default=False,
    help="Caption or plain text (default: a minimal JSON caption).",
)
@click.option("--width", default=256, show_default=True)
@click.option("--height", default=256, show_default=True)
@click.option(
    "--preset", type=click.Choice(list(PRESETS)), default=DEFAULT_PRESET, show_default=True
)
@click.option("--steps", "num_steps", type=int, default=None, help="Override the preset's steps.")
@click.option("--seed", default=0, show_default=True, help="Seeds the shared noise (numpy).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option(
    "--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True
)
def crosscheck(model, prompt, width, height, preset, num_steps, seed, device, dtype):
    """Run both pipelines on the same prompt and noise; print per-stage differences.

    Needs the `reference` extra (torch + diffusers). MODEL is a checkpoint folder or repo id.
    """
    try:
        # torch is optional: only this command needs it.
        from ideogram4_mlx.reference.crosscheck import crosscheck as run
    except ImportError as e:
        raise click.ClickException(
            f"crosscheck needs the reference extra ({e}): pip install 'ideogram4-mlx[reference]'"
        ) from e
    try:
        result = run(
            model, prompt, width, height, preset, num_steps, seed=seed, device=device, dtype=dtype
        )
    except (ValueError, OSError, RuntimeError) as e:
        raise click.ClickException(str(e)) from e
    for line in result.lines():
        click.echo(line)
