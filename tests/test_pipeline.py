"""Pipeline and loading: sizes, captions, seeds, noise, callbacks, memory policy, hub errors.

Runs the whole pipeline in fp32 on the tiny synthetic checkpoint (bf16 matmuls are slow on
MLX's CPU backend); parity with the PyTorch reference is in test_pipeline_parity.py.
"""

import json
import shutil
import warnings

import mlx.core as mx
import numpy as np
import pytest
from helpers import rel_l2
from huggingface_hub.errors import GatedRepoError
from PIL import Image

from ideogram4_mlx import environment, hub
from ideogram4_mlx.config import CheckpointError
from ideogram4_mlx.dtypes import dtype_name
from ideogram4_mlx.pipeline import load
from ideogram4_mlx.previews import StepPreviews
from ideogram4_mlx.request import CaptionError, GenerationRequest, check_size
from ideogram4_mlx.vae import decode

CAPTION = (
    '{"high_level_description":"a red sign","compositional_deconstruction":'
    '{"background":"white","elements":[{"type":"text","text":"OPEN","desc":"bold"}]}}'
)
FAST = {"width": 256, "height": 256, "num_steps": 3}


def denoised(pipe, prompt, noise=None, **settings) -> np.ndarray:
    """The final latents, not decoded: for checks that need no image."""
    generation = pipe.start(GenerationRequest(prompt, **settings), noise)
    for step in generation:
        mx.eval(step.latents)
    return np.array(generation.latents)


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return load(tiny_checkpoint, dtype=mx.float32, keep_in_memory=True)


@pytest.mark.parametrize(
    "width, height, match",
    [
        (250, 256, "width 250"),
        (256, 4096, "height 4096"),
        (240, 256, "width 240"),
        (2048, 256, "aspect"),
    ],
)
def test_bad_sizes_are_clear_errors(width, height, match):
    with pytest.raises(ValueError, match=match):
        check_size(width, height)


def test_size_to_grid():
    assert check_size(1024, 768) == (48, 64)
    assert check_size(1536, 256) == (16, 96)  # 6:1 is allowed


def test_seeded_generation_is_reproducible_and_seeds_differ(pipe):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = pipe.generate(CAPTION, seed=7, width=256, height=256, steps=3)  # the CLI's name
        b = denoised(pipe, CAPTION, seed=7, **FAST)  # the decode is a pure function of these
        c = denoised(pipe, CAPTION, seed=8, **FAST)
    assert a.image.size == (256, 256) and a.latents.shape == (1, 256, 128)
    np.testing.assert_array_equal(b, a.latents)
    assert not np.array_equal(c, a.latents)
    assert a.metadata["seed"] == 7 and a.metadata["num_steps"] == 3
    assert a.metadata["guidance_schedule"] == [7.0, 3.0, 3.0]  # DEFAULT_20 keeps 2 polish steps


def test_given_noise_replaces_the_seed_and_callback_sees_every_step(pipe):
    noise = np.random.default_rng(0).standard_normal((1, 256, 128)).astype(np.float32)
    steps = []
    result = pipe.generate(
        CAPTION, noise=noise, callback=lambda s, n, z: steps.append((s, n)), **FAST
    )
    assert steps == [(0, 3), (1, 3), (2, 3)]
    assert result.metadata["seed"] is None and result.metadata["noise"] == "given"
    again = denoised(pipe, CAPTION, noise=noise, seed=123, **FAST)
    np.testing.assert_array_equal(result.latents, again)
    with pytest.raises(ValueError, match=r"noise has shape \(1, 10, 128\)"):
        pipe.generate(CAPTION, noise=noise[:, :10], **FAST)


@pytest.fixture
def modelless(tiny_checkpoint):
    """A pipeline whose components raise when asked for: checks must come first."""
    pipe = load(tiny_checkpoint, dtype=mx.float32)

    def no_models(*a, **k):
        raise AssertionError("a model was loaded")

    pipe.prompt_encoder = pipe.dits = pipe.vae = no_models
    return pipe


def test_a_setting_under_both_its_names_fails_before_loading(modelless):
    with pytest.raises(ValueError, match="steps is another name for num_steps"):
        modelless.generate(CAPTION, steps=3, **FAST)
    with pytest.raises(TypeError, match=r"unknown generation setting\(s\) \['stepz'\]"):
        modelless.generate(CAPTION, stepz=3)


def test_strict_caption_fails_before_loading(modelless):
    pipe = modelless
    with pytest.raises(CaptionError, match="plain-text prompt"):
        pipe.generate("a cat", strict_caption=True, **FAST)
    with pytest.raises(CaptionError, match="compositional_deconstruction is missing"):
        pipe.generate('{"high_level_description": "x"}', strict_caption=True, **FAST)


def test_memory_policy_frees_components_unless_kept(tiny_checkpoint):
    pipe = load(tiny_checkpoint, dtype=mx.float32, keep_in_memory=False)
    with pytest.warns(UserWarning, match="plain-text prompt"):
        pipe.generate("a cat", seed=1, **FAST)
    assert pipe._dits is None and pipe._vae is None and pipe._prompt_encoder.model is None
    kept = load(tiny_checkpoint, dtype=mx.float32, keep_in_memory=True)
    kept.generate(CAPTION, seed=1, **FAST)
    assert (
        kept._dits is not None and kept._vae is not None and kept._prompt_encoder.model is not None
    )


