"""JSON caption verifier: the official ``CaptionVerifier`` rules, pure Python
(MODEL_NOTES#caption-verifier-rules).

Every finding is a warning string; nothing here raises (but ``read_text_file``, the bounded
reader of every text file a command takes). Key-order checks use strict equality with the
official order, as the reference does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ideogram4_mlx.errors import InputError

TOP_KEYS = ("high_level_description", "style_description", "compositional_deconstruction")
STYLE_KEYS = ("aesthetics", "lighting", "photo", "art_style", "medium", "color_palette")
ELEMENT_KEYS = ("type", "bbox", "text", "desc", "color_palette")
ELEMENT_TYPES = ("obj", "text")
STYLE_PALETTE_MAX = 16
ELEMENT_PALETTE_MAX = 5
BBOX_GRID_MAX = 1000
HEX_COLOR = re.compile(r"#[0-9A-F]{6}")
# \uXXXX escapes of code points >= U+0080: the mark of a file saved with ensure_ascii=True.
NON_ASCII_ESCAPE = re.compile(
    r"\\u(00[89a-fA-F][0-9a-fA-F]|0[1-9a-fA-F][0-9a-fA-F]{2}|[1-9a-fA-F][0-9a-fA-F]{3})"
)
# Prompts are capped at 2048 tokens (prompt.py), a few KB; a file past this is the wrong file
# (or /dev/zero), refused before it fills the memory.
MAX_TEXT_FILE_BYTES = 256 * 1024
# A caption nests about 4 levels; the bound keeps json's recursion far from Python's limit.
MAX_JSON_DEPTH = 64
PLAIN_PROMPT_WARNING = (
    "plain-text prompt: Ideogram 4 is trained on JSON captions; results are usually better "
    "with one (see `ideo4-mlx verify-caption`)"
)


def is_json_prompt(text: str) -> bool:
    return text.lstrip().startswith("{")


def verify_raw(text: str) -> list[str]:
    """Check caption text: the unicode-escape heuristic, JSON parsing, then ``verify``."""
    warnings = _escape_warnings(text)
    try:
        parsed = parse_json(text)
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        return [*warnings, f"invalid JSON: {e}"]
    return warnings + verify(parsed)


def parse_json(text: str) -> object:
    """``json.loads``, refusing nesting deeper than ``MAX_JSON_DEPTH`` (InputError) before it
    can exhaust Python's recursion limit."""
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise InputError(
            f"the JSON nests {depth} levels deep; the limit is {MAX_JSON_DEPTH} "
            "(a caption needs about 4)"
        )
    return json.loads(text)


def json_depth(text: str) -> int:
    """The deepest bracket nesting of JSON text, strings skipped (stops counting past the
    limit, so a hostile input costs one pass)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_JSON_DEPTH:
                break
        elif ch in "]}":
            depth -= 1
    return deepest


def read_text_file(
    path: Path | str, max_bytes: int = MAX_TEXT_FILE_BYTES, encoding: str = "utf-8"
) -> str:
    """A text file (prompt, caption, system prompt) of at most ``max_bytes``: at most
    ``max_bytes + 1`` bytes are read, so an endless or huge file costs nothing. Raises
    InputError, one line naming the file, when it is longer, not UTF-8 or unreadable."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > max_bytes:
        raise InputError(
            f"{path} is over {max_bytes // 1024} KiB; a prompt or caption is a few KB "
            "(is it the right file?)"
        )
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        raise InputError(
            f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8"
        ) from None


def verify_file(path: Path | str) -> list[str]:
    """``verify_raw`` of a caption file (``read_text_file``: InputError if unreadable)."""
    return verify_raw(read_text_file(path))


def verify(obj: object) -> list[str]:
    """Check a parsed caption object against the official schema rules."""
    if not isinstance(obj, dict):
        return [f"root: expected a JSON object, got {type(obj).__name__}"]
    out = _unknown_keys("root", obj, TOP_KEYS)
    hld = obj.get("high_level_description")
    if "high_level_description" in obj and not isinstance(hld, str):
        out.append("root.high_level_description: expected a string")
    if "style_description" in obj:
        out += _check_style(obj["style_description"])
    if "compositional_deconstruction" not in obj:
        out.append("root: compositional_deconstruction is missing")
    else:
        out += _check_composition(obj["compositional_deconstruction"])
    return out


def _escape_warnings(text: str) -> list[str]:
    escapes = NON_ASCII_ESCAPE.findall(text)
    if not escapes or any(ord(ch) > 127 for ch in text):
        return []
    examples = ", ".join(f"\\u{e}" for e in escapes[:3])
    return [
        f"text uses \\uXXXX escapes for non-ASCII characters ({examples}); the model expects "
        "literal characters: save with ensure_ascii=False"
    ]


