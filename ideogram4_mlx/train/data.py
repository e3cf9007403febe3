"""A training folder: images with a caption each, checked at once, sorted into size buckets.

    samples = scan_dataset(folder)                 # every problem at once, before any model
    buckets = assign_buckets(samples, resolution)  # {(w, h): [sample index, ...]}
    for batch in epoch_batches(buckets, batch_size, seed, epoch): ...

A sample is an image (``.jpg``, ``.jpeg``, ``.png``, ``.webp``) with ``NAME.json`` beside it,
a caption in the Ideogram 4 schema, or ``NAME.txt``, a plain idea the magic prompt turns into
one (only with ``allow_txt``). Only the folder's own files count (no subfolders, no hidden
files; other suffixes are ignored). Images load as Pillow users expect (``edit.load_image``:
EXIF orientation, transparency on white) and are resized to cover their bucket, then
centre-cropped, so datasets of mixed sizes train together, a batch never mixing two sizes.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ideogram4_mlx.caption import parse_json, read_text_file, verify
from ideogram4_mlx.constants import PIXELS_PER_TOKEN
from ideogram4_mlx.edit import fit, load_image, to_rgb
from ideogram4_mlx.errors import InputError
from ideogram4_mlx.files import FORCE_HINT
from ideogram4_mlx.request import MAX_ASPECT, MAX_SIDE, MIN_SIDE, check_size

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
CAPTION_SUFFIXES = (".json", ".txt")
# Bounds on what a folder can make the scan read: a LoRA trains on tens to thousands of images.
MAX_SAMPLES = 20_000
MAX_FOLDER_ENTRIES = 4 * MAX_SAMPLES
MAX_IMAGE_FILE_BYTES = 128 * 2**20
# A long report is cut here (the count of the rest follows): the first problems show the pattern.
MAX_REPORTED = 50
# Width:height ratios a bucket can have (each also turned portrait); all within MAX_ASPECT.
ASPECTS = ((1, 1), (5, 4), (4, 3), (3, 2), (16, 9), (2, 1), (21, 9), (3, 1), (4, 1), (6, 1))
DEFAULT_RESOLUTION = 1024


class DatasetError(InputError):
    """A training folder that cannot be used: every problem found, one line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = problems[:MAX_REPORTED]
        more = len(problems) - len(shown)
        super().__init__("\n".join(shown + ([f"... and {more} more"] if more else [])))


@dataclass(frozen=True)
class Sample:
    """One image of the folder and its caption, as scanned (the pixels are not kept)."""

    image: Path
    caption_file: Path
    caption: str | None  # the JSON caption's text; None for an idea the magic prompt expands
    idea: str | None  # a NAME.txt's text (allow_txt), else None
    size: tuple[int, int]  # (width, height) after the EXIF orientation
    sha256: str  # of the decoded pixels (edit.fingerprint): a cache key part


def scan_dataset(folder: Path | str, allow_txt: bool = False) -> list[Sample]:
    """The samples of ``folder``, sorted by image name. Raises ``DatasetError`` listing every
    problem, one line each naming the file: an image without a caption or a caption without an
    image, an unreadable, truncated or oversized image, a caption that is not valid JSON (or not
    a JSON object), a ``.txt`` caption without ``allow_txt``, an empty folder. Caption verifier
    findings are warnings (one ``warnings.warn`` per file): such captions still train."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"training folder {folder} is not a folder")
    images, captions, problems = _list_folder(folder)
    samples = []
    for stem in sorted(set(images) | set(captions)):
        found_images, found_captions = images.get(stem, []), captions.get(stem, [])
        problem = _pairing_problem(folder, stem, found_images, found_captions)
        if problem is not None:
            problems.append(problem)
            continue
        image, caption_file = found_images[0], found_captions[0]
        try:
            sample = _scan_sample(image, caption_file, allow_txt)
        except (InputError, OSError) as e:
            problems.append(str(e))
            continue
        samples.append(sample)
    if not samples and not problems:
        problems.append(
            f"training folder {folder} holds no samples: put images "
            f"({', '.join(IMAGE_SUFFIXES)}) there, each with NAME.json (a caption) beside it"
        )
    if problems:
        raise DatasetError(problems)
    return samples


def _list_folder(folder: Path) -> tuple[dict, dict, list[str]]:
    """The folder's images and captions by stem; files too many or too large are problems."""
    images: dict[str, list[Path]] = {}
    captions: dict[str, list[Path]] = {}
    problems = []
    entries = 0
    for path in folder.iterdir():
        entries += 1
        if entries > MAX_FOLDER_ENTRIES:
            raise DatasetError([f"training folder {folder} holds over {MAX_FOLDER_ENTRIES} files"])
        suffix = path.suffix.lower()
        if path.name.startswith(".") or suffix not in IMAGE_SUFFIXES + CAPTION_SUFFIXES:
            continue
        if not path.is_file():
            continue  # a folder named like an image
        (images if suffix in IMAGE_SUFFIXES else captions).setdefault(path.stem, []).append(path)
    if len(images) > MAX_SAMPLES:
        problems.append(
            f"training folder {folder} holds {len(images)} images; the limit is {MAX_SAMPLES}"
        )
    return images, captions, problems


