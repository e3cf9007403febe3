"""PipelineOptions, the one definition of the load settings, and the many-images seeds."""

import random
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import pytest

from ideogram4_mlx import environment
from ideogram4_mlx.batch import MAX_IMAGES, image_requests, image_seeds
from ideogram4_mlx.dtypes import dtype_name
from ideogram4_mlx.lora import LoRAError
from ideogram4_mlx.lora_spec import LoRASpec
from ideogram4_mlx.magic.options import MagicOptions, MagicPromptError
from ideogram4_mlx.pipeline import load
from ideogram4_mlx.pipeline_options import OPTIONS, PipelineOptions
from ideogram4_mlx.request import MAX_SEED, GenerationRequest


def test_values_are_normalised_as_the_options_are_made():
    options = PipelineOptions(
        "a/b", dtype="fp32", loras=["x.safetensors:0.5"], magic_options={"temperature": 0.0}
    )
    assert options.dtype == mx.float32
    assert options.loras == (LoRASpec("x.safetensors", 0.5, "cond"),)
    assert options.magic_options == MagicOptions(temperature=0.0)
    assert PipelineOptions(loras=[LoRASpec("y", None, "uncond")]).loras[0].target == "uncond"


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"dtype": "int8"}, "unknown dtype 'int8'"),
        ({"dtype": 3}, "dtype 3 is not supported"),
        ({"loras": "one.safetensors"}, "a list of LoRAs, not one"),
        ({"loras": [3]}, "must be LoRASpecs or FILE"),
        ({"keep_in_memory": "yes"}, "keep_in_memory 'yes' must be True, False or None"),
        ({"fuse_lora": 1}, "fuse_lora 1 must be True or False"),
        ({"distributed": None}, "distributed None must be True or False"),
        ({"model": None}, "model None must be a checkpoint folder or a repo id"),
        ({"magic_head": 5}, "magic_head 5 must be a folder or repo id, or None"),
        ({"magic_options": {"temprature": 1}}, "unexpected keyword argument 'temprature'"),
    ],
)
def test_a_mistyped_option_is_refused_naming_it(fields, message):
    with pytest.raises((ValueError, TypeError), match=message):
        PipelineOptions(**fields)


@pytest.mark.parametrize(
    "fields, error, message",
    [
        ({"memory_limit": -1}, ValueError, "memory limit must be a finite number of GB > 0"),
        ({"memory_limit": "8"}, ValueError, "memory limit must be a number of GB, got '8'"),
        ({"memory_limit": 0, "fuse_lora": True}, LoRAError, "--fuse-lora with --low-memory"),
        ({"magic_options": {"temperature": 9.0}}, MagicPromptError, "temperature 9.0 is out"),
        ({"magic_options": {"max_tokens": 8}}, MagicPromptError, "max_tokens 8 is out of range"),
    ],
)
def test_validate_checks_ranges_and_combinations(fields, error, message):
    options = PipelineOptions(**fields)  # types only: ranges are validate()'s
    with pytest.raises(error, match=message):
        options.validate()


def test_validate_once_reads_the_system_prompt_and_marks_the_options(tmp_path):
    (tmp_path / "system.txt").write_text("Be brief.", encoding="utf-8")
    options = PipelineOptions(magic_options={"system_prompt": tmp_path / "system.txt"})
    validated = options.validate()
    assert validated.magic_options.system_prompt == "Be brief." and validated.validated
    assert validated.validate() is validated  # not checked again
    assert validated == replace(validated) and not replace(validated).validated


def test_metadata_round_trip_and_what_a_replay_keeps():
    options = PipelineOptions("owner/repo", "abc", "float32", memory_limit=2.0)
    stored = options.to_metadata()
    assert stored == {
        "model": "owner/repo", "revision": "abc", "dtype": "float32", "uncond": "checkpoint"
    }  # fmt: skip
    base = PipelineOptions(memory_limit=2.0)
    assert PipelineOptions.from_metadata(stored, base) == options
    new_model = PipelineOptions.from_metadata(stored, base, {"model": "other/repo"})
    assert (new_model.model, new_model.revision) == ("other/repo", None)
    with pytest.raises(ValueError, match="the metadata has no dtype"):
        PipelineOptions.from_metadata({"model": "a/b", "revision": None})
    with pytest.raises(ValueError, match="metadata field 'revision' is 3"):
        PipelineOptions.from_metadata({**stored, "revision": 3})


def test_load_takes_options_or_their_fields_as_keywords(tiny_checkpoint):
    options = PipelineOptions(tiny_checkpoint, dtype="float32", keep_in_memory=True)
    by_options, by_keywords = (
        load(options),
        load(tiny_checkpoint, dtype="float32", keep_in_memory=True),
    )
    assert by_options.options == by_keywords.options
    assert by_options.options.model == str(Path(tiny_checkpoint).resolve())  # resolved
    assert by_options.settings()["model"] == by_options.options.model
    assert load(options, memory_limit=0).low_memory  # keywords replace fields of the options
    assert set(OPTIONS) == {
        "model", "revision", "dtype", "memory_limit", "keep_in_memory", "loras", "fuse_lora",
        "lora_allow_partial", "magic_head", "magic_model", "magic_options", "distributed",
        "transformer",
        "uncond",
        "single_branch",
    }  # fmt: skip


