"""Run the MLX pipeline and the PyTorch reference on the same prompt and noise; compare stages."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
import torch

from ideogram4_mlx.dtypes import dtype_name
from ideogram4_mlx.edit import ImageInput
from ideogram4_mlx.pipeline import load
from ideogram4_mlx.pipeline_options import PipelineOptions
from ideogram4_mlx.reference.pipeline import ReferenceRun, check_original, reference_generate
from ideogram4_mlx.request import GenerationRequest
from ideogram4_mlx.sampler import DEFAULT_PRESET
from ideogram4_mlx.vae import encode

# Without an input image, crosscheck runs small: the reference is slow on a CPU.
CROSSCHECK_SIZE = 256

# The parity tests' bounds per compute dtype; their docstrings say why (test_pipeline_parity end
# to end; test_text_encoder_, test_transformer_, test_vae_parity per component). [measured: tiny
# synthetic checkpoint, V4_TURBO_12, 256^2, CPU]
# - fp32: the same formulas in fp32 on both sides, differing in summation order and 1-ulp
#   transcendentals: 1e-4 per component, 1e-3 for latents after up to 48 Euler steps, 2/255 for
#   the image (a value on a rounding boundary flips a level). [features 9e-7, velocity 5e-7,
#   latents 2e-6, image 1/255]
# - bf16: the component tests allow 1.5-2x the reference's own bf16-vs-fp32 noise, which one run
#   cannot measure (text ~1-2e-2, so <= 4e-2; VAE 1.4e-2, so <= 3.5e-2; DiT < 5e-2): each is
#   held to 5e-2, the end-to-end bf16 test's latents bound, and image PSNR >= 30 dB as there.
#   [features 2.1e-2, velocity 3.9e-3, latents 3.4e-3, PSNR 50.7 dB]
# - the time grid is fp32/fp64 whatever the dtype: 1e-6, fp32 vs fp64 linspace. [6e-8]
# - float16 is in no parity test: held to bf16's bounds (its rounding is 8x finer).
# None: printed, not bounded.
TOLERANCES: dict[str, dict[str, float | None]] = {
    "float32": {
        "features_rel_l2": 1e-4,
        "grid_max_abs_diff": 1e-6,
        "encoded_rel_l2": 1e-4,
        "first_velocity_rel_l2": 1e-4,
        "latents_rel_l2": 1e-3,
        "image_max_abs_diff": 2,
        "image_psnr": None,
    },
    "bfloat16": {
        "features_rel_l2": 5e-2,
        "grid_max_abs_diff": 1e-6,
        "encoded_rel_l2": 5e-2,
        "first_velocity_rel_l2": 5e-2,
        "latents_rel_l2": 5e-2,
        "image_max_abs_diff": None,
        "image_psnr": 30.0,  # a lower bound
    },
}
TOLERANCES["float16"] = TOLERANCES["bfloat16"]
AT_LEAST = {"image_psnr"}  # the bounds that are minimums


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


@dataclass(frozen=True)
class Check:
    """One stage's measured value against its bound (None: reported only)."""

    stage: str
    measure: str
    field: str
    value: float
    bound: float | None
    form: str = ".2e"
    unit: str = ""

    @property
    def ok(self) -> bool:
        if self.bound is None:
            return True
        return self.value >= self.bound if self.field in AT_LEAST else self.value <= self.bound

    def text(self) -> str:
        shown = f"{self.measure} {self.value:{self.form}}{self.unit}"
        if self.bound is None:
            return shown
        relation = ">=" if self.field in AT_LEAST else "<="
        bound = f"{self.bound:{self.form}}{self.unit}"
        return f"{shown} {relation} {bound} {'ok' if self.ok else 'FAIL'}"


@dataclass
class CrossCheck:
    token_ids_equal: bool
    features_rel_l2: float
    first_velocity_rel_l2: float
    latents_rel_l2: float
    image_max_abs_diff: int
    image_psnr: float
    ours_image: np.ndarray
    reference: ReferenceRun
    grid_max_abs_diff: float = 0.0
    encoded_rel_l2: float | None = None  # an edit's input latents
    dtype: str = "float32"  # picks the TOLERANCES row

    def checks(self) -> list[Check]:
        """Every measured stage, in pipeline order, with its bound for this dtype."""
        bounds = TOLERANCES[self.dtype]

        def check(stage, measure, field, form=".2e", unit=""):
            return Check(stage, measure, field, getattr(self, field), bounds[field], form, unit)

        encoded = [] if self.encoded_rel_l2 is None else [
            check("encoded input image", "rel L2", "encoded_rel_l2")
        ]  # fmt: skip
        return [
            check("text features", "rel L2", "features_rel_l2"),
            check("time grid", "max |diff|", "grid_max_abs_diff", ".1e"),
            *encoded,
            check("first-step velocity", "rel L2", "first_velocity_rel_l2"),
            check("final latents", "rel L2", "latents_rel_l2"),
            check("image", "max |diff|", "image_max_abs_diff", ".0f", "/255"),
            check("image", "PSNR", "image_psnr", ".1f", " dB"),
        ]

    def failures(self) -> list[str]:
        """The stages out of bounds (token ids first), by name; empty when all pass."""
        failed = [] if self.token_ids_equal else ["token ids"]
        for c in self.checks():
            if not c.ok and c.stage not in failed:
                failed.append(c.stage)
        return failed

    @property
    def passed(self) -> bool:
        return not self.failures()

    def lines(self) -> list[str]:
        """A line per stage, ``measure value <= bound ok``, and the verdict last."""
        ids = "ok" if self.token_ids_equal else "FAIL"
        lines = [f"token ids equal      : {self.token_ids_equal} {ids}"]
        lines += [f"{c.stage:<21}: {c.text()}" for c in self.checks()]
        failed = self.failures()
        verdict = "PASS" if not failed else f"FAIL: {', '.join(failed)} out of bounds"
        return [*lines, f"{verdict} ({self.dtype} tolerances of the parity tests)"]


