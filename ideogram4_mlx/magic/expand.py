"""Magic prompt: a plain idea -> a JSON caption in Ideogram 4's schema, on this machine
(MODEL_NOTES#caption-schema).

A causal LM (the checkpoint's own Qwen3-VL body with the prompt-enhancer lm_head, or any
mlx-lm chat model) writes the caption under a grammar (``constrain.py``), so what comes out
always passes the caption verifier in strict mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler

from ideogram4_mlx.magic.constrain import caption_processor, finish_caption, hf_tokenizer
from ideogram4_mlx.magic.options import (
    DEFAULT_MAX_TOKENS,
    MAX_TOKENS_LIMIT,
    MagicPromptError,
    check_idea,
    check_sampling,
    check_system_prompt,
    check_target,
)
from ideogram4_mlx.prompt import render_chat

# Written for this project from MODEL_NOTES#captions; --system-prompt replaces it.
SYSTEM_PROMPT = """\
You turn a short image idea into a detailed caption for a text-to-image model. Reply with one \
JSON object and nothing else.

The object has these keys, in this order:
- "high_level_description": two or three sentences on what the image shows as a whole.
- "style_description" (optional): an object with "aesthetics", "lighting", then either \
"photo" (camera, lens, film: for photographs) followed by "medium", or "medium" followed by \
"art_style" (for illustrations, paintings, designs); optionally "color_palette", up to 16 \
colours as uppercase "#RRGGBB".
- "compositional_deconstruction": an object with "background" (the setting, described in one \
or two sentences) and "elements", a list of the things in the image, largest or most \
important first. Each element is either {"type": "obj", "desc": ...} for a thing, or \
{"type": "text", "text": ..., "desc": ...} for lettering that must appear in the image, \
where "text" is the exact words and "desc" says how they look (font, size, colour, place). \
An element may end with "color_palette", up to 5 colours.

Write concrete, visual descriptions: materials, colours, positions, light. Keep every word \
the idea asks to be written in the image exactly as given, in its own script. Do not invent \
text the idea does not imply. Match the composition to the target aspect ratio."""


def aspect_ratio(width: int, height: int) -> str:
    """``W:H`` in lowest terms (1536x1024 -> ``3:2``), as the official tool states it."""
    g = math.gcd(width, height)
    return f"{width // g}:{height // g}"


def user_message(idea: str, width: int, height: int) -> str:
    return f"Target aspect ratio {aspect_ratio(width, height)} (width:height).\n\nIdea: {idea}"


def expand(
    model: nn.Module,
    tokenizer,
    idea: str,
    width: int = 1024,
    height: int = 1024,
    seed: int | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    keep_bboxes: bool = False,
    system_prompt: str | Path | None = None,
    on_text: Callable[[str], None] | None = None,
    grammar_limits: dict | None = None,
) -> str:
    """One caption (minified JSON, verifier-clean) for ``idea``.

    ``model`` and ``tokenizer`` are an mlx-lm causal LM and its tokenizer. Decoding samples at
    ``temperature``/``top_p`` under the caption grammar, seeded by ``seed``; ``on_text``
    receives the text as it streams. Bounding boxes are dropped unless ``keep_bboxes``;
    ``grammar_limits`` tightens the grammar's string and element bounds (``constrain.py``).
    ``system_prompt``: the text, or a file (``Path``, read bounded); None: ``SYSTEM_PROMPT``.
    Raises :class:`MagicPromptError` for a bad input (``options.py``: an empty or over-long
    idea, a non-finite or out-of-range setting) before any model work, or when ``max_tokens``
    ends the caption early (no partial JSON is returned); ``CheckpointError`` when the chat
    template fails (``prompt.render_chat`` bounds its work).
    """
    idea = check_idea(idea)
    check_target(width, height, seed)
    check_sampling(temperature, top_p, max_tokens)
    system = check_system_prompt(system_prompt) or SYSTEM_PROMPT
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": user_message(idea, width, height)},
    ]
    hf = hf_tokenizer(tokenizer)
    prompt = hf.encode(render_chat(hf, messages), add_special_tokens=False)
    if seed is not None:
        mx.random.seed(seed)
    sampler = make_sampler(temp=temperature, top_p=top_p if top_p < 1.0 else 0.0)
    processor = caption_processor(tokenizer, keep_bboxes=keep_bboxes, **(grammar_limits or {}))
    pieces, finish = [], None
    for response in stream_generate(
        model, tokenizer, prompt, max_tokens, sampler=sampler, logits_processors=[processor]
    ):
        pieces.append(response.text)
        finish = response.finish_reason
        if on_text is not None:
            on_text(response.text)
    if finish != "stop":
        raise MagicPromptError(
            f"the caption was not finished within max_tokens {max_tokens}; raise it (up to "
            f"{MAX_TOKENS_LIMIT}, --max-tokens)"
        )
    return finish_caption("".join(pieces), keep_bboxes=keep_bboxes)
