"""OCR engines that read an image's text: Apple's Vision framework on macOS, RapidOCR (ONNX
models in its wheel) elsewhere, Tesseract where installed (docs/TEXT_CHECK.md).

Each engine has a ``name``, the ``scripts`` it reads (names from :func:`scripts_of`) and
``read(image, scripts=None)``: the lines it reads, in pixels of ``image``. ``scripts`` is a hint
(the scripts of the text looked for): engines that take a language pick theirs from it.
:func:`get_engine` makes each engine once (models load once) and keeps it.
"""

from __future__ import annotations

import io
import math
import platform
import shutil
import threading
import unicodedata
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image, ImageOps

from ideogram4_mlx.errors import Ideo4Error, InputError

ENGINES = ("vision", "rapidocr", "tesseract")
AUTO = "auto"
MAX_SIDE = 2048  # larger images are read downscaled to this side (boxes mapped back)
MAX_PIXELS = 8192 * 8192  # refused above this: bounds the work before any resize
TESSERACT_TIMEOUT_S = 60  # one tesseract run; a larger image is refused, not waited on
PIP_INSTALL = 'pip install "ideogram4-mlx[ocr]"'
# The Debian packages of tesseract and the language packs this module maps scripts to.
APT_INSTALL = (
    "apt-get install tesseract-ocr tesseract-ocr-eng tesseract-ocr-chi-sim tesseract-ocr-jpn "
    "tesseract-ocr-kor tesseract-ocr-rus tesseract-ocr-ara tesseract-ocr-hin"
)

# Script names (scripts_of) as people read them, for messages.
SCRIPT_NAMES = {
    "latin": "Latin", "greek": "Greek", "cyrillic": "Cyrillic", "han": "Chinese characters",
    "hiragana": "Japanese kana", "katakana": "Japanese kana", "hangul": "Korean",
    "arabic": "Arabic", "hebrew": "Hebrew", "devanagari": "Devanagari", "thai": "Thai",
}  # fmt: skip
# PP-OCR's Chinese model in the rapidocr wheel: Latin, Chinese and Japanese. Its other
# languages are separate downloads, never fetched here (the engine stays offline).
RAPIDOCR_SCRIPTS = frozenset({"latin", "han", "hiragana", "katakana"})
# Tesseract language packs by script; the first installed one of a script is used.
TESSERACT_LANGS = {
    "latin": ("eng",), "cyrillic": ("rus",), "han": ("chi_sim", "jpn"),
    "hiragana": ("jpn",), "katakana": ("jpn",), "hangul": ("kor",), "arabic": ("ara",),
    "devanagari": ("hin",), "greek": ("ell",), "hebrew": ("heb",), "thai": ("tha",),
}  # fmt: skip
# Vision's recognition languages (BCP 47) by script, in the order it is asked for them.
VISION_LANGS = {
    "latin": ("en-US", "fr-FR", "de-DE"), "cyrillic": ("ru-RU", "uk-UA"),
    "han": ("zh-Hans", "zh-Hant"), "hiragana": ("ja-JP",), "katakana": ("ja-JP",),
    "hangul": ("ko-KR",), "arabic": ("ar-SA",), "thai": ("th-TH",),
}  # fmt: skip


class OCRUnavailableError(Ideo4Error):
    """An OCR engine that is not installed here: the message names the install."""


class OCRError(Ideo4Error):
    """An installed engine that failed on an image (a crash, a timeout)."""


@dataclass(frozen=True)
class OCRLine:
    """One piece of text read: ``box`` ``(x0, y0, x1, y1)`` in pixels (the axis-aligned box
    around what was read), ``confidence`` 0..1 as the engine reports it."""

    text: str
    box: tuple[float, float, float, float]
    confidence: float


class OCREngine(Protocol):
    name: str
    scripts: frozenset[str]

    def read(self, image: Image.Image, scripts: frozenset[str] | None = None) -> list[OCRLine]: ...


def scripts_of(text: str) -> frozenset[str]:
    """The scripts of ``text``'s letters ("latin", "han", "hiragana", "arabic", ...; the first
    word of each letter's Unicode name); digits, marks and punctuation belong to none."""
    found = set()
    for ch in unicodedata.normalize("NFKC", text):
        if unicodedata.category(ch)[0] != "L":
            continue
        word = unicodedata.name(ch, "").split(" ")[0].lower()
        found.add({"cjk": "han", "katakana-hiragana": "katakana"}.get(word, word))
    return frozenset(found - {""})


