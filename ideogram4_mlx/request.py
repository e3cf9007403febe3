"""What one generation is: a frozen :class:`GenerationRequest`, the single definition that the
CLI, ``Pipeline.generate(**settings)``, the PNG metadata and replay map onto.

Adding a generation parameter means a field here, the one place in the pipeline that uses
it, and a CLI option of the same name. Replaying an image is
``dataclasses.replace(GenerationRequest.from_metadata(m), **overrides)``.
"""

from __future__ import annotations

import json
import math
import numbers
import reprlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

import numpy as np

from ideogram4_mlx.caption import (
    MAX_JSON_DEPTH,
    PLAIN_PROMPT_WARNING,
    is_json_prompt,
    json_depth,
    verify_raw,
)
from ideogram4_mlx.constants import PIXELS_PER_TOKEN
from ideogram4_mlx.edit import (
    DEFAULT_SIZE,
    MAX_MASK_TOKENS,
    REMIX_STRENGTH,
    Edit,
    ImageInput,
    check_edit_settings,
    edit_size,
    load_image,
    prepare_edit,
)
from ideogram4_mlx.errors import InputError
from ideogram4_mlx.sampler import (
    DEFAULT_PRESET,
    PRESETS,
    Schedule,
    get_preset,
    resolve_schedule,
)

MIN_SIDE, MAX_SIDE, MAX_ASPECT = 256, 2048, 6.0
MAX_SEED = 2**63 - 1
# The presets use 12-48 steps; the bound keeps a typo from allocating without end.
MAX_STEPS = 1000
# An idea is a sentence or a paragraph (the model writes the details); a 100 KB one ran the
# magic prompt's prefill for minutes and held the server's only worker.
MAX_IDEA_CHARS = 2000
# CFG weight g in v = v_uncond + g * (v_cond - v_uncond): 1 is the conditional model alone,
# 0 the unconditional one, below 0 steers away from the prompt; far above the presets' 3..7
# the colours saturate (30 is generous); a weight of 1e30 decodes to flat grey.
GUIDANCE_RANGE = (0.0, 30.0)
# The time grid is sigmoid(-(mu + resolution shift + std * z)), clipped to the logSNR limits
# (logit t in -9..7.5, sampler.T_MIN/T_MAX): at |mu| = 10 or std = 10 most steps already sit
# on a limit, beyond it the schedule collapses into one jump. The presets use mu 0..0.5, std
# 1.5..1.75. std must stay > 0 (the grid is its mean alone at 0).
MU_RANGE = (-10.0, 10.0)
MAX_STD = 10.0
# First Block Cache (``step_cache.BlockCache``): a relative change of block 0's residual; 0 is
# off. Peers use 0.05 (diffusers) to 0.12 (ParaAttention with fp8); at 1 nearly every pass after
# the first would be skipped.
CACHE_THRESHOLD_RANGE = (0.0, 1.0)


class CaptionError(InputError):
    """The caption verifier reported findings and strict checking was requested."""


