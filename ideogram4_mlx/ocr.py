"""OCR engines that read an image's text: Apple's Vision framework on macOS, RapidOCR (ONNX
models in its wheel) elsewhere, Tesseract where installed (docs/TEXT_CHECK.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from PIL import Image

ENGINES = ("vision", "rapidocr", "tesseract")


@dataclass(frozen=True)
class OCRLine:
    """One piece of text read: ``box`` ``(x0, y0, x1, y1)`` in pixels (the axis-aligned box
    around what was read), ``confidence`` 0..1 as the engine reports it."""

    text: str
    box: tuple[float, float, float, float]
    confidence: float


class OCREngine(Protocol):
    name: str

    def read(self, image: Image.Image) -> list[OCRLine]: ...


def available_engines() -> list[str]:
    """The engines installed here, the platform's default first."""
    raise NotImplementedError


def get_engine(name: str | None = None) -> OCREngine:
    """Engine ``name`` (one of ``ENGINES``; None or "auto": the first available); an
    ``Ideo4Error`` in one line naming what to install when it is not installed."""
    raise NotImplementedError
