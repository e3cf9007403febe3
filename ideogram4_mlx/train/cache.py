"""What training reads instead of the models: text features and VAE latents, encoded once.

    data = prepare_dataset(pipe, samples, resolution, cache_dir, flip=True)
    for batch in data.batches(batch_size, seed, epoch):
        latents, features, lengths = data.load_batch(batch)

Each entry is a safetensors file under ``cache_dir``, named by the SHA-256 of what made it, so
a second run (or another LoRA on the same images) encodes nothing, and a changed caption,
image, bucket, model or dtype never reads a stale entry:

- ``text/KEY.safetensors``: ``features`` (T, 13*D) in the pipeline dtype, KEY from the
  canonical caption, the text encoder's ``weights.fingerprint`` and the dtype;
- ``latents/KEY.safetensors``: ``latents`` (H/16 * W/16, 128) fp32, packed and normalised as
  image-to-image starts from (``vae.encode``), KEY from the pixels' SHA-256, the bucket,
  the mirroring, the VAE's fingerprint and the dtype;
- ``captions/KEY.json``: a ``NAME.txt`` idea expanded by the magic prompt (never written into
  the training folder), KEY from the idea, the bucket, the seed and the magic settings.

Entries are written atomically (``files.write_file``) and checked on every read (shape, dtype,
finite values); a damaged one is encoded again, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from tqdm import tqdm

from ideogram4_mlx.caption import parse_json, read_text_file
from ideogram4_mlx.constants import PACKED_CHANNELS, PIXELS_PER_TOKEN
from ideogram4_mlx.dtypes import dtype_name
from ideogram4_mlx.errors import InputError
from ideogram4_mlx.files import write_file
from ideogram4_mlx.prompt import canonical_prompt
from ideogram4_mlx.train.data import (
    DatasetError,
    Sample,
    assign_buckets,
    bucket_pixels,
    epoch_batches,
)
from ideogram4_mlx.vae import encode
from ideogram4_mlx.weights import fingerprint

# Bump when what an entry holds changes meaning (resize filter, packing): old entries go unused.
CACHE_VERSION = 1


@dataclass(frozen=True)
class CachedSample:
    """One training example: where its features and latents are, and its bucket."""

    image: Path
    caption: str  # the JSON caption it trains on (expanded from NAME.txt where it was one)
    features: Path  # text/KEY.safetensors
    latents: Path  # latents/KEY.safetensors
    bucket: tuple[int, int]  # (width, height)
    flipped: bool


@dataclass(frozen=True)
class TrainingData:
    """The cached examples (a mirrored copy of each image follows it with ``flip``) and their
    buckets ({(width, height): indices into ``items``})."""

    items: list[CachedSample]
    buckets: dict[tuple[int, int], list[int]]
    features_dtype: mx.Dtype

    def batches(self, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
        """One epoch's batches of indices (``data.epoch_batches``: one bucket each)."""
        return epoch_batches(self.buckets, batch_size, seed, epoch)

    def load_batch(self, indices: list[int]) -> tuple[mx.array, mx.array, list[int]]:
        """Latents (B, N, 128) fp32, text features (B, T_max, 13*D) fp32 left-padded with
        zero rows (as ``PromptEncoder.encode``), and each row's real token count."""
        latents, rows = [], []
        for i in indices:
            item = self.items[i]
            latents.append(read_latents(item.latents, item.bucket, strict=True))
            rows.append(read_features(item.features, self.features_dtype, strict=True))
        lengths = [r.shape[0] for r in rows]
        t_max = max(lengths)
        features = mx.stack([mx.pad(r, [(t_max - r.shape[0], 0), (0, 0)]) for r in rows])
        return mx.stack(latents), features.astype(mx.float32), lengths


def digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps([CACHE_VERSION, *parts], default=str).encode()).hexdigest()


def component_id(component_dir: Path, dtype: mx.Dtype) -> str:
    """A component's weights (``weights.fingerprint``) and the dtype it runs in."""
    return f"{fingerprint(component_dir)}:{dtype_name(dtype)}"


def write_entry(path: Path, arrays: dict[str, mx.array]) -> None:
    write_file(path, lambda f: mx.save_safetensors(f, arrays), force=True)


def read_entry(path: Path, name: str, ok, strict: bool) -> mx.array | None:
    """Array ``name`` of ``path`` if ``ok(array)`` and finite; else None (a warning when the
    file exists), or with ``strict`` an ``InputError`` (training reads what it prepared)."""
    if not path.is_file():
        problem = "is missing"
    else:
        try:
            array = mx.load(str(path)).get(name)
        except (ValueError, RuntimeError, OSError) as e:
            array, problem = None, f"cannot be read ({e})"
        else:
            problem = "holds the wrong array"
        if array is not None and ok(array):
            if mx.all(mx.isfinite(array)).item():
                return array
            problem = "holds NaN or infinite values"
    if strict:
        raise InputError(f"cache entry {path} {problem}: run train-lora again to rebuild it")
    if path.exists():
        warnings.warn(f"cache entry {path} {problem}: encoding it again", stacklevel=2)
    return None


def read_features(path: Path, dtype: mx.Dtype, strict: bool = False) -> mx.array | None:
    """Cached text features (T, 13*D) in ``dtype``, or None (see :func:`read_entry`)."""
    return read_entry(
        path, "features", lambda a: a.ndim == 2 and a.shape[0] > 0 and a.dtype == dtype, strict
    )


