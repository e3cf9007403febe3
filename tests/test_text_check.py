"""The text check: which text a prompt asks for, how strings are normalised and scored, the
bbox search, and rendered images read back by the real engines (rapidocr for Latin and CJK,
tesseract for Cyrillic, Arabic and Devanagari): the exact words pass, a misspelling fails, a
blank image is "not found"."""

import json
from pathlib import Path

import pytest
from ocr_helpers import (
    DEJAVU,
    DEJAVU_BOLD,
    DEJAVU_SERIF,
    NOTO_ARABIC,
    NOTO_CJK,
    NOTO_DEVANAGARI,
    NOTO_SANS,
    render,
    require_module,
)
from PIL import Image

from ideogram4_mlx import ocr
from ideogram4_mlx.text_check import (
    TEXT_THRESHOLD,
    ElementScore,
    TextElement,
    TextReport,
    best_match,
    check_text,
    normalise,
    similarity,
    text_elements,
)

require_module("rapidfuzz")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def caption(*elements) -> str:
    """A caption holding ``elements`` (``(text, bbox)`` pairs)."""
    items = [{"type": "text", "text": t, "bbox": b, "desc": "x"} for t, b in elements]
    return json.dumps({"compositional_deconstruction": {"elements": items}}, ensure_ascii=False)


def test_normalise_folds_case_width_spaces_and_punctuation_but_keeps_marks_and_lookalikes():
    assert normalise("Friday 18 July · 8 pm!") == "friday18july8pm"
    assert normalise("ＧＲＡＮＤ　ＳＡＬＥ") == "grandsale"  # full width (NFKC)
    assert normalise("Straße") == normalise("STRASSE")  # casefold
    assert normalise("O0 Il1") == "o0il1"  # no look-alike mapping
    assert normalise("नमस्ते") == "नमस्ते"  # combining marks (virama, vowel signs) kept
    assert normalise("«مقهى»؟") == "مقهى"
    assert normalise("★ — ✓ $%") == ""


def test_similarity_is_one_minus_levenshtein_over_the_longer():
    assert similarity("GRAND SALE", "grand-sale") == 1.0
    assert similarity("GRAND OPENING", "GRAND OPENIGN") == pytest.approx(1 - 2 / 12)
    assert similarity("abc", "") == 0.0


def test_best_match_joins_split_lines_and_finds_text_among_other_words():
    assert best_match("grandopening", ["GRAND", "OPENING"]) == (1.0, "GRAND OPENING")
    assert best_match("sale", ["BIG SALE TODAY"]) == (1.0, "SALE")
    score, best = best_match("summerjazznight", ["NOISE", "SUMMER JAZZ", "NIGHT 8 PM"])
    assert score == 1.0 and best == "SUMMER JAZZ NIGHT"
    assert best_match("open", []) == (0.0, None)
    assert best_match("open", ["CLOSED"])[0] < TEXT_THRESHOLD


def test_best_match_counts_an_extra_letter_as_a_mistake():
    """Generated lettering often doubles or adds a letter: whole words are compared, so the
    right word inside a wrong one is no match (it would be with windows of the read text)."""
    assert best_match("open", ["OPENN"]) == (0.8, "OPENN")
    assert best_match("open", ["REOPENING SOON"])[0] < TEXT_THRESHOLD
    assert best_match("sale", ["BIG SALES TODAY"]) == (0.8, "SALES")
    # Chinese and Japanese have no spaces: a window of the read text is a match there
    assert best_match("拉面", ["东京拉面店"], unspaced=True) == (1.0, "东京拉面店")
    assert best_match("拉面", ["东京拉面店"])[0] < TEXT_THRESHOLD


def test_text_elements_of_the_examples():
    poster = text_elements((EXAMPLES / "poster.json").read_text(encoding="utf-8"))
    assert poster == [
        TextElement("SUMMER JAZZ NIGHT", (680, 80, 800, 920)),
        TextElement("Friday 18 July · 8 pm", (820, 80, 870, 920)),
        TextElement("The Blue Room, 12 Harbour Street", (890, 80, 940, 920)),
    ]
    signs = text_elements((EXAMPLES / "non_latin.json").read_text(encoding="utf-8"))
    assert [e.text for e in signs] == ["東京ラーメン", "Книжный магазин", "مقهى الياسمين"]


