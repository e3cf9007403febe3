"""Run the MLX pipeline and the PyTorch reference on the same prompt and noise; compare stages."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

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


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


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

    def lines(self) -> list[str]:
        edit = (
            []
            if self.encoded_rel_l2 is None
            else [f"encoded input image  : rel L2 {self.encoded_rel_l2:.2e}"]
        )
        return [
            f"token ids equal      : {self.token_ids_equal}",
            f"text features        : rel L2 {self.features_rel_l2:.2e}",
            f"time grid            : max |diff| {self.grid_max_abs_diff:.1e}",
            *edit,
            f"first-step velocity  : rel L2 {self.first_velocity_rel_l2:.2e}",
            f"final latents        : rel L2 {self.latents_rel_l2:.2e}",
            f"image                : max |diff| {self.image_max_abs_diff}/255, "
            f"PSNR {self.image_psnr:.1f} dB",
        ]


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
    **edit,
) -> CrossCheck:
    """Both pipelines on the same noise (drawn with numpy from ``seed``), stage by stage.

    ``model`` is the original fp8 snapshot (folder or repo id), or :class:`PipelineOptions`
    naming it (their dtype then wins over ``dtype``); a converted folder is refused before
    anything loads. The size defaults to 256x256, or the input ``image``'s own size.
    ``edit``: ``mask``, ``strength``, ``mask_grow``, ``mask_feather``, ``paste_back``,
    ``expand``, as for ``generate``.
    """
    if not isinstance(model, PipelineOptions):
        model = PipelineOptions(model, dtype=dtype)
    options = model.validate()
    if Path(options.model).expanduser().is_dir():
        check_original(Path(options.model).expanduser())
    torch_dtype = getattr(torch, dtype_name(options.dtype))
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

    pipe = load(options, keep_in_memory=True)
    features = pipe.encode(prompt)
    encoded = None
    if resolved.edit is not None:
        encoded = np.array(encode(pipe.vae(), resolved.edit.canvas[None]))
    first = {}
    result = pipe.generate(
        request,
        noise=noise,
        callback=lambda step, n, z: first.setdefault("z1", np.array(z)) if step == 0 else None,
    )
    ref = reference_generate(
        pipe.checkpoint_dir,
        prompt,
        request.width,
        request.height,
        schedule,
        noise,
        device,
        torch_dtype,
        resolved.edit,
    )
    # The first Euler step's velocity, on the tokens it moved freely (an inpainting mask pins
    # the others after the step).
    t0, t1 = schedule.grid[-1], schedule.grid[-2]
    start = noise if encoded is None else t0 * encoded + (1 - t0) * noise
    free = slice(None)
    if resolved.edit is not None and resolved.edit.token_mask is not None:
        free = resolved.edit.token_mask.reshape(-1) == 1
    ours_v = ((first["z1"] - start) / (t1 - t0))[:, free]
    ours_image = np.array(result.image)
    return CrossCheck(
        token_ids_equal=pipe.prompt_encoder().token_ids(prompt) == ref.token_ids,
        features_rel_l2=rel_l2(np.array(features), ref.features),
        first_velocity_rel_l2=rel_l2(ours_v, ref.first_velocity[:, free]),
        latents_rel_l2=rel_l2(result.latents, ref.latents),
        image_max_abs_diff=int(np.abs(ours_image.astype(int) - ref.image.astype(int)).max()),
        image_psnr=psnr(ours_image, ref.image),
        ours_image=ours_image,
        reference=ref,
        grid_max_abs_diff=float(np.abs(schedule.grid - ref.grid).max()),
        encoded_rel_l2=None if encoded is None else rel_l2(encoded, ref.encoded),
    )
