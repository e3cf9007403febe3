"""GenerationRequest: validation, the metadata round trip and replay by ``dataclasses.replace``."""

import math
import re
from dataclasses import replace

import numpy as np
import pytest

from ideogram4_mlx.errors import InputError
from ideogram4_mlx.request import (
    MAX_IDEA_CHARS,
    MAX_SEED,
    MAX_STEPS,
    SETTINGS,
    CaptionError,
    GenerationRequest,
    check_size,
    request_from_settings,
)
from ideogram4_mlx.sampler import PRESETS, resolve_schedule

CAPTION = (
    '{"high_level_description":"a sign","compositional_deconstruction":'
    '{"background":"white","elements":[]}}'
)


def test_validate_gives_the_grid_the_schedule_and_the_findings():
    resolved = GenerationRequest(CAPTION, width=512, height=768, preset="V4_TURBO_12").validate()
    assert (resolved.grid_h, resolved.grid_w) == check_size(512, 768) == (48, 32)
    expected = resolve_schedule(768, 512, "V4_TURBO_12")
    np.testing.assert_array_equal(resolved.schedule.grid, expected.grid)
    assert resolved.schedule.guidance == expected.guidance and resolved.caption_findings == []
    plain = GenerationRequest("a cat").validate()
    assert plain.caption_findings and "plain-text prompt" in plain.caption_findings[0]


def test_a_magic_prompt_idea_over_the_limit_is_refused_by_validate():
    """The server validates a job when it is submitted: an idea too long for the magic prompt
    is a 422 then, not a failure when the job runs; a caption of that length is not an idea."""
    GenerationRequest("x" * MAX_IDEA_CHARS, magic_prompt=True).validate()
    with pytest.raises(ValueError, match="the idea is 2001 characters long; the limit is 2000"):
        GenerationRequest("x" * (MAX_IDEA_CHARS + 1), magic_prompt=True).validate()
    GenerationRequest("x" * (MAX_IDEA_CHARS + 1)).validate()


