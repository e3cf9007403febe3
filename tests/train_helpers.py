"""A small training folder for the train-lora tests: images of given sizes, a caption each."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

# Verifier-clean (the schema's required keys), short: a few tokens for the tiny text encoder.
CAPTION = {
    "high_level_description": "A red square on a white wall.",
    "style_description": {
        "aesthetics": "plain",
        "lighting": "flat",
        "photo": "50mm lens",
        "medium": "photograph",
    },
    "compositional_deconstruction": {"background": "A white wall.", "elements": []},
}


def caption(text: str) -> str:
    return json.dumps({**CAPTION, "high_level_description": text})


def write_dataset(
    folder: Path, sizes: list[tuple[int, int]], captions: list[str] | None = None
) -> Path:
    """``folder/img{i}.png`` of each (width, height), smooth random pixels, with
    ``img{i}.json`` beside it (``captions[i]``, else a caption naming the image)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        rng = np.random.default_rng(i)
        small = rng.integers(0, 256, (max(1, h // 16), max(1, w // 16), 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR).save(
            folder / f"img{i}.png"
        )
        text = captions[i] if captions is not None else caption(f"Image number {i}.")
        (folder / f"img{i}.json").write_text(text, encoding="utf-8")
    return folder