@dataclass(frozen=True)
class GenerationRequest:
    """One image: the prompt and every setting that decides its pixels.

    ``num_steps``, ``guidance_schedule`` (chronological: entry 0 = first, noisiest step; one
    value per step or one for all), ``mu`` and ``std`` override the preset when not None.
    ``prompt`` is caption text or a caption dict (stored as minified JSON). ``seed`` None
    means a random seed, drawn and recorded when the generation starts. ``strict_caption``
    turns caption findings into a :class:`CaptionError` before any model loads;
    ``allow_invalid_caption`` lets a prompt that starts with ``{`` but is not valid JSON run
    as plain text (otherwise an error). ``magic_prompt`` treats ``prompt`` as an idea that
    the pipeline first expands into a JSON caption (seeded by ``seed``).

    Edits (``edit.py``): ``image`` (a path, PIL image or uint8 array) starts the run from that
    image: image-to-image with ``strength`` in (0, 1] (default 0.6; 1 = from noise;
    MODEL_NOTES#image-to-image). ``mask`` (white = regenerate, the image's size) makes it
    inpainting (default strength 1): ``mask_grow`` and ``mask_feather`` widen it by tokens
    (16 px), ``paste_back`` keeps every unmasked pixel of the input exactly. ``expand`` (left,
    top, right, bottom pixels, multiples of 16) outpaints a border. ``width`` and ``height``
    are the output size: 1024, or the image's own size (plus ``expand``) when None.
    ``image_sha256``/``mask_sha256``, when set (a replay), must match the inputs' fingerprints
    (``edit.fingerprint``).

    ``cache_threshold`` T in [0, 1] turns on step caching (First Block Cache, per branch:
    ``step_cache.BlockCache``): a pass whose first block moved less than T (relative) since
    the last full pass reuses what the other blocks added then. 0 (the default) is off, bit for
    bit; its effect on quality is unmeasured here.

    ``remix`` (with ``image``, an empty ``prompt``): the pipeline first describes the image
    (``describe/``), steered by ``idea``, and runs image-to-image from that caption (default
    strength 0.7); the PNG stores the caption as its prompt, so a replay describes nothing.

    Each field's type is checked as the request is made (``REQUEST_TYPES``: an integer is no
    float or bool, a number is finite, the prompt is UTF-8 text), an ``InputError`` naming it;
    numpy numbers are stored as int and float, lists as tuples. Ranges are :meth:`validate`'s.
    """

    prompt: str = ""  # a remix writes it
    width: int | None = None
    height: int | None = None
    preset: str = DEFAULT_PRESET
    num_steps: int | None = None
    guidance_schedule: tuple[float, ...] | None = None
    mu: float | None = None
    std: float | None = None
    seed: int | None = None
    strict_caption: bool = False
    allow_invalid_caption: bool = False
    magic_prompt: bool = False
    image: ImageInput | None = None
    mask: ImageInput | None = None
    strength: float | None = None
    mask_grow: int = 0
    mask_feather: int = 0
    paste_back: bool = False
    expand: tuple[int, int, int, int] | None = None
    image_sha256: str | None = None
    mask_sha256: str | None = None
    cache_threshold: float = 0.0
    remix: bool = False
    idea: str | None = None

    def __post_init__(self):
        if isinstance(self.prompt, dict):
            try:
                text = json.dumps(
                    self.prompt, ensure_ascii=False, separators=(",", ":"), allow_nan=False
                )
            except (TypeError, ValueError) as e:
                raise InputError(f"the prompt dict cannot be written as JSON ({e})") from None
            object.__setattr__(self, "prompt", text)
        for name, (kind, what) in REQUEST_TYPES.items():
            object.__setattr__(self, name, checked_field(name, getattr(self, name), kind, what))
        try:
            self.prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InputError(
                f"the prompt is not valid Unicode text (a lone surrogate at position {e.start}: "
                "bytes that are not UTF-8, or half of a \\ud800-\\udfff pair); give UTF-8 text"
            ) from None
        for name in ("image", "mask"):  # arrays as images: a request compares with ==
            value = getattr(self, name)
            if isinstance(value, np.ndarray):
                object.__setattr__(self, name, load_image(value, name).image)

    def validate(self) -> ResolvedRequest:
        """Every check that needs no model, with the values the pipeline runs on.

        Raises ``InputError`` naming the setting (``CaptionError`` for caption findings when
        ``strict_caption``); a plain prompt or caption findings otherwise only warn later.
        """
        if self.remix or self.idea is not None:
            check_remix(self)
        elif not self.prompt.strip():
            raise InputError("the prompt is empty")
        # Any prompt may be parsed as JSON (canonical form), not only those starting with "{".
        if json_depth(self.prompt) > MAX_JSON_DEPTH:
            raise InputError(
                f"the prompt nests brackets more than {MAX_JSON_DEPTH} levels deep; "
                "a JSON caption needs about 4"
            )
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise InputError(f"seed {self.seed} is out of range: use 0..{MAX_SEED}")
        if self.magic_prompt:  # refused when submitted, not when the job runs
            check_idea_length(self.prompt)
        lo, hi = CACHE_THRESHOLD_RANGE
        if not lo <= self.cache_threshold <= hi:
            raise InputError(
                f"cache_threshold {self.cache_threshold!r} is out of range: use {lo:g}..{hi:g} "
                "(0 is off; peers use 0.05..0.12)"
            )
        resolved, edit = self.resolve_edit()
        grid_h, grid_w = check_size(resolved.width, resolved.height)
        schedule = resolved.schedule()
        # An idea for the magic prompt is plain text by design; its caption is checked instead.
        findings = [] if self.magic_prompt or self.remix else caption_findings(self.prompt)
        invalid = [f for f in findings if f.startswith("invalid JSON")]
        if invalid and not self.allow_invalid_caption:
            raise CaptionError(
                f"the prompt starts with '{{' but is not valid JSON ({invalid[0]}); fix it "
                "(ideo4-mlx verify-caption shows where) or allow it as plain text "
                "(--allow-invalid-caption, allow_invalid_caption=True)"
            )
        if findings and self.strict_caption:
            raise CaptionError("caption check failed: " + "; ".join(findings))
        return ResolvedRequest(resolved, grid_h, grid_w, schedule, findings, edit)

    def resolve_edit(self) -> tuple[GenerationRequest, Edit | None]:
        """This request with the output size (and, for an edit, the strength and the inputs'
        fingerprints) filled in, and the prepared :class:`~ideogram4_mlx.edit.Edit`."""
        if self.image is None and self.image_sha256 is not None:
            raise InputError(
                f"this image was made from an input image (sha256 {self.image_sha256[:12]}...): "
                "give that image with --image (image=)"
            )
        if self.mask is None and self.mask_sha256 is not None:
            raise InputError(
                f"the mask differs from the one this image was made from (sha256 "
                f"{self.mask_sha256}; none was given): give the same file with --mask (mask=)"
            )
        check_edit_settings(
            self.image is not None,
            self.mask is not None,
            self.strength,
            self.mask_grow,
            self.mask_feather,
            self.paste_back,
            self.expand,
        )
        if self.image is None:
            size = {k: getattr(self, k) or DEFAULT_SIZE for k in ("width", "height")}
            return replace(self, **size), None
        image = load_image(self.image, "image")
        mask = None if self.mask is None else load_image(self.mask, "mask")
        for what, given, expected in (
            ("image", image, self.image_sha256),
            ("mask", mask, self.mask_sha256),
        ):
            if expected is not None and (given is None or given.sha256 != expected):
                found = "none was given" if given is None else f"{given.name} has {given.sha256}"
                raise InputError(
                    f"the {what} differs from the one this image was made from (sha256 "
                    f"{expected}; {found}): give the same file with --{what} ({what}=)"
                )
        width, height, inner_w, inner_h = edit_size(
            image, self.width, self.height, self.expand, MIN_SIDE, MAX_SIDE
        )
        try:
            check_size(width, height)
        except ValueError as e:
            grown = f" ({inner_w}x{inner_h} expanded by {self.expand})" if self.expand else ""
            raise InputError(f"the output {width}x{height}{grown}: {e}") from None
        edit = prepare_edit(
            image,
            mask,
            (inner_w, inner_h),
            REMIX_STRENGTH if self.remix and self.strength is None else self.strength,
            self.mask_grow,
            self.mask_feather,
            self.paste_back,
            self.expand,
        )
        resolved = replace(
            self,
            width=width,
            height=height,
            strength=edit.strength,
            image_sha256=edit.image_sha256,
            mask_sha256=edit.mask_sha256,
        )
        return resolved, edit

    def schedule(self) -> Schedule:
        """The preset with this request's overrides applied (errors name the setting); the
        size must be resolved (see :meth:`resolve_edit`)."""
        if self.num_steps is not None and not 1 <= self.num_steps <= MAX_STEPS:
            raise InputError(f"num_steps {self.num_steps} is out of range: use 1..{MAX_STEPS}")
        presets = PRESETS.values()
        lo, hi = GUIDANCE_RANGE
        for g in self.guidance_schedule or ():
            if not lo <= g <= hi:
                used = [g for p in presets for g in p.guidance]
                raise out_of_range("guidance_schedule weight", g, f"use {lo:g}..{hi:g}", used)
        lo, hi = MU_RANGE
        if self.mu is not None and not lo <= self.mu <= hi:
            raise out_of_range("mu", self.mu, f"use {lo:g}..{hi:g}", [p.mu for p in presets])
        if self.std is not None and not 0 < self.std <= MAX_STD:
            rule = f"std must be > 0 and <= {MAX_STD:g}"
            raise out_of_range("std", self.std, rule, [p.std for p in presets])
        if self.width is None or self.height is None:
            raise ValueError("the size is not resolved yet: call validate() or resolve_edit()")
        return resolve_schedule(
            self.height,
            self.width,
            self.preset,
            self.num_steps,
            self.guidance_schedule,
            self.mu,
            self.std,
            1.0 if self.strength is None else self.strength,
        )

    def to_metadata(self) -> dict:
        """The request as stored in a PNG, with the resolved size, steps, guidance, mu and
        std; an edit adds its settings and the inputs' fingerprints (never their pixels)."""
        resolved = self
        unresolved_edit = self.image is not None and None in (self.strength, self.image_sha256)
        if self.width is None or self.height is None or unresolved_edit:
            resolved = self.resolve_edit()[0]
        schedule = resolved.schedule()
        stored = {name: getattr(resolved, name) for name in METADATA_TYPES}
        stored.update(
            num_steps=schedule.num_steps,
            guidance_schedule=list(schedule.guidance),
            mu=schedule.mu,
            std=schedule.std,
        )
        if resolved.image_sha256 is not None:
            stored.update({name: getattr(resolved, name) for name in EDIT_METADATA_TYPES})
            stored["expand"] = None if resolved.expand is None else list(resolved.expand)
        for name, (_, default) in OPTIONAL_METADATA.items():
            if getattr(resolved, name) != default:
                stored[name] = getattr(resolved, name)
        return stored

    @classmethod
    def from_metadata(cls, metadata: Mapping) -> GenerationRequest:
        """The request stored by :meth:`to_metadata`, with preset-derived values as None.

        A stored value that equals what the preset gives is not an override, so
        ``replace(request, preset=...)`` takes the new preset's values for it, and
        ``replace(request, num_steps=...)`` reshapes a preset-shaped guidance schedule.
        Raises ``InputError`` naming a missing or mistyped field.
        """
        m = metadata
        is_edit = "image_sha256" in m  # an edit; its inputs are given again at the replay
        types = {**METADATA_TYPES, **(EDIT_METADATA_TYPES if is_edit else {})}
        missing = [k for k in types if k not in m]
        if missing:
            raise InputError(f"the metadata has no {', '.join(missing)}: it cannot be replayed")
        for key, kind in types.items():
            check_type(key, m[key], kind)
        edit = {k: m[k] for k in EDIT_METADATA_TYPES} if is_edit else {}
        optional = {k: m[k] for k in OPTIONAL_METADATA if k in m}
        for key, value in optional.items():
            check_type(key, value, OPTIONAL_METADATA[key][0])
        base = cls(
            **{k: m[k] for k in METADATA_TYPES if k not in SCHEDULE_KEYS}, **edit, **optional
        )
        preset = get_preset(base.preset)
        steps = None if m["num_steps"] == preset.num_steps else m["num_steps"]
        shaped = replace(base, num_steps=steps).schedule().guidance
        guidance = tuple(float(g) for g in m["guidance_schedule"])
        return replace(
            base,
            num_steps=steps,
            guidance_schedule=None if guidance == shaped else guidance,
            mu=None if m["mu"] == preset.mu else float(m["mu"]),
            std=None if m["std"] == preset.std else float(m["std"]),
        )