class Progress:
    """``report`` gets a line as each stage starts and one, with its seconds, as it ends."""

    def __init__(self, report: Callable[[str], None] | None):
        self.report = report

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.report is None:
            yield
            return
        self.report(f"{name} ...")
        start = time.perf_counter()
        yield
        self.report(f"{name}: done in {time.perf_counter() - start:.1f} s")


def crosscheck(
    model: str | PipelineOptions,
    prompt: str,
    width: int | None = None,
    height: int | None = None,
    preset: str = DEFAULT_PRESET,
    num_steps: int | None = None,
    guidance_schedule: list[float] | None = None,
    mu: float | None = None,
    std: float | None = None,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
    image: ImageInput | None = None,
    progress: Callable[[str], None] | None = None,
    **edit,
) -> CrossCheck:
    """Both pipelines on the same noise (drawn with numpy from ``seed``), stage by stage.

    ``model`` is the original fp8 snapshot (folder or repo id), or :class:`PipelineOptions`
    naming it (their dtype then wins over ``dtype``); a converted folder is refused before
    anything loads. The size defaults to 256x256, or the input ``image``'s own size.
    ``edit``: ``mask``, ``strength``, ``mask_grow``, ``mask_feather``, ``paste_back``,
    ``expand``, as for ``generate``. ``progress`` gets a line as each stage starts and ends
    (MLX encode, denoise, decode; the reference; the comparison). The result's ``lines()``
    hold each value beside its :data:`TOLERANCES` bound and a PASS/FAIL verdict.
    """
    if not isinstance(model, PipelineOptions):
        model = PipelineOptions(model, dtype=dtype)
    options = model.validate()
    if Path(options.model).expanduser().is_dir():
        check_original(Path(options.model).expanduser())
    name = dtype_name(options.dtype)
    if image is None:
        width, height = width or CROSSCHECK_SIZE, height or CROSSCHECK_SIZE
    request = GenerationRequest(
        prompt,
        width=width,
        height=height,
        preset=preset,
        num_steps=num_steps,
        guidance_schedule=guidance_schedule,
        mu=mu,
        std=std,
        image=image,
        **edit,
    )
    resolved = request.validate()  # before anything loads
    request, schedule = resolved.request, resolved.schedule
    grid_h, grid_w = resolved.grid_h, resolved.grid_w
    noise = np.random.default_rng(seed).standard_normal((1, grid_h * grid_w, 128), np.float32)
    stages = Progress(progress)

    pipe = load(options, keep_in_memory=True)
    with stages.stage("MLX encode"):
        features = np.array(pipe.encode(prompt))
    encoded = None
    if resolved.edit is not None:
        with stages.stage("MLX encode input image"):
            encoded = np.array(encode(pipe.vae(), resolved.edit.canvas[None]))
    generation = pipe.start(resolved, noise=noise)  # encodes the prompt again (kept in memory)
    with stages.stage(f"MLX denoise ({schedule.num_steps} steps)"):
        for step in generation:
            mx.eval(step.latents)
            if step.index == 0:
                first_latents = np.array(step.latents)
    with stages.stage("MLX decode"):
        result = generation.result()
    with stages.stage(f"reference (PyTorch on {device}, {name}: encode, denoise, decode)"):
        ref = reference_generate(
            pipe.checkpoint_dir,
            prompt,
            request.width,
            request.height,
            schedule,
            noise,
            device,
            getattr(torch, name),
            resolved.edit,
        )
    with stages.stage("compare"):
        # The first Euler step's velocity, on the tokens it moved freely (an inpainting mask
        # pins the others after the step).
        t0, t1 = schedule.grid[-1], schedule.grid[-2]
        start = noise if encoded is None else t0 * encoded + (1 - t0) * noise
        free = slice(None)
        if resolved.edit is not None and resolved.edit.token_mask is not None:
            free = resolved.edit.token_mask.reshape(-1) == 1
        ours_v = ((first_latents - start) / (t1 - t0))[:, free]
        ours_image = np.array(result.image)
        diff = np.abs(ours_image.astype(int) - ref.image.astype(int))
        return CrossCheck(
            token_ids_equal=pipe.prompt_encoder().token_ids(prompt) == ref.token_ids,
            features_rel_l2=rel_l2(features, ref.features),
            first_velocity_rel_l2=rel_l2(ours_v, ref.first_velocity[:, free]),
            latents_rel_l2=rel_l2(result.latents, ref.latents),
            image_max_abs_diff=int(diff.max()),
            image_psnr=psnr(ours_image, ref.image),
            ours_image=ours_image,
            reference=ref,
            grid_max_abs_diff=float(np.abs(schedule.grid - ref.grid).max()),
            encoded_rel_l2=None if encoded is None else rel_l2(encoded, ref.encoded),
            dtype=name,
        )
