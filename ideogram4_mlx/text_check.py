"""Read back the lettering an image renders and score it against the caption's text elements
(docs/TEXT_CHECK.md).

A caption's ``"type": "text"`` elements (or, for a plain-text prompt, its quoted strings) are
what should appear. An OCR engine (``ocr.py``) reads the image; each element is compared with
what was read inside its bbox (``[y_min, x_min, y_max, x_max]`` on a 0..1000 grid, padded), or
anywhere in the image when it has none, as a normalised edit distance.

Normalising (both sides): Unicode NFKC, casefold, then whitespace, punctuation and symbols
(categories Z*, P*, S*, C*) dropped; combining marks (M*) kept, as Devanagari and Arabic need
them; no look-alike mapping (O and 0 stay different). Score: ``1 - Levenshtein(a, b) /
max(len(a), len(b))`` on the normalised strings, the best over runs of whole words read in the
region (in reading order, across lines: text split over lines still matches, and text beside
other words is found without them; an extra letter is a mistake, not a match). Chinese,
Japanese and Thai have no spaces: there windows of the read text count too.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass

from PIL import Image

from ideogram4_mlx import ocr
from ideogram4_mlx.caption import parse_json

try:
    from rapidfuzz.distance import Levenshtein
except ImportError:  # the ocr extra: the package imports without it, a check needs it
    Levenshtein = None

TEXT_THRESHOLD = 0.9  # an element scoring at least this is "found"
GRID = 1000  # caption bboxes are on a 0..1000 grid
PAD = 0.02  # a bbox is searched padded by this fraction of the image on each side
MAX_ELEMENTS = 32  # text elements checked per prompt (the rest are ignored)
MAX_TEXT_CHARS = 200  # a longer element is not checked: lettering, not a paragraph
MAX_CANDIDATES = 64  # OCR lines compared per element, in reading order
RTL_SCRIPTS = frozenset({"arabic", "hebrew"})
# Written without spaces between words: an element may sit inside a longer run of letters.
UNSPACED_SCRIPTS = frozenset({"han", "hiragana", "katakana", "thai"})
# Quoted strings of a plain-text prompt: straight, curly, guillemets, CJK corner brackets.
# A straight or curly single quote counts only outside a word (not an apostrophe).
QUOTED = re.compile(
    r'"([^"\n]+)"|“([^”\n]+)”|«([^»\n]+)»|「([^」\n]+)」|『([^』\n]+)』'
    r"|(?<!\w)'([^'\n]+?)'(?!\w)|(?<!\w)‘([^\n]+?)’(?!\w)"
)


@dataclass(frozen=True)
class TextElement:
    """One piece of text the prompt asks for; ``bbox`` ``(y_min, x_min, y_max, x_max)`` on
    0..1000, None: anywhere."""

    text: str
    bbox: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class ElementScore:
    """How well ``text`` was read back: ``score`` in 0..1 (1: the same after normalising),
    ``best`` the read text that matched best (None: nothing was read where it was searched).
    ``unchecked``: why it was not checked (no engine here reads its script, nothing left after
    normalising); such an element counts in neither ``passed`` nor ``worst``."""

    text: str
    bbox: tuple[int, int, int, int] | None
    score: float
    best: str | None
    unchecked: str | None = None

    def found(self, threshold: float = TEXT_THRESHOLD) -> bool:
        return self.unchecked is None and self.score >= threshold

    def line(self, threshold: float = TEXT_THRESHOLD) -> str:
        """``"OPEN": found, 1.00`` / ``"GRAND SALE": best match "GRAND SAIE", 0.90`` /
        ``"OPEN": not found, 0.00`` / ``"مقهى": not checked: rapidocr does not read Arabic``."""
        if self.unchecked is not None:
            return f"{_quoted(self.text)}: not checked: {self.unchecked}"
        if self.found(threshold):
            verdict = "found"
        elif self.best is None:
            verdict = "not found"
        else:
            verdict = f"best match {_quoted(self.best)}"
        return f"{_quoted(self.text)}: {verdict}, {self.score:.2f}"

    def to_metadata(self) -> dict:
        return {"text": self.text, "bbox": self.bbox, "score": round(self.score, 4),
                "best": self.best, "unchecked": self.unchecked}  # fmt: skip


@dataclass(frozen=True)
class TextReport:
    """The scores of every text element of one image, read by ``engine``."""

    engine: str
    threshold: float
    elements: tuple[ElementScore, ...]

    @property
    def passed(self) -> bool:
        """Every checked element found (True when the prompt asks for no text)."""
        return all(e.found(self.threshold) for e in self.elements if e.unchecked is None)

    @property
    def worst(self) -> float:
        """The lowest checked element's score (1.0 when there are none): what retries compare."""
        return min((e.score for e in self.elements if e.unchecked is None), default=1.0)

    def lines(self) -> list[str]:
        return [e.line(self.threshold) for e in self.elements]

    def to_metadata(self) -> dict:
        return {
            "engine": self.engine,
            "threshold": self.threshold,
            "passed": self.passed,
            "elements": [e.to_metadata() for e in self.elements],
        }