def _pairing_problem(folder: Path, stem: str, images: list, captions: list) -> str | None:
    names = ", ".join(p.name for p in sorted(images + captions))
    if not images:
        return (
            f"{folder / stem}: caption {names} has no image beside it "
            f"(expected {stem}{' or '.join(IMAGE_SUFFIXES)})"
        )
    if not captions:
        return f"{images[0]} has no caption: add {stem}.json (an Ideogram 4 caption) beside it"
    if len(images) > 1 or len(captions) > 1:
        return f"{folder / stem}: {names} share one name; keep one image and one caption per name"
    return None


def _scan_sample(image: Path, caption_file: Path, allow_txt: bool) -> Sample:
    """One sample read and checked: the caption first (cheap), then the whole image decoded."""
    text = read_text_file(caption_file, encoding="utf-8-sig")
    caption = idea = None
    if caption_file.suffix.lower() == ".txt":
        if not allow_txt:
            raise InputError(
                f"{caption_file} is plain text: write a JSON caption {caption_file.stem}.json, "
                "or pass --allow-txt (allow_txt=True) to expand it with the magic prompt"
            )
        idea = text.strip()
        if not idea:
            raise InputError(f"{caption_file} is empty: write the image's description in it")
    else:
        caption = _json_caption(caption_file, text)
    size = image.stat().st_size
    if size > MAX_IMAGE_FILE_BYTES:
        raise InputError(
            f"image {image} is {size / 2**20:.0f} MiB, over the "
            f"{MAX_IMAGE_FILE_BYTES // 2**20} MiB limit: downscale it first"
        )
    loaded = load_image(image)
    return Sample(image, caption_file, caption, idea, loaded.size, loaded.sha256)


def _json_caption(path: Path, text: str) -> str:
    try:
        obj = parse_json(text)
    except json.JSONDecodeError as e:
        raise InputError(
            f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    except InputError as e:  # nested too deep
        raise InputError(f"{path}: {e}") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path} holds a JSON {type(obj).__name__}, not a caption object")
    findings = verify(obj)
    if findings:
        more = f" (and {len(findings) - 1} more)" if len(findings) > 1 else ""
        warnings.warn(f"{path}: {findings[0]}{more}", stacklevel=3)
    return text.strip()


def check_output(out: Path | str, force: bool = False, resume: bool = False) -> Path:
    """The LoRA file to write: ``.safetensors``, not a link or a folder, and new unless
    ``force`` (or ``resume``, which continues the run that writes it). Raises ``InputError``
    or ``FileExistsError``."""
    out = Path(out).expanduser()
    if out.suffix.lower() != ".safetensors":
        raise InputError(f"output {out} must end in .safetensors (the LoRA file)")
    if out.is_symlink():
        raise FileExistsError(
            f"{out} is a symbolic link; outputs are never written through a link: choose "
            "another name"
        )
    if out.is_dir():
        raise FileExistsError(f"{out} is a folder; give a file name ending in .safetensors")
    if out.exists() and not (force or resume):
        raise FileExistsError(f"{out} already exists; {FORCE_HINT}")
    return out