def test_with_seed_reseeds_a_resolved_request_and_bounds_the_seed():
    resolved = GenerationRequest(CAPTION, width=512, height=512, seed=1).validate()
    other = resolved.with_seed(MAX_SEED)
    assert other.request == replace(resolved.request, seed=MAX_SEED)
    assert (other.grid_h, other.schedule) == (resolved.grid_h, resolved.schedule)
    fresh = GenerationRequest(CAPTION, width=512, height=512, seed=MAX_SEED).validate()
    assert other.request == fresh.request
    with pytest.raises(ValueError, match=f"seed {MAX_SEED + 1} is out of range"):
        resolved.with_seed(MAX_SEED + 1)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_steps": MAX_STEPS + 1}, f"num_steps {MAX_STEPS + 1} is out of range: use 1..1000"),
        ({"num_steps": 0}, "num_steps 0 is out of range"),
        ({"mu": math.nan}, "mu must be a finite number, got nan"),
        ({"std": math.inf}, "std must be a finite number, got inf"),
        ({"std": -1.0}, "std must be > 0"),
        ({"guidance_schedule": (7.0, math.inf)}, "must be finite"),
        ({"guidance_schedule": ("7", "x")}, r"guidance_schedule \('7', 'x'\) must be a list of"),
        ({"seed": -1}, "seed -1 is out of range"),
        ({"width": 250}, "width 250 is not supported"),
        ({"prompt": "  "}, "the prompt is empty"),
        ({"preset": "V4_NOPE"}, "unknown preset 'V4_NOPE'; valid presets"),
        ({"cache_threshold": -0.1}, r"cache_threshold -0.1 is out of range: use 0..1 \(0 is off"),
        ({"cache_threshold": 1.5}, "cache_threshold 1.5 is out of range: use 0..1"),
    ],
)
def test_validate_names_the_bad_setting(changes, message):
    with pytest.raises(ValueError, match=message):
        replace(GenerationRequest(CAPTION), **changes).validate()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("prompt", 12345, "prompt 12345 must be text (a str) or a caption dict"),
        ("prompt", None, "prompt None must be text"),
        ("prompt", ["a cat"], "prompt ['a cat'] must be text"),
        ("width", "256", "width '256' must be an integer (a whole number of pixels, multiple of"),
        ("width", 256.0, "width 256.0 must be an integer"),
        ("height", True, "height True must be an integer"),
        ("preset", [1], "preset [1] must be a preset name (V4_QUALITY_48, V4_DEFAULT_20, V4_TURBO"),
        ("preset", None, "preset None must be a preset name"),
        ("num_steps", [2], "num_steps [2] must be an integer (the number of denoising steps)"),
        ("num_steps", 2.7, "num_steps 2.7 must be an integer"),
        ("num_steps", "20", "num_steps '20' must be an integer"),
        ("guidance_schedule", "77", "guidance_schedule '77' must be a list of numbers"),
        ("guidance_schedule", "7,7", "guidance_schedule '7,7' must be a list of numbers"),
        ("guidance_schedule", 7.0, "guidance_schedule 7.0 must be a list of numbers"),
        ("guidance_schedule", [7, True], "guidance_schedule [7, True] must be a list of numbers"),
        ("guidance_schedule", (7, "3"), "guidance_schedule (7, '3') must be a list of numbers"),
        ("guidance_schedule", [7, math.nan], "guidance_schedule must be finite numbers, got"),
        ("mu", "abc", "mu 'abc' must be a number"),
        ("mu", True, "mu True must be a number"),
        ("mu", math.inf, "mu must be a finite number, got inf"),
        ("std", "1.5", "std '1.5' must be a number"),
        pytest.param("std", 10**400, "std must be a finite number, got 1000", id="std-10**400"),
        ("seed", math.inf, "seed inf must be an integer (0..9223372036854775807) or None"),
        ("seed", 3.0, "seed 3.0 must be an integer"),
        ("seed", "7", "seed '7' must be an integer"),
        ("strict_caption", "no", "strict_caption 'no' must be True or False"),
        ("allow_invalid_caption", 1, "allow_invalid_caption 1 must be True or False"),
        ("magic_prompt", None, "magic_prompt None must be True or False"),
        ("image", 5, "image 5 must be a path, a PIL image or a uint8 array"),
        ("mask", [[0]], "mask [[0]] must be a path, a PIL image or a uint8 array"),
        ("strength", "0.5", "strength '0.5' must be a number in (0, 1]"),
        ("strength", True, "strength True must be a number"),
        ("strength", math.nan, "strength must be a finite number, got nan"),
        ("mask_grow", 1.0, "mask_grow 1.0 must be an integer (tokens of 16 px, 0..64)"),
        ("mask_feather", "2", "mask_feather '2' must be an integer"),
        ("paste_back", "yes", "paste_back 'yes' must be True or False"),
        ("expand", "0,0,256,0", "expand '0,0,256,0' must be 4 integers (LEFT, TOP, RIGHT, BOTTOM"),
        ("expand", (16, 0, 0, 16.0), r"expand (16, 0, 0, 16.0) must be 4 integers"),
        ("expand", [16, 0, 0], r"expand [16, 0, 0] must be 4 integers"),
        ("image_sha256", 5, "image_sha256 5 must be a SHA-256 hex string or None"),
        ("mask_sha256", b"ab", "mask_sha256 b'ab' must be a SHA-256 hex string"),
        ("cache_threshold", "0.1", "cache_threshold '0.1' must be a number in [0, 1]"),
        ("cache_threshold", None, "cache_threshold None must be a number in [0, 1]"),
        ("cache_threshold", True, "cache_threshold True must be a number"),
        ("cache_threshold", math.nan, "cache_threshold must be a finite number, got nan"),
    ],
)
def test_wrong_types_are_one_line_naming_the_field_as_the_request_is_made(field, value, message):
    """Every interface (Python, CLI, server JSON, metadata replay) makes a request: a wrong type
    is refused there, not deep inside the run."""
    with pytest.raises(ValueError, match=re.escape(message)) as raised:
        GenerationRequest(**{"prompt": CAPTION, field: value})
    assert "\n" not in str(raised.value)
    with pytest.raises(ValueError, match=re.escape(message)):  # replay, overrides
        replace(GenerationRequest(CAPTION), **{field: value})
    prompt, settings = (value, {}) if field == "prompt" else (CAPTION, {field: value})
    with pytest.raises(ValueError, match=re.escape(message)):  # Pipeline.generate(**settings)
        request_from_settings(prompt, settings)