def _quoted(text: str, limit: int = 60) -> str:
    """``text`` in double quotes, shortened past ``limit`` characters, on one line."""
    text = " ".join(text.split())
    return '"' + (text if len(text) <= limit else text[: limit - 3] + "...") + '"'


def text_elements(prompt: str) -> list[TextElement]:
    """The text a prompt asks for: a JSON caption's ``"type": "text"`` elements (with their
    bboxes), or a plain-text prompt's quoted strings (no bbox). A bbox that is not four finite
    numbers in 0..1000 with min < max is dropped (the element is searched everywhere); at most
    ``MAX_ELEMENTS``, duplicates once."""
    caption = _caption(prompt)
    if caption is None:
        found = [TextElement(next(g for g in m.groups() if g)) for m in QUOTED.finditer(prompt)]
    else:
        found = _caption_elements(caption)
    found = [e for e in found if e.text.strip()]
    return list(dict.fromkeys(found))[:MAX_ELEMENTS]


def _caption(prompt: str) -> dict | None:
    """The prompt as a JSON caption (an object), None for plain text."""
    if not prompt.lstrip().startswith("{"):
        return None
    try:
        caption = parse_json(prompt)
    except ValueError:  # not JSON after all (or nested past the limit): read it as text
        return None
    return caption if isinstance(caption, dict) else None


def _caption_elements(caption: dict) -> list[TextElement]:
    scene = caption.get("compositional_deconstruction")
    elements = scene.get("elements") if isinstance(scene, dict) else None
    found = []
    for element in elements if isinstance(elements, list) else ():
        if not isinstance(element, dict) or element.get("type") != "text":
            continue
        if isinstance(element.get("text"), str):
            found.append(TextElement(element["text"], _bbox(element.get("bbox"))))
    return found


def _bbox(value) -> tuple[int, int, int, int] | None:
    """A caption bbox if it is usable (four finite numbers in 0..1000, min < max), else None."""
    if not isinstance(value, list | tuple) or len(value) != 4:
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        return None
    if not all(math.isfinite(v) and 0 <= v <= GRID for v in value):
        return None
    y0, x0, y1, x1 = value
    if not (y0 < y1 and x0 < x1):
        return None
    return (round(y0), round(x0), round(y1), round(x1))


def normalise(text: str) -> str:
    """``text`` as it is compared: NFKC, casefolded, without whitespace, punctuation, symbols
    or control characters; combining marks kept; no look-alike mapping."""
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    return "".join(ch for ch in text if unicodedata.category(ch)[0] not in "ZPSC")


def similarity(a: str, b: str) -> float:
    """``1 - Levenshtein(a, b) / max(len(a), len(b))`` on the normalised strings (1.0: both
    empty)."""
    return _levenshtein().normalized_similarity(normalise(a), normalise(b))


def _levenshtein():
    """rapidfuzz's Levenshtein, or an ``OCRUnavailableError`` naming the install."""
    if Levenshtein is None:
        raise ocr.OCRUnavailableError(f"the text check needs rapidfuzz: {ocr.PIP_INSTALL}")
    return Levenshtein


def check_text(
    image: Image.Image,
    prompt: str,
    engine=None,
    threshold: float = TEXT_THRESHOLD,
) -> TextReport:
    """Read ``image`` with ``engine`` (an ``ocr.OCREngine``, an engine name or None for this
    platform's default) and score every element of ``text_elements(prompt)``. An element with
    a bbox is read from its padded region, one without from the whole image (read once per
    script set)."""
    _levenshtein()
    if engine is None or isinstance(engine, str):
        engine = ocr.get_engine(engine)
    reads: dict[tuple, list[ocr.OCRLine]] = {}
    scores = [_score(element, image, engine, reads) for element in text_elements(prompt)]
    return TextReport(engine=engine.name, threshold=threshold, elements=tuple(scores))


def _score(element: TextElement, image: Image.Image, engine, reads: dict) -> ElementScore:
    target = normalise(element.text)
    scripts = ocr.scripts_of(element.text)
    why = _unchecked(element.text, target, scripts, engine)
    if why is not None:
        return ElementScore(element.text, element.bbox, 0.0, None, unchecked=why)
    region = _region(element.bbox, image.size)
    key = (region, scripts)
    if key not in reads:
        reads[key] = _read(image, region, scripts, engine)
    lines = _reading_order(reads[key], rtl=bool(scripts & RTL_SCRIPTS))[:MAX_CANDIDATES]
    unspaced = bool(scripts & UNSPACED_SCRIPTS)
    score, best = best_match(target, [line.text for line in lines], unspaced)
    return ElementScore(element.text, element.bbox, score, best)