def test_load_errors_name_the_problem(tiny_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="not a Hugging Face repo id"):
        load(tmp_path / "nothing" / "here")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "vae" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="vae/config.json is missing"):
        load(broken)


def test_gated_repo_message_says_how_to_get_access(monkeypatch):
    def refuse(*args, **kwargs):
        error = GatedRepoError.__new__(GatedRepoError)  # the real one needs an HTTP response
        Exception.__init__(error, "403 Client Error: gated repo")
        raise error

    monkeypatch.setattr(hub, "snapshot_download", refuse)
    with pytest.raises(
        hub.ModelAccessError, match="Request access on https://huggingface.co/.*HF_TOKEN"
    ):
        load("ideogram-ai/ideogram-4-fp8")


def test_repo_id_download_uses_only_needed_files(monkeypatch, tiny_checkpoint):
    seen = {}

    def fake_download(repo_id, revision=None, allow_patterns=None):
        seen.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return str(tiny_checkpoint)

    monkeypatch.setattr(hub, "snapshot_download", fake_download)
    pipe = load("ideogram-ai/ideogram-4-fp8")
    assert pipe.model_id == "ideogram-ai/ideogram-4-fp8" and pipe.revision == tiny_checkpoint.name
    assert "transformer/*" in seen["allow_patterns"] and "*" not in seen["allow_patterns"]


def test_cached_prompt_does_not_load_the_text_encoder_again(tiny_checkpoint):
    pipe = load(tiny_checkpoint, dtype=mx.float32, keep_in_memory=False)  # free after use
    first = denoised(pipe, CAPTION, seed=1, **FAST)
    again = denoised(pipe, CAPTION, seed=1, **FAST)
    encoder = pipe.prompt_encoder()
    assert encoder.loads == 1 and encoder.model is None
    np.testing.assert_array_equal(first, again)
    with pytest.warns(UserWarning, match="plain-text prompt"):
        denoised(pipe, "a new prompt", seed=1, **FAST)
    assert encoder.loads == 2


def test_start_yields_each_step_for_the_caller_to_evaluate(pipe):
    request = GenerationRequest(CAPTION, seed=5, **FAST)
    generation = pipe.start(request)
    with pytest.raises(RuntimeError, match="iterate over all the denoising steps"):
        generation.result()
    steps = []
    for step in generation:
        mx.eval(step.latents)
        steps.append((step.index, step.num_steps, step.t))
    schedule = request.validate().schedule
    assert steps == [(i, 3, float(schedule.grid[2 - i])) for i in range(3)]
    assert steps[-1][2] == float(schedule.grid[0])  # ends at t_max
    streamed = generation.result()
    direct = pipe.generate(request)  # generate() consumes the same iterator
    np.testing.assert_array_equal(streamed.latents, direct.latents)
    assert streamed.request == request and streamed.metadata == direct.metadata


def test_previews_decode_the_steps_with_the_generations_vae(pipe, tmp_path):
    generation = pipe.start(GenerationRequest(CAPTION, seed=3, **FAST))
    previews, r = StepPreviews(tmp_path / "steps"), generation.resolved
    for step in generation:
        mx.eval(step.latents)
        want = decode(pipe.vae(), step.latents, r.grid_h, r.grid_w)[0]
        np.testing.assert_array_equal(np.asarray(generation.preview(step.latents)), want)
        with Image.open(previews.save(generation, step)) as written:
            np.testing.assert_array_equal(np.asarray(written), want)
    final = np.asarray(generation.result().image)  # the last preview is the image
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "steps" / "step_003.png")), final
    )


def test_start_checks_the_request_before_any_model_loads(modelless):
    pipe = modelless
    with pytest.raises(ValueError, match="num_steps 5000 is out of range"):
        pipe.start(GenerationRequest(CAPTION, **{**FAST, "num_steps": 5000}))
    with pytest.raises(ValueError, match="mu must be a finite number"):
        pipe.generate(CAPTION, mu=float("nan"), **FAST)
    with pytest.raises(ValueError, match=r"guidance_schedule weight 1e\+30 is out of range"):
        pipe.generate(CAPTION, guidance_schedule=(1e30,), **FAST)
    with pytest.raises(ValueError, match="width '256' must be an integer"):
        pipe.generate(CAPTION, **{**FAST, "width": "256"})


def test_nan_latents_stop_with_a_clear_error(tiny_checkpoint, monkeypatch):
    from ideogram4_mlx import generation

    def nan_velocity(*args):
        def v(z, t):
            return mx.full(z.shape, float("nan"))

        return v, v

    monkeypatch.setattr(generation, "velocity_fns", nan_velocity)
    pipe = load(tiny_checkpoint, dtype=mx.float32)
    with pytest.raises(generation.NonFiniteError, match="NaN or infinite after step 1"):
        pipe.generate(CAPTION, seed=1, **FAST)
    assert pipe._vae is None  # stopped before decoding a black image


