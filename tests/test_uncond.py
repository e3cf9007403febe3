"""What runs the unconditional pass: nothing when every step's guidance is 1 (not loaded, not
planned, not needed on disk), the checkpoint's ``unconditional_transformer/``, or the
conditional DiT itself (``uncond="self"``, DiffSynth-Studio's fallback, an approximation)."""

import shutil

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ideogram4_mlx.cli import main
from ideogram4_mlx.errors import InputError
from ideogram4_mlx.lora import LoRAError
from ideogram4_mlx.memory import denoise_bytes
from ideogram4_mlx.metadata import read_metadata, replay
from ideogram4_mlx.pipeline import load
from ideogram4_mlx.pipeline_options import PipelineOptions
from ideogram4_mlx.transformer import Ideogram4Transformer

CAPTION = (
    '{"high_level_description":"a red sign","compositional_deconstruction":'
    '{"background":"white","elements":[{"type":"text","text":"OPEN","desc":"bold"}]}}'
)
FAST = {"width": 256, "height": 256, "num_steps": 3, "seed": 7}


@pytest.fixture(scope="module")
def no_uncond(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint without ``unconditional_transformer/``."""
    folder = tmp_path_factory.mktemp("no-uncond") / "tiny"
    shutil.copytree(tiny_checkpoint, folder, ignore=shutil.ignore_patterns("unconditional_*"))
    return folder


@pytest.fixture
def loads(monkeypatch):
    """The DiT folders ``from_pretrained`` reads, in order."""
    folders = []
    real = Ideogram4Transformer.from_pretrained.__func__

    def counted(cls, path, *args, **kwargs):
        folders.append(path.name)
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(Ideogram4Transformer, "from_pretrained", classmethod(counted))
    return folders


def image(checkpoint, **settings) -> np.ndarray:
    options = {k: settings.pop(k) for k in ("uncond",) if k in settings}
    pipe = load(checkpoint, dtype=mx.float32, **options)
    result = pipe.generate(CAPTION, **{**FAST, **settings})
    return np.array(result.image), result


def test_guidance_one_loads_no_unconditional_dit_and_runs_without_its_folder(
    tiny_checkpoint, no_uncond, loads
):
    full, one = image(tiny_checkpoint, guidance_schedule=(1.0,))
    assert loads == ["transformer"]  # never loaded, though the folder is there
    without, result = image(no_uncond, guidance_schedule=(1.0,))
    np.testing.assert_array_equal(full, without)  # bit for bit
    assert result.metadata["uncond"] == "checkpoint"
    _, both = image(tiny_checkpoint)  # CFG: both DiTs (benchmarks/uncond_memory.py)
    assert one.stats["denoise"]["peak_gb"] < both.stats["denoise"]["peak_gb"]


def test_a_step_that_needs_the_missing_folder_fails_before_any_weights_load(no_uncond, loads):
    pipe = load(no_uncond, dtype=mx.float32)
    with pytest.raises(InputError) as error:
        pipe.generate(CAPTION, guidance_schedule=(1.0, 3.0, 1.0), **{**FAST, "seed": 1})
    message = str(error.value)
    assert "\n" not in message and "unconditional_transformer/" in message
    assert "step 2's guidance 3" in message and "--guidance-schedule 1" in message
    assert "--uncond self" in message and "full checkpoint" in message
    assert loads == [] and pipe._prompt_encoder is None  # checked before the encoder too
    with pytest.raises(InputError, match="which the unconditional pass needs"):
        pipe.dits(100)
    assert loads == []


def test_the_plan_counts_only_the_dits_held(tiny_checkpoint, no_uncond):
    sizes = load(tiny_checkpoint, dtype=mx.float32).budget.sizes
    blocks = len(sizes[0].blocks)
    one = denoise_bytes(sizes[:1], (blocks,), 64)  # holds the conditional DiT, not both
    tight = load(tiny_checkpoint, dtype=mx.float32, memory_limit=one / 1e9)
    assert tight.plan(64, (0,)) == (blocks, 0) and tight.plan(64) < (blocks, blocks)
    assert load(no_uncond, dtype=mx.float32).budget.sizes[1] is None
    assert load(tiny_checkpoint, uncond="self").budget.sizes[1] is None  # one DiT, held once


def test_uncond_self_runs_one_dit_for_both_passes(tiny_checkpoint, no_uncond, loads):
    pipe = load(no_uncond, dtype=mx.float32, uncond="self", keep_in_memory=True)
    cond, uncond = pipe.dits(100)
    assert uncond is cond and loads == ["transformer"]
    again, none = pipe.dits(100, uncond=False)
    assert again is cond and none is None and loads == ["transformer"]
    a, result = image(no_uncond, uncond="self")
    b, _ = image(no_uncond, uncond="self")
    np.testing.assert_array_equal(a, b)  # deterministic
    exact, _ = image(tiny_checkpoint)
    assert np.abs(a.astype(int) - exact).max() > 0  # an approximation: another image
    assert result.metadata["uncond"] == "self"
    options, request = replay(result.metadata)
    assert options.uncond == "self"
    again = load(options, dtype=mx.float32).generate(request)
    np.testing.assert_array_equal(np.array(again.image), a)


def test_uncond_options_validate_and_round_trip():
    assert PipelineOptions("a/b", uncond="owner/delta").validate().uncond_delta == "owner/delta"
    with pytest.raises(InputError, match="uncond is empty; use 'checkpoint'"):
        PipelineOptions("a/b", uncond=" ").validate()
    with pytest.raises(InputError, match="uncond 3 must be one of checkpoint, self, or a delta"):
        PipelineOptions("a/b", uncond=3)
    with pytest.raises(LoRAError, match="--lora-uncond with --uncond self"):
        PipelineOptions.from_keywords(
            model="a/b", uncond="self", lora_uncond="u.safetensors"
        ).validate()
    options = PipelineOptions("a/b", dtype="float32", uncond="self")
    stored = options.to_metadata()
    assert stored["uncond"] == "self"
    assert PipelineOptions.from_metadata(stored) == options
    older = {k: v for k, v in stored.items() if k != "uncond"}  # before uncond was stored
    assert PipelineOptions.from_metadata(older).uncond == "checkpoint"
    assert PipelineOptions.from_metadata(stored, overrides={"uncond": "checkpoint"}).uncond == (
        "checkpoint"
    )


def test_cli_uncond_self_writes_it_into_the_metadata(no_uncond, tmp_path):
    output = tmp_path / "self.png"
    args = ["generate", "--model", str(no_uncond), "--dtype", "float32", "--prompt", CAPTION]
    args += ["--width", "256", "--height", "256", "--steps", "2", "--seed", "3"]
    result = CliRunner().invoke(main, [*args, "--output", str(output), "--uncond", "self"])
    assert result.exit_code == 0, result.output
    assert read_metadata(output)["uncond"] == "self"
    with Image.open(output) as png:
        assert png.size == (256, 256)
    failed = CliRunner().invoke(main, [*args, "--output", str(tmp_path / "x.png")])
    assert failed.exit_code != 0 and "has no unconditional_transformer/" in failed.output