def _unchecked(text: str, target: str, scripts: frozenset[str], engine) -> str | None:
    """Why an element cannot be checked (None: it can)."""
    if not target:
        return "nothing left to compare after dropping spaces, punctuation and symbols"
    if len(text) > MAX_TEXT_CHARS:
        return f"longer than {MAX_TEXT_CHARS} characters"
    missing = scripts - engine.scripts
    if not missing:
        return None
    other = ocr.engine_reading(scripts)
    hint = f"--ocr {other} does" if other else "no OCR engine installed here reads it"
    return f"{engine.name} does not read {ocr.script_names(missing)} ({hint})"


def _region(bbox, size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """A caption bbox as a pixel box ``(x0, y0, x1, y1)`` padded by ``PAD`` of the image on
    each side and clipped to it; None (the whole image) without a bbox."""
    if bbox is None:
        return None
    width, height = size
    y0, x0, y1, x1 = bbox
    pad = PAD * GRID
    x0, x1 = (max(0.0, x0 - pad) * width / GRID, min(GRID, x1 + pad) * width / GRID)
    y0, y1 = (max(0.0, y0 - pad) * height / GRID, min(GRID, y1 + pad) * height / GRID)
    return (math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1))


def _read(image, region, scripts, engine) -> list[ocr.OCRLine]:
    """The lines read in ``region`` (the whole image when None), in ``image``'s pixels, whose
    box centre lies inside it."""
    if region is None:
        return engine.read(image, scripts)
    x0, y0, x1, y1 = region
    lines = engine.read(image.crop(region), scripts)
    moved = [
        ocr.OCRLine(ln.text, (b[0] + x0, b[1] + y0, b[2] + x0, b[3] + y0), ln.confidence)
        for ln in lines
        for b in (ln.box,)
    ]
    return [ln for ln in moved if x0 <= _cx(ln) <= x1 and y0 <= _cy(ln) <= y1]


def _cx(line: ocr.OCRLine) -> float:
    return (line.box[0] + line.box[2]) / 2


def _cy(line: ocr.OCRLine) -> float:
    return (line.box[1] + line.box[3]) / 2


def _reading_order(lines: list[ocr.OCRLine], rtl: bool = False) -> list[ocr.OCRLine]:
    """Lines top to bottom in rows (a line whose centre lies within the previous row's height
    joins it), each row left to right (right to left for Arabic and Hebrew)."""
    rows: list[list[ocr.OCRLine]] = []
    for line in sorted(lines, key=lambda ln: ln.box[1]):
        if rows and rows[-1][0].box[1] <= _cy(line) <= rows[-1][0].box[3]:
            rows[-1].append(line)
        else:
            rows.append([line])
    return [ln for row in rows for ln in sorted(row, key=_cx, reverse=rtl)]


def best_match(target: str, texts: list[str], unspaced: bool = False) -> tuple[float, str | None]:
    """The best score of normalised ``target`` against runs of consecutive words of ``texts``
    (the lines in reading order, joined across lines), and those words as read (None when
    ``texts`` is empty). Whole words only, so an extra or missing letter counts ("OPENN" is
    not "OPEN"); ``unspaced`` (Chinese, Japanese, Thai: no spaces between words): also any
    window of a run about ``target``'s length."""
    distance = _levenshtein()
    words = [w for text in texts for w in text.split()]
    norms = [normalise(w) for w in words]
    slack = max(1, len(target) // 5)  # runs are tried up to len(target) + slack characters
    best, best_text = 0.0, (" ".join(texts) if texts else None)
    for i in range(len(words)):
        run = ""
        for j in range(i, len(words)):
            run += norms[j]
            score = distance.normalized_similarity(target, run)
            if unspaced:
                score = max(score, _best_window(target, run, len(norms[i]), slack))
            if score > best:
                best, best_text = score, " ".join(words[i : j + 1])
            if len(run) >= len(norms[i]) + len(target) + slack:
                break
    return best, best_text


def _best_window(target: str, run: str, starts: int, slack: int) -> float:
    """The best similarity of ``target`` with a window of ``run`` starting in its first
    ``starts`` characters, ``len(target) +- slack`` long."""
    if len(run) <= len(target):
        return 0.0
    best = 0.0
    lengths = range(max(1, len(target) - slack), len(target) + slack + 1)
    for start in range(min(starts, len(run))):
        for length in lengths:
            if start + length > len(run):
                break
            window = run[start : start + length]
            best = max(best, _levenshtein().normalized_similarity(target, window))
    return best
