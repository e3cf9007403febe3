"""The example captions in examples/ pass the verifier as written and canonicalise cleanly."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ideogram4_mlx.caption import TOP_KEYS, verify_file, verify_raw
from ideogram4_mlx.cli import main
from ideogram4_mlx.cli.caption import examples_hint
from ideogram4_mlx.metadata import read_metadata
from ideogram4_mlx.prompt import canonical_prompt
from ideogram4_mlx.request import GenerationRequest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FILES = sorted(EXAMPLES.glob("*.json"))


def test_the_examples_are_there():
    names = {"photo.json", "poster.json", "non_latin.json", "art.json", "caption.json"}
    assert {p.name for p in FILES} >= names


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


# --- the README's edit inputs: caption.json, photo.jpg and mask.png ------------------------------

PHOTO, MASK, CAPTION = EXAMPLES / "photo.jpg", EXAMPLES / "mask.png", EXAMPLES / "caption.json"


def edit_inputs_script():
    spec = importlib.util.spec_from_file_location("edit_inputs", EXAMPLES / "edit_inputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_edit_inputs_are_small_and_match_their_script(tmp_path):
    script = edit_inputs_script()
    assert PHOTO.stat().st_size < 16_000 and MASK.stat().st_size < 2_000
    photo, mask = Image.open(PHOTO), Image.open(MASK)
    assert (photo.format, photo.mode, photo.size) == ("JPEG", "RGB", (256, 256))
    assert (mask.format, mask.mode, mask.size) == ("PNG", "L", (256, 256))
    assert np.array_equal(np.array(mask), script.mask_pixels())
    drawn = script.photo_pixels().astype(int)
    assert np.abs(np.array(photo).astype(int) - drawn).mean() < 2  # JPEG at quality 90
    again_photo, again_mask = script.write(tmp_path)
    assert np.array_equal(np.array(Image.open(again_mask)), np.array(mask))
    assert np.abs(np.array(Image.open(again_photo)).astype(int) - drawn).mean() < 2


def test_an_edit_request_validates_with_the_examples():
    caption = CAPTION.read_text(encoding="utf-8")
    resolved = GenerationRequest(caption, image=PHOTO, mask=MASK, paste_back=True).validate()
    edit = resolved.edit
    assert (resolved.request.width, resolved.request.height) == (256, 256)
    top, bottom, left, right = (v // 16 for v in edit_inputs_script().MASK_BOX)
    expected = np.zeros((16, 16), np.float32)
    expected[top:bottom, left:right] = 1  # whole tokens: the mask covers 5x5 of them
    assert np.array_equal(edit.token_mask, expected) and edit.paste_mask is not None
    assert GenerationRequest(caption, image=PHOTO, strength=0.6).validate().edit.token_mask is None
    wider = GenerationRequest(caption, image=PHOTO, expand=(0, 0, 128, 0)).validate()
    assert (wider.request.width, wider.request.height) == (384, 256)


def test_the_readme_inpainting_command_runs_on_the_examples(tmp_path, tiny_checkpoint):
    out = tmp_path / "inpainted.png"
    args = ["generate", "--model", str(tiny_checkpoint), "--dtype", "float32", "--steps", "1"]
    args += ["--prompt-file", str(CAPTION), "--image", str(PHOTO), "--mask", str(MASK)]
    result = CliRunner().invoke(main, [*args, "--mask-grow", "1", "--paste-back", "-o", str(out)])
    assert result.exit_code == 0, result.output
    pixels = np.array(Image.open(out))
    assert pixels.shape == (256, 256, 3)
    assert np.array_equal(pixels[:16], np.array(Image.open(PHOTO))[:16])  # pasted back
    assert read_metadata(out)["paste_back"] is True