def preflight(
    folder: Path | str,
    out: Path | str,
    resolution: int = DEFAULT_RESOLUTION,
    allow_txt: bool = False,
    force: bool = False,
    resume: bool = False,
) -> list[Sample]:
    """Every check training can make without a model, all reported at once (``DatasetError``,
    one line each): the output (:func:`check_output`), the resolution and the training folder
    (:func:`scan_dataset`). Returns the samples."""
    problems, samples = [], []
    for check in (lambda: check_output(out, force, resume), lambda: bucket_sizes(resolution)):
        try:
            check()
        except (InputError, OSError) as e:
            problems.append(str(e))
    try:
        samples = scan_dataset(folder, allow_txt)
    except DatasetError as e:
        problems += e.problems
    except (InputError, OSError) as e:
        problems.append(str(e))
    if problems:
        raise DatasetError(problems)
    return samples


# -- buckets ----------------------------------------------------------------------------------


def check_resolution(resolution: int) -> int:
    if (
        not isinstance(resolution, int)
        or resolution % PIXELS_PER_TOKEN
        or not MIN_SIDE <= resolution <= MAX_SIDE
    ):
        raise InputError(
            f"resolution {resolution!r} is not supported: use a multiple of "
            f"{PIXELS_PER_TOKEN} between {MIN_SIDE} and {MAX_SIDE} (the side of a square bucket)"
        )
    return resolution


def bucket_sizes(resolution: int = DEFAULT_RESOLUTION) -> list[tuple[int, int]]:
    """The (width, height) buckets at ``resolution``: one per ratio of ``ASPECTS`` (landscape
    and portrait), about ``resolution**2`` pixels, sides multiples of 16 within the request
    bounds (a side clamped to them changes the ratio), no two the same."""
    check_resolution(resolution)
    sizes = []
    for w, h in ASPECTS:
        for a in (w / h, h / w):
            size = tuple(
                min(MAX_SIDE, max(MIN_SIDE, PIXELS_PER_TOKEN * round(side / PIXELS_PER_TOKEN)))
                for side in (resolution * math.sqrt(a), resolution / math.sqrt(a))
            )
            if size not in sizes and max(size) / min(size) <= MAX_ASPECT:
                check_size(*size)
                sizes.append(size)
    return sizes


def closest_bucket(size: tuple[int, int], sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to ``size``'s (in log ratio; the first on a tie)."""
    ratio = math.log(size[0] / size[1])
    return min(sizes, key=lambda s: abs(math.log(s[0] / s[1]) - ratio))


def assign_buckets(
    sizes: list[tuple[int, int]], resolution: int = DEFAULT_RESOLUTION
) -> dict[tuple[int, int], list[int]]:
    """Image sizes (width, height) -> {bucket (width, height): the images' indices}, buckets
    in the order of :func:`bucket_sizes`, indices ascending."""
    choices = bucket_sizes(resolution)
    out: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        out.setdefault(closest_bucket(size, choices), []).append(i)
    return {b: out[b] for b in choices if b in out}


def epoch_batches(
    buckets: dict[tuple[int, int], list[int]], batch_size: int, seed: int, epoch: int
) -> list[list[int]]:
    """One epoch's batches: each bucket's indices shuffled and cut into ``batch_size`` (the
    last of a bucket may be smaller), then the batches shuffled. The same (seed, epoch) gives
    the same batches; a batch never mixes buckets."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size {batch_size!r} must be a whole number >= 1")
    rng = np.random.default_rng([seed, epoch])
    batches = []
    for indices in buckets.values():
        order = [indices[i] for i in rng.permutation(len(indices))]
        batches += [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def bucket_pixels(sample: Sample, bucket: tuple[int, int], flip: bool = False) -> np.ndarray:
    """A sample's image as the VAE encodes it: (H, W, 3) uint8, RGB (transparency on white),
    resized to cover ``bucket`` (width, height) and centre-cropped; mirrored left-right if
    ``flip``. An image changed since the scan is an ``InputError`` (its cache key is stale)."""
    loaded = load_image(sample.image)
    if loaded.sha256 != sample.sha256:
        raise InputError(f"image {sample.image} changed during training's preparation: run again")
    rgb = fit(to_rgb(loaded.image), bucket, Image.Resampling.LANCZOS)
    pixels = np.asarray(rgb)
    return np.ascontiguousarray(pixels[:, ::-1] if flip else pixels)
