"""`ideo4-mlx serve`: keep the model loaded behind an HTTP API and a web page."""

import warnings
from pathlib import Path

import click

from ideogram4_mlx.cli.errors import Command
from ideogram4_mlx.cli.options import pipeline_options, report_dtype, show_warning
from ideogram4_mlx.server.hosts import is_loopback


@click.command(
    cls=Command, short_help="Serve the model over HTTP (OpenAI-compatible API and a web page)."
)
@pipeline_options("memory", "lora", "magic", "transformer", "uncond")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to bind. Anything but loopback needs --api-key (or --no-auth).",
)
@click.option(
    "--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="Port to bind."
)
@click.option(
    "--output-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default="ideo4-outputs",
    show_default=True,
    help="Where the PNGs go (server-chosen names; listed again after a restart).",
)
@click.option(
    "--max-queue",
    type=click.IntRange(1, 1000),
    default=16,
    show_default=True,
    help="Unfinished jobs (queued + running) accepted at once; more get 429 + Retry-After.",
)
@click.option(
    "--preview-every",
    type=click.IntRange(0, 1000),
    default=0,
    show_default=True,
    help="Send a preview image in the events every N steps (0: none; each is a VAE decode).",
)
@click.option("--api-key", envvar="IDEO4_API_KEY", help="Require Authorization: Bearer KEY.")
@click.option("--no-auth", is_flag=True, help="Allow a non-loopback --host without a key (warns).")
@click.option("--cors-origin", help="Allow browser requests from this origin (default: none).")
@click.option(
    "--allowed-host",
    "allowed_hosts",
    multiple=True,
    help="A name clients may reach the server by, besides --host, localhost and IP addresses "
    "(any port; repeatable). Other Host headers are refused (DNS rebinding).",
)
@click.option(
    "--max-body-mb",
    type=click.IntRange(1, 1024),
    default=32,
    show_default=True,
    help="Largest request body accepted, in MiB.",
)
def serve(
    options,
    host,
    port,
    output_dir,
    max_queue,
    preview_every,
    api_key,
    no_auth,
    cors_origin,
    allowed_hosts,
    max_body_mb,
) -> None:
    """Load the model once and serve it: the OpenAI Images API (POST
    /v1/images/generations), native jobs with progress events (/v1/jobs), caption checks, the
    magic prompt (with the --temperature, --max-tokens, ... given here), and a web page at /.
    Jobs run one at a time from a bounded queue.

    \b
    Example:
      ideo4-mlx serve --model ~/models/ideo4-q4 --port 8000
      curl -s localhost:8000/v1/images/generations -H 'Content-Type: application/json' \\
        -d '{"prompt": "a red sign that says OPEN", "size": "1024x1024", "seed": 1}'
    """
    if not is_loopback(host) and api_key is None and not no_auth:
        raise click.UsageError(
            f"--host {host} is reachable from other machines: give --api-key KEY (clients "
            "send Authorization: Bearer KEY) or --no-auth to serve without one"
        )
    try:
        # The web stack is the `serve` extra: only this command needs it.
        import uvicorn

        from ideogram4_mlx.server.app import create_app
        from ideogram4_mlx.server.jobs import JobQueue
    except ImportError as e:
        raise click.ClickException(
            f"serve needs the serve extra ({e}): pip install 'ideogram4-mlx[serve]'"
        ) from e
    if not is_loopback(host) and api_key is None:
        click.echo(f"warning: serving on {host} without an API key (--no-auth)", err=True)
    # While serving, every warning is one line on stderr, whichever thread raises it (the
    # filters are process-wide); ours every time, so the log has each job's (the load's, the
    # temporary files the queue removed, a job's caption findings).
    with warnings.catch_warnings():
        warnings.filterwarnings("always", category=UserWarning, module="ideogram4_mlx")
        warnings.showwarning = show_warning
        from ideogram4_mlx.pipeline import load  # looked up now: tests replace it

        pipe = load(options)
        report_dtype()
        jobs = JobQueue(pipe, output_dir, max_queue, preview_every)
        app = create_app(jobs, api_key, cors_origin, max_body_mb * 2**20, [host, *allowed_hosts])
        click.echo(f"serving {pipe.model_id} on http://{host}:{port}/ (outputs in {output_dir})")
        # Ctrl-C: an open event stream must not hold the shutdown until its job ends; after 1 s
        # uvicorn closes the connections and the app cancels the running job after its step.
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=1)
