"""The training loop (``ideogram4_mlx.train.loop``) on the tiny synthetic DiT: it trains and
writes a LoRA our loader applies, a run resumed from a checkpoint ends bit for bit where a
straight run does, and the schedules and refusals are as documented.

The examples are in memory (an object with ``TrainingData``'s interface: ``items``,
``buckets``, ``batches``, ``load_batch``), random latents and text features of the tiny
checkpoint's sizes, two size buckets."""

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from ideogram4_mlx.errors import InputError
from ideogram4_mlx.lora import read_lora
from ideogram4_mlx.train.data import epoch_batches
from ideogram4_mlx.train.loop import TrainSettings, learning_rates, train
from ideogram4_mlx.transformer import Ideogram4Transformer


@dataclass(frozen=True)
class Item:
    features: Path
    latents: Path
    bucket: tuple[int, int]  # (width, height)


class Examples:
    """Four examples in two buckets (64x48 and 48x64 pixels: 4x3 and 3x4 token grids)."""

    def __init__(self, features_dim: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.items, self.arrays = [], []
        for i, bucket in enumerate([(64, 48), (64, 48), (48, 64), (48, 64)]):
            n = (bucket[0] // 16) * (bucket[1] // 16)
            text = 3 + i
            self.items.append(Item(Path(f"f{i}"), Path(f"l{i}"), bucket))
            self.arrays.append(
                (
                    mx.array(rng.standard_normal((n, 128), dtype=np.float32)),
                    mx.array(rng.standard_normal((text, features_dim), dtype=np.float32)),
                )
            )
        self.buckets = {(64, 48): [0, 1], (48, 64): [2, 3]}

    def batches(self, batch_size, seed, epoch):
        return epoch_batches(self.buckets, batch_size, seed, epoch)

    def load_batch(self, indices):
        rows = [self.arrays[i][1] for i in indices]
        lengths = [r.shape[0] for r in rows]
        t = max(lengths)
        features = mx.stack([mx.pad(r, [(t - r.shape[0], 0), (0, 0)]) for r in rows])
        return mx.stack([self.arrays[i][0] for i in indices]), features, lengths


@pytest.fixture(scope="module")
def setup(tiny_checkpoint):
    component = tiny_checkpoint / "transformer"
    dim = Ideogram4Transformer.from_pretrained(component, mx.float32).config.llm_features_dim
    pipe = SimpleNamespace(dit_dir=lambda name: tiny_checkpoint / name, dtype=mx.float32)
    return pipe, Examples(dim)


FAST = {"rank": 4, "learning_rate": 1e-3, "batch_size": 2, "seed": 3}


def tensors(path):
    return {k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(path)).items()}


def test_trains_and_writes_a_lora_our_loader_reads(setup, tmp_path):
    pipe, data = setup
    out = train(pipe, data, tmp_path / "style.safetensors", steps=3, **FAST)
    lora = read_lora(out)
    assert lora.layout == "diffusers/PEFT" and lora.ranks == [4]
    b = [v for k, v in tensors(out).items() if "lora_B" in k]
    assert b and any(np.abs(x).max() > 0 for x in b)  # trained away from B = 0


def test_a_resumed_run_ends_bit_for_bit_where_a_straight_run_does(setup, tmp_path):
    pipe, data = setup
    straight = train(pipe, data, tmp_path / "a.safetensors", steps=4, **FAST)
    first = tmp_path / "b.safetensors"
    settings = {**FAST, "steps": 4, "checkpoint_every": 2}
    lines = []

    class Stop(Exception):
        pass

    def stop_after_checkpoint(line):
        lines.append(line)
        raise Stop  # the run dies right after its checkpoint at step 2

    with pytest.raises(Stop):
        train(pipe, data, first, report=stop_after_checkpoint, **settings)
    assert lines == [f"checkpoint: step 2 in {tmp_path / 'b.state'}"] and not first.exists()
    resumed = train(pipe, data, first, resume=True, **settings)
    a, b = tensors(straight), tensors(resumed)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_resume_refuses_a_missing_or_different_checkpoint(setup, tmp_path):
    pipe, data = setup
    out = tmp_path / "c.safetensors"
    with pytest.raises(InputError, match="--resume: no checkpoint in"):
        train(pipe, data, out, resume=True, steps=2, **FAST)
    stopped = []

    def stop(line):
        stopped.append(line)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(pipe, data, out, steps=4, checkpoint_every=2, report=stop, **FAST)
    other = {**FAST, "learning_rate": 5e-4}
    with pytest.raises(InputError, match="made with other settings or data"):
        train(pipe, data, out, resume=True, steps=4, **other)


def test_schedules_warm_up_then_hold_or_fall():
    total = 10
    # after 2 warmup steps, 8 more: linear ends at 1e-3 * (1 - 7/8), cosine near 0
    for schedule, last in (("constant", 1e-3), ("linear", 1.25e-4), ("cosine", 3.8e-5)):
        rates = learning_rates(TrainSettings(learning_rate=1e-3, schedule=schedule,
                                             warmup_steps=2), total)  # fmt: skip
        values = [float(rates(mx.array(s))) for s in range(total)]
        assert values[0] == 0.0 and values[2] == pytest.approx(1e-3)
        assert all(b <= a + 1e-12 for a, b in zip(values[2:], values[3:], strict=False))
        assert values[-1] == pytest.approx(last, rel=1e-2)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"schedule": "step"}, "schedule 'step': use one of constant, linear, cosine"),
        ({"learning_rate": float("nan")}, "learning_rate must be a finite number > 0"),
        ({"steps": 0}, "steps must be a whole number in 1..1000000"),
        ({"batch_size": 0}, "batch_size and gradient_accumulation must be at least 1"),
        ({"warmup_steps": -1}, "warmup_steps must be a whole number >= 0"),
    ],
)
def test_bad_settings_are_one_line(settings, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainSettings(**settings)


def test_epochs_count_accumulated_steps():
    settings = TrainSettings(epochs=3, gradient_accumulation=2)
    assert settings.total_steps(5) == 9  # ceil(5 / 2) steps per epoch
    assert TrainSettings(steps=7).total_steps(5) == 7


@pytest.mark.filterwarnings("ignore:caption. plain-text prompt")
def test_sample_images_are_rendered_with_the_dit_being_trained(tiny_checkpoint, setup, tmp_path):
    from ideogram4_mlx import load
    from ideogram4_mlx.metadata import read_metadata
    from ideogram4_mlx.train.samples import TrainingSamples

    _, data = setup
    pipe = load(tiny_checkpoint, dtype=mx.float32, keep_in_memory=False)
    folder = tmp_path / "samples"
    samples = TrainingSamples(pipe, ["a sun"], folder, (256, 256), seed=5, num_steps=2)
    lines = []
    settings = {**FAST, "learning_rate": 1e-2}  # big steps: the samples must change
    train(pipe, data, tmp_path / "s.safetensors", steps=4, samples=samples, sample_every=2,
          report=lines.append, **settings)  # fmt: skip
    paths = [folder / "step-000002-1.png", folder / "step-000004-1.png"]
    assert lines == [f"sample: {p}" for p in paths]
    assert read_metadata(paths[0])["prompt"] == "a sun" and read_metadata(paths[0])["seed"] == 5
    first, last = (np.asarray(Image.open(p), dtype=np.int16) for p in paths)
    assert np.abs(last - first).max() > 0  # two more steps of training moved the image
    with pytest.raises(InputError, match="sample prompts and sample_every go together"):
        train(pipe, data, tmp_path / "t.safetensors", steps=1, samples=samples, **FAST)


def test_a_memory_limit_turns_checkpointing_on_when_a_plain_step_would_not_fit(
    setup, tmp_path, monkeypatch
):
    """``memory_limit`` against ``train.memory``'s projection for the largest bucket (4x3
    tokens + the longest caption, 6 rows): plain when it fits, checkpointed when only that
    fits (the same result: checkpointing changes no gradient), an error when neither fits."""
    from ideogram4_mlx.memory import dit_sizes
    from ideogram4_mlx.train import loop
    from ideogram4_mlx.train.memory import plan_training_memory

    pipe, data = setup
    monkeypatch.setattr(loop, "_feature_rows", lambda path: 3 + int(path.name[1:]))
    sizes = dit_sizes(pipe.dit_dir("transformer"), pipe.dtype)
    plan = plan_training_memory(sizes.config, 12 + 6, FAST["rank"], sizes.total, 4, batch=2)
    plain, checkpointed = plan.peak(False), plan.peak(True)
    assert checkpointed < plain
    outs = {}
    for name, limit in (("plain", plain), ("checkpointed", checkpointed)):
        lines = []
        outs[name] = train(pipe, data, tmp_path / f"{name}.safetensors", steps=2,
                           memory_limit=limit, report=lines.append, **FAST)  # fmt: skip
        on = ["gradient checkpointing: on (a plain step would not fit --memory-limit)"]
        assert lines == (on if name == "checkpointed" else [])
    a, b = tensors(outs["plain"]), tensors(outs["checkpointed"])
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-2, atol=1e-6, err_msg=key)
    with pytest.raises(InputError):
        train(pipe, data, tmp_path / "none.safetensors", steps=1, memory_limit=1000, **FAST)
