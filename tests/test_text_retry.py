"""--check-text / --retry-text (ideogram4_mlx.text_retry) through the command and the Python API.

The retry loop runs against a fake pipeline whose images "render" a known text per seed; the
OCR engine here reads that text back from the image (the real engines are tested on rendered
text in tests/test_ocr.py and tests/test_text_check.py, and end to end below when installed).
"""

import json
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ideogram4_mlx import ocr
from ideogram4_mlx.cli import main
from ideogram4_mlx.errors import Ideo4Error, InputError
from ideogram4_mlx.metadata import read_metadata
from ideogram4_mlx.ocr import OCRLine
from ideogram4_mlx.pipeline import GenerationResult
from ideogram4_mlx.text_retry import MAX_TRIES, TextCheck, score_table, text_check_from

ROOT = Path(__file__).resolve().parents[1]
GENERATE_MODULE = "ideogram4_mlx.cli.generate"
CAPTION = json.dumps(
    {
        "high_level_description": "a shop sign",
        "compositional_deconstruction": {
            "background": "white",
            "elements": [
                {"type": "text", "text": "OPEN", "desc": "red letters"},
                {"type": "text", "text": "Since 1920", "desc": "small"},
            ],
        },
    }
)


class ReadsWhatWasDrawn:
    """An OCR engine that reads the text the fake pipeline drew (``image.info["drawn"]``),
    as one line over the whole image."""

    name = "fake"
    scripts = frozenset(ocr.SCRIPT_NAMES)

    def read(self, image, *args, **kwargs):
        lines = image.info.get("drawn", [])
        w, h = image.size
        return [OCRLine(text, (0, i * 10, w, i * 10 + 10), 1.0) for i, text in enumerate(lines)]


@pytest.fixture
def engine(monkeypatch):
    made = []

    def get_engine(name=None):
        made.append(name)
        return ReadsWhatWasDrawn()

    monkeypatch.setattr(ocr, "get_engine", get_engine)
    return made


@pytest.fixture
def fake(monkeypatch):
    """Replaces ``load``: seed ``s`` draws ``drawn[s]`` (default: nothing), or is the image
    ``render[s]`` when ``render`` is set; records the seeds."""
    seen = SimpleNamespace(seeds=[], drawn={}, loads=0, render=None)

    class FakeGeneration:
        num_steps = 0

        def __init__(self, request):
            self.request = request

        def __iter__(self):
            return iter(())

        def result(self):
            seed = self.request.seed
            seen.seeds.append(seed)
            if seen.render is not None:  # a PIL rendering of real text
                image = seen.render[seed]
            else:
                image = Image.new("RGB", (64, 64), "white")
                image.info["drawn"] = seen.drawn.get(seed, [])
            metadata = {"seed": seed, "prompt": self.request.prompt}
            return GenerationResult(image, np.zeros(1), metadata, {}, self.request)

    class FakePipe:
        cfg = None

        def start(self, request, verbose=False, report=None):
            return FakeGeneration(request.request)

        def check(self, request):
            return request.validate()

    def fake_load(options, **keywords):
        seen.loads += 1
        seen.options = replace(options, **keywords)
        return FakePipe()

    monkeypatch.setattr(sys.modules[GENERATE_MODULE], "load", fake_load)
    return seen


def invoke(*args):
    return CliRunner().invoke(main, ["generate", *(str(a) for a in args)])


def test_retry_stops_at_the_first_seed_whose_text_is_found(fake, engine, tmp_path):
    fake.drawn = {10: ["0PEN", "Since 1920"], 11: [], 12: ["OPEN", "Since 1920"]}
    out = tmp_path / "sign.png"
    result = invoke("--prompt", CAPTION, "--seed", 10, "--retry-text", 4, "--output", out)
    assert result.exit_code == 0, result.output
    assert fake.seeds == [10, 11, 12]  # the third seed renders it right: no fourth
    assert result.stdout == f"{out} (seed 12)\n"
    err = result.stderr
    assert "text check, seed 10 (1/4)" in err and "text check, seed 12 (3/4)" in err
    assert '"OPEN": best match "0PEN", 0.75' in err  # O and 0 are different letters
    assert '"Since 1920": not found, 0.00' in err  # seed 11: nothing read
    assert '"OPEN": found, 1.00' in err
    assert "kept seed 12 (passed), 3 tried" in err
    metadata = read_metadata(out)
    assert metadata["seed"] == 12  # the kept image replays with its own seed
    record = metadata["text_check"]
    assert record["passed"] is True and record["seed"] == 12 and record["engine"] == "fake"
    assert [t["seed"] for t in record["tries"]] == [10, 11, 12]
    assert [t["passed"] for t in record["tries"]] == [False, False, True]
    assert [e["score"] for e in record["elements"]] == [1.0, 1.0]
    assert fake.loads == 1  # the models load once for all the tries