def test_overlong_prompt_fails_before_the_text_encoder_loads(tiny_checkpoint):
    pipe = load(tiny_checkpoint, dtype=mx.float32)
    with pytest.raises(ValueError, match="tokens long in the chat template; the limit is 2048"):
        pipe.start(GenerationRequest("word " * 3000, **FAST))
    assert pipe.prompt_encoder().loads == 0 and pipe._dits is None


def test_by_default_models_stay_loaded_when_they_fit(tiny_checkpoint, monkeypatch):
    from ideogram4_mlx import memory

    pipe = load(tiny_checkpoint, dtype=mx.float32)
    assert pipe.keep_in_memory  # a few MB: load once
    weights = pipe.budget.models_bytes()  # the byte rule: tests/test_memory_budget.py
    assert weights > 0
    over = weights / memory.GB * 0.999
    assert not load(tiny_checkpoint, dtype=mx.float32, memory_limit=over).keep_in_memory
    ram = int(weights / memory.KEEP_FRACTION)
    monkeypatch.setattr(memory, "physical_memory", lambda: ram - 1)
    assert not load(tiny_checkpoint, dtype=mx.float32).keep_in_memory
    assert load(tiny_checkpoint, dtype=mx.float32, keep_in_memory=True).keep_in_memory
    monkeypatch.setattr(memory, "physical_memory", lambda: ram + 2)
    assert load(tiny_checkpoint, dtype=mx.float32).keep_in_memory


def test_dtype_by_name_and_bad_dtypes_fail_at_load(tiny_checkpoint):
    assert load(tiny_checkpoint, dtype="float32").dtype == mx.float32
    assert load(tiny_checkpoint, dtype="bf16").dtype == mx.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        load(tiny_checkpoint, dtype="int8")
    with pytest.raises(ValueError, match="is not supported; use one of bfloat16"):
        load(tiny_checkpoint, dtype=np.float32)


@pytest.mark.parametrize(
    "backend, dtype", [("cpu", mx.float32), ("metal", mx.bfloat16), ("cuda", mx.bfloat16)]
)
def test_the_default_dtype_is_the_backends_and_stored_resolved(
    tiny_checkpoint, monkeypatch, backend, dtype
):
    monkeypatch.setattr(environment, "backend", lambda: backend)
    pipe = load(tiny_checkpoint)
    assert pipe.dtype == pipe.options.dtype == dtype
    assert pipe.settings()["dtype"] == dtype_name(dtype)  # a replay gets it back anywhere
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # float16 on the CPU backend: the slowness note
        assert load(tiny_checkpoint, dtype="float16").dtype == mx.float16  # a given dtype wins


def test_cpu_backend_warns_once_about_slow_bf16(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(environment, "backend", lambda: "cpu")
    with pytest.warns(UserWarning, match="CPU backend here, where bfloat16 matmuls are 10-50x"):
        load(tiny_checkpoint, dtype=mx.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(tiny_checkpoint, dtype=mx.float32)
        load(tiny_checkpoint)  # the default there: float32, nothing to warn about


def test_dict_caption_and_result_save_keep_the_metadata(pipe, tmp_path):
    from ideogram4_mlx.metadata import read_metadata

    caption = json.loads(CAPTION)
    result = pipe.generate(caption, seed=2, **FAST)
    assert result.request.prompt == CAPTION  # minified JSON, key order kept
    path = result.save(tmp_path / "a.png")
    assert read_metadata(path) == result.metadata
    assert read_metadata(path)["environment"]["mlx"] == mx.__version__
    with pytest.raises(FileExistsError):
        result.save(path)


def test_step_caching_counts_its_passes_and_moves_the_latents_a_little(tiny_checkpoint):
    """Random weights move block 0 by 80-160% a step, so here only a threshold of about 1
    skips a pass: this checks the counts, the records and a bound, not the quality."""
    pipe = load(tiny_checkpoint, dtype=mx.float32)
    kwargs = {"width": 256, "height": 256, "num_steps": 12, "seed": 3}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = pipe.generate(CAPTION, **kwargs)
        cached = pipe.generate(CAPTION, **kwargs, cache_threshold=1.0)
        again = pipe.generate(CAPTION, **kwargs, cache_threshold=1.0)
    every = {"full_passes": 12, "cached_passes": 0}
    assert plain.stats["denoise"]["cond"] == plain.stats["denoise"]["uncond"] == every
    assert "cache_threshold" not in plain.metadata and "cache_passes" not in plain.metadata
    passes = {k: cached.stats["denoise"][k] for k in ("cond", "uncond")}
    assert all(p["full_passes"] + p["cached_passes"] == 12 for p in passes.values())
    assert sum(p["cached_passes"] for p in passes.values()) > 0
    assert cached.metadata["cache_threshold"] == 1.0 and cached.metadata["cache_passes"] == passes
    assert 0 < rel_l2(cached.latents, plain.latents) <= 1e-2
    np.testing.assert_array_equal(again.latents, cached.latents)  # deterministic
    replayed = GenerationRequest.from_metadata(cached.metadata)
    assert replayed.cache_threshold == 1.0