@pytest.mark.parametrize(
    "bbox",
    [[0, 0, 1000], [0, 0, 1001, 500], [500, 0, 400, 900], [0, 0, float("nan"), 9],
     [True, 0, 1, 1], ["0", 0, 10, 10], None, "0,0,10,10", [10, 10, 10, 20]],
)  # fmt: skip
def test_a_bad_bbox_is_dropped_and_the_element_searched_everywhere(bbox):
    assert text_elements(caption(("OPEN", bbox))) == [TextElement("OPEN", None)]


def test_text_elements_skip_other_types_empty_text_and_bound_the_count():
    prompt = json.dumps({"compositional_deconstruction": {"elements": [
        {"type": "obj", "text": "NOT ME"}, {"type": "text", "text": "  "},
        {"type": "text", "text": 7}, "junk", {"type": "text", "text": "YES"},
    ]}})  # fmt: skip
    assert text_elements(prompt) == [TextElement("YES")]
    many = caption(*((f"W{i}", None) for i in range(50)))
    assert len(text_elements(many)) == 32
    assert text_elements('{"compositional_deconstruction": 5}') == []
    assert text_elements("[1, 2]") == []


def test_plain_prompts_give_their_quoted_strings_in_order():
    prompt = (
        'a sign saying "OPEN", a banner “Grand Sale”, a label ‘Joe’s Diner’, '
        "a 'CLOSED' card, «Café», 「東京」 and 『ラーメン』; it's the cat's toy"
    )
    assert [e.text for e in text_elements(prompt)] == [
        "OPEN", "Grand Sale", "Joe’s Diner", "CLOSED", "Café", "東京", "ラーメン"
    ]  # fmt: skip
    assert text_elements("a cat on a mat") == []
    assert text_elements('{"not json": "OPEN" ') == [TextElement("not json"), TextElement("OPEN")]
    assert text_elements('"OPEN" and "OPEN"') == [TextElement("OPEN")]


def test_element_lines_and_report_exclude_unchecked_elements():
    ok = ElementScore("OPEN", None, 1.0, "OPEN")
    bad = ElementScore("GRAND SALE", None, 0.8, "GRAND SAIE")
    skipped = ElementScore("مقهى", None, 0.0, None, unchecked="rapidocr does not read Arabic")
    assert bad.line() == '"GRAND SALE": best match "GRAND SAIE", 0.80'
    assert skipped.line() == '"مقهى": not checked: rapidocr does not read Arabic'
    report = TextReport("rapidocr", TEXT_THRESHOLD, (ok, skipped))
    assert report.passed and report.worst == 1.0
    assert TextReport("rapidocr", TEXT_THRESHOLD, (ok, bad, skipped)).worst == 0.8
    assert report.to_metadata()["elements"][1]["unchecked"] == "rapidocr does not read Arabic"


class Fake:
    """An engine that reads ``lines`` wherever it is pointed (boxes in the crop it gets)."""

    name = "fake"
    scripts = frozenset({"latin"})

    def __init__(self, lines):
        self.lines, self.crops = lines, []

    def read(self, image, scripts=None):
        self.crops.append(image.size)
        return list(self.lines)


def test_unreadable_scripts_and_empty_text_are_not_checked_with_a_reason(monkeypatch):
    monkeypatch.setattr(ocr, "engine_reading", lambda scripts: "tesseract")
    prompt = caption(("OPEN", None), ("مقهى", None), ("★★★", None))
    report = check_text(Image.new("RGB", (64, 64)), prompt, Fake([]))
    assert report.lines() == [
        '"OPEN": not found, 0.00',
        '"مقهى": not checked: fake does not read Arabic (--ocr tesseract does)',
        '"★★★": not checked: nothing left to compare after dropping spaces, punctuation and '
        "symbols",
    ]
    assert not report.passed and report.worst == 0.0


def test_a_bbox_is_read_from_its_padded_region():
    engine = Fake([ocr.OCRLine("OPEN", (2, 2, 30, 12), 1.0)])
    report = check_text(
        Image.new("RGB", (1000, 500)), caption(("OPEN", [100, 200, 300, 600])), engine
    )
    assert engine.crops == [(440, 120)] and report.passed  # 2% of each side added: 180..620
    check_text(Image.new("RGB", (1000, 500)), caption(("OPEN", None), ("SHUT", None)), engine)
    assert engine.crops[1:] == [(1000, 500)]  # the whole image, read once for both