def script_names(scripts) -> str:
    """``{"arabic", "hangul"}`` -> ``"Arabic, Korean"``."""
    return ", ".join(sorted({SCRIPT_NAMES.get(s, s.title()) for s in scripts}))


def default_engine() -> str:
    """This platform's default engine: Vision on macOS, RapidOCR elsewhere."""
    return "vision" if platform.system() == "Darwin" else "rapidocr"


def available_engines() -> list[str]:
    """The engines installed here, the platform's default first."""
    found = [name for name in ENGINES if _missing(name) is None]
    return sorted(found, key=lambda name: name != default_engine())


def get_engine(name: str | None = None) -> OCREngine:
    """Engine ``name`` (one of ``ENGINES``; None or "auto": the installed engines together,
    the default first, each element read by the first that reads its scripts); an
    ``OCRUnavailableError`` in one line naming what to install when it is not installed."""
    if name is None or name == AUTO:
        installed = available_engines()
        if not installed:
            raise OCRUnavailableError(f"no OCR engine is installed: {_install_hint()}")
        return AutoEngine(installed)
    if name not in ENGINES:
        raise InputError(f"unknown OCR engine {name!r}: use one of {', '.join(ENGINES)} or auto")
    with _MAKING:  # the server's request and worker threads share the engines
        if name not in _MADE:
            missing = _missing(name)
            if missing is not None:
                raise OCRUnavailableError(missing)
            _MADE[name] = _MAKERS[name]()
        return _MADE[name]


_MADE: dict[str, OCREngine] = {}  # one engine per name per process: models load once
_MAKING = threading.RLock()  # AutoEngine makes its members through get_engine


def _install_hint() -> str:
    if platform.system() == "Darwin":
        return PIP_INSTALL
    return f"{PIP_INSTALL} (rapidocr), or {APT_INSTALL} (tesseract)"


def _missing(name: str) -> str | None:
    """Why engine ``name`` cannot run here (one line with the install), None when it can."""
    if name == "vision":
        if platform.system() != "Darwin":
            return "the vision OCR engine is Apple's Vision framework: macOS only"
        if not _importable("Vision"):
            return f"the vision OCR engine needs pyobjc-framework-Vision: {PIP_INSTALL}"
    elif name == "rapidocr":
        if not (_importable("rapidocr") and _importable("onnxruntime")):
            return f"the rapidocr OCR engine needs rapidocr and onnxruntime: {PIP_INSTALL}"
    elif name == "tesseract":
        if not _importable("pytesseract"):
            return f"the tesseract OCR engine needs pytesseract: {PIP_INSTALL}"
        if shutil.which("tesseract") is None:
            return f"the tesseract OCR engine needs the tesseract program: {APT_INSTALL}"
    return None


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


class AutoEngine:
    """The installed engines together: ``read`` goes to the first (the default first) whose
    ``scripts`` cover the hint, so Arabic reaches tesseract while Latin stays on the default."""

    def __init__(self, names: list[str]):
        self.members, failures = [], []
        for name in names:
            try:
                self.members.append(get_engine(name))
            except OCRUnavailableError as e:  # installed but not running: use the others
                failures.append(e)
        if not self.members:
            raise failures[0]
        self.name = "+".join(m.name for m in self.members)
        self.scripts = frozenset().union(*(m.scripts for m in self.members))

    def engine_for(self, scripts: frozenset[str] | None) -> OCREngine:
        for member in self.members:
            if not scripts or scripts <= member.scripts:
                return member
        return self.members[0]

    def read(self, image: Image.Image, scripts: frozenset[str] | None = None) -> list[OCRLine]:
        return self.engine_for(scripts).read(image, scripts)


def engine_reading(scripts: frozenset[str]) -> str | None:
    """The first installed engine that reads every script of ``scripts`` (None: none does)."""
    for name in available_engines():
        if scripts <= get_engine(name).scripts:
            return name
    return None


def bounded(image: Image.Image) -> tuple[Image.Image, float]:
    """``image`` in RGB, downscaled to at most ``MAX_SIDE`` a side, and the factor that maps
    its pixels back to the original's; an InputError past ``MAX_PIXELS``."""
    if image.width * image.height > MAX_PIXELS:
        raise InputError(
            f"the image is {image.width}x{image.height}: OCR reads at most "
            f"{MAX_PIXELS // 1_000_000} megapixels; downscale it first"
        )
    image = image.convert("RGB")
    scale = max(image.width, image.height) / MAX_SIDE
    if scale <= 1:
        return image, 1.0
    size = (max(1, round(image.width / scale)), max(1, round(image.height / scale)))
    return image.resize(size, Image.Resampling.LANCZOS), scale


