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
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

from ideogram4_mlx.caption import (
    MAX_JSON_DEPTH,
    PLAIN_PROMPT_WARNING,
    is_json_prompt,
    json_depth,
    verify_raw,
)
from ideogram4_mlx.constants import PIXELS_PER_TOKEN
from ideogram4_mlx.sampler import DEFAULT_PRESET, Schedule, get_preset, resolve_schedule

MIN_SIDE, MAX_SIDE, MAX_ASPECT = 256, 2048, 6.0
MAX_SEED = 2**63 - 1
# The presets use 12-48 steps; the bound keeps a typo from allocating without end.
MAX_STEPS = 1000


class CaptionError(ValueError):
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
    """

    prompt: str
    width: int = 1024
    height: int = 1024
    preset: str = DEFAULT_PRESET
    num_steps: int | None = None
    guidance_schedule: tuple[float, ...] | None = None
    mu: float | None = None
    std: float | None = None
    seed: int | None = None
    strict_caption: bool = False
    allow_invalid_caption: bool = False
    magic_prompt: bool = False

    def __post_init__(self):
        if isinstance(self.prompt, dict):
            text = json.dumps(self.prompt, ensure_ascii=False, separators=(",", ":"))
            object.__setattr__(self, "prompt", text)
        if self.guidance_schedule is not None:
            try:
                weights = tuple(float(g) for g in self.guidance_schedule)
            except (TypeError, ValueError):
                raise ValueError(
                    f"guidance_schedule {self.guidance_schedule!r} is not a list of numbers"
                ) from None
            object.__setattr__(self, "guidance_schedule", weights)

    def validate(self) -> ResolvedRequest:
        """Every check that needs no model, with the values the pipeline runs on.

        Raises ``ValueError`` naming the setting (``CaptionError`` for caption findings when
        ``strict_caption``); a plain prompt or caption findings otherwise only warn later.
        """
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("the prompt is empty")
        # Any prompt may be parsed as JSON (canonical form), not only those starting with "{".
        if json_depth(self.prompt) > MAX_JSON_DEPTH:
            raise ValueError(
                f"the prompt nests brackets more than {MAX_JSON_DEPTH} levels deep; "
                "a JSON caption needs about 4"
            )
        grid_h, grid_w = check_size(self.width, self.height)
        if self.seed is not None and not 0 <= int(self.seed) <= MAX_SEED:
            raise ValueError(f"seed {self.seed} is out of range: use 0..{MAX_SEED}")
        schedule = self.schedule()
        # An idea for the magic prompt is plain text by design; its caption is checked instead.
        findings = [] if self.magic_prompt else caption_findings(self.prompt)
        invalid = [f for f in findings if f.startswith("invalid JSON")]
        if invalid and not self.allow_invalid_caption:
            raise CaptionError(
                f"the prompt starts with '{{' but is not valid JSON ({invalid[0]}); fix it "
                "(ideo4-mlx verify-caption shows where) or allow it as plain text "
                "(--allow-invalid-caption, allow_invalid_caption=True)"
            )
        if findings and self.strict_caption:
            raise CaptionError("caption check failed: " + "; ".join(findings))
        return ResolvedRequest(self, grid_h, grid_w, schedule, findings)

    def schedule(self) -> Schedule:
        """The preset with this request's overrides applied (errors name the setting)."""
        if self.num_steps is not None and not 1 <= int(self.num_steps) <= MAX_STEPS:
            raise ValueError(f"num_steps {self.num_steps} is out of range: use 1..{MAX_STEPS}")
        for name in ("mu", "std"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        if self.guidance_schedule is not None and not all(
            math.isfinite(g) for g in self.guidance_schedule
        ):
            raise ValueError(f"guidance_schedule {list(self.guidance_schedule)} must be finite")
        return resolve_schedule(
            self.height,
            self.width,
            self.preset,
            self.num_steps,
            self.guidance_schedule,
            self.mu,
            self.std,
        )

    def to_metadata(self) -> dict:
        """The request as stored in a PNG, with the resolved steps, guidance, mu and std."""
        schedule = self.schedule()
        stored = {name: getattr(self, name) for name in METADATA_TYPES}
        stored.update(
            num_steps=schedule.num_steps,
            guidance_schedule=list(schedule.guidance),
            mu=schedule.mu,
            std=schedule.std,
        )
        return stored

    @classmethod
    def from_metadata(cls, metadata: Mapping) -> GenerationRequest:
        """The request stored by :meth:`to_metadata`, with preset-derived values as None.

        A stored value that equals what the preset gives is not an override, so
        ``replace(request, preset=...)`` takes the new preset's values for it, and
        ``replace(request, num_steps=...)`` reshapes a preset-shaped guidance schedule.
        Raises ``ValueError`` naming a missing or mistyped field.
        """
        missing = [k for k in METADATA_TYPES if k not in metadata]
        if missing:
            raise ValueError(f"the metadata has no {', '.join(missing)}: it cannot be replayed")
        for key, kind in METADATA_TYPES.items():
            check_type(key, metadata[key], kind)
        m = metadata
        base = cls(**{k: m[k] for k in METADATA_TYPES if k not in SCHEDULE_KEYS})
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
# The fields stored in a PNG and their JSON types ("seq": a list of numbers). strict_caption
# and allow_invalid_caption are not stored: they decide whether to run, not the image; nor is
# magic_prompt: the stored prompt is the caption it wrote (the idea is kept beside it).
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
# Stored resolved (the preset's values filled in): from_metadata turns them back into overrides.
SCHEDULE_KEYS = ("num_steps", "guidance_schedule", "mu", "std")


def check_type(key: str, value, kind) -> None:
    """One metadata field against its JSON type (bools are not numbers here)."""
    if kind == "seq":
        ok = isinstance(value, list) and all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value
        )
        expected = "a list of numbers"
    else:
        ok = isinstance(value, kind) and not isinstance(value, bool)
        names = kind if isinstance(kind, tuple) else (kind,)
        expected = " or ".join("null" if k is type(None) else k.__name__ for k in names)
    if not ok:
        raise ValueError(f"metadata field {key!r} is {value!r}: expected {expected}")


