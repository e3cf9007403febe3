"""`ideo4-mlx generate` end to end on the tiny synthetic checkpoint, and ideogram4_mlx.metadata.

Three real generations (fp32, 2 steps, 256-320 px) are shared across the assertions; option
plumbing and replay overrides use a fake pipeline, and every bad input fails before a model
loads.
"""

import json
import os
import sys
import warnings
from dataclasses import replace
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ideogram4_mlx import __version__, environment
from ideogram4_mlx.cli import main
from ideogram4_mlx.environment import describe
from ideogram4_mlx.hub import DEFAULT_REPO
from ideogram4_mlx.metadata import PNG_KEY, png_info, read_metadata, replay, save_png
from ideogram4_mlx.pipeline import GenerationResult
from ideogram4_mlx.pipeline_options import PipelineOptions
from ideogram4_mlx.previews import StepPreviews
from ideogram4_mlx.request import GenerationRequest, ResolvedRequest

# the package attribute `generate` is the command, so patch by dotted module path
GENERATE_MODULE = "ideogram4_mlx.cli.generate"

CAPTION = (
    '{"high_level_description":"a café sign","compositional_deconstruction":'
    '{"background":"white","elements":[{"type":"text","text":"CAFÉ","desc":"bold"}]}}'
)
FAST = ["--dtype", "float32", "--steps", "2"]


def invoke(*args):
    return CliRunner().invoke(main, ["generate", *(str(a) for a in args)])


def pixels(path):
    with Image.open(path) as image:
        return np.array(image)


def sample_metadata(**changes):
    metadata = {
        "prompt": CAPTION,
        "preset": "V4_DEFAULT_20",
        "width": 320,
        "height": 256,
        "seed": 7,
        "noise": "seeded",
        "num_steps": 2,
        "guidance_schedule": [5.0, 2.5],
        "mu": 0.25,
        "std": 1.5,
        "model": "owner/repo",
        "revision": "abc123",
        "dtype": "float32",
        "uncond": "checkpoint",
        "quantization": None,
        "caption_findings": [],
        "version": __version__,
        "environment": describe(),
    }
    return {**metadata, **changes}


