"""The whole text-to-image path in PyTorch, as the official pipeline runs it (spec §D-§F).

transformers' Qwen3-VL taps, diffusers' DiTs and VAE, and the official Euler loop written
here in torch (index order, asymmetric CFG, uncond skipped at g = 1, last step to t_max).
The time grid comes from ``ideogram4_mlx.sampler.time_grid``, which is pinned to the spec's
test vectors. Every stage's output is returned, for stage-by-stage cross-checks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from ideogram4_mlx.quantization import RECORD_KEY
from ideogram4_mlx.reference.text_encoder import load_reference_text_encoder, reference_taps
from ideogram4_mlx.reference.transformer import (
    load_reference_transformer,
    reference_forward,
    reference_layout,
)
from ideogram4_mlx.reference.vae import load_reference_vae, reference_decode
from ideogram4_mlx.sampler import Schedule
from ideogram4_mlx.weights import CheckpointError, read_json

MODEL_COMPONENTS = ("text_encoder", "transformer", "unconditional_transformer", "vae")


@dataclass
class ReferenceRun:
    token_ids: list[int]
    features: np.ndarray  # (1, T, F) float32
    first_velocity: np.ndarray  # (1, N, 128) CFG velocity of the first step
    latents: np.ndarray  # (1, N, 128) final packed normalised latents
    image: np.ndarray  # (H, W, 3) uint8


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
    """Chat template, no system prompt, no added special tokens (spec §D.1)."""
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    messages = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def reference_canonical_prompt(prompt: str) -> str:
    """The caption text the reference tokenizes: a JSON object re-serialised as mflux does
    (spec §D.1: minified, ``ensure_ascii=False``, key order kept); other text as given.
    Written here, apart from the MLX prompt code, so the two are checked against each other."""
    try:
        caption = json.loads(prompt)
    except json.JSONDecodeError:
        return prompt
    if not isinstance(caption, dict):
        return prompt
    return json.dumps(caption, ensure_ascii=False, separators=(",", ":"))


def reference_generate(
    checkpoint: Path | str,
    prompt: str,
    width: int,
    height: int,
    schedule: Schedule,
    noise: np.ndarray,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ReferenceRun:
    """Run the reference on ``noise`` (1, H/16 * W/16, 128) for ``prompt`` (a JSON caption is
    canonicalised by :func:`reference_canonical_prompt`)."""
    checkpoint = Path(checkpoint)
    check_original(checkpoint)
    grid_h, grid_w = height // 16, width // 16

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

    grid = torch.from_numpy(schedule.grid)
    guidance_index_order = list(reversed(schedule.guidance))  # official: entry 0 = last step
    z = torch.from_numpy(np.asarray(noise, np.float32).copy())
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
    del cond_model, uncond_model

    vae = load_reference_vae(checkpoint / "vae", device, dtype)
    image = reference_decode(vae, z.numpy(), grid_h, grid_w)[0]
    return ReferenceRun(ids, features, first_velocity, z.numpy(), image)
