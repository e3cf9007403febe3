"""diffusers' ``Ideogram4Transformer2DModel`` built from an Ideogram 4 checkpoint folder.

Independent of the MLX code: its own fp8 dequantization in PyTorch, diffusers' module code.
Works on the real ``ideogram-ai/ideogram-4-fp8`` snapshot and on synthetic ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import Ideogram4Pipeline, Ideogram4Transformer2DModel
from safetensors import safe_open

REPACK_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")


def read_state_dict(path: Path, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    """Load one file tensor by tensor, dequantizing fp8 + per-row scale as the official
    ``Fp8Linear`` does: ``bf16(w8) * bf16(scale)[:, None]``, rounded to bf16
    (MODEL_NOTES#fp8-dequantization).

    Each tensor is converted to ``dtype`` as it is read, so peak memory stays near the size
    of the final model (the real DiT file is 9.3 GB of fp8).
    """
    out = {}
    with safe_open(str(path), framework="pt", device=device) as f:
        keys = set(f.keys())
        for key in sorted(keys):
            if key.endswith(".weight_scale"):
                continue
            value = f.get_tensor(key)
            if key + "_scale" in keys:
                scale = f.get_tensor(key + "_scale")
                value = value.to(torch.bfloat16) * scale.to(torch.bfloat16)[:, None]
            out[key] = value.to(dtype)
    return out


def to_diffusers_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip repack prefixes; split fused ``qkv`` into ``to_q/to_k/to_v``; ``o`` -> ``to_out.0``."""
    out = {}
    for key, value in state.items():
        key = next((key[len(p) :] for p in REPACK_PREFIXES if key.startswith(p)), key)
        if ".attention.qkv." in key:
            for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0), strict=True):
                out[key.replace(".qkv.", f".{name}.")] = part
        else:
            out[key.replace(".attention.o.", ".attention.to_out.0.")] = value
    return out


def checkpoint_file(component_dir: Path) -> Path:
    files = sorted(Path(component_dir).glob("*.safetensors"))
    if len(files) != 1:
        raise FileNotFoundError(
            f"{component_dir}: expected one .safetensors file, found {len(files)}"
        )
    return files[0]


def load_reference_transformer(
    component_dir: Path | str, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> Ideogram4Transformer2DModel:
    """Build the diffusers DiT from ``transformer/`` or ``unconditional_transformer/``."""
    component_dir = Path(component_dir)
    config = json.loads((component_dir / "config.json").read_text())
    with torch.device("meta"):
        model = Ideogram4Transformer2DModel.from_config(config)
    state = to_diffusers_names(read_state_dict(checkpoint_file(component_dir), dtype, device))
    model.load_state_dict(state, strict=True, assign=True)
    # A dtype cast also rounds the RoPE inv_freq buffer; keep it fp32
    # (MODEL_NOTES#reference-runs-in-bf16).
    rope = model.rotary_emb
    rope.inv_freq = 1.0 / (
        rope_theta(config)
        ** (torch.arange(0, rope.head_dim, 2, dtype=torch.float32) / rope.head_dim)
    )
    return model.to(device).eval()


def rope_theta(config: dict) -> float:
    return config.get("rope_theta", 5_000_000)


def reference_layout(
    text_lengths: list[int], grid_h: int, grid_w: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``position_ids``, ``segment_ids``, ``indicator`` (numpy) of the packed
    ``[left padding][text][image]`` sequence, built by diffusers' pipeline, never by the MLX
    helper, so a layout bug on either side shows as a parity failure. ``[0]``: image only."""
    layout = Ideogram4Pipeline._prepare_ids(
        text_lengths, grid_h, grid_w, max(text_lengths), torch.device("cpu")
    )
    return tuple(a.numpy() for a in layout)


@torch.no_grad()
def reference_forward(
    model: Ideogram4Transformer2DModel,
    x: np.ndarray,
    t: np.ndarray,
    llm_features: np.ndarray,
    position_ids: np.ndarray,
    segment_ids: np.ndarray,
    indicator: np.ndarray,
) -> np.ndarray:
    """Run the diffusers DiT as the official pipeline feeds it; returns (B, L, 128) float32.

    The pipeline rounds t to bf16 before the model (MODEL_NOTES#timestep-embedding); we do that
    in every dtype.
    """
    param = next(model.parameters())
    device, dtype = param.device, param.dtype

    def as_tensor(a, dt):
        return torch.as_tensor(np.asarray(a)).to(device=device, dtype=dt)

    t_model = torch.as_tensor(np.asarray(t, dtype=np.float32)).to(torch.bfloat16).to(device, dtype)
    out = model(
        hidden_states=as_tensor(x, dtype),
        timestep=t_model,
        encoder_hidden_states=as_tensor(llm_features, dtype),
        position_ids=as_tensor(position_ids, torch.long),
        segment_ids=as_tensor(segment_ids, torch.long),
        indicator=as_tensor(indicator, torch.long),
        return_dict=False,
    )[0]
    return out.float().cpu().numpy()
