"""Check the lettering of generated images and retry the seeds that got it wrong
(docs/TEXT_CHECK.md).

:func:`generate_checked` makes an image, reads its text back (``text_check.check_text``) and,
while an element scores under the threshold, tries the next seed, up to ``tries`` images. It
keeps the best (every element found, else the highest lowest score) and records every try in
its metadata under ``text_check``: the kept seed replays that image.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from ideogram4_mlx.batch import image_seeds
from ideogram4_mlx.errors import InputError
from ideogram4_mlx.generation import GenerationResult
from ideogram4_mlx.request import ResolvedRequest
from ideogram4_mlx.text_check import TEXT_THRESHOLD, TextReport, check_text

MAX_TRIES = 16  # images one --retry-text may make: a bound on the work a request can ask
METADATA_KEY = "text_check"


@dataclass(frozen=True)
class TextCheck:
    """How to check an image's text: ``ocr`` the engine (``ocr.ENGINES``; None: this
    platform's default), ``tries`` the most images to make (1: check, no retry),
    ``threshold`` the score an element needs (0..1)."""

    ocr: str | None = None
    tries: int = 1
    threshold: float = TEXT_THRESHOLD

    def __post_init__(self):
        if isinstance(self.tries, bool) or not isinstance(self.tries, int):
            raise InputError(f"retry_text must be a whole number, got {self.tries!r}")
        if not 1 <= self.tries <= MAX_TRIES:
            raise InputError(f"retry_text {self.tries}: use 1..{MAX_TRIES} images")
        if not isinstance(self.threshold, int | float) or isinstance(self.threshold, bool):
            raise InputError(f"text_threshold must be a number, got {self.threshold!r}")
        if not (math.isfinite(self.threshold) and 0 <= self.threshold <= 1):
            raise InputError(f"text_threshold {self.threshold}: use a number in 0..1")
        if self.ocr is not None and not isinstance(self.ocr, str):
            raise InputError(f"ocr must be an engine name, got {self.ocr!r}")

    def engine(self):
        """The OCR engine (``ocr.get_engine``: made once per process; ``Ideo4Error`` naming the
        install when it is not installed: call it before generating to fail first)."""
        from ideogram4_mlx.ocr import get_engine

        return get_engine(self.ocr)

    def check(self, result: GenerationResult) -> TextReport:
        """``result``'s text scores against the prompt it ran (the caption, after a magic
        prompt)."""
        return check_text(result.image, result.metadata["prompt"], self.engine(), self.threshold)


def text_check_from(
    check_text: bool = False, retry_text: int = 0, ocr: str | None = None, threshold=None
) -> TextCheck | None:
    """The API's and the commands' keywords as a :class:`TextCheck` (None: no check).
    ``retry_text`` N > 0 makes up to N images and implies ``check_text``; ``ocr`` or a
    ``threshold`` without either is an error, not ignored."""
    if isinstance(retry_text, bool) or not isinstance(retry_text, int) or retry_text < 0:
        raise InputError(f"retry_text must be a whole number >= 0, got {retry_text!r}")
    if not (check_text or retry_text):
        if ocr is not None or threshold is not None:
            raise InputError("ocr and text_threshold need check_text or retry_text")
        return None
    threshold = TEXT_THRESHOLD if threshold is None else threshold
    return TextCheck(ocr=ocr, tries=max(retry_text, 1), threshold=threshold)


def with_scores(
    result: GenerationResult, scores: TextReport, tries: list[dict] | None = None
) -> GenerationResult:
    """``result`` with ``text_scores`` set and the scores (and every try) in its metadata."""
    record = {**scores.to_metadata(), "seed": result.metadata.get("seed")}
    record["tries"] = tries if tries is not None else [_try(result, scores)]
    metadata = {**result.metadata, METADATA_KEY: record}
    return replace(result, metadata=metadata, text_scores=scores)


def _try(result: GenerationResult, scores: TextReport) -> dict:
    return {
        "seed": result.metadata.get("seed"),
        "passed": scores.passed,
        "worst": round(scores.worst, 4),
        "scores": [round(e.score, 4) for e in scores.elements],
    }


def generate_checked(
    generate: Callable[[ResolvedRequest], GenerationResult | None],
    request: ResolvedRequest,
    check: TextCheck,
    report: Callable[[str], None] | None = None,
) -> GenerationResult | None:
    """Up to ``check.tries`` images of ``request`` with seeds ``seed, seed + 1, ...`` (a
    random start when it has none), each checked; stops at the first whose every element is
    found. Returns the best with ``text_scores`` and its metadata's ``text_check`` (every
    try). ``report`` gets one line per element and try. None when ``generate`` returns None
    (a CFG-parallel rank 1, which makes one image: ``tries`` must be 1)."""
    check.engine()  # no OCR engine: fail before the first image
    seeds = image_seeds(request.request.seed, check.tries)
    tried: list[dict] = []
    best: tuple[tuple, GenerationResult, TextReport] | None = None
    for i, seed in enumerate(seeds):
        result = generate(request.with_seed(seed))
        if result is None:
            if check.tries > 1:
                raise InputError("retry_text needs the image on this process: not a rank 1")
            return None
        scores = check.check(result)
        tried.append(_try(result, scores))
        if report is not None:
            head = f"text check, seed {seed} ({i + 1}/{len(seeds)})"
            report(f"{head}: no text elements in the prompt" if not scores.elements else head)
            for line in scores.lines():
                report(f"  {line}")
        mean = sum(e.score for e in scores.elements) / max(len(scores.elements), 1)
        rank = (scores.passed, scores.worst, mean)
        if best is None or rank > best[0]:
            best = (rank, result, scores)
        if scores.passed:
            break
    _, result, scores = best
    if report is not None and len(tried) > 1:
        verdict = "passed" if scores.passed else "best of the tries, below the threshold"
        report(f"kept seed {result.metadata.get('seed')} ({verdict}), {len(tried)} tried")
    return with_scores(result, scores, tried)


def score_table(records: list[dict], width: int = 22) -> list[str]:
    """The ``text_check`` metadata of several images as a table: a row per image (its seed,
    each element's score, whether all were found), a column per element (its text, cut to
    ``width`` characters). Images whose elements differ (a magic prompt per seed) get a
    line per element instead."""
    if not records:
        return []
    texts = [e["text"] for e in records[0]["elements"]]
    if any([e["text"] for e in r["elements"]] != texts for r in records):
        lines = []
        for record in records:
            verdict = "all found" if record["passed"] else "not all found"
            lines.append(f"seed {record.get('seed')}: {verdict}")
            lines += [f'  "{_cut(e["text"], 60)}": {e["score"]:.2f}' for e in record["elements"]]
        return lines
    heads = ["seed", *(_cut(f'"{" ".join(t.split())}"', width) for t in texts), "all found"]
    rows = [
        [str(r.get("seed")), *(f"{e['score']:.2f}" for e in r["elements"]),
         "yes" if r["passed"] else "no"]
        for r in records
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in [heads, *rows]) for i in range(len(heads))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in [heads, *rows]]  # fmt: skip


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