SETTINGS = tuple(f.name for f in fields(GenerationRequest))
# The commands' names for fields (generate --steps); generate(**settings) and the server's JSON
# take them too.
ALIASES = {"steps": "num_steps"}
# The fields stored in a PNG and their JSON types ("seq": a list of numbers). strict_caption
# and allow_invalid_caption are not stored: they decide whether to run, not the image; nor is
# magic_prompt and remix: the stored prompt is the caption written (the idea is kept beside it).
METADATA_TYPES = {
    "prompt": str,
    "width": int,
    "height": int,
    "preset": str,
    "seed": (int, type(None)),
    "num_steps": int,
    "guidance_schedule": "seq",
    "mu": numbers.Real,
    "std": numbers.Real,
}
# An edit's settings, stored beside them; the inputs themselves only as fingerprints.
EDIT_METADATA_TYPES = {
    "strength": numbers.Real,
    "image_sha256": str,
    "mask_sha256": (str, type(None)),
    "mask_grow": int,
    "mask_feather": int,
    "paste_back": bool,
    "expand": ("ints4", type(None)),
}
# Stored only when not their default, so older PNGs (without them) replay: field -> (type,
# default).
OPTIONAL_METADATA = {"cache_threshold": (numbers.Real, 0.0)}
# Stored resolved (the preset's values filled in): from_metadata turns them back into overrides.
SCHEDULE_KEYS = ("num_steps", "guidance_schedule", "mu", "std")