def _scaled(lines: list[OCRLine], scale: float) -> list[OCRLine]:
    if scale == 1.0:
        return lines
    return [OCRLine(ln.text, tuple(v * scale for v in ln.box), ln.confidence) for ln in lines]


class RapidOCREngine:
    """PP-OCR (detection, orientation, Chinese+Latin recognition) through onnxruntime; the
    models ship in the rapidocr wheel and nothing is downloaded."""

    name = "rapidocr"
    scripts = RAPIDOCR_SCRIPTS

    def __init__(self):
        from rapidocr import RapidOCR  # optional dependency (the ocr extra)

        # Detection at most 1024 a side (limit_type "min" would upscale every small image);
        # lang and model fixed to those in the wheel, so no model is ever fetched.
        self._ocr = RapidOCR(
            params={
                "Global.log_level": "error",
                "Det.limit_type": "max",
                "Det.limit_side_len": 1024,
                "Det.lang_type": "ch",
                "Rec.lang_type": "ch",
            }
        )

    def read(self, image: Image.Image, scripts: frozenset[str] | None = None) -> list[OCRLine]:
        image, scale = bounded(image)
        try:
            out = self._ocr(np.asarray(image))
        except Exception as e:  # onnxruntime and opencv raise their own types
            raise OCRError(f"rapidocr failed on a {image.width}x{image.height} image: {e}") from e
        if out.txts is None:
            return []
        lines = [
            OCRLine(text, _quad_box(quad), float(score))
            for text, score, quad in zip(out.txts, out.scores, out.boxes, strict=True)
            if text.strip()
        ]
        return _scaled(lines, scale)


def _quad_box(quad) -> tuple[float, float, float, float]:
    """A (4, 2) quadrilateral -> the axis-aligned ``(x0, y0, x1, y1)`` around it."""
    xs, ys = [float(p[0]) for p in quad], [float(p[1]) for p in quad]
    return (min(xs), min(ys), max(xs), max(ys))


class TesseractEngine:
    """Tesseract through pytesseract, the language packs picked from the scripts hint; reads
    the scripts whose packs are installed."""

    name = "tesseract"

    def __init__(self):
        import pytesseract  # optional dependency (the ocr extra); the program comes from apt

        self._tess = pytesseract
        try:
            installed = set(pytesseract.get_languages(config=""))
        except Exception as e:  # pytesseract raises its own types and OSError
            raise OCRUnavailableError(f"tesseract does not run ({e}): {APT_INSTALL}") from e
        self._langs = {
            script: next(lang for lang in langs if lang in installed)
            for script, langs in TESSERACT_LANGS.items()
            if any(lang in installed for lang in langs)
        }
        self.scripts = frozenset(self._langs)

    def languages(self, scripts: frozenset[str] | None) -> str:
        """The ``-l`` argument for ``scripts``: each script's pack (Japanese covers Han when
        kana are present), English when the hint names none."""
        if scripts and scripts & {"hiragana", "katakana"} and "jpn" in self._langs.values():
            scripts = scripts - {"han"}
        langs = sorted({self._langs[s] for s in scripts or () if s in self._langs})
        return "+".join(langs) or self._langs.get("latin", "eng")

    def read(self, image: Image.Image, scripts: frozenset[str] | None = None) -> list[OCRLine]:
        image, scale = bounded(image)
        grey = ImageOps.grayscale(image)
        if np.median(np.asarray(grey)) < 128:  # light text on a dark ground: tesseract wants dark
            grey = ImageOps.invert(grey)
        zoom = 2 if grey.height < 96 else 1  # a lone line of small text reads better enlarged
        if zoom > 1:
            grey = grey.resize((grey.width * zoom, grey.height * zoom), Image.Resampling.LANCZOS)
        try:
            data = self._tess.image_to_data(
                grey,
                lang=self.languages(scripts),
                config="--psm 11" if grey.height > 400 else "--psm 6",
                output_type=self._tess.Output.DICT,
                timeout=TESSERACT_TIMEOUT_S,
            )
        except Exception as e:  # pytesseract raises RuntimeError on a timeout, its own otherwise
            raise OCRError(f"tesseract failed on a {image.width}x{image.height} image: {e}") from e
        return _scaled(_tesseract_lines(data), scale / zoom)


