"""A description's inputs, checked before any model work: the image (read as an edit's input
is), the idea that steers a remix, the seed, the sampling settings and the system prompt. No
mlx-lm here, so the commands check their options with :func:`prepare` before loading.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ideogram4_mlx.edit import ImageInput, load_image, to_rgb
from ideogram4_mlx.magic.options import (
    DEFAULT_MAX_TOKENS,
    MagicPromptError,
    check_idea,
    check_sampling,
    check_system_prompt,
)
from ideogram4_mlx.request import MAX_SEED

# Describing is transcription, not invention: greedy decoding by default (the same image gives
# the same caption); a temperature > 0 samples, seeded by ``seed``.
DEFAULT_TEMPERATURE = 0.0

# Written for this project from MODEL_NOTES#caption-schema; --system-prompt replaces it.
SYSTEM_PROMPT = """\
You look at one image and write the caption a text-to-image model would need to draw it \
again. Reply with one JSON object and nothing else.

Keys, in this order:
- "high_level_description": two or three sentences saying what the image shows as a whole: \
its subject, its setting and what kind of picture it is.
- "style_description" (optional): an object with "aesthetics" (mood, composition, colour \
feel), "lighting", then for a photograph "photo" (camera, lens, depth of field, angle) \
followed by "medium", otherwise "medium" followed by "art_style"; optionally \
"color_palette", up to 16 dominant colours as uppercase "#RRGGBB".
- "compositional_deconstruction": an object with "background" (what lies behind the \
subjects, in one or two sentences) and "elements", the visible things, most prominent first. \
Give one element per object: {"type": "obj", "desc": ...}, and one element per separate \
piece of lettering: {"type": "text", "text": ..., "desc": ...}, where "text" is the \
lettering exactly as it reads (same spelling, capitals and script) and "desc" its font, \
size, colour and place. An element may end with "color_palette", up to 5 colours.

Describe only what is visible: shapes, materials, colours, positions, light. Do not \
invent lettering that is not in the image, and do not translate or correct the lettering \
that is."""

BBOX_NOTE = """

After "type", an element may give "bbox": [y_min, x_min, y_max, x_max], integers on a \
0..1000 grid of the image's height and width, the box around that element."""


class DescribeError(MagicPromptError):
    """The image cannot be described into a valid caption (a bad input, or out of tokens)."""


def check_remix_idea(idea: object) -> str | None:
    """The steering idea, stripped (1 to ``MAX_IDEA_CHARS`` characters), or None for none."""
    if idea is None or isinstance(idea, str) and not idea.strip():
        return None
    try:
        return check_idea(idea)
    except MagicPromptError as e:
        raise DescribeError(str(e)) from None


def image_to_describe(image: ImageInput, what: str = "image") -> Image.Image:
    """An image as the describe model sees it: read as an edit's input (``InputError`` or
    ``FileNotFoundError`` naming it), EXIF rotation applied, transparency on white, RGB."""
    return to_rgb(load_image(image, what).image)


@dataclass(frozen=True)
class DescribeTask:
    """One description, checked (:func:`prepare`): the image as the model sees it and the
    settings it is written with."""

    image: Image.Image
    idea: str | None
    seed: int | None
    temperature: float
    top_p: float
    max_tokens: int
    keep_bboxes: bool
    system_prompt: str
    grammar_limits: dict | None = None


def prepare(
    image: ImageInput,
    idea: str | None = None,
    seed: int | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
    top_p: float = 1.0,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    keep_bboxes: bool = False,
    system_prompt: str | Path | None = None,
    grammar_limits: dict | None = None,
) -> DescribeTask:
    """Every check of a description that needs no model (see :func:`describe`): the idea, the
    seed and sampling settings, the system prompt (a file read, bounded), the image read."""
    idea = check_remix_idea(idea)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise DescribeError(f"seed must be an integer, got {seed!r}")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise DescribeError(f"seed {seed} is out of range: use 0..{MAX_SEED}")
    if not isinstance(keep_bboxes, bool):
        raise DescribeError(f"keep_bboxes must be True or False, got {keep_bboxes!r}")
    try:
        check_sampling(temperature, top_p, max_tokens)
        system = check_system_prompt(system_prompt)
    except MagicPromptError as e:
        raise DescribeError(str(e)) from None
    system = system or SYSTEM_PROMPT + (BBOX_NOTE if keep_bboxes else "")
    picture = image_to_describe(image)
    return DescribeTask(
        picture, idea, seed, temperature, top_p, max_tokens, keep_bboxes, system, grammar_limits
    )