# What each request field takes and what to give, checked as a request is made (by every
# interface: Python, CLI, server JSON, metadata replay). Kinds as for the metadata.
REQUEST_TYPES = {
    "prompt": (str, "text (a str) or a caption dict"),
    "width": ((int, type(None)), "an integer (a whole number of pixels, multiple of 16) or None"),
    "height": ((int, type(None)), "an integer (a whole number of pixels, multiple of 16) or None"),
    "preset": (str, f"a preset name ({', '.join(PRESETS)})"),
    "num_steps": ((int, type(None)), "an integer (the number of denoising steps) or None"),
    "guidance_schedule": (
        ("seq", type(None)),
        "a list of numbers (a CFG weight per step, or one for all) or None",
    ),
    "mu": ((numbers.Real, type(None)), "a number (the time grid's mean) or None"),
    "std": ((numbers.Real, type(None)), "a number (the time grid's spread) or None"),
    "seed": ((int, type(None)), f"an integer (0..{MAX_SEED}) or None (a random seed)"),
    "strict_caption": (bool, "True or False"),
    "allow_invalid_caption": (bool, "True or False"),
    "magic_prompt": (bool, "True or False"),
    "image": (("image", type(None)), "a path, a PIL image or a uint8 array, or None"),
    "mask": (("image", type(None)), "a path, a PIL image or a uint8 array, or None"),
    "strength": ((numbers.Real, type(None)), "a number in (0, 1] or None"),
    "mask_grow": (int, f"an integer (tokens of 16 px, 0..{MAX_MASK_TOKENS})"),
    "mask_feather": (int, f"an integer (tokens of 16 px, 0..{MAX_MASK_TOKENS})"),
    "paste_back": (bool, "True or False"),
    "expand": (("ints4", type(None)), "4 integers (LEFT, TOP, RIGHT, BOTTOM pixels) or None"),
    "image_sha256": ((str, type(None)), "a SHA-256 hex string or None"),
    "mask_sha256": ((str, type(None)), "a SHA-256 hex string or None"),
    "cache_threshold": (numbers.Real, "a number in [0, 1] (0: no step caching)"),
    "remix": (bool, "True or False"),
    "idea": ((str, type(None)), "text (how a remix changes the image) or None"),
}
KIND_NAMES = {
    type(None): "null",
    bool: "true or false",
    "seq": "a list of numbers",
    "ints4": "a list of 4 integers",
    "image": "an image",
}