def read_latents(path: Path, bucket: tuple[int, int], strict: bool = False) -> mx.array | None:
    """Cached latents (H/16 * W/16, 128) fp32 of a (W, H) bucket, or None (:func:`read_entry`)."""
    tokens = (bucket[0] // PIXELS_PER_TOKEN) * (bucket[1] // PIXELS_PER_TOKEN)
    shape = (tokens, PACKED_CHANNELS)
    return read_entry(path, "latents", lambda a: a.shape == shape and a.dtype == mx.float32, strict)


def default_cache_dir(out: Path | str) -> Path:
    """``NAME.cache/`` beside the LoRA file ``NAME.safetensors``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.cache")


def prepare_dataset(
    pipe,
    samples: list[Sample],
    resolution: int,
    cache_dir: Path | str,
    flip: bool = False,
    seed: int = 0,
    verbose: bool = True,
) -> TrainingData:
    """Encode what is not cached yet: ``NAME.txt`` ideas to captions (``pipe.expand``), each
    caption to text features once (``pipe.encode``), each image once per bucket (and mirrored
    with ``flip``) to latents (``pipe.vae()``). The text encoder is released before the VAE
    loads, the VAE after; a fully cached run loads neither. ``pipe`` is an
    ``Ideogram4Pipeline`` (only ``checkpoint_dir``, ``dtype``, ``options``, ``expand``,
    ``prompt_encoder`` (its tokenizer), ``encode``, ``vae`` and ``release`` are used)."""
    cache_dir = Path(cache_dir).expanduser()
    by_bucket = assign_buckets([s.size for s in samples], resolution)
    bucket_of = {i: b for b, indices in by_bucket.items() for i in indices}
    text_id = component_id(pipe.checkpoint_dir / "text_encoder", pipe.dtype)
    captions = _captions(pipe, samples, bucket_of, cache_dir, text_id, seed, verbose)
    files = {}  # caption -> the first file that holds it (for messages)
    for c, s in zip(captions, samples, strict=True):
        files.setdefault(c, s.caption_file)
    features = _encode_captions(pipe, captions, files, cache_dir, text_id, verbose)
    latents = _encode_images(pipe, samples, bucket_of, cache_dir, flip, verbose)
    items, buckets = [], {}
    for i, sample in enumerate(samples):
        for mirrored in (False, True) if flip else (False,):
            buckets.setdefault(bucket_of[i], []).append(len(items))
            items.append(
                CachedSample(
                    sample.image,
                    captions[i],
                    features[captions[i]],
                    latents[i, mirrored],
                    bucket_of[i],
                    mirrored,
                )
            )
    ordered = {b: buckets[b] for b in by_bucket}
    return TrainingData(items, ordered, pipe.dtype)


def _captions(pipe, samples, bucket_of, cache_dir, text_id, seed, verbose) -> list[str]:
    """Each sample's JSON caption: its own, or its idea expanded (cached in captions/)."""
    out = [s.caption for s in samples]
    todo = [i for i, s in enumerate(samples) if s.caption is None]
    o = pipe.options
    magic = {**o.magic_options.as_kwargs(), "head": o.magic_head, "model": o.magic_model}
    for i in tqdm(todo, desc="magic prompt", unit="caption", disable=not verbose or not todo):
        (w, h), idea = bucket_of[i], samples[i].idea
        path = (
            cache_dir / "captions" / f"{digest('caption', idea, w, h, seed, text_id, magic)}.json"
        )
        out[i] = _read_caption(path)
        if out[i] is None:
            out[i] = pipe.expand(idea, w, h, seed)
            write_file(path, lambda f, c=out[i]: f.write(c.encode()), force=True)
    if todo:
        pipe.release("text_encoder")  # the magic prompt's model shares or is not the encoder
    return out


def _read_caption(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        text = read_text_file(path)
        if isinstance(parse_json(text), dict):
            return text
    except (InputError, ValueError):
        pass
    warnings.warn(f"cache entry {path} is not a JSON caption: expanding it again", stacklevel=2)
    return None


def _encode_captions(pipe, captions, files, cache_dir, text_id, verbose) -> dict[str, Path]:
    """caption -> its features' entry; encodes the captions not cached (each once), after
    checking that all of them fit the text encoder (``DatasetError`` naming each file)."""
    paths = {
        c: cache_dir / "text" / f"{digest('text', canonical_prompt(c), text_id)}.safetensors"
        for c in captions
    }
    todo = [c for c, p in paths.items() if read_features(p, pipe.dtype) is None]
    problems = []
    for caption in todo:  # the tokenizer only: too long a caption stops before the encoder loads
        try:
            pipe.prompt_encoder().token_ids(caption)
        except InputError as e:
            problems.append(f"{files[caption]}: {e}")
    if problems:
        raise DatasetError(problems)
    for caption in tqdm(
        todo, desc="text features", unit="caption", disable=not verbose or not todo
    ):
        features = pipe.encode(caption)[0].astype(pipe.dtype)
        write_entry(paths[caption], {"features": features})
    if todo:
        pipe.release("text_encoder")
    return paths


def _encode_images(pipe, samples, bucket_of, cache_dir, flip, verbose) -> dict:
    """(sample index, mirrored) -> its latents' entry; encodes the images not cached."""
    vae_id = component_id(pipe.checkpoint_dir / "vae", pipe.dtype)
    paths = {}
    for i, sample in enumerate(samples):
        for mirrored in (False, True) if flip else (False,):
            key = digest("latents", sample.sha256, bucket_of[i], mirrored, vae_id)
            paths[i, mirrored] = cache_dir / "latents" / f"{key}.safetensors"
    todo = [k for k, p in paths.items() if read_latents(p, bucket_of[k[0]]) is None]
    for i, mirrored in tqdm(todo, desc="latents", unit="image", disable=not verbose or not todo):
        pixels = bucket_pixels(samples[i], bucket_of[i], mirrored)
        latents = encode(pipe.vae(), pixels[None])[0]
        mx.eval(latents)
        write_entry(paths[i, mirrored], {"latents": latents})
    if todo:
        pipe.release("vae")
    return paths