def test_numbers_of_other_kinds_are_stored_as_int_and_float():
    request = GenerationRequest(
        CAPTION,
        width=np.int64(512),
        seed=np.uint32(7),
        mu=np.float32(0.25),
        std=2,
        guidance_schedule=[np.float64(7), 3],
        expand=[np.int16(16), 0, 0, 0],
    )
    assert type(request.width) is int and type(request.seed) is int and request.seed == 7
    assert (type(request.mu), type(request.std)) == (float, float) and request.mu == 0.25
    assert request.guidance_schedule == (7.0, 3.0) and request.expand == (16, 0, 0, 0)
    assert all(type(v) is int for v in request.expand) and hash(request)


@pytest.mark.parametrize(
    "prompt, position",
    [("a c\ud800t", 3), ("\udcff", 0), ({"high_level_description": "caf\udce9"}, 30)],
)
def test_a_prompt_with_a_lone_surrogate_is_refused_naming_the_position(prompt, position):
    message = f"the prompt is not valid Unicode text (a lone surrogate at position {position}"
    with pytest.raises(ValueError, match=re.escape(message)):
        GenerationRequest(prompt)


def test_metadata_with_a_lone_surrogate_or_a_wrong_type_is_refused_by_the_same_checks():
    stored = GenerationRequest(CAPTION, seed=1).to_metadata()
    with pytest.raises(ValueError, match="lone surrogate at position 2"):
        GenerationRequest.from_metadata({**stored, "prompt": "ab\ud800"})
    with pytest.raises(ValueError, match=r"metadata field 'width' is 256.0: expected int"):
        GenerationRequest.from_metadata({**stored, "width": 256.0})
    with pytest.raises(ValueError, match=r"metadata field 'seed' is inf: expected int or null"):
        GenerationRequest.from_metadata({**stored, "seed": math.inf})


def test_a_caption_dict_that_is_not_json_is_refused():
    with pytest.raises(ValueError, match="the prompt dict cannot be written as JSON"):
        GenerationRequest({"high_level_description": {1, 2}})
    with pytest.raises(ValueError, match="the prompt dict cannot be written as JSON"):
        GenerationRequest({"high_level_description": math.nan})


def below(x: float) -> float:
    return math.nextafter(x, -math.inf)


def above(x: float) -> float:
    return math.nextafter(x, math.inf)


@pytest.mark.parametrize(
    "changes",
    [
        {"guidance_schedule": (0.0,)},
        {"num_steps": 2, "guidance_schedule": (30.0, 7.0)},
        {"num_steps": 2, "guidance_schedule": (30, 0)},
        {"mu": -10.0},
        {"mu": 10},
        {"std": 10.0},
        {"std": 5e-324},  # the smallest float above 0
    ],
)
def test_guidance_mu_and_std_ends_of_their_ranges_pass(changes):
    replace(GenerationRequest(CAPTION), **changes).validate()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"guidance_schedule": (1e30,)}, "guidance_schedule weight 1e+30 is out of range"),
        ({"guidance_schedule": (7.0, above(30))}, f"weight {above(30)!r} is out of range"),
        ({"guidance_schedule": (below(0),)}, "weight -5e-324 is out of range: use 0..30"),
        ({"guidance_schedule": (-1,)}, "-1.0 is out of range: use 0..30 (the presets use 3..7)"),
        ({"mu": 1e30}, "mu 1e+30 is out of range: use -10..10 (the presets use 0..0.5)"),
        ({"mu": above(10)}, f"mu {above(10)!r} is out of range"),
        ({"mu": below(-10)}, f"mu {below(-10)!r} is out of range"),
        ({"std": above(10)}, f"std {above(10)!r} is out of range: std must be > 0 and <= 10"),
        ({"std": 0.0}, "std 0.0 is out of range: std must be > 0 and <= 10"),
        ({"std": -1}, "(the presets use 1.5..1.75)"),
    ],
)
def test_guidance_mu_and_std_outside_their_ranges_are_refused(changes, message):
    request = replace(GenerationRequest(CAPTION), **changes)
    with pytest.raises(ValueError, match=re.escape(message)):
        request.validate()
    with pytest.raises(ValueError, match=re.escape(message)):
        request.to_metadata()


