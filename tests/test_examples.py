"""The example captions in examples/ pass the verifier as written and canonicalise cleanly."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ideogram4_mlx.caption import TOP_KEYS, verify_file, verify_raw
from ideogram4_mlx.cli import main
from ideogram4_mlx.cli.caption import examples_hint
from ideogram4_mlx.prompt import canonical_prompt

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FILES = sorted(EXAMPLES.glob("*.json"))


def test_the_examples_are_there():
    assert {p.name for p in FILES} >= {"photo.json", "poster.json", "non_latin.json", "art.json"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_example_passes_the_verifier(path):
    assert verify_file(path) == []
    result = CliRunner().invoke(main, ["verify-caption", str(path)])
    assert result.exit_code == 0 and result.output.strip().endswith(": ok")


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_example_is_canonical_utf8(path):
    text = path.read_text(encoding="utf-8")
    assert "\\u" not in text  # literal characters, as the model saw in training
    caption = json.loads(text)
    assert list(caption) == [k for k in TOP_KEYS if k in caption]  # canonical top-level order
    minified = canonical_prompt(text)
    assert minified == json.dumps(caption, ensure_ascii=False, separators=(",", ":"))
    assert json.loads(minified) == caption and verify_raw(minified) == []


def test_non_latin_example_covers_three_scripts():
    texts = [
        e["text"]
        for e in json.loads((EXAMPLES / "non_latin.json").read_text(encoding="utf-8"))[
            "compositional_deconstruction"
        ]["elements"]
        if e["type"] == "text"
    ]
    joined = "".join(texts)
    assert any("\u4e00" <= c <= "\u9fff" or "\u30a0" <= c <= "\u30ff" for c in joined)  # CJK
    assert any("\u0400" <= c <= "\u04ff" for c in joined)  # Cyrillic
    assert any("\u0600" <= c <= "\u06ff" for c in joined)  # Arabic


def test_findings_end_with_a_pointer_to_an_example(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"high_level_description": "x"}', encoding="utf-8")
    result = CliRunner().invoke(main, ["verify-caption", str(bad)])
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    assert last == examples_hint() and last.startswith("see ")
    named = Path(last.split()[1])
    assert named.is_file() and verify_file(named) == []  # the pointer works from anywhere


def test_hint_finds_the_installed_location(tmp_path, monkeypatch):
    import ideogram4_mlx.cli.caption as cli_caption

    installed = tmp_path / "site-packages" / "ideogram4_mlx" / "examples"
    installed.mkdir(parents=True)
    (installed / "poster.json").write_text("{}", encoding="utf-8")
    monkeypatch.setattr(cli_caption, "EXAMPLE_DIRS", (installed, tmp_path / "nowhere"))
    assert str(installed / "poster.json") in cli_caption.examples_hint()
    monkeypatch.setattr(cli_caption, "EXAMPLE_DIRS", (tmp_path / "nowhere",))
    assert "examples/poster.json in the ideogram4-mlx repository" in cli_caption.examples_hint()


def test_examples_are_installed_with_the_package():
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((EXAMPLES.parent / "pyproject.toml").read_text())
    setuptools = pyproject["tool"]["setuptools"]
    assert setuptools["package-dir"]["ideogram4_mlx.examples"] == "examples"
    assert "ideogram4_mlx.examples" in setuptools["packages"]
    assert setuptools["package-data"]["ideogram4_mlx.examples"] == ["*.json"]
