"""The OCR engines: each reads rendered text in the scripts it claims, in the right place;
a missing engine or an unknown name is one line saying what to do; the auto engine sends each
script to an engine that reads it. RapidOCR and Tesseract run here (CI installs both); Apple
Vision runs on macOS (``IDEO4_REQUIRE_VISION=1`` makes its absence a failure)."""

import os
import platform

import pytest
from ocr_helpers import (
    DEJAVU,
    DEJAVU_BOLD,
    NOTO_ARABIC,
    NOTO_CJK,
    NOTO_DEVANAGARI,
    render,
)
from PIL import Image

from ideogram4_mlx import ocr
from ideogram4_mlx.errors import Ideo4Error, InputError
from ideogram4_mlx.text_check import similarity


def read_text(engine, image, scripts=None) -> str:
    return " ".join(line.text for line in engine.read(image, scripts))


@pytest.mark.parametrize(
    "text, path",
    [("GRAND OPENING", DEJAVU_BOLD), ("东方明珠", NOTO_CJK), ("東京ラーメン", NOTO_CJK)],
)
def test_rapidocr_reads_latin_chinese_japanese_where_drawn(rapid, text, path):
    image = render(text, path, size=48, at=(60, 140))
    lines = rapid.read(image)
    assert len(lines) == 1 and similarity(lines[0].text, text) == 1.0, lines
    x0, y0, x1, y1 = lines[0].box
    assert 40 <= x0 <= 80 and 120 <= y0 <= 170 and y1 <= 220 and x1 > x0 + 100, lines[0]
    assert 0 < lines[0].confidence <= 1


@pytest.mark.parametrize(
    "text, path, scripts",
    [
        ("Книжный магазин", DEJAVU, {"cyrillic"}),
        ("سوق الكتب القديمة", NOTO_ARABIC, {"arabic"}),
        ("नमस्ते दुनिया", NOTO_DEVANAGARI, {"devanagari"}),
        ("서울 커피", NOTO_CJK, {"hangul"}),
    ],
)
def test_tesseract_reads_the_scripts_rapidocr_does_not(tess, rapid, text, path, scripts):
    assert scripts <= tess.scripts and not scripts <= rapid.scripts
    image = render(text, path, size=44, at=(40, 120))
    assert similarity(read_text(tess, image, frozenset(scripts)), text) >= 0.9


def test_blank_image_reads_nothing(rapid, tess):
    blank = Image.new("RGB", (640, 320), "white")
    assert rapid.read(blank) == [] and tess.read(blank) == []


def test_light_on_dark_and_a_large_image_map_back_to_its_pixels(rapid, tess):
    # 3000 px wide: read downscaled to 2048, the boxes scaled back to the original.
    image = render(
        "NIGHT MARKET", DEJAVU_BOLD, 96, (2000, 300), (3000, 600), ("#102040", "#f4ebd9")
    )
    for engine in (rapid, tess):
        lines = engine.read(image)
        assert [similarity(ln.text, "NIGHT MARKET") for ln in lines] == [1.0], engine.name
        x0, y0, _, _ = lines[0].box
        assert 1960 <= x0 <= 2040 and 290 <= y0 <= 340, (engine.name, lines[0].box)


def test_an_oversized_image_is_refused_in_one_line():
    huge = Image.new("1", (8200, 8200))
    with pytest.raises(InputError, match=r"8200x8200: OCR reads at most 67 megapixels"):
        ocr.bounded(huge)


def test_scripts_of_names_each_letter_script_and_ignores_digits_and_marks():
    assert ocr.scripts_of("東京ラーメン 2024") == {"han", "katakana"}
    assert ocr.scripts_of("Книжный · OPEN") == {"cyrillic", "latin"}
    assert ocr.scripts_of("مقهى") == {"arabic"}
    assert ocr.scripts_of("नमस्ते") == {"devanagari"}
    assert ocr.scripts_of("１２３ !?") == frozenset()
    assert ocr.script_names({"hangul", "hiragana", "katakana"}) == "Japanese kana, Korean"


def test_unknown_engine_lists_the_valid_ones():
    with pytest.raises(InputError, match="unknown OCR engine 'easyocr': use one of vision, "):
        ocr.get_engine("easyocr")


