"""Describe and remix: an image -> a JSON caption in Ideogram 4's schema, written on this
machine by the checkpoint's own Qwen3-VL (its vision tower, its text body and the
prompt-enhancer lm_head: ``model.py``) under the magic prompt's grammar (``magic.constrain``),
so what comes out always passes the caption verifier in strict mode.

The image is read as an edit's input is (``edit.load_image``: EXIF rotation, transparency on
white, the 64 MP bound); an ``idea`` steers what the description changes (``generate
--remix``). No model code here: the model is handed in, anything with ``DescribeModel``'s
``tokenizer`` and ``generate``; the inputs are checked first (``options.prepare``).
"""

from __future__ import annotations

from collections.abc import Callable

from ideogram4_mlx.describe.options import DescribeError, DescribeTask, prepare
from ideogram4_mlx.edit import ImageInput
from ideogram4_mlx.magic.constrain import (
    CaptionIncompleteError,
    caption_processor,
    finish_caption,
)
from ideogram4_mlx.magic.expand import aspect_ratio
from ideogram4_mlx.magic.options import MAX_TOKENS_LIMIT


def user_message(idea: str | None, width: int, height: int) -> str:
    """What the model is asked, the image beside it: the image's aspect ratio, and the idea
    that steers what the new picture changes."""
    ask = (
        f"Describe this image (aspect ratio {aspect_ratio(width, height)}, width:height) as "
        "one caption."
    )
    if idea is None:
        return ask
    return (
        f"{ask} Write it for a new picture: this image, changed as follows: {idea}\nKeep as it "
        "is in the image whatever the change does not touch (layout, subjects, lettering)."
    )


def run(model, task: DescribeTask, on_text: Callable[[str], None] | None = None) -> str:
    """``task``'s caption from ``model`` (a ``describe.model.DescribeModel``: its ``tokenizer``
    and ``generate``), under the caption grammar; see :func:`describe`."""
    limits = task.grammar_limits or {}
    processor = caption_processor(model.tokenizer, keep_bboxes=task.keep_bboxes, **limits)
    text = model.generate(
        task.image,
        task.system_prompt,
        user_message(task.idea, *task.image.size),
        max_tokens=task.max_tokens,
        temperature=task.temperature,
        top_p=task.top_p,
        seed=task.seed,
        logits_processors=[processor],
        on_text=on_text,
    )
    try:
        return finish_caption(text, keep_bboxes=task.keep_bboxes)
    except CaptionIncompleteError:
        raise DescribeError(
            f"the description was not finished within max_tokens {task.max_tokens}; raise it "
            f"(up to {MAX_TOKENS_LIMIT}, --max-tokens)"
        ) from None
    except ValueError as e:  # a model that ignored the processor: no caption to return
        raise DescribeError(f"the description is not a valid caption: {e}") from None


def describe(
    model,
    image: ImageInput,
    idea: str | None = None,
    seed: int | None = None,
    on_text: Callable[[str], None] | None = None,
    **settings,
) -> str:
    """One caption (minified JSON, verifier-clean) describing ``image``.

    ``model``: a ``describe.model.DescribeModel`` (its ``tokenizer`` and ``generate``).
    ``image``: a path, a PIL image or a uint8 array (H, W[, 3|4]), read as an edit's input.
    ``idea``: how the new picture should differ (None: describe it as it is); ``on_text``
    receives the text as it streams. ``settings`` (:func:`prepare`'s): ``temperature`` (0,
    the default: greedy; above, sampled and seeded by ``seed``), ``top_p``, ``max_tokens``,
    ``keep_bboxes`` (element boxes kept, else dropped), ``system_prompt`` (the text, or a file
    as a ``Path``; None: ``SYSTEM_PROMPT``), ``grammar_limits`` (tighter grammar bounds).
    Raises :class:`DescribeError` for a bad setting or idea before any model work, or when
    ``max_tokens`` ends the caption early (no partial JSON is returned); ``InputError`` or
    ``FileNotFoundError`` naming an unreadable, missing or oversized image.
    """
    return run(model, prepare(image, idea, seed, **settings), on_text)