def _unknown_keys(path: str, d: dict, known: tuple[str, ...]) -> list[str]:
    unknown = [k for k in d if k not in known]
    return [f"{path}: unknown keys {unknown}"] if unknown else []


def _check_order(
    path: str, d: dict, expected: tuple[str, ...], known: tuple[str, ...]
) -> list[str]:
    out = [
        f"{path}.{k}: not allowed in this context" for k in d if k in known and k not in expected
    ]
    present = tuple(k for k in d if k in expected)
    if present != expected:
        out.append(
            f"{path}: keys should be exactly {list(expected)} in this order, got {list(present)}"
        )
    return out


def _check_palette(path: str, palette: object, limit: int) -> list[str]:
    if not isinstance(palette, list):
        return [f"{path}: expected a list of colours"]
    if len(palette) > limit:
        return [f"{path}: {len(palette)} colours, at most {limit} allowed"]
    return [
        f"{path}[{i}]: {c!r} is not an uppercase #RRGGBB colour"
        for i, c in enumerate(palette)
        if not (isinstance(c, str) and len(c) == 7 and HEX_COLOR.fullmatch(c))
    ]


def _check_style(style: object) -> list[str]:
    path = "style_description"
    if not isinstance(style, dict):
        return [f"{path}: expected an object"]
    out = _unknown_keys(path, style, STYLE_KEYS)
    has_photo, has_art = "photo" in style, "art_style" in style
    if has_photo and has_art:
        return [*out, f"{path}: give either photo or art_style, not both"]
    if not (has_photo or has_art):
        return [*out, f"{path}: one of photo or art_style is required"]
    expected = (
        ("aesthetics", "lighting", "photo", "medium")
        if has_photo
        else ("aesthetics", "lighting", "medium", "art_style")
    )
    if "color_palette" in style:
        expected += ("color_palette",)
        out += _check_palette(f"{path}.color_palette", style["color_palette"], STYLE_PALETTE_MAX)
    return out + _check_order(path, style, expected, STYLE_KEYS)


def _check_composition(comp: object) -> list[str]:
    path = "compositional_deconstruction"
    if not isinstance(comp, dict):
        return [f"{path}: expected an object"]
    if "background" not in comp:
        return [f"{path}.background is missing"]
    if not isinstance(comp["background"], str):
        return [f"{path}.background: expected a string"]
    if "elements" not in comp:
        return [f"{path}.elements is missing"]
    out = []
    if tuple(comp) != ("background", "elements"):
        out.append(f"{path}: keys should be exactly ['background', 'elements'], got {list(comp)}")
    if not isinstance(comp["elements"], list):
        return [*out, f"{path}.elements: expected a list"]
    for i, element in enumerate(comp["elements"]):
        out += _check_element(f"{path}.elements[{i}]", element)
    return out


def _check_element(path: str, element: object) -> list[str]:
    if not isinstance(element, dict):
        return [f"{path}: expected an object"]
    out = _unknown_keys(path, element, ELEMENT_KEYS)
    if "type" not in element:
        return [*out, f"{path}.type is missing"]
    kind = element["type"]
    if kind not in ELEMENT_TYPES:
        return [*out, f"{path}.type: {kind!r} is not one of {list(ELEMENT_TYPES)}"]
    expected = ("type",) + (("bbox",) if "bbox" in element else ())
    expected += ("text", "desc") if kind == "text" else ("desc",)
    if "color_palette" in element:
        expected += ("color_palette",)
        out += _check_palette(
            f"{path}.color_palette", element["color_palette"], ELEMENT_PALETTE_MAX
        )
    if "bbox" in element:
        out += _check_bbox(f"{path}.bbox", element["bbox"])
    return out + _check_order(path, element, expected, ELEMENT_KEYS)


def _check_bbox(path: str, bbox: object) -> list[str]:
    if not isinstance(bbox, list) or len(bbox) != 4:
        return [f"{path}: expected [y_min, x_min, y_max, x_max], a list of 4 integers"]
    # bool is an int here, as in the official verifier (MODEL_NOTES#caption-verifier-rules).
    if not all(isinstance(v, int) for v in bbox):
        return [f"{path}: values must be integers, got {bbox}"]
    out = []
    if not all(0 <= v <= BBOX_GRID_MAX for v in bbox):
        out.append(f"{path}: values must lie in [0, {BBOX_GRID_MAX}], got {bbox}")
    y0, x0, y1, x1 = bbox
    if y0 > y1 or x0 > x1:
        out.append(f"{path}: needs y_min <= y_max and x_min <= x_max, got {bbox}")
    return out
