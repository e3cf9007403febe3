"""One error handler for the commands (``cli/errors.py``): a library error or a file-system
problem is one ``Error: ...`` line and exit status 1, never a traceback; anything else is a bug
and keeps its traceback."""

import shlex

import click
import pytest
from click.testing import CliRunner

from ideogram4_mlx.cli import main
from ideogram4_mlx.cli.errors import Command
from ideogram4_mlx.errors import InputError

BAD_NAME = "a!b/c"  # huggingface_hub refuses it before any request: no network needed


def one_error_line(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, (args, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    assert "Traceback" not in result.output
    return result.output


# (command line, with {d} for a folder holding the files below; a part of the message)
CASES = [
    ("verify-caption {d}/latin1.json", "latin1.json is not UTF-8 text"),  # InputError
    ("models {d}/missing", "missing: no such folder"),  # CheckpointError
    ("lora-info {d}/missing.safetensors", "does not exist"),  # FileNotFoundError
    ("lora-info {d}/junk.safetensors", "is not a readable safetensors file"),  # LoRAError
    (f"lora-info {BAD_NAME}/x.safetensors", "not a valid repo id"),  # InputError (hub)
    ("synth {d}/a-file", "a-file is a file"),  # FileExistsError
    (f"convert {BAD_NAME} {{d}}/out", "not a valid repo id"),
    ("convert {d}/a-file {d}/out", "folder not found"),  # CheckpointError
    ("magic-prompt ' '", "the idea is empty"),  # MagicPromptError
    (f"magic-prompt fox --model {BAD_NAME}", "not a valid repo id"),
]


@pytest.mark.parametrize(("line", "message"), CASES, ids=[c[0].split()[0] for c in CASES])
def test_each_command_reports_a_bad_input_in_one_line(tmp_path, line, message):
    (tmp_path / "latin1.json").write_bytes("{'café'}".encode("latin-1"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "a-file").write_text("x")
    assert message in one_error_line(shlex.split(line.format(d=tmp_path)))


def command_raising(error: Exception) -> click.Command:
    @click.command(cls=Command)
    @click.option("--x", callback=lambda ctx, param, value: value)
    def run(x):
        raise error

    return run


@pytest.mark.parametrize(
    "error",
    [InputError("bad value"), FileExistsError("out.png already exists")],
)
def test_library_and_file_errors_become_one_line(error):
    result = CliRunner().invoke(command_raising(error), [])
    assert (result.exit_code, result.output) == (1, f"Error: {error}\n")


def test_an_option_callback_error_is_reported_too():
    def check(ctx, param, value):
        raise InputError(f"--x {value} is out of range")

    command = click.command(cls=Command)(click.option("--x", callback=check)(lambda x: None))
    result = CliRunner().invoke(command, ["--x", "7"])
    assert (result.exit_code, result.output) == (1, "Error: --x 7 is out of range\n")


@pytest.mark.parametrize("error", [ValueError("a bug"), KeyError("k"), BrokenPipeError()])
def test_other_errors_are_not_dressed_up(error):
    """A plain ValueError is a bug (the library converts third-party ones where it reads the
    file); a broken pipe is click's own quiet exit."""
    result = CliRunner().invoke(command_raising(error), [])
    assert result.exception is error