def test_stored_guidance_out_of_range_is_refused_at_replay():
    stored = GenerationRequest(CAPTION, seed=1).to_metadata()
    replayed = GenerationRequest.from_metadata({**stored, "guidance_schedule": [1e30] * 20})
    with pytest.raises(ValueError, match=re.escape("guidance_schedule weight 1e+30 is out")):
        replayed.validate()


def test_strict_caption_raises_on_findings():
    with pytest.raises(CaptionError, match="caption check failed: plain-text prompt"):
        GenerationRequest("a cat", strict_caption=True).validate()
    GenerationRequest(CAPTION, strict_caption=True).validate()  # no findings: no error


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"num_steps": 5},
        {"num_steps": 3, "guidance_schedule": (4.0, 1.0, 2.5)},
        {"mu": 0.3, "std": 1.2},
        {"guidance_schedule": (5.0,)},
    ],
)
def test_metadata_round_trip_gives_the_same_schedule(preset, overrides):
    request = GenerationRequest(CAPTION, 320, 256, preset, seed=11, **overrides)
    back = GenerationRequest.from_metadata(request.to_metadata())
    assert back.to_metadata() == request.to_metadata()
    a, b = request.schedule(), back.schedule()
    np.testing.assert_array_equal(a.grid, b.grid)
    assert (a.guidance, a.mu, a.std) == (b.guidance, b.mu, b.std)


def test_from_metadata_keeps_only_real_overrides():
    preset_shaped = GenerationRequest(CAPTION, preset="V4_TURBO_12", num_steps=12, mu=0.5)
    back = GenerationRequest.from_metadata(preset_shaped.to_metadata())
    assert (back.num_steps, back.guidance_schedule, back.mu, back.std) == (None,) * 4
    custom = GenerationRequest(CAPTION, num_steps=4, guidance_schedule=(6.0,), std=2.0)
    back = GenerationRequest.from_metadata(custom.to_metadata())
    assert (back.num_steps, back.guidance_schedule, back.mu, back.std) == (
        4,
        (6.0, 6.0, 6.0, 6.0),
        None,
        2.0,
    )
    # replace() with a new preset: its steps and mu, the image's own std
    turbo = replace(back, preset="V4_TURBO_12", num_steps=None, guidance_schedule=None)
    assert turbo.schedule().num_steps == 12 and turbo.schedule().std == 2.0


def test_settings_are_the_dataclass_fields_and_unknown_ones_are_refused():
    assert SETTINGS[0] == "prompt" and "strict_caption" in SETTINGS and "noise" not in SETTINGS
    request = request_from_settings("a cat", {"width": 512, "seed": 3})
    assert request == GenerationRequest("a cat", width=512, seed=3)
    assert request_from_settings(request, {"seed": 4}) == replace(request, seed=4)
    with pytest.raises(TypeError, match=r"unknown generation setting\(s\) \['stepz'\]"):
        request_from_settings("a cat", {"stepz": 4})


def test_settings_take_the_commands_names_but_not_both_names():
    # generate --steps: generate(steps=...) too; the request's field is num_steps
    assert request_from_settings("a cat", {"steps": 4}) == GenerationRequest("a cat", num_steps=4)
    request = GenerationRequest("a cat", num_steps=2)
    assert request_from_settings(request, {"steps": 5}).num_steps == 5
    with pytest.raises(InputError, match="steps is another name for num_steps: give one of them"):
        request_from_settings("a cat", {"steps": 4, "num_steps": 4})


def test_guidance_is_stored_as_a_tuple_of_floats():
    request = GenerationRequest(CAPTION, guidance_schedule=[7, 3])
    assert request.guidance_schedule == (7.0, 3.0)
    assert hash(request)  # frozen and hashable: usable as a cache or queue key


def test_a_caption_dict_is_stored_as_minified_json():
    request = GenerationRequest({"high_level_description": "Café", "b": [1, 2]})
    assert request.prompt == '{"high_level_description":"Café","b":[1,2]}'


