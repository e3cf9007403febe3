"""The whole text-to-image path in PyTorch, as the official pipeline runs it
(MODEL_NOTES#text-encoder, #sampler, #vae), plus the edits (MODEL_NOTES#image-to-image):
image-to-image, inpainting, outpainting.

transformers' Qwen3-VL taps, diffusers' DiTs and VAE (its encoder for edits), and the
official Euler loop written here in torch (index order, asymmetric CFG, uncond skipped at
g = 1, last step to t_max). The time grid is computed here in torch (:func:`reference_grid`);
the guidance weights are the resolved schedule's. An edit's inputs (the canvas, the token
mask, the paste-back mask) come prepared by ``ideogram4_mlx.edit``: that is image handling,
not model numerics. Every stage's output is returned, for stage-by-stage cross-checks.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from ideogram4_mlx.config import CheckpointError, read_json
from ideogram4_mlx.edit import Edit
from ideogram4_mlx.quantization import RECORD_KEY
from ideogram4_mlx.reference.text_encoder import load_reference_text_encoder, reference_taps
from ideogram4_mlx.reference.transformer import (
    load_reference_transformer,
    reference_forward,
    reference_layout,
)
from ideogram4_mlx.reference.vae import load_reference_vae, reference_decode, reference_encode
from ideogram4_mlx.sampler import Schedule

MODEL_COMPONENTS = ("text_encoder", "transformer", "unconditional_transformer", "vae")


@dataclass
class ReferenceRun:
    token_ids: list[int]
    features: np.ndarray  # (1, T, F) float32
    first_velocity: np.ndarray  # (1, N, 128) CFG velocity of the first step
    latents: np.ndarray  # (1, N, 128) final packed normalised latents
    image: np.ndarray  # (H, W, 3) uint8
    grid: np.ndarray  # S[0..N] float32
    encoded: np.ndarray | None = None  # (1, N, 128): an edit's input through the VAE encoder


def check_original(checkpoint: Path) -> None:
    """Refuse a folder written by ``ideo4-mlx convert``: the reference reads the original fp8
    layout, and a converted folder would fail deep inside diffusers with every key listed."""
    for name in MODEL_COMPONENTS:
        config = checkpoint / name / "config.json"
        if not config.is_file():
            continue
        record = read_json(config).get(RECORD_KEY)
        if record is not None:
            source = record.get("source") if isinstance(record, dict) else None
            origin = f" ({source})" if source else ""
            raise CheckpointError(
                f"crosscheck needs the original fp8 snapshot ({checkpoint} was converted by "
                f"ideo4-mlx convert: {name}/config.json has an {RECORD_KEY} record); pass the "
                f"snapshot folder or repo id it was converted from{origin}"
            )


def reference_token_ids(tokenizer_dir: Path, prompt: str) -> list[int]:
    """Chat template, no system prompt, no added special tokens (MODEL_NOTES#prompt-format)."""
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    messages = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def reference_canonical_prompt(prompt: str) -> str:
    """The caption text the reference tokenizes: a JSON object re-serialised as mflux does
    (minified, ``ensure_ascii=False``, key order kept: MODEL_NOTES#prompt-format); other text as
    given. Written here, apart from the MLX prompt code, so the two are checked against each
    other."""
    try:
        caption = json.loads(prompt)
    except json.JSONDecodeError:
        return prompt
    if not isinstance(caption, dict):
        return prompt
    return json.dumps(caption, ensure_ascii=False, separators=(",", ":"))


def reference_grid(
    num_steps: int, height: int, width: int, mu: float, std: float, strength: float = 1.0
) -> torch.Tensor:
    """``S[0..N]`` float32 in torch: ``1 - sigmoid(mean + std * ndtri(u))`` clamped to
    [t_min, t_max] (logSNR 18 and -15), ``u = linspace(0, strength, N + 1)``. Text-to-image
    (strength 1) takes the official float32 linspace; image-to-image DiffSynth's float64 one
    (MODEL_NOTES#time-grid, #image-to-image)."""
    mean = mu + 0.5 * math.log(height * width / (512 * 512))
    if strength == 1:
        u = torch.linspace(0, 1, num_steps + 1, dtype=torch.float32).double()
    else:
        u = torch.linspace(0, strength, num_steps + 1, dtype=torch.float64)
    s = 1 - torch.sigmoid(mean + std * torch.special.ndtri(u))
    t_min, t_max = 1 / (1 + math.exp(0.5 * 18)), 1 / (1 + math.exp(0.5 * -15))
    return s.clamp(t_min, t_max).float()


def reference_generate(
    checkpoint: Path | str,
    prompt: str,
    width: int,
    height: int,
    schedule: Schedule,
    noise: np.ndarray,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    edit: Edit | None = None,
) -> ReferenceRun:
    """Run the reference on ``noise`` (1, H/16 * W/16, 128) for ``prompt`` (a JSON caption is
    canonicalised by :func:`reference_canonical_prompt`). ``schedule`` gives the steps,
    guidance, mu, std and strength; ``edit`` the edit's prepared inputs.

    An edit starts from ``t0 * x0 + (1 - t0) * noise`` (x0: diffusers' encoder, t0 = S[N]);
    with a token mask, after each step the latents become ``m * z + (1 - m) * known`` with
    ``known`` the input noised to the time reached (x0 itself after the last step); the
    decoded pixels outside the paste-back mask are the canvas's."""
    checkpoint = Path(checkpoint)
    check_original(checkpoint)
    grid_h, grid_w = height // 16, width // 16
    vae = load_reference_vae(checkpoint / "vae", device, dtype)
    x0 = None
    if edit is not None:
        x0 = torch.from_numpy(reference_encode(vae, edit.canvas[None]))

    ids = reference_token_ids(checkpoint / "tokenizer", reference_canonical_prompt(prompt))
    text_model = load_reference_text_encoder(checkpoint / "text_encoder", device, dtype)
    _, features = reference_taps(text_model, np.array([ids]))
    del text_model

    cond_model = load_reference_transformer(checkpoint / "transformer", device, dtype)
    uncond_model = load_reference_transformer(
        checkpoint / "unconditional_transformer", device, dtype
    )
    n_text, n_img = len(ids), grid_h * grid_w
    cond_ids = reference_layout([n_text], grid_h, grid_w)
    uncond_ids = tuple(a[:, n_text:] for a in cond_ids)  # the image slice, as diffusers does
    cond_features = np.concatenate(
        [features, np.zeros((1, n_img, features.shape[-1]), np.float32)], 1
    )
    uncond_features = np.zeros((1, n_img, features.shape[-1]), np.float32)
    text_slots = np.zeros((1, n_text, noise.shape[-1]), np.float32)

    n = schedule.num_steps
    grid = reference_grid(n, height, width, schedule.mu, schedule.std, schedule.strength)
    guidance_index_order = list(reversed(schedule.guidance))  # official: entry 0 = last step
    eps = torch.from_numpy(np.asarray(noise, np.float32).copy())
    z, mask = eps, None
    if x0 is not None:
        z = grid[n] * x0 + (1 - grid[n]) * eps
        if edit.token_mask is not None:
            mask = torch.from_numpy(edit.token_mask.reshape(1, -1, 1))
    first_velocity = None
    for i in range(schedule.num_steps - 1, -1, -1):
        t = grid[i + 1].reshape(1).numpy()
        x = np.concatenate([text_slots, z.numpy()], axis=1)
        v = torch.from_numpy(
            reference_forward(cond_model, x, t, cond_features, *cond_ids)[:, n_text:]
        )
        g = torch.tensor(guidance_index_order[i], dtype=torch.float32)
        if abs(float(g) - 1.0) > 1e-6:
            v_u = torch.from_numpy(
                reference_forward(uncond_model, z.numpy(), t, uncond_features, *uncond_ids)
            )
            v = g * v + (1.0 - g) * v_u
        if first_velocity is None:
            first_velocity = v.numpy().copy()
        z = z + v * (grid[i] - grid[i + 1])
        if mask is not None:
            known = x0 if i == 0 else grid[i] * x0 + (1 - grid[i]) * eps
            z = mask * z + (1 - mask) * known
    del cond_model, uncond_model

    image = reference_decode(vae, z.numpy(), grid_h, grid_w)[0]
    if edit is not None and edit.paste_mask is not None:
        image = np.where(edit.paste_mask[..., None], image, edit.canvas)
    encoded = None if x0 is None else x0.numpy()
    return ReferenceRun(ids, features, first_velocity, z.numpy(), image, grid.numpy(), encoded)