def test_retry_keeps_the_best_when_no_seed_passes(fake, engine, tmp_path):
    fake.drawn = {5: ["OPEN"], 6: ["OPEN", "Since 192O"], 7: []}
    out = tmp_path / "sign.png"
    result = invoke("--prompt", CAPTION, "--seed", 5, "--retry-text", 3, "--output", out)
    assert result.exit_code == 0, result.output
    assert fake.seeds == [5, 6, 7]
    assert result.stdout == f"{out} (seed 6)\n"  # its lowest score is the highest
    assert "kept seed 6 (best of the tries, below the threshold), 3 tried" in result.stderr
    record = read_metadata(out)["text_check"]
    assert record["passed"] is False and [t["seed"] for t in record["tries"]] == [5, 6, 7]


def test_check_text_checks_one_image_and_a_threshold_decides(fake, engine, tmp_path):
    fake.drawn = {3: ["OPEN", "Since 192O"]}  # 0.89 after normalising "since1920"
    out = tmp_path / "a.png"
    result = invoke("--prompt", CAPTION, "--seed", 3, "--check-text", "--output", out)
    assert result.exit_code == 0, result.output
    assert fake.seeds == [3]
    assert '"Since 1920": best match "Since 192O", 0.89' in result.stderr
    assert read_metadata(out)["text_check"]["passed"] is False
    low = invoke(
        "--prompt", CAPTION, "--seed", 3, "--check-text", "--text-threshold", 0.8,
        "--output", tmp_path / "b.png",
    )  # fmt: skip
    assert '"Since 1920": found, 0.89' in low.stderr
    assert read_metadata(tmp_path / "b.png")["text_check"]["threshold"] == 0.8


def test_num_images_with_a_check_prints_a_table(fake, engine, tmp_path):
    fake.drawn = {1: ["OPEN", "Since 1920"], 2: ["OPEN", "Since"]}
    out = tmp_path / "s.png"
    result = invoke("--prompt", CAPTION, "--seeds", "1,2", "--check-text", "--output", out)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[:2] == [f"{tmp_path / 's-1.png'} (seed 1)", f"{tmp_path / 's-2.png'} (seed 2)"]
    assert lines[2].split() == ["seed", '"OPEN"', '"Since', '1920"', "all", "found"]
    assert lines[3].split() == ["1", "1.00", "1.00", "yes"]
    assert lines[4].split() == ["2", "1.00", "0.56", "no"]  # "since" of "since1920"
    assert read_metadata(tmp_path / "s-2.png")["text_check"]["passed"] is False


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--retry-text", 2, "--num-images", 2], "not with --num-images/--seeds"),
        (["--retry-text", 2, "--seeds", "1,2"], "not with --num-images/--seeds"),
        (["--retry-text", 2, "--distributed"], "not with --distributed"),
        (["--retry-text", 2, "--stepwise-dir", "prev"], "not with --stepwise-dir"),
        (["--ocr", "rapidocr"], "ocr and text_threshold need check_text or retry_text"),
        (["--text-threshold", 0.5], "ocr and text_threshold need check_text or retry_text"),
        (["--check-text", "--text-threshold", 1.5], "text_threshold 1.5: use a number in 0..1"),
        (["--check-text", "--text-threshold", "nan"], "use a number in 0..1"),
        (["--retry-text", MAX_TRIES + 1], "--retry-text"),
        (["--check-text", "--ocr", "paddle"], "'paddle' is not one of"),
    ],
)
def test_bad_check_options_are_usage_errors_before_loading(fake, engine, tmp_path, extra, message):
    result = invoke("--prompt", CAPTION, *extra, "--output", tmp_path / "a.png")
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert fake.loads == 0


def test_no_ocr_engine_is_one_line_before_any_model_loads(fake, monkeypatch, tmp_path):
    def missing(name=None):
        raise Ideo4Error('no OCR engine is installed: pip install "ideogram4-mlx[ocr]"')

    monkeypatch.setattr(ocr, "get_engine", missing)
    for extra in (["--check-text"], ["--retry-text", 3], ["--check-text", "--num-images", 2]):
        result = invoke("--prompt", CAPTION, *extra, "--output", tmp_path / "a.png")
        assert result.exit_code == 1, result.output
        assert (
            result.output == 'Error: no OCR engine is installed: pip install "ideogram4-mlx[ocr]"\n'
        )
    assert fake.loads == 0 and not (tmp_path / "a.png").exists()


def test_text_check_from_reads_the_keywords():
    assert text_check_from() is None
    assert text_check_from(check_text=True) == TextCheck(tries=1)
    assert text_check_from(retry_text=4, ocr="tesseract") == TextCheck("tesseract", 4)
    assert text_check_from(True, 2, threshold=0.5).threshold == 0.5
    for bad in ({"retry_text": -1}, {"retry_text": 2.5}, {"retry_text": True}):
        with pytest.raises(InputError, match="retry_text must be a whole number"):
            text_check_from(**bad)
    with pytest.raises(InputError, match=f"use 1..{MAX_TRIES} images"):
        text_check_from(retry_text=MAX_TRIES + 1)
    with pytest.raises(InputError, match="need check_text or retry_text"):
        text_check_from(ocr="vision")