def without(monkeypatch, modules=(), programs=()):
    """Pretend ``modules`` cannot be imported and ``programs`` are not on PATH; no engine made."""
    monkeypatch.setattr(ocr, "_MADE", {})
    real_importable, real_which = ocr._importable, ocr.shutil.which
    monkeypatch.setattr(ocr, "_importable", lambda m: m not in modules and real_importable(m))
    monkeypatch.setattr(ocr.shutil, "which", lambda p: None if p in programs else real_which(p))


def test_a_missing_engine_is_one_line_naming_the_install(monkeypatch):
    without(monkeypatch, modules=("rapidocr", "pytesseract"), programs=("tesseract",))
    with pytest.raises(ocr.OCRUnavailableError) as err:
        ocr.get_engine("rapidocr")
    assert str(err.value).count("\n") == 0 and 'pip install "ideogram4-mlx[ocr]"' in str(err.value)
    assert isinstance(err.value, Ideo4Error)
    with pytest.raises(ocr.OCRUnavailableError, match="needs pytesseract: pip install"):
        ocr.get_engine("tesseract")
    if platform.system() != "Darwin":
        with pytest.raises(ocr.OCRUnavailableError, match="no OCR engine is installed: pip "):
            ocr.get_engine(None)


def test_a_missing_tesseract_program_names_the_apt_packages(monkeypatch):
    without(monkeypatch, programs=("tesseract",))
    with pytest.raises(ocr.OCRUnavailableError) as err:
        ocr.get_engine("tesseract")
    assert "apt-get install tesseract-ocr " in str(err.value) and "\n" not in str(err.value)
    assert "tesseract" not in ocr.available_engines()


class Fake:
    def __init__(self, name, scripts):
        self.name, self.scripts, self.asked = name, frozenset(scripts), []

    def read(self, image, scripts=None):
        self.asked.append(scripts)
        return [ocr.OCRLine(self.name, (0, 0, 10, 10), 1.0)]


def test_auto_sends_each_script_to_the_first_engine_that_reads_it(monkeypatch):
    first, second = Fake("rapidocr", {"latin", "han"}), Fake("tesseract", {"latin", "arabic"})
    monkeypatch.setattr(ocr, "_MADE", {"rapidocr": first, "tesseract": second})
    auto = ocr.AutoEngine(["rapidocr", "tesseract"])
    assert auto.name == "rapidocr+tesseract" and auto.scripts == {"latin", "han", "arabic"}
    image = Image.new("RGB", (32, 32))
    assert auto.read(image, frozenset({"latin"}))[0].text == "rapidocr"
    assert auto.read(image, frozenset({"arabic"}))[0].text == "tesseract"
    assert auto.read(image)[0].text == "rapidocr"
    assert second.asked == [frozenset({"arabic"})]


def test_default_engine_is_vision_on_macos_else_rapidocr():
    expected = "vision" if platform.system() == "Darwin" else "rapidocr"
    assert ocr.default_engine() == expected
    installed = ocr.available_engines()
    assert not installed or installed[0] == expected or expected not in installed


def test_vision_reads_latin_and_japanese_where_drawn():
    if platform.system() != "Darwin" or ocr._missing("vision") is not None:
        reason = ocr._missing("vision") or "Vision missing"
        if os.environ.get("IDEO4_REQUIRE_VISION") == "1":
            pytest.fail(f"IDEO4_REQUIRE_VISION=1, but {reason}")
        pytest.skip(reason)
    vision = ocr.get_engine("vision")
    assert {"latin", "han", "katakana"} <= vision.scripts
    for text, path, scripts in [("GRAND OPENING", DEJAVU_BOLD, {"latin"}),
                                ("東京ラーメン", NOTO_CJK, {"han", "katakana"})]:  # fmt: skip
        lines = vision.read(render(text, path, 48, (60, 140)), frozenset(scripts))
        assert len(lines) == 1 and similarity(lines[0].text, text) >= 0.9, lines
        x0, y0, x1, y1 = lines[0].box  # top-left pixels, not Vision's bottom-left unit square
        assert 40 <= x0 <= 80 and 120 <= y0 <= 170 and 150 < y1 <= 220 and x1 > 200, lines[0]
