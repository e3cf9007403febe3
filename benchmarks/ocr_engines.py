"""The OCR engines side by side on rendered text (docs/TEXT_CHECK.md "Measured").

Each phrase is drawn with PIL in each of its fonts, twice (40 px black on white; 32 px cream on
navy turned 6 degrees), on a 640x320 image, and scored by ``text_check.check_text`` with each
installed engine (whole image, no bbox). Prints, per script and engine, the phrases found
(score >= 0.9) and the mean seconds per image, then one whole 1024x1024 image per engine.

    python benchmarks/ocr_engines.py [--engines rapidocr,tesseract] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ideogram4_mlx import ocr
from ideogram4_mlx.text_check import check_text

FONTS = Path("/usr/share/fonts")
DEJAVU_BOLD = FONTS / "truetype/dejavu/DejaVuSans-Bold.ttf"
DEJAVU_SERIF = FONTS / "truetype/dejavu/DejaVuSerif.ttf"
DEJAVU = FONTS / "truetype/dejavu/DejaVuSans.ttf"
NOTO_SANS = FONTS / "truetype/noto/NotoSans-Regular.ttf"
NOTO_CJK = FONTS / "opentype/noto/NotoSansCJK-Regular.ttc"
NOTO_ARABIC = FONTS / "truetype/noto/NotoSansArabic-Regular.ttf"
NOTO_DEVANAGARI = FONTS / "truetype/noto/NotoSansDevanagari-Regular.ttf"
LATIN_FONTS = (DEJAVU_BOLD, DEJAVU_SERIF, NOTO_SANS)

SCRIPTS = {
    "Latin": (
        ["GRAND OPENING", "Summer Jazz Night", "Fresh Coffee", "OPEN 24 HOURS", "Harbour Street"],
        LATIN_FONTS,
    ),
    "Chinese": (["东京拉面", "欢迎光临", "新年快乐", "咖啡馆", "书店"], (NOTO_CJK,)),
    "Japanese": (["ラーメン", "こんにちは", "東京タワー", "さくら", "コーヒー"], (NOTO_CJK,)),
    "Korean": (["서울 카페", "안녕하세요", "커피", "도서관", "봄날"], (NOTO_CJK,)),
    "Cyrillic": (
        ["Книжный магазин", "Добро пожаловать", "Кафе", "Москва", "Открыто"],
        LATIN_FONTS,
    ),
    "Arabic": (
        ["سوق الكتب القديمة", "مرحبا", "القاهرة", "مكتبة", "قهوة عربية"],
        (NOTO_ARABIC, DEJAVU),
    ),
    "Devanagari": (["नमस्ते", "दिल्ली", "चाय की दुकान", "स्वागत है", "पुस्तकालय"], (NOTO_DEVANAGARI,)),
}
STYLES = (("white", "black", 40, 0.0), ("#1B2A49", "#F4EBD9", 32, 6.0))


def render(text: str, font_path: Path, ground: str, ink: str, size: int, angle: float):
    image = Image.new("RGB", (640, 320), ground)
    font = ImageFont.truetype(str(font_path), size)
    ImageDraw.Draw(image).text((40, 120), text, font=font, fill=ink)
    if angle:
        image = image.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=ground)
    return image


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                 if ln.startswith("model name")]  # fmt: skip
        cpu = f"{len(names)} x {names[0]}" if names else cpu
    return f"{platform.system()} {platform.machine()}, {cpu}"


def caption(text: str) -> str:
    element = {"type": "text", "text": text, "desc": "a sign"}
    return json.dumps({"compositional_deconstruction": {"elements": [element]}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default=",".join(n for n in ("rapidocr", "tesseract")))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    engines = {}
    for name in args.engines.split(","):
        try:
            engines[name] = ocr.get_engine(name)
        except ocr.OCRUnavailableError as e:
            print(f"{name}: {e}")
    lines = [f"machine: {machine()}"]
    lines.append(f"{'script':<11}" + "".join(f"{n:>22}" for n in engines))
    for script, (phrases, fonts) in SCRIPTS.items():
        fonts = [f for f in fonts if f.exists()]
        row = f"{script:<11}"
        for engine in engines.values():
            found = total = 0
            unchecked = False
            seconds = 0.0
            for text in phrases:
                for path in fonts:
                    for ground, ink, size, angle in STYLES:
                        image = render(text, path, ground, ink, size, angle)
                        start = time.perf_counter()
                        report = check_text(image, caption(text), engine)
                        seconds += time.perf_counter() - start
                        element = report.elements[0]
                        total += 1
                        found += element.unchecked is None and element.found(report.threshold)
                        unchecked = element.unchecked is not None
            cell = (
                "not read" if total and unchecked else f"{found}/{total}, {seconds / total:.2f} s"
            )
            row += f"{cell:>22}"
        lines.append(row)
        print(lines[-1], flush=True)
    big = render("GRAND OPENING", DEJAVU_BOLD, "white", "black", 40, 0.0).resize((1024, 1024))
    for name, engine in engines.items():
        start = time.perf_counter()
        engine.read(big)
        lines.append(f"1024x1024 whole image, {name}: {time.perf_counter() - start:.2f} s")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