def test_score_table_lists_each_image_or_each_caption():
    record = {"seed": 7, "passed": False, "elements": [{"text": "A" * 40, "score": 0.5}]}
    lines = score_table([record, {**record, "seed": 8, "passed": True}])
    assert lines[0].split()[0] == "seed" and lines[0].split()[1] == '"' + "A" * 20 + "…"
    assert [line.split()[-1] for line in lines[1:]] == ["no", "yes"]
    other = {"seed": 9, "passed": True, "elements": [{"text": "B", "score": 1.0}]}
    assert score_table([record, other])[-2:] == ["seed 9: all found", '  "B": 1.00']


def test_python_api_checks_and_retries_on_the_tiny_checkpoint(tiny_checkpoint, engine):
    from ideogram4_mlx import load

    pipe = load(tiny_checkpoint, dtype="float32")
    fast = {"width": 256, "height": 256, "num_steps": 1, "seed": 4}
    res = pipe.generate(CAPTION, check_text=True, **fast)
    assert [e.best for e in res.text_scores.elements] == [None, None]  # random weights
    assert res.text_scores.lines() == ['"OPEN": not found, 0.00', '"Since 1920": not found, 0.00']
    assert res.metadata["text_check"]["tries"][0]["seed"] == 4
    res = pipe.generate(CAPTION, retry_text=2, **fast)
    assert [t["seed"] for t in res.metadata["text_check"]["tries"]] == [4, 5]
    assert res.metadata["seed"] == 4  # none passes: the first of equals is kept
    with pytest.raises(InputError, match="retry_text needs seeds of one process"):
        pipe.generate(CAPTION, retry_text=2, noise=np.zeros((1, 256, 128), np.float32), **fast)


# -- with a real OCR engine (tests/ocr_helpers.py: a failure, not a skip, in CI) -----------------


def test_retry_with_a_real_engine_stops_where_the_rendered_text_is_right(fake, tmp_path):
    """The fake pipeline renders with PIL: a misspelling, nothing, then the caption's text;
    the cross-platform engine reads them and the loop stops at the third seed."""
    from ocr_helpers import DEJAVU_BOLD, render, require_engine

    require_engine("rapidocr")
    drawn = {20: "0PFN  Since 1902", 21: "", 22: "OPEN  Since 1920", 23: "OPEN  Since 1920"}
    fake.render = {s: render(t, DEJAVU_BOLD, 44, canvas=(640, 160)) for s, t in drawn.items()}
    out = tmp_path / "sign.png"
    result = invoke("--prompt", CAPTION, "--seed", 20, "--retry-text", 4, "--ocr", "rapidocr",
                    "--output", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert fake.seeds == [20, 21, 22]
    record = read_metadata(out)["text_check"]
    assert [t["passed"] for t in record["tries"]] == [False, False, True]
    assert record["tries"][0]["worst"] < 0.9 and record["tries"][1]["worst"] == 0.0
    assert record["engine"] == "rapidocr" and read_metadata(out)["seed"] == 22


def test_the_synthetic_checkpoint_end_to_end_reports_not_found(tmp_path):
    """#29's done-when command on the tiny synthetic checkpoint: random weights draw no text,
    so every element of examples/poster.json is "not found", 4 seeds are tried, one is kept."""
    from ocr_helpers import require_engine

    from ideogram4_mlx.synth import write_synthetic_checkpoint

    require_engine("rapidocr")
    model = write_synthetic_checkpoint(tmp_path / "tiny", "tiny", seed=0)
    poster = ROOT / "examples" / "poster.json"
    out = tmp_path / "poster.png"
    result = invoke(
        "--model", model, "--prompt-file", poster, "--check-text", "--retry-text", 4,
        "--width", 256, "--height", 256, "--steps", 2, "--seed", 42, "--output", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    err = result.stderr
    for seed, i in ((42, 1), (45, 4)):
        assert f"text check, seed {seed} ({i}/4)" in err
    texts = [e["text"] for e in json.loads(poster.read_text())["compositional_deconstruction"]
             ["elements"] if e["type"] == "text"]  # fmt: skip
    assert err.count(f'"{texts[0]}": not found, 0.00') == 4
    assert "kept seed 42 (best of the tries, below the threshold), 4 tried" in err
    assert result.stdout == f"{out} (seed 42)\n"
    record = read_metadata(out)["text_check"]
    assert [e["text"] for e in record["elements"]] == texts
    assert [t["seed"] for t in record["tries"]] == [42, 43, 44, 45]
    assert all(e["best"] is None and e["score"] == 0.0 for e in record["elements"])