def test_exact_words_pass_and_a_misspelling_fails_in_several_fonts(rapid):
    cases = [(DEJAVU_BOLD, 56), (DEJAVU_SERIF, 40), (NOTO_SANS, 32)]
    for path, size in cases:
        right = check_text(render("GRAND OPENING", path, size), '"GRAND OPENING"', rapid)
        assert right.passed, (path.name, right.lines())
        wrong = check_text(render("GRAND OPENIGN", path, size), '"GRAND OPENING"', rapid)
        assert not wrong.passed and wrong.worst < TEXT_THRESHOLD, (path.name, wrong.lines())


def test_rotated_and_light_on_dark_text_passes(rapid):
    rotated = render("SUMMER JAZZ", DEJAVU_BOLD, 48, (120, 130), angle=7)
    assert check_text(rotated, '"Summer Jazz"', rapid).passed
    dark = render("NIGHT MARKET", DEJAVU, 44, colours=("#1b2a49", "#f4ebd9"))
    assert check_text(dark, '"Night Market"', rapid).passed


def test_blank_image_is_not_found(rapid):
    report = check_text(Image.new("RGB", (640, 320), "white"), '"OPEN"', rapid)
    assert report.lines() == ['"OPEN": not found, 0.00'] and not report.passed


def test_bbox_search_finds_the_word_in_its_box_and_not_elsewhere(rapid):
    image = render("OPEN", DEJAVU_BOLD, 56, at=(30, 20))  # top left of a 640x320 canvas
    elsewhere = check_text(image, caption(("OPEN", [600, 550, 950, 950])), rapid)
    assert elsewhere.lines() == ['"OPEN": not found, 0.00']
    there = check_text(image, caption(("OPEN", [50, 40, 300, 350])), rapid)
    assert there.passed, there.lines()


def test_chinese_and_japanese_with_rapidocr(rapid):
    image = render("东方明珠", NOTO_CJK, 48, at=(40, 40))
    image.paste(render("東京ラーメン", NOTO_CJK, 40, at=(40, 20), canvas=(640, 120)), (0, 180))
    prompt = caption(("东方明珠", [80, 40, 350, 500]), ("東京ラーメン", [600, 40, 950, 600]))
    report = check_text(image, prompt, rapid)
    assert report.passed, report.lines()
    wrong = check_text(render("東京ラーメソ", NOTO_CJK, 40), '"東京ラーメン"', rapid)
    assert not wrong.passed, wrong.lines()


@pytest.mark.parametrize(
    "text, misspelt, path",
    [
        ("Книжный магазин", "Кнежный магазын", DEJAVU),
        ("سوق الكتب القديمة", "سوف الكتب القديم", NOTO_ARABIC),
        ("नमस्ते दुनिया", "नमस्कार दुनिया", NOTO_DEVANAGARI),
    ],
)
def test_cyrillic_arabic_devanagari_with_tesseract(tess, text, misspelt, path):
    # Arabic is compared in logical order, as written in the caption and returned by engines.
    prompt = caption((text, [300, 30, 600, 800]))
    right = check_text(render(text, path, 44, at=(40, 110)), prompt, tess)
    assert right.passed, right.lines()
    wrong = check_text(render(misspelt, path, 44, at=(40, 110)), prompt, tess)
    assert not wrong.passed, wrong.lines()


def test_auto_reads_each_script_with_an_engine_that_reads_it(rapid, tess):
    image = render("OPEN", DEJAVU_BOLD, 48, at=(40, 30))
    image.paste(render("Книжный", DEJAVU, 44, at=(40, 20), canvas=(640, 120)), (0, 180))
    prompt = caption(("OPEN", [50, 30, 350, 500]), ("Книжный", [560, 30, 900, 600]))
    report = check_text(image, prompt, None)
    assert report.engine.startswith("rapidocr+tesseract") and report.passed, report.lines()
    alone = check_text(image, prompt, rapid)
    assert alone.passed and alone.elements[1].unchecked.startswith("rapidocr does not read")
