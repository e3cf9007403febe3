"""One error handler for the commands: a problem for the person at the keyboard is one
``Error: ...`` line and exit status 1, never a traceback.

``@click.command(cls=Command)`` reports, from the command and its option callbacks:
- ``Ideo4Error``: everything the library reports (its messages say what, where and the fix);
- ``OSError``: the file system (a refused or missing path, a full disk, a permission).

Anything else is a bug and keeps its traceback. A plain ``ValueError`` is not caught: the
library converts the ones a third-party reader raises on a person's file (Pillow, safetensors,
JSON, UTF-8) where it calls it, into an ``InputError`` naming the file.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import click

from ideogram4_mlx.errors import Ideo4Error

REPORTED = (Ideo4Error, OSError)


@contextmanager
def reported() -> Iterator[None]:
    """``REPORTED`` errors become a ``click.ClickException`` carrying their message."""
    try:
        yield
    except BrokenPipeError:
        raise  # `... | head`: click's main exits quietly on it
    except REPORTED as e:
        raise click.ClickException(str(e) or type(e).__name__) from e


class Command(click.Command):
    """A click command whose callbacks report library and file-system errors in one line."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        with reported():
            return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        with reported():
            return super().invoke(ctx)
