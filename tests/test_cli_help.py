"""`--help`: every command shows an example, every option says what it does, and the command
list shows each description whole."""

import inspect
import re

import click
import pytest
from click.testing import CliRunner
from helpers import require_reference

from ideogram4_mlx.cli import main
from ideogram4_mlx.sampler import DEFAULT_PRESET


def help_text(*args: str) -> str:
    result = CliRunner().invoke(main, [*args, "--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.output


def example_commands(text: str) -> list[str]:
    """The command lines of the help's "Example(s):" block."""
    match = re.search(r"^  Examples?( \(.*\))?:\n((?:    .*\n)+)", text, re.MULTILINE)
    return [] if match is None else [line.strip() for line in match.group(2).splitlines()]


@pytest.mark.parametrize("name", sorted(main.commands))
def test_every_command_help_shows_an_example(name):
    lines = example_commands(help_text(name))
    assert any(line.startswith(f"ideo4-mlx {name}") for line in lines), lines


def test_top_level_help_has_examples_and_whole_descriptions():
    text = help_text()
    examples = example_commands(text)
    assert examples and all(line.startswith("ideo4-mlx ") for line in examples)
    listing = text.split("Commands:\n", 1)[1]
    rows = re.split(r"\n(?=  \S)", listing.rstrip())
    assert len(rows) == len(main.commands)
    for row in rows:
        name, description = row.split(maxsplit=1)
        assert not description.rstrip().endswith("...")
        full = main.commands[name].get_short_help_str(limit=1000)
        assert "".join(description.split()) == "".join(full.split())  # whole, only wrapped


@pytest.mark.parametrize("name", sorted(main.commands))
def test_every_option_has_help(name):
    options = [p for p in main.commands[name].params if isinstance(p, click.Option)]
    assert [o.name for o in options if not o.help] == []


def test_crosscheck_default_preset_is_shown_and_is_the_library_default():
    assert f"[default: {DEFAULT_PRESET}]" in " ".join(help_text("crosscheck").split())
    preset = next(p for p in main.commands["crosscheck"].params if p.name == "preset")
    assert preset.default == DEFAULT_PRESET
    require_reference()
    from ideogram4_mlx.reference.crosscheck import crosscheck

    assert inspect.signature(crosscheck).parameters["preset"].default == DEFAULT_PRESET
