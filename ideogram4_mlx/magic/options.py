"""The magic prompt's inputs, checked before any model work: the idea, the system prompt, the
target size, the seed and the sampling settings. No mlx-lm here, so the commands check their
options with these functions before loading, and ``expand()`` checks them again for Python and
the server (whose JSON may hold anything).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ideogram4_mlx.caption import read_text_file
from ideogram4_mlx.errors import InputError
from ideogram4_mlx.request import MAX_SEED, MAX_SIDE, check_idea_length

# A full caption (several elements with descriptions) takes 300-900 tokens; the bound keeps a
# typo from running for hours.
DEFAULT_MAX_TOKENS = 1024
MAX_TOKENS_LIMIT = 4096
MIN_MAX_TOKENS = 32
MAX_TEMPERATURE = 2.0
# Our system prompt is ~1,900 characters; room for a longer one, not for a book.
MAX_SYSTEM_PROMPT_CHARS = 16000


class MagicPromptError(InputError):
    """The idea cannot be expanded into a valid caption (a bad input, or out of tokens)."""


@dataclass(frozen=True)
class MagicOptions:
    """How the magic prompt expands an idea (``expand()``'s settings): sampling
    ``temperature`` (0: greedy) and ``top_p``, the longest caption in tokens, whether element
    bounding boxes are kept, another system prompt (text, or a file read by :meth:`validate`)
    and ``grammar_limits`` (tighter string and element bounds, ``constrain.py``)."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    keep_bboxes: bool = False
    system_prompt: str | Path | None = None
    grammar_limits: dict | None = None

    def validate(self) -> MagicOptions:
        """Checked (``MagicPromptError``), the system prompt file read (bounded)."""
        check_sampling(self.temperature, self.top_p, self.max_tokens)
        if not isinstance(self.keep_bboxes, bool):
            raise MagicPromptError(f"keep_bboxes must be True or False, got {self.keep_bboxes!r}")
        return replace(self, system_prompt=check_system_prompt(self.system_prompt))

    def as_kwargs(self) -> dict:
        """``expand()``'s keyword arguments."""
        return asdict(self)


def check_idea(idea: object) -> str:
    """The idea, stripped: text of 1 to ``MAX_IDEA_CHARS`` characters."""
    if idea is not None and not isinstance(idea, str):
        raise MagicPromptError(f"the idea must be text, got {type(idea).__name__}")
    idea = (idea or "").strip()
    if not idea:
        raise MagicPromptError("the idea is empty: describe the image to expand")
    try:
        check_idea_length(idea)
    except ValueError as e:
        raise MagicPromptError(str(e)) from None
    return idea


def check_system_prompt(system_prompt: str | Path | None) -> str | None:
    """The system prompt's text (a ``Path`` is read, at most 256 KiB), or None for ours;
    non-empty and at most ``MAX_SYSTEM_PROMPT_CHARS`` characters."""
    if system_prompt is None:
        return None
    if isinstance(system_prompt, Path):
        try:
            system_prompt = read_text_file(system_prompt)
        except ValueError as e:
            raise MagicPromptError(f"system prompt: {e}") from None
    if not isinstance(system_prompt, str):
        raise MagicPromptError(
            f"the system prompt must be text or a file, got {type(system_prompt).__name__}"
        )
    if not system_prompt.strip():
        raise MagicPromptError("the system prompt is empty")
    if len(system_prompt) > MAX_SYSTEM_PROMPT_CHARS:
        raise MagicPromptError(
            f"the system prompt is {len(system_prompt)} characters long; the limit is "
            f"{MAX_SYSTEM_PROMPT_CHARS}"
        )
    return system_prompt


def check_sampling(
    temperature: object = 1.0, top_p: object = 1.0, max_tokens: object = DEFAULT_MAX_TOKENS
) -> None:
    """Finite ``temperature`` in 0..2 and ``top_p`` in 0..1 (nan reached the grammar as a
    RuntimeError), ``max_tokens`` in 32..4096."""
    _check_number("temperature", temperature, 0.0, MAX_TEMPERATURE)
    _check_number("top_p", top_p, 0.0, 1.0)
    _check_integer("max_tokens", max_tokens, MIN_MAX_TOKENS, MAX_TOKENS_LIMIT)


def check_target(width: object = 1024, height: object = 1024, seed: object = None) -> None:
    """Target sides in 1..2048 (they give the aspect ratio) and a seed in 0..2**63-1 or None."""
    _check_integer("width", width, 1, MAX_SIDE)
    _check_integer("height", height, 1, MAX_SIDE)
    if seed is not None:
        _check_integer("seed", seed, 0, MAX_SEED)


def _check_number(name: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MagicPromptError(f"{name} must be a number, got {value!r}")
    if not (low <= value <= high and math.isfinite(value)):  # nan compares False
        raise MagicPromptError(
            f"{name} {value!r} is out of range: use a finite number in {low:g}..{high:g}"
        )


def _check_integer(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MagicPromptError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise MagicPromptError(f"{name} {value} is out of range: use {low}..{high}")
