"""Constrained decoding of JSON captions: a grammar our verifier accepts in strict mode
(MODEL_NOTES#captions), run by llguidance as an mlx-lm logits processor.

The grammar fixes the key orders, ``photo`` xor ``art_style``, element shapes, bbox integers in
0..1000, palette sizes and uppercase ``#RRGGBB``; strings admit only the escapes json.dumps
writes for ASCII (no ``\\uXXXX``), so the text is valid UTF-8 with literal characters. What a
grammar cannot say (bbox min <= max) ``finish_caption`` repairs, then verifies.
"""

from __future__ import annotations

import functools
import json

import llguidance
import llguidance.hf
import mlx.core as mx
import numpy as np
from mlx_lm.tokenizer_utils import TokenizerWrapper
from transformers import PreTrainedTokenizerFast

from ideogram4_mlx.caption import (
    BBOX_GRID_MAX,
    ELEMENT_PALETTE_MAX,
    STYLE_PALETTE_MAX,
    verify_raw,
)
from ideogram4_mlx.errors import InputError

# Bounds a real caption fits in (the official examples run to ~400 chars per description and
# under 10 elements); they also keep a wandering sampler from writing forever.
MAX_STRING_CHARS = 1000
MAX_ELEMENTS = 16
# Pretty-printed JSON indents at most ~5 levels; more whitespace is a sampler wandering.
MAX_WHITESPACE = 24


class CaptionIncompleteError(InputError):
    """Generation stopped (max_tokens) before the caption's JSON was complete."""


def caption_grammar(
    keep_bboxes: bool = False,
    max_string_chars: int = MAX_STRING_CHARS,
    max_elements: int = MAX_ELEMENTS,
) -> str:
    """The caption grammar in llguidance's Lark dialect (minified or pretty JSON both match)."""
    ws = f"[ \\t\\n\\r]{{0,{MAX_WHITESPACE}}}"
    color = '"#[0-9A-F]{6}"'
    num = f"(?:0|[1-9][0-9]{{0,{len(str(BBOX_GRID_MAX)) - 2}}}|{BBOX_GRID_MAX})"
    bbox = f"\\[{ws}{num}(?:{ws},{ws}{num}){{3}}{ws}\\]"

    def palette(n: int) -> str:
        return f"\\[{ws}{color}(?:{ws},{ws}{color}){{0,{n - 1}}}{ws}\\]"

    def field(name: str, value: str) -> str:  # `"name": value` with optional whitespace
        return f'"\\"{name}\\"" W ":" W {value}'

    sep = 'W "," W'
    box = f"({sep} {field('bbox', 'BBOX')})?" if keep_bboxes else ""
    pal5 = f"({sep} {field('color_palette', 'PALETTE5')})?"
    pal16 = f"({sep} {field('color_palette', 'PALETTE16')})?"
    obj_type, text_type = field("type", '"\\"obj\\""'), field("type", '"\\"text\\""')
    # A string of 1..max chars: any character but '"', '\\' and controls, or a short escape.
    string = f'"(?:[^"\\\\\\x00-\\x1f]|\\\\["\\\\\\/bfnrt]){{1,{max_string_chars}}}"'
    f = {k: field(k, "STRING") for k in ("high_level_description", "aesthetics", "lighting")}
    f |= {k: field(k, "STRING") for k in ("photo", "medium", "art_style", "background")}
    f |= {k: field(k, "STRING") for k in ("text", "desc")}
    rules = [
        f'start: "{{" W {f["high_level_description"]} '
        f"({sep} {field('style_description', 'style')})? "
        f'{sep} {field("compositional_deconstruction", "comp")} W "}}"',
        f'style: "{{" W {f["aesthetics"]} {sep} {f["lighting"]} {sep} (photo | art) {pal16} W "}}"',
        f"photo: {f['photo']} {sep} {f['medium']}",
        f"art: {f['medium']} {sep} {f['art_style']}",
        f'comp: "{{" W {f["background"]} {sep} {field("elements", "elements")} W "}}"',
        f'elements: "[" W element ({sep} element){{0,{max_elements - 1}}} W "]"',
        "element: obj | text",
        f'obj: "{{" W {obj_type} {box} {sep} {f["desc"]} {pal5} W "}}"',
        f'text: "{{" W {text_type} {box} {sep} {f["text"]} {sep} {f["desc"]} {pal5} W "}}"',
        f"W: /{ws}/",
        f"STRING: /{string}/",
        f"BBOX: /{bbox}/",
        f"PALETTE5: /{palette(ELEMENT_PALETTE_MAX)}/",
        f"PALETTE16: /{palette(STYLE_PALETTE_MAX)}/",
    ]
    return "\n".join(rules) + "\n"


@functools.lru_cache(maxsize=4)
def _ll_tokenizer(hf_tokenizer: PreTrainedTokenizerFast, eos_ids: tuple[int, ...]):
    # ~1 s at a 151,936-token vocabulary, so built once per tokenizer.
    return llguidance.hf.from_tokenizer(hf_tokenizer, eos_token=list(eos_ids))