# -- real generations ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def made(tiny_checkpoint, tmp_path_factory):
    """One run using most options; --force replaces a file that is already there."""
    folder = tmp_path_factory.mktemp("generate")
    caption = folder / "caption.json"
    caption.write_text(f"\n{CAPTION}\n", encoding="utf-8")
    output = folder / "out" / "image.png"
    output.parent.mkdir()
    output.write_bytes(b"old")
    result = invoke(
        "--model", tiny_checkpoint, "--prompt-file", caption, *FAST,
        "--width", 320, "--height", 256, "--seed", 7, "--guidance-schedule", "5,2.5",
        "--mu", 0.25, "--std", 1.5, "--verbose", "--stepwise-dir", folder / "steps",
        "--output", output, "--force",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return SimpleNamespace(result=result, output=output, folder=folder, model=tiny_checkpoint)


def test_png_and_its_metadata(made):
    with Image.open(made.output) as image:
        assert image.size == (320, 256) and image.mode == "RGB"
    assert sorted(p.name for p in made.output.parent.iterdir()) == ["image.png"]  # no temp file
    assert read_metadata(made.output) == sample_metadata(
        model=str(made.model), revision=None
    )  # the prompt is the file's text without the surrounding newlines


def test_verbose_prints_stages_and_the_progress_bar_goes_to_stderr(made):
    err = made.result.stderr
    for stage in ("encode", "denoise", "decode"):
        assert f"[{stage}] " in err and " GB" in err  # with --verbose: peak memory per stage
    out = made.result.stdout
    assert "[total]" in out and out.endswith(f"{made.output} (seed 7)\n")
    assert "denoise" in err and "2/2" in err
    assert "warning" not in made.result.stderr  # a valid caption has no findings


def test_stepwise_dir_holds_one_preview_per_step_and_the_last_is_the_image(made):
    steps = made.folder / "steps"
    assert sorted(p.name for p in steps.iterdir()) == ["step_001.png", "step_002.png"]
    final = pixels(made.output)
    assert pixels(steps / "step_001.png").shape == final.shape
    assert not np.array_equal(pixels(steps / "step_001.png"), final)
    np.testing.assert_array_equal(pixels(steps / "step_002.png"), final)


def test_from_metadata_replays_pixel_identical(made, tmp_path):
    replay = tmp_path / "replay.png"
    result = invoke("--from-metadata", made.output, "--output", replay)
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(pixels(replay), pixels(made.output))
    assert read_metadata(replay) == read_metadata(made.output)
    assert f"replay: identical to {made.output}" in result.stderr
    assert "another setup" not in result.stderr  # same machine, same libraries


def test_replay_on_another_setup_warns_and_reports_the_difference(made, tmp_path):
    stored = read_metadata(made.output)
    stored["environment"] = {**stored["environment"], "backend": "metal", "blas": "accelerate"}
    elsewhere = save_png(Image.open(made.output).convert("RGB"), tmp_path / "mac.png", stored)
    changed = pixels(elsewhere).copy()
    changed[0, :10] ^= 1  # as if the Mac's pixels differed by one level in 10 places
    save_png(Image.fromarray(changed), elsewhere, stored, force=True)
    result = invoke("--from-metadata", elsewhere, "--output", tmp_path / "replay.png")
    assert result.exit_code == 0, result.output
    assert "warning: the image was made on another setup (backend: metal -> cpu" in result.stderr
    assert "replay: differs from" in result.stderr and "by at most 1 levels" in result.stderr


def test_plain_prompt_preset_random_seed_and_default_output(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--model", tiny_checkpoint, "--prompt", "a cat", "--preset", "V4_TURBO_12", *FAST]
    args += ["--width", 256, "--height", 256]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "warning: caption: plain-text prompt" in result.stderr
    # one line as each quiet stage starts and ends, without --verbose
    for line in ("[encode] ...", "[decode] ...", "[encode] ", "[decode] "):
        assert line in result.stderr
    assert " GB" not in result.stderr
    metadata = read_metadata(tmp_path / "ideogram4.png")
    assert isinstance(metadata["seed"], int)
    assert result.stdout == f"ideogram4.png (seed {metadata['seed']})\n"
    assert metadata["preset"] == "V4_TURBO_12" and metadata["prompt"] == "a cat"
    # TURBO_12 at 2 steps keeps its shape: main weight 7, then one polish step at 3
    schedule = metadata["guidance_schedule"], metadata["mu"], metadata["std"]
    assert schedule == ([7.0, 3.0], 0.5, 1.75)
    before = pixels(tmp_path / "ideogram4.png")
    again = invoke(*args)
    assert again.exit_code == 1
    assert "ideogram4.png already exists; pass --force to replace it" in again.output
    np.testing.assert_array_equal(pixels(tmp_path / "ideogram4.png"), before)


# -- option plumbing with a fake pipeline --------------------------------------------------------


@pytest.fixture
def fake(monkeypatch):
    """Replaces ``load``; records what ``load`` and ``start`` receive."""
    seen = SimpleNamespace(load=None, request=None)

    class FakeGeneration:
        num_steps = 0

        def __iter__(self):
            return iter(())

        def result(self):
            r = seen.request
            image = Image.new("RGB", (r.width or 16, r.height or 16))  # None: the default
            seed = 1 if r.seed is None else r.seed
            return GenerationResult(image, np.zeros(1), {"seed": seed}, {})

    class FakePipe:
        cfg = None  # not CFG-parallel

        def start(self, request, verbose=False, report=None):
            # the CLI hands over its preflight's ResolvedRequest (validated once)
            assert isinstance(request, ResolvedRequest)
            seen.request, seen.verbose = request.request, verbose
            return FakeGeneration()

    def fake_load(options, **keywords):
        options = replace(options, **keywords)
        seen.options = options
        seen.load = {"model": options.model, "dtype": options.dtype, "revision": options.revision}
        seen.memory_limit, seen.keep_in_memory = options.memory_limit, options.keep_in_memory
        return FakePipe()

    monkeypatch.setattr(sys.modules[GENERATE_MODULE], "load", fake_load)
    return seen


def test_defaults_reach_load_and_the_request(fake, tmp_path, monkeypatch):
    monkeypatch.setattr(environment, "backend", lambda: "metal")
    result = invoke("--prompt", CAPTION, "--output", tmp_path / "a.png")
    assert result.exit_code == 0, result.output
    assert fake.load == {"model": DEFAULT_REPO, "dtype": mx.bfloat16, "revision": None}
    assert fake.memory_limit is None  # the machine's (tests/test_memory_limit.py); 0: low memory
    # every other default (validated: the dtype resolved for the backend)
    assert fake.options == PipelineOptions(keep_in_memory=False).validate()
    assert fake.keep_in_memory is False  # one image per process: free each model after use
    assert fake.verbose is False
    # the CLI's defaults are the request's (resolved: the default size filled in)
    assert fake.request == GenerationRequest(CAPTION).validate().request


@pytest.mark.parametrize(
    "backend, dtype, line",
    [
        ("cpu", mx.float32, "dtype: float32 (MLX CPU backend; --dtype to choose)"),
        ("metal", mx.bfloat16, "dtype: bfloat16 (MLX Metal backend; --dtype to choose)"),
        ("cuda", mx.bfloat16, "dtype: bfloat16 (MLX CUDA backend; --dtype to choose)"),
    ],
)
def test_the_default_dtype_is_the_backends_and_said_on_stderr(
    fake, tmp_path, monkeypatch, backend, dtype, line
):
    monkeypatch.setattr(environment, "backend", lambda: backend)
    result = invoke("--prompt", CAPTION, "--output", tmp_path / "a.png")
    assert result.exit_code == 0, result.output
    assert fake.load["dtype"] == dtype
    assert line in result.stderr.splitlines() and line not in result.stdout
    # --dtype wins, and then nothing is said
    result = invoke("--prompt", CAPTION, "--dtype", "float16", "--output", tmp_path / "b.png")
    assert result.exit_code == 0, result.output
    assert fake.load["dtype"] == mx.float16 and "dtype:" not in result.stderr


def test_a_replay_keeps_the_stored_dtype_whatever_the_backend(fake, tmp_path, monkeypatch):
    monkeypatch.setattr(environment, "backend", lambda: "cpu")  # its own choice: float32
    stored = save_png(
        Image.new("RGB", (8, 8)), tmp_path / "bf16.png", sample_metadata(dtype="bfloat16")
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # made on another setup
        result = invoke("--from-metadata", stored, "--output", tmp_path / "again.png")
    assert result.exit_code == 0, result.output
    assert fake.load["dtype"] == mx.bfloat16 and "dtype:" not in result.stderr


def test_num_steps_alias_and_one_guidance_weight(fake, tmp_path):
    args = ["--prompt", CAPTION, "--num-steps", 4, "--guidance-schedule", "4.5"]
    assert invoke(*args, "--output", tmp_path / "a.png").exit_code == 0
    assert fake.request.num_steps == 4 and fake.request.guidance_schedule == (4.5,)


@pytest.mark.parametrize(
    "args, load_changes, request_changes",
    [
        ([], {}, {}),
        (["--seed", 9], {}, {"seed": 9}),
        (["--model", "other/repo"], {"model": "other/repo", "revision": None}, {}),
        (["--dtype", "bfloat16"], {"dtype": mx.bfloat16}, {}),
        (["--prompt", "a dog", "--width", 512], {}, {"prompt": "a dog", "width": 512}),
        # the stored schedule is explicit (not the preset's shape): it must be given anew
        (["--steps", 3, "--guidance-schedule", 4], {}, {"num_steps": 3, "guidance_schedule": (4,)}),
        (["--strict-caption"], {}, {"strict_caption": True}),
        (["--cache-threshold", 0.08], {}, {"cache_threshold": 0.08}),
        # explicit settings of the image stay under the new preset
        (["--preset", "V4_TURBO_12", "--std", 2.0], {}, {"preset": "V4_TURBO_12", "std": 2.0}),
    ],
)
def test_from_metadata_options_override_the_stored_ones(
    fake, tmp_path, args, load_changes, request_changes
):
    stored = save_png(Image.new("RGB", (8, 8)), tmp_path / "stored.png", sample_metadata())
    result = invoke("--from-metadata", stored, *args, "--output", tmp_path / "new.png")
    assert result.exit_code == 0, result.output
    assert fake.load == {
        "model": "owner/repo",
        "dtype": mx.float32,
        "revision": "abc123",
        **load_changes,
    }
    stored_request = GenerationRequest(
        CAPTION, 320, 256, "V4_DEFAULT_20", 2, (5.0, 2.5), 0.25, 1.5, seed=7
    )
    assert fake.request == replace(stored_request, **request_changes)


# -- bad inputs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "x", "--width", 250], "width 250 is not supported"),
        (["--prompt", "x", "--width", 2048, "--height", 256], "aspect ratio 2048x256"),
        (["--prompt", "x", "--preset", "V4_NOPE"], "Invalid value for '--preset'"),
        (["--prompt-file", "{tmp}/missing.json"], "does not exist"),
        (["--prompt", "x", "--prompt-file", "{tmp}/ok.txt"], "not both"),
        ([], "give --prompt or --prompt-file"),
        (["--prompt", "  "], "the prompt is empty"),
        (["--prompt-file", "{tmp}/bad.json"], "bad.json is not valid JSON: Expecting"),
        (["--prompt-file", "{tmp}/bad.txt"], "line 2 column 1"),
        (["--prompt-file", "{tmp}/latin1.txt"], "latin1.txt is not UTF-8 text"),
        (["--prompt-file", "/dev/zero"], "/dev/zero is over 256 KiB; a prompt or caption is"),
        (["--prompt-file", "{tmp}/huge.txt"], "huge.txt is over 256 KiB"),
        (["--prompt", "a cat", "--strict-caption"], "caption check failed: plain-text prompt"),
        (["--prompt", "x", "--guidance-schedule", "7,x"], "not a comma-separated list"),
        (["--prompt", "x", "--guidance-schedule", "7,nan"], "must be finite"),
        (
            ["--prompt", "x", "--steps", 2, "--guidance-schedule", "7,3,3"],
            "guidance_schedule has 3 entries but num_steps is 2",
        ),
        (["--prompt", "x", "--std", 0], "std must be > 0"),
        (["--prompt", "x", "--seed", -1], "seed -1 is out of range: use 0..9223372036854775807"),
        (["--prompt", "x", "--seed", 2**63], f"seed {2**63} is out of range"),
        (["--prompt", "x", "--output", "{tmp}/out.jpg"], "use a .png name"),
        (["--prompt", "x", "--dtype", "int8"], "Invalid value for '--dtype'"),
        (["--prompt", "x", "--steps", 10**9], "num_steps 1000000000 is out of range: use 1..1000"),
        (["--prompt", "x", "--mu", "nan"], "mu must be a finite number, got nan"),
        (["--prompt", "x", "--std", "inf"], "std must be a finite number, got inf"),
        (["--prompt", "x", "--cache-threshold", 2], "cache_threshold 2.0 is out of range"),
        (["--prompt", "x", "--guidance-schedule", "7,inf"], "must be finite"),
        (["--prompt", "[" * 5000 + "]" * 5000], "nests brackets more than 64 levels"),
        (["--prompt-file", "{tmp}/deep.json"], "deep.json: the JSON nests"),
        (["--prompt", "x", "--output", "{tmp}/ok.txt/out.png"], "cannot write into"),
        (["--prompt", "x", "--output", "{tmp}/dir.png"], "dir.png' is a directory"),
        (["--from-metadata", "{tmp}/huge_steps.png"], "num_steps 1000000000 is out of range"),
        (["--from-metadata", "{tmp}/nan_mu.png"], "mu must be a finite number, got nan"),
        (["--from-metadata", "{tmp}/text_mu.png"], "metadata field 'mu' is 'NaN': expected Real"),
        (["--from-metadata", "{tmp}/text_width.png"], "metadata field 'width' is 'abc'"),
    ],
)
def test_bad_inputs_fail_before_loading_with_one_line(monkeypatch, tmp_path, args, message):
    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(sys.modules[GENERATE_MODULE], "load", no_load)
    (tmp_path / "bad.json").write_text('{"a": 1,,}', encoding="utf-8")
    (tmp_path / "bad.txt").write_text('{"a": 1,\n', encoding="utf-8")
    (tmp_path / "ok.txt").write_text("a cat", encoding="utf-8")
    (tmp_path / "latin1.txt").write_text("un café", encoding="latin-1")
    (tmp_path / "huge.txt").write_text("a fox " * 50_000, encoding="utf-8")  # 300 KB
    (tmp_path / "deep.json").write_text("[" * 5000 + "]" * 5000, encoding="utf-8")
    (tmp_path / "dir.png").mkdir()
    stored = {
        "huge_steps.png": sample_metadata(num_steps=10**9),
        "nan_mu.png": sample_metadata(mu=float("nan")),
        "text_mu.png": sample_metadata(mu="NaN"),
        "text_width.png": sample_metadata(width="abc"),
    }
    for name, metadata in stored.items():
        save_png(Image.new("RGB", (8, 8)), tmp_path / name, metadata)
    args = [str(a).format(tmp=tmp_path) for a in args]
    result = invoke("--output", tmp_path / "out.png", *args)  # a later --output wins
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out.png").exists()


def test_stepwise_dir_must_be_empty_unless_force_and_links_are_replaced(fake, tmp_path):
    steps = tmp_path / "steps"
    steps.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (steps / "step_001.png").symlink_to(victim)
    args = ["--prompt", CAPTION, "--stepwise-dir", steps, "--output", tmp_path / "a.png"]
    result = invoke(*args)
    assert result.exit_code == 1 and f"{steps} is not empty; pass --force" in result.output
    assert fake.load is None  # refused before loading
    previews = StepPreviews(steps, force=True)

    # the preview path without a model: a stand-in generation whose preview is black
    black = SimpleNamespace(preview=lambda z: Image.new("RGB", (256, 256)))
    step = SimpleNamespace(index=0, latents=mx.zeros((1, 256, 128)))
    path = previews.save(black, step)
    assert victim.read_text() == "keep me" and not path.is_symlink()
    assert pixels(path).shape == (256, 256, 3)


def test_every_problem_is_reported_at_once(monkeypatch, tmp_path):
    monkeypatch.setattr(sys.modules[GENERATE_MODULE], "load", lambda **k: 1 / 0)
    (tmp_path / "out.png").write_bytes(b"x")
    (tmp_path / "steps").mkdir()
    (tmp_path / "steps" / "old.png").write_bytes(b"x")
    args = ["--prompt", "a cat", "--width", 250, "--output", tmp_path / "out.png"]
    result = invoke(*args, "--stepwise-dir", tmp_path / "steps")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "out.png already exists" in result.output and "width 250" in result.output
    result = invoke("--prompt", "a cat", "--output", tmp_path / "out.png", "--force",
                    "--stepwise-dir", tmp_path / "steps", "--seed", -1)  # fmt: skip
    assert result.exit_code == 1 and "seed -1 is out of range" in result.output  # the library's


def test_invalid_json_prompt_is_an_error_unless_allowed(fake, tmp_path):
    args = ["--prompt", '{"high_level_description": "x",}', "--output", tmp_path / "a.png"]
    result = invoke(*args)
    assert result.exit_code == 1 and "starts with '{' but is not valid JSON" in result.output
    assert fake.load is None
    result = invoke(*args, "--allow-invalid-caption")
    assert result.exit_code == 0, result.output
    assert fake.request.allow_invalid_caption  # the pipeline then warns (test_request)


def test_nonexistent_model_folder(tmp_path):
    args = ["--model", tmp_path / "no" / "model", "--prompt", CAPTION]
    result = invoke(*args, "--output", tmp_path / "a.png")
    assert result.exit_code == 1 and "no such folder" in result.output


def test_from_metadata_needs_our_metadata_and_a_seed(tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    result = invoke("--from-metadata", plain, "--output", tmp_path / "out.png")
    assert result.exit_code == 1 and f"{plain} has no {PNG_KEY} metadata" in result.output
    noise = save_png(Image.new("RGB", (8, 8)), tmp_path / "n.png", sample_metadata(seed=None))
    result = invoke("--from-metadata", noise, "--output", tmp_path / "out.png")
    assert result.exit_code == 1 and "made from given noise" in result.output


# -- ideogram4_mlx.metadata ----------------------------------------------------------------------


def test_png_info_round_trips_any_text(tmp_path):
    metadata = sample_metadata(prompt="日本語の看板 🍜 \\u00e9", caption_findings=["x"])
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png", pnginfo=png_info(metadata))
    assert read_metadata(tmp_path / "a.png") == metadata
    with Image.open(tmp_path / "a.png") as image:
        assert image.text["Software"] == f"ideogram4-mlx {__version__}"


def test_save_png_is_atomic_and_refuses_to_overwrite(tmp_path):
    path = tmp_path / "new" / "folder" / "a.png"
    save_png(Image.new("RGB", (4, 4), "red"), path, {"seed": 1})
    assert read_metadata(path) == {"seed": 1}
    with pytest.raises(FileExistsError, match="a.png already exists"):
        save_png(Image.new("RGB", (4, 4)), path)
    save_png(Image.new("RGB", (4, 4), "blue"), path, {"seed": 2}, force=True)
    assert read_metadata(path) == {"seed": 2} and tuple(pixels(path)[0, 0]) == (0, 0, 255)
    with pytest.raises(TypeError):  # fails half-way: no temp file, the old image stays
        save_png(Image.new("RGB", (4, 4)), path, {"bad": object()}, force=True)
    assert [p.name for p in path.parent.iterdir()] == ["a.png"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert read_metadata(path) == {"seed": 2}


def test_read_metadata_errors_name_the_file(tmp_path):
    (tmp_path / "t.png").write_text("not an image")
    Image.new("RGB", (4, 4)).save(tmp_path / "a.jpg")
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    for name, text in (("broken.png", "{broken"), ("list.png", "[1]")):
        info = PngInfo()
        info.add_itxt(PNG_KEY, text)
        Image.new("RGB", (4, 4)).save(tmp_path / name, pnginfo=info)
    cases = {
        "t.png": "t.png is not an image",
        "a.jpg": "a.jpg is a JPEG file",
        "plain.png": "plain.png has no ideogram4-mlx metadata",
        "broken.png": "broken.png: the ideogram4-mlx metadata is not valid JSON",
        "list.png": "list.png: the ideogram4-mlx metadata is not a JSON object",
    }
    for name, message in cases.items():
        with pytest.raises(ValueError, match=message):
            read_metadata(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        read_metadata(tmp_path / "missing.png")


def test_replay_maps_metadata_to_load_and_the_request():
    options, request = replay(sample_metadata())
    assert options == PipelineOptions("owner/repo", "abc123", mx.float32)
    assert request == GenerationRequest(
        CAPTION, 320, 256, "V4_DEFAULT_20", 2, (5.0, 2.5), 0.25, 1.5, seed=7
    )
    assert replay(sample_metadata(dtype="bfloat16"))[0].dtype == mx.bfloat16
    # what the image does not store comes from the command line's options
    given = PipelineOptions(memory_limit=2.0, magic_options={"temperature": 0.0})
    assert replay(sample_metadata(), {}, given)[0] == replace(
        given, model="owner/repo", revision="abc123", dtype=mx.float32
    )
    assert request.to_metadata() == {
        k: v for k, v in sample_metadata().items() if k in request.to_metadata()
    }


def test_replay_of_preset_values_keeps_them_tied_to_the_preset():
    """Stored values equal to the preset's are not overrides: a new preset or step count
    brings its own, while the replay itself is unchanged."""
    turbo = {"preset": "V4_TURBO_12", "num_steps": 12, "mu": 0.5, "std": 1.75}
    stored = sample_metadata(**turbo, guidance_schedule=[7.0] * 11 + [3.0])
    _, request = replay(stored)
    assert (request.num_steps, request.guidance_schedule, request.mu, request.std) == (None,) * 4
    assert request.to_metadata()["guidance_schedule"] == stored["guidance_schedule"]
    _, default20 = replay(stored, {"preset": "V4_DEFAULT_20"})
    assert default20.to_metadata()["num_steps"] == 20 and default20.schedule().std == 1.75
    _, four = replay(stored, {"num_steps": 4})
    assert four.to_metadata()["guidance_schedule"] == [7.0, 7.0, 7.0, 3.0]
    _, fixed = replay(sample_metadata(**turbo, guidance_schedule=[5.0] * 12), {"num_steps": 4})
    with pytest.raises(ValueError, match="guidance_schedule has 12 entries but num_steps is 4"):
        fixed.schedule()  # an explicit schedule is kept: its length must be changed too


def test_replay_overrides():
    def changed(overrides):
        base_options, base = replay(sample_metadata())
        options, new = replay(sample_metadata(), overrides)
        diff = {k: v for k, v in vars(options).items() if vars(base_options)[k] != v}
        diff.update({k: v for k, v in vars(new).items() if vars(base)[k] != v})
        return diff

    assert changed({"seed": 3, "width": 512}) == {"seed": 3, "width": 512}
    assert changed({"model": "a/b"}) == {"model": "a/b", "revision": None}
    assert changed({"model": "a/b", "revision": "main"}) == {"model": "a/b", "revision": "main"}
    assert changed({"num_steps": 4}) == {"num_steps": 4}


def test_replay_errors():
    with pytest.raises(ValueError, match="made from given noise"):
        replay(sample_metadata(seed=None, noise="given"))
    assert replay(sample_metadata(seed=None), {"seed": 5})[1].seed == 5
    metadata = sample_metadata()
    del metadata["mu"], metadata["prompt"]
    with pytest.raises(ValueError, match="the metadata has no prompt, mu"):
        replay(metadata)
    with pytest.raises(ValueError, match="cannot override \\['noise'\\]"):
        replay(sample_metadata(), {"noise": "given"})
    with pytest.raises(ValueError, match="unknown dtype 'int4'"):
        replay(sample_metadata(dtype="int4"))


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("width", "abc", "expected int"),
        ("prompt", 12345, "expected str"),
        ("guidance_schedule", "7,7", "expected a list of numbers"),
        ("seed", "abc", "expected int or null"),
        ("mu", True, "expected Real"),
        ("model", 3, "expected str"),
    ],
)
def test_replay_names_a_mistyped_field(field, value, expected):
    with pytest.raises(ValueError, match=f"metadata field '{field}' is .*: {expected}"):
        replay(sample_metadata(**{field: value}))


def test_replay_warns_about_another_version():
    with pytest.warns(UserWarning, match="made by ideogram4-mlx 0.0.1"):
        replay(sample_metadata(version="0.0.1"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        replay(sample_metadata())


def test_metadata_is_json_with_the_stored_key(tmp_path):
    save_png(Image.new("RGB", (4, 4)), tmp_path / "a.png", sample_metadata())
    with Image.open(tmp_path / "a.png") as image:
        assert json.loads(image.text[PNG_KEY]) == sample_metadata()