def is_kind(value, kind) -> bool:
    """The one type check of request fields and metadata: a kind is a type, a tuple of kinds,
    "seq" (a list of numbers), "ints4" (4 integers) or "image"; a bool is no number, a float
    no integer."""
    if isinstance(kind, tuple):
        return any(is_kind(value, k) for k in kind)
    if kind in (bool, type(None)):
        return isinstance(value, kind)
    if kind == "seq":
        return isinstance(value, (list, tuple)) and all(is_kind(v, numbers.Real) for v in value)
    if kind == "ints4":
        return (
            isinstance(value, (list, tuple))
            and len(value) == 4
            and all(is_kind(v, int) for v in value)
        )
    if kind == "image":
        return isinstance(value, ImageInput)
    kind = numbers.Integral if kind is int else kind  # numpy integers too
    return isinstance(value, kind) and not isinstance(value, bool)


def check_type(key: str, value, kind) -> None:
    """One metadata field against its JSON type (:func:`is_kind`)."""
    if not is_kind(value, kind):
        names = kind if isinstance(kind, tuple) else (kind,)
        expected = " or ".join(KIND_NAMES.get(k) or k.__name__ for k in names)
        raise InputError(f"metadata field {key!r} is {reprlib.repr(value)}: expected {expected}")


def out_of_range(name: str, value: float, rule: str, used: list[float]) -> InputError:
    return InputError(
        f"{name} {value!r} is out of range: {rule} (the presets use {min(used):g}..{max(used):g})"
    )


def checked_field(name: str, value, kind, what: str):
    """A request field checked against its kind (else an ``InputError`` saying ``what`` to
    give) and stored plainly: integers as int, numbers as finite floats, sequences as tuples."""
    if not is_kind(value, kind):
        raise InputError(f"{name} {reprlib.repr(value)} must be {what}")
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if value is None or not {int, numbers.Real, "seq", "ints4"} & set(kinds):
        return value
    if int in kinds:
        return int(value)
    if "ints4" in kinds:
        return tuple(int(v) for v in value)
    if "seq" in kinds:
        weights = tuple(finite(v) for v in value)
        if None in weights:
            raise InputError(f"{name} must be finite numbers, got {reprlib.repr(value)}")
        return weights
    number = finite(value)
    if number is None:
        raise InputError(f"{name} must be a finite number, got {reprlib.repr(value)}")
    return number