def _tesseract_lines(data: dict) -> list[OCRLine]:
    """image_to_data's words grouped into lines (block, paragraph, line), in its order."""
    lines: dict[tuple, list[int]] = {}
    for i, word in enumerate(data["text"]):
        if word.strip() and float(data["conf"][i]) >= 0:
            key = (data["block_num"][i], data["par_num"][i], data["line_num"][i])
            lines.setdefault(key, []).append(i)
    out = []
    for words in lines.values():
        x0 = min(data["left"][i] for i in words)
        y0 = min(data["top"][i] for i in words)
        x1 = max(data["left"][i] + data["width"][i] for i in words)
        y1 = max(data["top"][i] + data["height"][i] for i in words)
        conf = sum(float(data["conf"][i]) for i in words) / len(words) / 100
        text = " ".join(data["text"][i] for i in words)
        out.append(OCRLine(text, (float(x0), float(y0), float(x1), float(y1)), conf))
    return out


class VisionEngine:
    """Apple's Vision text recognition (VNRecognizeTextRequest, accurate, no language
    correction), languages from the scripts hint; macOS only."""

    name = "vision"

    def __init__(self):
        import objc  # optional dependency (pyobjc-framework-Vision, macOS only)
        import Vision

        self._objc, self._vision = objc, Vision
        with objc.autorelease_pool():
            request = Vision.VNRecognizeTextRequest.alloc().init()
            request.setRecognitionLevel_(Vision.VNRequestTextRecognitionLevelAccurate)
            supported, _ = request.supportedRecognitionLanguagesAndReturnError_(None)
        self._supported = [str(lang) for lang in supported or ()]
        self.scripts = frozenset(
            script
            for script, langs in VISION_LANGS.items()
            if any(lang in self._supported for lang in langs)
        )

    def languages(self, scripts: frozenset[str] | None) -> list[str]:
        """The recognition languages for ``scripts`` that this macOS supports (Japanese first
        when kana are present: it also reads Han); English when the hint names none."""
        order = sorted(scripts or {"latin"}, key=lambda s: s not in {"hiragana", "katakana"})
        wanted = [lang for s in order for lang in VISION_LANGS.get(s, ())]
        return [lang for lang in dict.fromkeys(wanted) if lang in self._supported] or ["en-US"]

    def read(self, image: Image.Image, scripts: frozenset[str] | None = None) -> list[OCRLine]:
        image, scale = bounded(image)
        png = io.BytesIO()
        image.save(png, format="PNG")
        vision = self._vision
        with self._objc.autorelease_pool():
            request = vision.VNRecognizeTextRequest.alloc().init()
            request.setRecognitionLevel_(vision.VNRequestTextRecognitionLevelAccurate)
            request.setUsesLanguageCorrection_(False)  # we score spelling; do not correct it
            request.setRecognitionLanguages_(self.languages(scripts))
            handler = vision.VNImageRequestHandler.alloc().initWithData_options_(
                png.getvalue(), None
            )
            ok, error = handler.performRequests_error_([request], None)
            if not ok:
                raise OCRError(f"Vision failed on a {image.width}x{image.height} image: {error}")
            lines = [_vision_line(obs, image.width, image.height) for obs in request.results()]
        return _scaled([ln for ln in lines if ln is not None], scale)


def _vision_line(observation, width: int, height: int) -> OCRLine | None:
    """One VNRecognizedTextObservation as an OCRLine: its box is normalised with the origin
    at the bottom left; ours is in pixels from the top left."""
    candidates = observation.topCandidates_(1)
    if not candidates:
        return None
    best = candidates[0]
    rect = observation.boundingBox()
    x0 = rect.origin.x * width
    x1 = (rect.origin.x + rect.size.width) * width
    y0 = (1 - rect.origin.y - rect.size.height) * height
    y1 = (1 - rect.origin.y) * height
    conf = float(best.confidence())
    return OCRLine(str(best.string()), (x0, y0, x1, y1), conf if math.isfinite(conf) else 0.0)


_MAKERS = {"vision": VisionEngine, "rapidocr": RapidOCREngine, "tesseract": TesseractEngine}
