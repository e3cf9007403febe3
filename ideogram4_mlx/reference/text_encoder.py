"""transformers' ``Qwen3VLModel`` built from an Ideogram 4 ``text_encoder/`` folder.

Independent of the MLX code: its own fp8 dequantization in PyTorch, transformers' module code,
HF's own position ids and masks, and taps taken with forward hooks on the decoder layers.
Works on the real ``ideogram-ai/ideogram-4-fp8`` snapshot and on synthetic ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from transformers import Qwen3VLConfig, Qwen3VLModel
from transformers.models.qwen3_vl.modeling_qwen3_vl import (
    Qwen3VLTextRotaryEmbedding,
    Qwen3VLVisionRotaryEmbedding,
)

from ideogram4_mlx.reference.transformer import read_state_dict

# MODEL_NOTES#text-encoder-taps (diffusers' QWEN3_VL_ACTIVATION_LAYERS). Kept apart from the MLX
# module's copy on purpose: the reference must not inherit a bug from the code it checks.
TAP_LAYERS = (0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 35)
# The config flag marking Ideogram's fp8 layout; transformers' config class does not know it.
FP8_FLAG = "ideogram_fp8_weight_only"


def safetensors_files(component_dir: Path) -> list[Path]:
    """The index's shards, or the single ``.safetensors`` file."""
    component_dir = Path(component_dir)
    indexes = sorted(component_dir.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        return [component_dir / name for name in sorted(set(weight_map.values()))]
    return sorted(component_dir.glob("*.safetensors"))


def load_reference_text_encoder(
    component_dir: Path | str, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> Qwen3VLModel:
    """Build ``Qwen3VLModel`` (vision tower included, as in the file) with fp8 dequantized as
    ``bf16(bf16(w8) * bf16(scale)[:, None])`` (MODEL_NOTES#fp8-dequantization), then cast to
    ``dtype``."""
    component_dir = Path(component_dir)
    config_dict = json.loads((component_dir / "config.json").read_text())
    config_dict.pop(FP8_FLAG, None)
    config = Qwen3VLConfig(**config_dict)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = Qwen3VLModel(config)
    state = {}
    for path in safetensors_files(component_dir):
        state.update(read_state_dict(path, dtype, device))
    model.load_state_dict(state, strict=True, assign=True)
    # Non-persistent RoPE buffers are not in the file (still on meta): build them in fp32 on the
    # device, which also keeps inv_freq fp32 in a bf16 model (MODEL_NOTES#reference-runs-in-bf16).
    with torch.device(device):
        model.language_model.rotary_emb = Qwen3VLTextRotaryEmbedding(config.text_config)
        model.visual.rotary_pos_emb = Qwen3VLVisionRotaryEmbedding(config.vision_config)
    return model.to(device).eval()


@torch.no_grad()
def reference_taps(
    model: Qwen3VLModel, input_ids: np.ndarray, attention_mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Run the whole model on (B, T) ids (left padding marked 0 in ``attention_mask``).

    Returns ``taps`` (13, B, T, D) float32, the outputs of the ``TAP_LAYERS`` decoder layers
    (residual stream, before the final norm), and ``features`` (B, T, 13*D) float32 stacked
    interleaved (feature ``d*13 + slot``) with padding rows set to 0
    (MODEL_NOTES#text-encoder-taps).
    """
    device = next(model.parameters()).device
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long, device=device)
    mask = (
        torch.ones_like(ids)
        if attention_mask is None
        else torch.as_tensor(np.asarray(attention_mask), dtype=torch.long, device=device)
    )
    captured = {}

    def hook(index):
        def save(module, args, output):
            captured[index] = output[0] if isinstance(output, tuple) else output

        return save

    layers = model.language_model.layers
    handles = [layers[i].register_forward_hook(hook(i)) for i in TAP_LAYERS]
    try:
        model(input_ids=ids, attention_mask=None if attention_mask is None else mask)
    finally:
        for handle in handles:
            handle.remove()

    taps = torch.stack([captured[i] for i in TAP_LAYERS], dim=0)  # (13, B, T, D)
    b, length = ids.shape
    features = taps.permute(1, 2, 3, 0).reshape(b, length, -1)
    # where, not a multiply: a NaN in a fully masked padding row must not survive as 0 * NaN.
    features = torch.where(mask[..., None].bool(), features, torch.zeros((), dtype=taps.dtype))
    return taps.float().cpu().numpy(), features.float().cpu().numpy()
