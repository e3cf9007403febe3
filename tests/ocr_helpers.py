"""What the OCR tests share: an engine or a skip (a failure under ``IDEO4_REQUIRE_OCR=1``, which
CI sets), and text rendered with PIL in a given font, size, colour and angle."""

import importlib.util
import os
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont, features

from ideogram4_mlx import ocr

FONTS = Path("/usr/share/fonts")
DEJAVU = FONTS / "truetype/dejavu/DejaVuSans.ttf"
DEJAVU_BOLD = FONTS / "truetype/dejavu/DejaVuSans-Bold.ttf"
DEJAVU_SERIF = FONTS / "truetype/dejavu/DejaVuSerif.ttf"
NOTO_SANS = FONTS / "truetype/noto/NotoSans-Regular.ttf"
NOTO_CJK = FONTS / "opentype/noto/NotoSansCJK-Regular.ttc"
NOTO_ARABIC = FONTS / "truetype/noto/NotoSansArabic-Regular.ttf"
NOTO_DEVANAGARI = FONTS / "truetype/noto/NotoSansDevanagari-Regular.ttf"
APT_FONTS = "apt-get install fonts-dejavu-core fonts-noto-core fonts-noto-cjk"


def required() -> bool:
    return os.environ.get("IDEO4_REQUIRE_OCR") == "1"


def unavailable(reason: str):
    if required():
        pytest.fail(f"IDEO4_REQUIRE_OCR=1, but {reason}")
    pytest.skip(reason)


def require_module(name: str):
    """At a test file's top: skip it when ``name`` (of the ocr extra) is missing; a failure
    under ``IDEO4_REQUIRE_OCR=1``."""
    if importlib.util.find_spec(name) is None:
        reason = f'{name} missing: pip install "ideogram4-mlx[ocr]"'
        if required():
            pytest.fail(f"IDEO4_REQUIRE_OCR=1, but {reason}", pytrace=False)
        pytest.skip(reason, allow_module_level=True)


def require_engine(name: str):
    """Engine ``name``, or a skip (a failure under ``IDEO4_REQUIRE_OCR=1``)."""
    try:
        return ocr.get_engine(name)
    except ocr.OCRUnavailableError as e:
        unavailable(str(e))


def font(path: Path, size: int) -> ImageFont.FreeTypeFont:
    """``path`` at ``size`` px; Arabic and Devanagari need libraqm to shape their letters."""
    if not path.exists():
        unavailable(f"{path} missing: {APT_FONTS}")
    if path in (NOTO_ARABIC, NOTO_DEVANAGARI) and not features.check("raqm"):
        unavailable("Pillow was built without libraqm: Arabic and Devanagari render unshaped")
    return ImageFont.truetype(str(path), size)


def render(
    text: str,
    path: Path = DEJAVU_BOLD,
    size: int = 48,
    at: tuple[int, int] = (40, 40),
    canvas: tuple[int, int] = (640, 320),
    colours: tuple[str, str] = ("white", "black"),
    angle: float = 0.0,
) -> Image.Image:
    """``text`` drawn at ``at`` (its top left) on a ``canvas``, ``colours`` (ground, ink),
    the whole image turned by ``angle`` degrees about its centre."""
    image = Image.new("RGB", canvas, colours[0])
    ImageDraw.Draw(image).text(at, text, font=font(path, size), fill=colours[1])
    if angle:
        image = image.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=colours[0])
    return image
