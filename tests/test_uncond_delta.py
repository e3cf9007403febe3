"""The unconditional DiT as a delta on the conditional one (issue #28 item 3): the synthetic
pair (uncond = cond + rank-4 + noise), ``convert --uncond-as-lora``, its report, strict shape
checks, and ``DeltaDiT`` against the two-DiT velocity and image.

Tolerance: fp32 throughout. ``full`` swaps in ``W_cond + (W_uncond - W_cond)``, which is
``W_uncond`` itself wherever the fp32 difference of two bf16 values is exact (all of them
here): the velocity is bit-identical, asserted within 1e-6 relative L2. A full-rank SVD delta
adds ``(x @ down.T) @ up.T`` to ``x @ W_cond.T``: both matmuls round in fp32 (~1e-7 relative
each) and the SVD factors reproduce D to ~1e-6 of ||D||, so the velocity agrees to well under
1e-5 relative L2 (measured 7e-7), the bound asserted; the image to one 8-bit level.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import served
from safetensors.numpy import save_file

from ideogram4_mlx.cli import main
from ideogram4_mlx.convert import convert
from ideogram4_mlx.dit_sequence import sequence_ids
from ideogram4_mlx.errors import InputError
from ideogram4_mlx.generation import velocity_fns
from ideogram4_mlx.lora import LoRAError, apply_loras, match, read_lora
from ideogram4_mlx.metadata import read_metadata
from ideogram4_mlx.pipeline import load
from ideogram4_mlx.request import GenerationRequest
from ideogram4_mlx.synth.uncond_pair import write_synthetic_pair
from ideogram4_mlx.transformer import Ideogram4Transformer
from ideogram4_mlx.uncond_delta import (
    DELTA_FILE,
    REPORT_FILE,
    DeltaDiT,
    load_uncond_delta,
    read_uncond_delta,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
RANK = 4  # of the synthetic pair's linear deltas
VELOCITY_TOLERANCE = 1e-5  # relative L2, fp32 (see the module docstring)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return write_synthetic_pair(tmp_path_factory.mktemp("pair") / "ckpt", rank=RANK)


def delta_folder(pair, root, rank):
    return convert(
        pair.path,
        root / f"delta-{rank}",
        dtype="float32",
        uncond_as_lora=rank,
        components=("transformer",),
        progress=False,
    )


@pytest.fixture(scope="module")
def full(pair, tmp_path_factory):
    return delta_folder(pair, tmp_path_factory.mktemp("full"), "full")


@pytest.fixture(scope="module")
def dits(pair):
    cond = Ideogram4Transformer.from_pretrained(pair.path / "transformer", mx.float32)
    uncond = Ideogram4Transformer.from_pretrained(
        pair.path / "unconditional_transformer", mx.float32, text_input=False
    )
    return cond, uncond


def velocities(cond, uncond, grid=4, seed=0):
    features = mx.random.normal((1, 5, cond.config.llm_features_dim), key=mx.random.key(seed))
    z = mx.random.normal((1, grid * grid, 128), key=mx.random.key(seed + 1))
    cond_fn, uncond_fn = velocity_fns(cond, uncond, features, grid, grid)
    return np.array(cond_fn(z, 0.7)), np.array(uncond_fn(z, 0.7))


def relative(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_the_pair_is_low_rank_plus_noise(pair):
    assert pair.floors and all(0 < f < 0.01 for f in pair.floors.values())


@pytest.mark.parametrize("rank", ["full", 256])
def test_a_full_delta_reproduces_the_two_dit_velocity(pair, dits, full, tmp_path, rank):
    cond, uncond = dits
    folder = full if rank == "full" else delta_folder(pair, tmp_path, rank)
    cond_before, two_dit = velocities(cond, uncond)
    delta = load_uncond_delta(folder, cond)
    cond_after, one_dit = velocities(cond, delta)
    err = relative(one_dit, two_dit)
    assert err <= (1e-6 if rank == "full" else VELOCITY_TOLERANCE), err
    # the conditional pass is untouched, before and after an unconditional one
    np.testing.assert_array_equal(cond_after, cond_before)
    np.testing.assert_array_equal(velocities(cond, delta)[0], cond_before)
    # the delta's scale is per pass: 0 is the conditional DiT on image tokens
    delta.set_scale("unconditional delta", 0.0)
    assert relative(velocities(cond, delta)[1], two_dit) > 1e-3


def test_conditional_loras_stay_off_the_unconditional_pass(pair, full, tmp_path):
    from ideogram4_mlx.synth.configs import dit_config
    from ideogram4_mlx.synth.lora import write_synthetic_lora
    from ideogram4_mlx.synth.plan import SYNTHETIC_PRESETS

    cond = Ideogram4Transformer.from_pretrained(pair.path / "transformer", mx.float32)
    delta = load_uncond_delta(full / DELTA_FILE, cond)
    plain_cond, plain_uncond = velocities(cond, delta)
    path = write_synthetic_lora(
        tmp_path / "l.safetensors", dit_config(SYNTHETIC_PRESETS["tiny"]), "ai-toolkit"
    )
    apply_loras(cond, [(read_lora(path), 1.0)])
    styled_cond, styled_uncond = velocities(cond, delta)
    assert relative(styled_cond, plain_cond) > 1e-3
    np.testing.assert_array_equal(styled_uncond, plain_uncond)
    on_uncond = DeltaDiT(
        Ideogram4Transformer.from_pretrained(pair.path / "transformer", mx.float32),
        read_lora(full / DELTA_FILE),
        uncond_loras=[(read_lora(path), 1.0)],
    )
    assert relative(velocities(on_uncond.dit, on_uncond)[1], plain_uncond) > 1e-3


def test_a_full_delta_reproduces_the_two_dit_image(pair, full, tmp_path):
    """--uncond DELTA through the pipeline: one DiT loaded, the two-DiT image; a converted
    checkpoint holding the delta in place of unconditional_transformer/ uses it by itself."""
    noise = np.random.default_rng(3).standard_normal((1, 256, 128)).astype(np.float32)
    settings = dict(width=256, height=256, num_steps=2, seed=None, noise=noise)
    two = load(pair.path, dtype="float32", keep_in_memory=True).generate("a cat", **settings)
    pipe = load(pair.path, dtype="float32", keep_in_memory=True, uncond=str(full))
    one = pipe.generate("a cat", **settings)
    assert relative(one.latents, two.latents) <= VELOCITY_TOLERANCE
    a, b = np.asarray(one.image, np.int16), np.asarray(two.image, np.int16)
    assert np.abs(a - b).max() <= 1
    cond, uncond = pipe.dits()
    assert isinstance(uncond, DeltaDiT) and uncond.dit is cond and pipe.held() == (0,)
    # step caching runs through the delta's pass too (one cache per branch)
    np.testing.assert_array_equal(
        pipe.generate("a cat", **settings, cache_threshold=0.0).latents, one.latents
    )
    cached = pipe.generate("a cat", **{**settings, "num_steps": 6}, cache_threshold=1.0)
    assert set(cached.stats["denoise"]) >= {"cond", "uncond"}
    assert one.metadata["uncond"] == str(full)
    assert one.metadata["uncond_delta"]["sha256"] == read_lora(full / DELTA_FILE).sha256
    # the whole checkpoint converted: the delta in place of unconditional_transformer/
    dst = convert(pair.path, tmp_path / "one-dit", dtype="float32", uncond_as_lora="full",
                  progress=False)  # fmt: skip
    assert not (dst / "unconditional_transformer").exists()
    in_place = load(dst, dtype="float32", keep_in_memory=True)
    assert in_place.delta_source == str(dst) and in_place.options.uncond == "checkpoint"
    np.testing.assert_array_equal(in_place.generate("a cat", **settings).latents, one.latents)


@pytest.mark.parametrize("flag", ["fuse_lora", "low_memory", "distributed"])
def test_a_delta_refuses_what_it_cannot_run_with(pair, full, flag):
    with pytest.raises(
        InputError, match=f"a delta on the conditional DiT.*--{flag.replace('_', '-')}"
    ):
        load(pair.path, uncond=str(full), **{flag: True})


def test_error_falls_with_rank_and_reaches_the_noise_at_the_true_rank(pair, full, tmp_path):
    reports = {}
    for rank in (RANK - 1, RANK):
        folder = delta_folder(pair, tmp_path, rank)
        reports[rank] = json.loads((folder / REPORT_FILE).read_text())
        assert (folder / DELTA_FILE).is_file() and not (
            folder / "unconditional_transformer"
        ).exists()
    full_report = json.loads((full / REPORT_FILE).read_text())
    assert full_report["summary"]["low_rank_layers"] == 0
    assert full_report["summary"]["max_relative_error"] == 0
    for key, floor in pair.floors.items():
        if key.startswith("llm_cond"):
            assert key not in reports[RANK]["layers"]  # never read on the unconditional pass
            continue
        below = reports[RANK - 1]["layers"][key]["relative_error"]
        at = reports[RANK]["layers"][key]
        assert at["kind"] == "lora" and at["rank"] == RANK
        assert at["relative_error"] <= floor + 1e-5, key  # as good as the noise allows
        assert below > 10 * floor, key  # one rank short misses a whole component
        errors = list(at["error_by_rank"].values())
        assert errors == sorted(errors, reverse=True), key  # monotone in rank
        assert abs(at["error_by_rank"][str(RANK)] - at["relative_error"]) < 1e-4
    small = [e for e in reports[RANK]["layers"].values() if e["kind"] == "diff"]
    assert small and all(e["relative_error"] == 0 for e in small)


def write(path, tensors):
    save_file({k: np.asarray(v, np.float32) for k, v in tensors.items()}, str(path))
    return path


@pytest.mark.parametrize(
    "tensors, message",
    [
        (
            {"diffusion_model.layers.0.attention_norm1.diff": np.ones(7)},
            r"attention_norm1.diff has shape \(7,\), but layers.0.attention_norm1.weight is",
        ),
        (
            {"diffusion_model.layers.9.ffn_norm1.diff": np.ones(256)},
            r"layers.9.ffn_norm1.diff names layers.9.ffn_norm1.weight, which the DiT does not",
        ),
        (
            {
                "diffusion_model.layers.0.feed_forward.w1.lora_A.weight": np.ones((2, 255)),
                "diffusion_model.layers.0.feed_forward.w1.lora_B.weight": np.ones((256, 2)),
            },
            r"w1.lora_B.weight gives a \(256, 255\) update, but layers.0.feed_forward.w1 is",
        ),
        ({"diffusion_model.x.lora_A.weight": np.ones((2, 2))}, "no matching lora_B"),
    ],
)
def test_strict_shapes_name_the_key(pair, tmp_path, tensors, message):
    skeleton = Ideogram4Transformer.build(pair.path / "transformer")
    with pytest.raises(LoRAError, match=message):
        read_uncond_delta(write(tmp_path / "bad.safetensors", tensors), skeleton)


def test_other_layouts_and_refusals(pair, full, tmp_path):
    # kohya names (lora_down/up, .alpha) and a diff_b, with diffusers' prefix: read alike
    hidden = 256
    path = write(
        tmp_path / "kohya.safetensors",
        {
            "transformer.layers.1.attention.o.lora_down.weight": np.ones((2, hidden)),
            "transformer.layers.1.attention.o.lora_up.weight": np.ones((hidden, 2)),
            "transformer.layers.1.attention.o.alpha": np.array(1.0),
            "transformer.layers.1.adaln_modulation.diff_b": np.ones(4 * hidden),
        },
    )
    cond = Ideogram4Transformer.from_pretrained(pair.path / "transformer", mx.float32)
    delta = load_uncond_delta(path, cond)
    assert list(delta.swapped) == ["layers.1.adaln_modulation.bias"]
    # a plain --lora refuses full differences by key
    with pytest.raises(LoRAError, match=r"key transformer.layers.1.adaln_modulation.diff_b is a"):
        match(read_lora(path), {"layers.1.attention.o": (hidden, hidden)})
    with pytest.raises(FileNotFoundError, match="holds no unconditional_delta.safetensors"):
        load_uncond_delta(tmp_path, cond)
    streamed = Ideogram4Transformer.from_pretrained(
        pair.path / "transformer", mx.float32, low_memory=True
    )
    with pytest.raises(InputError, match="needs every block of the conditional DiT resident"):
        load_uncond_delta(full, streamed)
    with pytest.raises(ValueError, match="takes no text features"):
        delta.prepare(mx.zeros((1, 1, 4)), *sequence_ids([1], 2, 2))


def test_convert_options(pair, tmp_path):
    with pytest.raises(InputError, match="give a rank from 1 to 1024, or full"):
        convert(pair.path, tmp_path / "x", uncond_as_lora="abc")
    with pytest.raises(InputError, match="full adds exact differences"):
        convert(pair.path, tmp_path / "x", uncond_as_lora="full", quantize=4)
    result = CliRunner().invoke(
        main, ["convert", str(pair.path), str(tmp_path / "y"), "--uncond-as-lora", "0"]
    )
    assert result.exit_code != 0 and "give a rank from 1 to 1024" in result.output


def test_serve_runs_the_unconditional_pass_through_a_delta(pair, full, tmp_path, monkeypatch):
    """serve --uncond DELTA: one DiT held, a job's image recorded with the delta's SHA-256."""
    queues = served(monkeypatch)
    args = ["serve", "--model", str(pair.path), "--dtype", "float32", "--uncond", str(full),
            "--output-dir", str(tmp_path / "out")]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    (jobs,) = queues
    try:
        request = GenerationRequest("a cat", width=256, height=256, num_steps=2, seed=1)
        job = jobs.wait(jobs.submit(request), timeout=120)
        assert job.state == "done", job.summary()
        stored = read_metadata(job.path)
        assert stored["uncond_delta"]["sha256"] == read_lora(full / DELTA_FILE).sha256
        assert jobs.pipe.held() == (0,)
    finally:
        jobs.shutdown()
