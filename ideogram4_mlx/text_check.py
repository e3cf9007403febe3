"""Read back the lettering an image renders and score it against the caption's text elements
(docs/TEXT_CHECK.md).

A caption's ``"type": "text"`` elements (or, for a plain-text prompt, its quoted strings) are
what should appear. An OCR engine (``ocr.py``) reads the image; each element is compared with
what was read inside its bbox (``[y_min, x_min, y_max, x_max]`` on a 0..1000 grid, padded), or
anywhere in the image when it has none, as a normalised edit distance.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

TEXT_THRESHOLD = 0.9  # an element scoring at least this is "found"


@dataclass(frozen=True)
class TextElement:
    """One piece of text the prompt asks for; ``bbox`` ``(y_min, x_min, y_max, x_max)`` on
    0..1000, None: anywhere."""

    text: str
    bbox: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class ElementScore:
    """How well ``text`` was read back: ``score`` in 0..1 (1: the same after normalising),
    ``best`` the read text that matched best (None: nothing was read where it was searched)."""

    text: str
    bbox: tuple[int, int, int, int] | None
    score: float
    best: str | None

    def found(self, threshold: float = TEXT_THRESHOLD) -> bool:
        return self.score >= threshold

    def line(self, threshold: float = TEXT_THRESHOLD) -> str:
        """``"OPEN": found, 1.00`` / ``"GRAND SALE": best match "GRAND SAIE", 0.90`` /
        ``"OPEN": not found, 0.00``."""
        if self.found(threshold):
            verdict = "found"
        elif self.best is None:
            verdict = "not found"
        else:
            verdict = f"best match {_quoted(self.best)}"
        return f"{_quoted(self.text)}: {verdict}, {self.score:.2f}"

    def to_metadata(self) -> dict:
        return {"text": self.text, "bbox": self.bbox, "score": round(self.score, 4),
                "best": self.best}  # fmt: skip


@dataclass(frozen=True)
class TextReport:
    """The scores of every text element of one image, read by ``engine``."""

    engine: str
    threshold: float
    elements: tuple[ElementScore, ...]

    @property
    def passed(self) -> bool:
        """Every element found (True when the prompt asks for no text)."""
        return all(e.found(self.threshold) for e in self.elements)

    @property
    def worst(self) -> float:
        """The lowest element score (1.0 when there are none): what retries compare."""
        return min((e.score for e in self.elements), default=1.0)

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
    bboxes), or a plain-text prompt's quoted strings (no bbox)."""
    raise NotImplementedError


def check_text(
    image: Image.Image,
    prompt: str,
    engine=None,
    threshold: float = TEXT_THRESHOLD,
) -> TextReport:
    """Read ``image`` with ``engine`` (an ``ocr.OCREngine``, an engine name or None for this
    platform's default) and score every element of ``text_elements(prompt)``."""
    raise NotImplementedError


# TEMPORARY shim (not committed)
import json as _json, unicodedata as _ud, difflib as _dl
def _norm(t):
    t = _ud.normalize("NFKC", t).casefold()
    return "".join(c for c in t if not c.isspace() and _ud.category(c)[0] not in "PS")
def text_elements(prompt):
    c = _json.loads(prompt)
    return [TextElement(e["text"], tuple(e["bbox"]) if e.get("bbox") else None) for e in c["compositional_deconstruction"]["elements"] if e["type"] == "text"]
def check_text(image, prompt, engine=None, threshold=TEXT_THRESHOLD):
    lines = engine.read(image)
    out = []
    for el in text_elements(prompt):
        best, score = None, 0.0
        for l in lines:
            a, b = _norm(el.text), _norm(l.text)
            import Levenshtein as _L
            s = 1 - _L.distance(a, b) / max(len(a), len(b))
            if best is None or s > score: best, score = l.text, s
        out.append(ElementScore(el.text, el.bbox, score, best))
    return TextReport(engine.name, threshold, tuple(out))