def test_a_prompt_that_looks_like_json_but_is_not_is_an_error_unless_allowed():
    with pytest.raises(CaptionError, match=r"starts with '\{' but is not valid JSON"):
        GenerationRequest('{"high_level_description": "x",}').validate()
    resolved = GenerationRequest('{"oops"', allow_invalid_caption=True).validate()
    assert any(f.startswith("invalid JSON") for f in resolved.caption_findings)


# --- edits ------------------------------------------------------------------------------------


def edit_arrays():
    image = np.arange(320 * 256 * 3, dtype=np.uint32).reshape(256, 320, 3).astype(np.uint8)
    mask = np.zeros((256, 320), np.uint8)
    mask[:40] = 255
    return image, mask


def test_validate_resolves_the_size_and_an_edit():
    plain = GenerationRequest(CAPTION).validate()
    assert (plain.request.width, plain.request.height, plain.edit) == (1024, 1024, None)
    image, mask = edit_arrays()
    resolved = GenerationRequest(CAPTION, image=image, expand=(16, 0, 16, 0)).validate()
    r = resolved.request
    assert (r.width, r.height, r.strength) == (352, 256, 1.0)
    assert (resolved.grid_h, resolved.grid_w) == (16, 22)
    assert resolved.schedule.strength == 1.0 and r.image_sha256 is not None
    img2img = GenerationRequest(CAPTION, image=image, strength=0.4).validate()
    assert img2img.schedule.strength == 0.4 and img2img.edit.token_mask is None
    assert img2img.schedule.start_time > 0.1  # starts well after t_min


def test_edit_metadata_round_trip_needs_the_same_inputs():
    image, mask = edit_arrays()
    request = GenerationRequest(
        CAPTION, image=image, mask=mask, mask_grow=2, mask_feather=1, paste_back=True, seed=3
    )
    stored = request.to_metadata()
    assert stored["expand"] is None and stored["strength"] == 1.0 and stored["paste_back"]
    assert stored["width"] == 320 and len(stored["image_sha256"]) == 64
    back = GenerationRequest.from_metadata(stored)
    assert (
        back.image is None and back.mask_grow == 2 and back.image_sha256 == stored["image_sha256"]
    )
    again = replace(back, image=image, mask=mask)
    assert again.to_metadata() == stored
    with pytest.raises(ValueError, match="give that image with --image"):
        back.validate()
    with pytest.raises(ValueError, match="the mask differs"):
        replace(back, image=image, mask=np.zeros_like(mask)).validate()
    # text-to-image stores no edit keys (and old PNGs without them replay as text-to-image)
    assert "image_sha256" not in GenerationRequest(CAPTION).to_metadata()


@pytest.mark.parametrize(
    "key, value",
    [
        ("paste_back", "yes"),
        ("expand", [16, 0, 0]),
        ("expand", [16.0, 0, 0, 0]),
        ("image_sha256", 5),
        ("strength", True),
        ("mask_grow", 1.5),
    ],
)
def test_edit_metadata_types_are_checked(key, value):
    image, _ = edit_arrays()
    stored = GenerationRequest(CAPTION, image=image, seed=1).to_metadata()
    with pytest.raises(ValueError, match=f"metadata field '{key}'"):
        GenerationRequest.from_metadata({**stored, key: value})
    del stored["mask_grow"]
    with pytest.raises(ValueError, match="has no mask_grow"):
        GenerationRequest.from_metadata(stored)


def test_cache_threshold_is_stored_when_on_and_an_old_png_replays_with_it_off():
    on = GenerationRequest(CAPTION, seed=1, cache_threshold=0.08)
    stored = on.to_metadata()
    assert stored["cache_threshold"] == 0.08
    assert GenerationRequest.from_metadata(stored) == replace(on, width=1024, height=1024)
    off = GenerationRequest(CAPTION, seed=1).to_metadata()
    assert "cache_threshold" not in off  # 0: the metadata of before step caching, unchanged
    assert GenerationRequest.from_metadata(off).cache_threshold == 0.0
    with pytest.raises(ValueError, match="metadata field 'cache_threshold' is 'x': expected Real"):
        GenerationRequest.from_metadata({**stored, "cache_threshold": "x"})