def finite(value: numbers.Real) -> float | None:
    """``value`` as a float; None when it is not finite (or an int too large for a float)."""
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


@dataclass(frozen=True)
class ResolvedRequest:
    """A validated request (size, strength and fingerprints filled in) and what the pipeline
    runs on: token grid, schedule, caption findings, the prepared edit."""

    request: GenerationRequest
    grid_h: int
    grid_w: int
    schedule: Schedule
    caption_findings: list[str]
    edit: Edit | None = None  # image-to-image, inpainting or outpainting

    def with_seed(self, seed: int) -> ResolvedRequest:
        """The same resolved request with another seed (nothing else is checked again: the
        images of an edit are not read twice)."""
        request = replace(self.request, seed=seed)  # its type checked as for any request
        if request.seed is None or not 0 <= request.seed <= MAX_SEED:
            raise InputError(f"seed {seed} is out of range: use 0..{MAX_SEED}")
        return replace(self, request=request)

    def warn(self) -> None:
        """Emit the caption findings as warnings (``caption: ...``)."""
        for finding in self.caption_findings:
            warnings.warn(f"caption: {finding}", stacklevel=3)


def check_idea_length(idea: str) -> None:
    """A magic-prompt idea of at most ``MAX_IDEA_CHARS`` characters (stripped)."""
    n = len(idea.strip())
    if n > MAX_IDEA_CHARS:
        raise InputError(
            f"the idea is {n} characters long; the limit is {MAX_IDEA_CHARS}: describe the "
            "image in a sentence or a paragraph (the magic prompt writes the details)"
        )


def check_remix(request: GenerationRequest) -> None:
    """A remix: an input image to describe, no prompt of its own, no mask or border."""
    r = request
    if not r.remix:
        raise InputError("idea steers a remix: give --remix IMAGE (remix=True, image=...)")
    clash = r.prompt.strip() and "a prompt" or r.magic_prompt and "magic_prompt"
    if clash:
        raise InputError(
            f"a remix writes its prompt from the image: give --idea to steer it, not {clash}"
        )
    if r.image is None:
        raise InputError("remix describes an input image: give one with --remix IMAGE (image=)")
    if r.mask is not None or r.expand is not None:
        raise InputError("a remix is image-to-image: not with mask or expand")
    if r.idea is not None:
        check_idea_length(r.idea)


def check_size(width: int, height: int) -> tuple[int, int]:
    """Validate the image size and return the token grid (grid_h, grid_w)
    (MODEL_NOTES#presets-and-sizes)."""
    for name, side in (("width", width), ("height", height)):
        if side % PIXELS_PER_TOKEN or not MIN_SIDE <= side <= MAX_SIDE:
            raise InputError(
                f"{name} {side} is not supported: use a multiple of {PIXELS_PER_TOKEN} "
                f"between {MIN_SIDE} and {MAX_SIDE}"
            )
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise InputError(f"aspect ratio {width}x{height} is wider than {MAX_ASPECT:g}:1")
    return height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN


def caption_findings(prompt: str) -> list[str]:
    """Caption verifier findings (MODEL_NOTES#caption-verifier-rules); a plain-text prompt is
    one finding."""
    return verify_raw(prompt) if is_json_prompt(prompt) else [PLAIN_PROMPT_WARNING]


def field_names(settings: Mapping) -> dict:
    """``settings`` with the commands' names (``ALIASES``: ``steps``) as the fields' names;
    ``InputError`` when a field is given under both."""
    settings = dict(settings)
    for alias, name in ALIASES.items():
        if alias in settings:
            if name in settings:
                raise InputError(f"{alias} is another name for {name}: give one of them")
            settings[name] = settings.pop(alias)
    return settings


def request_from_settings(prompt: str | GenerationRequest, settings: Mapping) -> GenerationRequest:
    """``generate(prompt, **settings)``'s request: a request as given (settings replace its
    fields) or a new one from a prompt. The commands' names are taken too (``steps`` for
    ``num_steps``: :func:`field_names`)."""
    unknown = sorted(set(settings) - set(SETTINGS) - set(ALIASES))
    if unknown:
        valid = ", ".join([*SETTINGS, *ALIASES])
        raise TypeError(f"unknown generation setting(s) {unknown}; valid: {valid}")
    settings = field_names(settings)
    if isinstance(prompt, GenerationRequest):
        return replace(prompt, **settings)
    return GenerationRequest(prompt, **settings)