def hf_tokenizer(tokenizer) -> PreTrainedTokenizerFast:
    """The transformers tokenizer of an mlx-lm ``TokenizerWrapper`` (or the one given)."""
    if isinstance(tokenizer, TokenizerWrapper):
        return tokenizer._tokenizer
    if isinstance(tokenizer, PreTrainedTokenizerFast):
        return tokenizer
    raise TypeError(
        f"the magic prompt needs an mlx-lm TokenizerWrapper or a transformers fast tokenizer, "
        f"got {type(tokenizer).__name__}"
    )


def _hf_and_eos(tokenizer) -> tuple[PreTrainedTokenizerFast, tuple[int, ...]]:
    if isinstance(tokenizer, TokenizerWrapper):
        return tokenizer._tokenizer, tuple(sorted(tokenizer.eos_token_ids))
    return hf_tokenizer(tokenizer), (tokenizer.eos_token_id,)


class CaptionProcessor:
    """An mlx-lm logits processor: ``(tokens (T,), logits (1, V)) -> logits (1, V)`` with every
    token the grammar forbids at -inf. EOS is allowed only once the caption is complete, and is
    then the only choice. One instance serves one generation (it tracks the tokens it has seen).
    """

    def __init__(self, ll_tokenizer, grammar: str):
        self.matcher = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise ValueError(f"the caption grammar does not compile: {self.matcher.get_error()}")
        self.eos_ids = list(ll_tokenizer.eos_tokens)
        self._seen: int | None = None

    @property
    def done(self) -> bool:
        """The caption's JSON is complete (EOS may come next, or has come)."""
        return self.matcher.is_accepting() or self.matcher.is_stopped()

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self._seen is None:  # the first call sees the prompt only
            self._seen = tokens.size
        new = tokens[self._seen :].tolist()
        self._seen = tokens.size
        for t in new:
            if not self.matcher.is_stopped() and not self.matcher.consume_token(t):
                raise RuntimeError(
                    f"token {t} broke the caption grammar ({self.matcher.get_error()}); another "
                    "logits processor or a sampler changed the masked logits"
                )
        return mx.where(mx.array(self._allowed(logits.shape[-1])), logits, -mx.inf)

    def _allowed(self, width: int) -> np.ndarray:
        allowed = np.zeros(width, dtype=bool)
        if self.matcher.is_stopped():  # after EOS (mlx-lm computes one step ahead): EOS again
            allowed[self.eos_ids] = True
            return allowed
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        mask = np.unpackbits(bits, bitorder="little").astype(bool)
        n = min(width, mask.size)
        allowed[:n] = mask[:n]
        return allowed


def caption_processor(
    tokenizer,
    keep_bboxes: bool = False,
    max_string_chars: int = MAX_STRING_CHARS,
    max_elements: int = MAX_ELEMENTS,
) -> CaptionProcessor:
    """A fresh logits processor for one constrained caption (``generate_step(...,
    logits_processors=[...])``). ``tokenizer``: mlx-lm ``TokenizerWrapper`` (its EOS set ends
    the caption) or a transformers fast tokenizer (its ``eos_token_id``)."""
    hf, eos_ids = _hf_and_eos(tokenizer)
    grammar = caption_grammar(keep_bboxes, max_string_chars, max_elements)
    return CaptionProcessor(_ll_tokenizer(hf, eos_ids), grammar)


def finish_caption(text: str, keep_bboxes: bool = False) -> str:
    """Generated caption text -> canonical minified JSON that ``verify_raw`` accepts with zero
    findings: drops bboxes (unless ``keep_bboxes``), swaps a bbox's min/max pair when reversed.
    Raises ``CaptionIncompleteError`` for cut-off JSON, ``ValueError`` for any other finding."""
    try:
        caption = json.loads(text)
    except json.JSONDecodeError as e:
        raise CaptionIncompleteError(
            f"the generated caption is not complete JSON ({e.msg} at char {e.pos} of "
            f"{len(text)}): generation most likely hit max_tokens; raise max_tokens"
        ) from None
    for element in _elements(caption):
        if "bbox" in element:
            if keep_bboxes:
                element["bbox"] = _repair_bbox(element["bbox"])
            else:
                del element["bbox"]
    out = json.dumps(caption, ensure_ascii=False, separators=(",", ":"))
    findings = verify_raw(out)
    if findings:
        raise ValueError(
            "the caption fails the verifier: " + "; ".join(findings) + " (was it generated "
            "without caption_processor?)"
        )
    return out


def _elements(caption: object) -> list[dict]:
    comp = caption.get("compositional_deconstruction") if isinstance(caption, dict) else None
    elements = comp.get("elements") if isinstance(comp, dict) else None
    return [e for e in elements if isinstance(e, dict)] if isinstance(elements, list) else []


def _repair_bbox(bbox: object) -> object:
    # [y_min, x_min, y_max, x_max]: the grammar fixes 4 ints in range, not their order.
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, int) for v in bbox)):
        return bbox
    y0, x0, y1, x1 = bbox
    return [min(y0, y1), min(x0, x1), max(y0, y1), max(x0, x1)]