@dataclass(frozen=True)
class ResolvedRequest:
    """A validated request and what the pipeline runs on: token grid, schedule, findings."""

    request: GenerationRequest
    grid_h: int
    grid_w: int
    schedule: Schedule
    caption_findings: list[str]

    def warn(self) -> None:
        """Emit the caption findings as warnings (``caption: ...``)."""
        for finding in self.caption_findings:
            warnings.warn(f"caption: {finding}", stacklevel=3)


def check_size(width: int, height: int) -> tuple[int, int]:
    """Validate the image size (spec §E.5) and return the token grid (grid_h, grid_w)."""
    for name, side in (("width", width), ("height", height)):
        if side % PIXELS_PER_TOKEN or not MIN_SIDE <= side <= MAX_SIDE:
            raise ValueError(
                f"{name} {side} is not supported: use a multiple of {PIXELS_PER_TOKEN} "
                f"between {MIN_SIDE} and {MAX_SIDE}"
            )
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise ValueError(f"aspect ratio {width}x{height} is wider than {MAX_ASPECT:g}:1")
    return height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN


def caption_findings(prompt: str) -> list[str]:
    """Caption verifier findings (spec §G.2); a plain-text prompt is one finding."""
    return verify_raw(prompt) if is_json_prompt(prompt) else [PLAIN_PROMPT_WARNING]


def request_from_settings(prompt: str | GenerationRequest, settings: Mapping) -> GenerationRequest:
    """``generate(prompt, **settings)``'s request: a request as given (settings replace its
    fields) or a new one from a prompt."""
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise TypeError(f"unknown generation setting(s) {unknown}; valid: {', '.join(SETTINGS)}")
    if isinstance(prompt, GenerationRequest):
        return replace(prompt, **settings)
    return GenerationRequest(prompt, **settings)