@pytest.mark.parametrize("backend, dtype", [("cpu", mx.float32), ("metal", mx.bfloat16)])
def test_no_dtype_is_the_backends_resolved_by_validate(monkeypatch, backend, dtype):
    monkeypatch.setattr(environment, "backend", lambda: backend)
    options = PipelineOptions("a/b")
    assert options.dtype is None  # automatic, until validated
    assert options.validate().dtype == dtype
    assert options.to_metadata()["dtype"] == dtype_name(dtype)  # stored resolved
    assert PipelineOptions("a/b", dtype="fp16").validate().dtype == mx.float16  # given: kept
    # a replay takes the image's dtype, not this backend's
    stored = {"model": "a/b", "revision": None, "dtype": "float16"}
    assert PipelineOptions.from_metadata(stored, options).validate().dtype == mx.float16


def test_from_keywords_takes_the_commands_names(tmp_path):
    lora, uncond = LoRASpec("x.safetensors", 0.5), LoRASpec("u.safetensors", None, "uncond")
    options = PipelineOptions.from_keywords(
        model="a/b",
        low_memory=True,
        lora="x.safetensors:0.5",
        lora_uncond="u.safetensors",
        temperature=0.0,
        max_tokens=300,
    )
    assert options == PipelineOptions(
        "a/b",
        memory_limit=0,
        loras=[lora, uncond],
        magic_options=MagicOptions(temperature=0.0, max_tokens=300),
    )
    # with base options: the keywords replace (magic fields: within its magic_options)
    base = PipelineOptions("a/b", loras=[lora], magic_options={"top_p": 0.5})
    again = PipelineOptions.from_keywords(base, lora_uncond=[uncond], keep_bboxes=True)
    assert again.loras == (lora, uncond)
    assert again.magic_options == MagicOptions(top_p=0.5, keep_bboxes=True)
    assert PipelineOptions.from_keywords(base, low_memory=True).low_memory


@pytest.mark.parametrize(
    "keywords, error, message",
    [
        ({"lora": "x", "loras": ["x"]}, ValueError, "lora is another name for loras"),
        ({"low_memory": True, "memory_limit": 2}, ValueError, "give one of them"),
        (
            {"temperature": 0.0, "magic_options": {}},
            ValueError,
            r"give magic_options or its fields \(temperature\), not both",
        ),
        ({"stepz": 1}, TypeError, r"unknown load option\(s\) \['stepz'\]; valid: model,"),
    ],
)
def test_from_keywords_refuses_a_setting_given_twice_or_unknown(keywords, error, message):
    with pytest.raises(error, match=message):
        PipelineOptions.from_keywords(**keywords)


def test_load_takes_the_commands_names(tiny_checkpoint):
    pipe = load(tiny_checkpoint, dtype="float32", low_memory=True, temperature=0.5)
    assert pipe.low_memory and pipe.options.magic_options.temperature == 0.5
    options = PipelineOptions(tiny_checkpoint, dtype="float32")
    assert load(options, low_memory=True).low_memory  # was a TypeError from replace()


def test_image_seeds_one_range_and_their_bounds(monkeypatch):
    assert image_seeds(5, 3) == [5, 6, 7]
    assert image_seeds(None, 1, [9, 2]) == [9, 2]
    draws = []
    monkeypatch.setattr(random, "randint", lambda a, b: draws.append((a, b)) or b)
    assert image_seeds(None, 4) == [MAX_SEED - 3, MAX_SEED - 2, MAX_SEED - 1, MAX_SEED]
    assert draws == [(0, MAX_SEED - 3)]  # every image's seed stays in 0..2**63-1
    with pytest.raises(ValueError, match=f"{MAX_IMAGES + 1} images: use 1..{MAX_IMAGES}"):
        image_seeds(0, MAX_IMAGES + 1)
    with pytest.raises(ValueError, match="the seeds .* repeat"):
        image_seeds(None, 1, [3, 3])
    with pytest.raises(ValueError, match=f"seed {MAX_SEED + 1} is out of range"):
        image_seeds(MAX_SEED, 2)


def test_image_requests_give_image_i_seed_plus_i():
    requests = image_requests(GenerationRequest("a cat", seed=10), 3)
    assert [r.seed for r in requests] == [10, 11, 12]
    drawn = image_requests(GenerationRequest("a cat"), 2)
    assert drawn[1].seed == drawn[0].seed + 1 and drawn[0].prompt == "a cat"
