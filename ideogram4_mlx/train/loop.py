"""The training loop of ``ideo4-mlx train-lora``: cached examples (``cache.TrainingData``) ->
LoRA adapters on the conditional DiT (``step``), saved in the diffusers/PEFT layout (``save``).

Every random draw of optimizer step ``k`` (its times and noise) comes from
``numpy.random.default_rng([seed, k, j])`` for its ``j``-th batch, and the batch order from
``TrainingData.batches(seed, epoch)``, so a run resumed from a checkpoint continues bit for bit:
the checkpoint holds the adapters and the optimizer state in float32 and the step reached.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from safetensors import safe_open
from tqdm import tqdm

from ideogram4_mlx.constants import PIXELS_PER_TOKEN
from ideogram4_mlx.dit_file import load_dit
from ideogram4_mlx.errors import InputError
from ideogram4_mlx.files import write_file
from ideogram4_mlx.memory import dit_sizes
from ideogram4_mlx.train.memory import plan_training_memory
from ideogram4_mlx.train.objective import sample_times, time_weights, training_times
from ideogram4_mlx.train.save import save_lora
from ideogram4_mlx.train.step import (
    DEFAULT_TARGETS,
    LoRASettings,
    add_lora,
    lora_gradients,
    prepare_batch,
)

SCHEDULES = ("constant", "linear", "cosine")
MAX_STEPS = 1_000_000  # a bound on the work one command can ask
STATE_FILES = ("adapters.safetensors", "optimizer.safetensors", "progress.json")


@dataclass(frozen=True)
class TrainSettings:
    """How to train: the LoRA's shape, the optimizer and its schedule, the length (``steps``,
    else ``epochs``: 1 by default), batches, seed, checkpoints and gradient checkpointing."""

    rank: int = 16
    alpha: float | None = None  # None: the rank (scale 1)
    targets: tuple[str, ...] | None = None  # None: step.DEFAULT_TARGETS
    learning_rate: float = 1e-4
    schedule: str = "constant"
    warmup_steps: int = 0
    steps: int | None = None
    epochs: int | None = None
    batch_size: int = 1
    gradient_accumulation: int = 1
    seed: int = 0
    weighting: str = "bell"
    checkpoint_every: int | None = None
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise InputError(f"schedule {self.schedule!r}: use one of {', '.join(SCHEDULES)}")
        lr = self.learning_rate
        if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
            raise InputError(f"learning_rate must be a finite number > 0, got {lr!r}")
        for name in ("warmup_steps", "batch_size", "gradient_accumulation", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InputError(f"{name} must be a whole number >= 0, got {value!r}")
        for name in ("steps", "epochs", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and 1 <= value <= MAX_STEPS):
                raise InputError(f"{name} must be a whole number in 1..{MAX_STEPS}, got {value!r}")
        if self.batch_size < 1 or self.gradient_accumulation < 1:
            raise InputError("batch_size and gradient_accumulation must be at least 1")

    def lora(self) -> LoRASettings:
        alpha = float(self.rank if self.alpha is None else self.alpha)
        return LoRASettings(self.rank, alpha, tuple(self.targets or DEFAULT_TARGETS), self.seed)

    def total_steps(self, batches_per_epoch: int) -> int:
        """Optimizer steps: ``steps``, or ``epochs`` (1) passes of ``gradient_accumulation``
        batches each (a last partial step counts)."""
        if self.steps is not None:
            return self.steps
        per_epoch = math.ceil(batches_per_epoch / self.gradient_accumulation)
        total = (self.epochs or 1) * per_epoch
        if total > MAX_STEPS:
            raise InputError(f"{total} steps: at most {MAX_STEPS}; give fewer --epochs")
        return total


TRAIN_FIELDS = tuple(TrainSettings.__dataclass_fields__)


def learning_rates(settings: TrainSettings, total: int):
    """The learning rate by step: a linear warmup from 0, then constant, linear to 0 or
    cosine to 0 over the remaining steps (mlx.optimizers schedules)."""
    peak, rest = settings.learning_rate, max(1, total - settings.warmup_steps)
    if settings.schedule == "constant":
        main = lambda step: mx.array(peak, mx.float32)  # noqa: E731
    elif settings.schedule == "linear":
        main = optim.linear_schedule(peak, 0.0, rest)
    else:
        main = optim.cosine_decay(peak, rest)
    if settings.warmup_steps == 0:
        return main
    warmup = optim.linear_schedule(0.0, peak, settings.warmup_steps)
    return optim.join_schedules([warmup, main], [settings.warmup_steps])


def batch_plan(data, settings: TrainSettings, total: int) -> list[list[list[int]]]:
    """Each optimizer step's batches (``gradient_accumulation`` of them, the last step of an
    epoch possibly fewer), epoch after epoch, ``total`` steps."""
    plan, epoch = [], 0
    while len(plan) < total:
        batches = data.batches(settings.batch_size, settings.seed, epoch)
        if not batches:
            raise InputError("the training data holds no examples")
        k = settings.gradient_accumulation
        plan += [batches[i : i + k] for i in range(0, len(batches), k)]
        epoch += 1
    return plan[:total]


def train(
    pipe,
    data,
    out: Path | str,
    force: bool = False,
    resume: bool = False,
    state_dir: Path | str | None = None,
    report=None,
    samples=None,
    sample_every: int | None = None,
    memory_limit: int | None = None,
    **settings,
) -> Path:
    """Train a LoRA on ``data`` (``cache.TrainingData``) for ``pipe``'s conditional DiT and
    write it to ``out`` (diffusers/PEFT layout, bf16). ``settings``: :class:`TrainSettings`'
    fields. Checkpoints (every ``checkpoint_every`` steps) go to ``state_dir`` (default
    ``OUT.state/`` beside ``out``); ``resume`` continues from the last one, which must have
    been made with the same settings and data. ``samples`` (``samples.TrainingSamples``)
    renders its prompts with the DiT being trained every ``sample_every`` steps. ``report``
    gets a line per checkpoint and per sample image. ``memory_limit`` (bytes): turn gradient
    checkpointing on when the projected peak of a plain step would not fit
    (``train.memory``; an ``InputError`` when neither fits)."""
    if (samples is None) != (sample_every is None):
        raise InputError("sample prompts and sample_every go together: give both or neither")
    settings = TrainSettings(**settings)
    out = Path(out)
    state_dir = Path(state_dir) if state_dir else out.with_name(f"{out.stem}.state")
    lora = settings.lora()
    total = settings.total_steps(len(data.batches(settings.batch_size, settings.seed, 0)))
    plan = batch_plan(data, settings, total)
    fingerprint = _fingerprint(settings, data)
    start = _read_progress(state_dir, fingerprint) if resume else 0
    checkpoint = settings.gradient_checkpointing
    if memory_limit is not None and not checkpoint:
        checkpoint = _needs_checkpointing(pipe, data, settings, lora, memory_limit)
        if checkpoint and report is not None:
            report("gradient checkpointing: on (a plain step would not fit --memory-limit)")
    model = load_dit(pipe.dit_dir("transformer"), pipe.dtype)  # a folder or a file (dit_file)
    add_lora(model, lora, checkpoint=checkpoint)
    optimizer = optim.AdamW(learning_rate=learning_rates(settings, total), weight_decay=0.01)
    optimizer.init(model.trainable_parameters())
    if start:
        _load_state(state_dir, model, optimizer)
    tables = {b: training_times(b[1], b[0]) for b in data.buckets}  # per (width, height)
    bar = tqdm(range(start, total), initial=start, total=total, desc="train", unit="step",
               file=sys.stderr)  # fmt: skip
    for k in bar:
        began = time.perf_counter()
        mx.reset_peak_memory()
        loss = _step(model, optimizer, data, plan[k], tables, settings, k)
        seconds = time.perf_counter() - began
        peak = mx.get_peak_memory() / 1e9
        bar.set_postfix_str(f"loss {loss:.4f}, {seconds:.2f} s/step, {peak:.2f} GB")
        if samples is not None and (k + 1) % sample_every == 0:
            for path in samples.render(model, k + 1):
                if report is not None:
                    report(f"sample: {path}")
        every = settings.checkpoint_every
        if every and (k + 1) % every == 0 and k + 1 < total:
            _save_state(state_dir, model, optimizer, k + 1, fingerprint)
            if report is not None:
                report(f"checkpoint: step {k + 1} in {state_dir}")
    training = {k: v for k, v in asdict(settings).items() if v is not None}
    training["targets"] = list(lora.targets)
    return save_lora(out, model, lora, training=training, force=force)


def _step(model, optimizer, data, batches, tables, settings, k: int) -> float:
    """One optimizer step over ``batches`` (gradients averaged); returns the mean loss."""
    total_loss, grads = 0.0, None
    for j, indices in enumerate(batches):
        rng = np.random.default_rng([settings.seed, k, j])
        latents, features, lengths = data.load_batch(indices)
        width, height = data.items[indices[0]].bucket
        t = sample_times(rng, len(indices), tables[(width, height)])
        noise = mx.array(rng.standard_normal(latents.shape, dtype=np.float32))
        weights = time_weights(t, tables[(width, height)], settings.weighting)
        grid = (height // 16, width // 16)
        batch = prepare_batch(model, latents, features, lengths, grid, t, noise, weights)
        loss, g = lora_gradients(model, batch)
        grads = g if grads is None else tree_map(mx.add, grads, g)
        mx.eval(loss, grads)
        total_loss += loss.item()
    n = len(batches)
    if n > 1:
        grads = tree_map(lambda g: g / n, grads)
    optimizer.update(model, grads)
    mx.eval(model.trainable_parameters(), optimizer.state)
    return total_loss / n


def _needs_checkpointing(pipe, data, settings, lora, limit: int) -> bool:
    """Whether the largest batch's projected peak needs block checkpointing to fit ``limit``
    (``train.memory``: measured per-token costs), from the files' headers alone."""
    sizes = dit_sizes(pipe.dit_dir("transformer"), pipe.dtype)
    image = max((w // PIXELS_PER_TOKEN) * (h // PIXELS_PER_TOKEN) for w, h in data.buckets)
    text = max(_feature_rows(item.features) for item in data.items)
    plan = plan_training_memory(sizes.config, image + text, lora.rank, sizes.total,
                                pipe.dtype.size, lora.targets, settings.batch_size)  # fmt: skip
    return plan.needs_checkpointing(limit)


def _feature_rows(path: Path) -> int:
    """A cached caption's token count, from its file's header."""
    with safe_open(str(path), framework="numpy") as f:
        return f.get_slice("features").get_shape()[0]


def _fingerprint(settings: TrainSettings, data) -> str:
    """What a resumed run must share with the checkpoint: the settings that shape the run
    (not its length) and the examples (their cached files, in order)."""
    shaping = {k: v for k, v in asdict(settings).items() if k not in ("steps", "epochs",
               "checkpoint_every", "gradient_checkpointing")}  # fmt: skip
    items = [(str(i.features.name), str(i.latents.name), i.bucket) for i in data.items]
    return hashlib.sha256(json.dumps([shaping, items], default=str).encode()).hexdigest()


def _save_state(state_dir: Path, model, optimizer, step: int, fingerprint: str) -> None:
    """Adapters and optimizer state in float32 (exact), then the step reached: written last,
    so a checkpoint interrupted mid-way is never taken for a finished one."""
    state_dir.mkdir(parents=True, exist_ok=True)
    arrays = dict(tree_flatten(model.trainable_parameters()))
    write_file(state_dir / STATE_FILES[0], lambda f: mx.save_safetensors(f, arrays), True)
    state = dict(tree_flatten(optimizer.state))
    write_file(state_dir / STATE_FILES[1], lambda f: mx.save_safetensors(f, state), True)
    progress = json.dumps({"step": step, "fingerprint": fingerprint}).encode()
    write_file(state_dir / STATE_FILES[2], lambda f: f.write(progress), True)


def _read_progress(state_dir: Path, fingerprint: str) -> int:
    path = state_dir / STATE_FILES[2]
    if not path.is_file():
        raise InputError(f"--resume: no checkpoint in {state_dir} (--checkpoint-every makes one)")
    try:
        progress = json.loads(path.read_text(encoding="utf-8"))
        step = int(progress["step"])
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"--resume: {path} is damaged ({e}); start again without it") from e
    if progress.get("fingerprint") != fingerprint:
        raise InputError(
            f"--resume: the checkpoint in {state_dir} was made with other settings or data; "
            "resume with the same ones, or start again without --resume"
        )
    return step


def _load_state(state_dir: Path, model, optimizer) -> None:
    """The checkpoint's adapters and optimizer state, checked against the model's."""
    adapters = mx.load(str(state_dir / STATE_FILES[0]))
    expected = dict(tree_flatten(model.trainable_parameters()))
    if {k: v.shape for k, v in adapters.items()} != {k: v.shape for k, v in expected.items()}:
        raise InputError(f"--resume: {state_dir} holds other adapters than this LoRA's")
    model.update(tree_unflatten(list(adapters.items())))
    state = mx.load(str(state_dir / STATE_FILES[1]))
    optimizer.state = tree_unflatten(list(state.items()))
    mx.eval(model.trainable_parameters(), optimizer.state)
