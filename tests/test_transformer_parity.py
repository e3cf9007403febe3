"""MLX DiT vs diffusers' Ideogram4Transformer2DModel on the same synthetic fp8 checkpoint.

Tolerances:
- fp32: relative L2 <= 1e-4 over image tokens. Both sides compute in fp32 from the same
  bf16-dequantized weights; what differs is summation order (BLAS, softmax) and 1-ulp
  differences in cos/sin/exp, amplified through the blocks. Observed ~1e-5, so 1e-4 leaves
  a 10x margin while still catching any formula error (those give >= 1e-2).
- bf16: neither side can be exact (SDPA kernels accumulate differently). The reference's own
  bf16 run differs from its fp32 run by its rounding noise ``floor``; ours must stay within
  1.5x of that floor against the fp32 result, and within 2x floor of the bf16 reference.
"""

import dataclasses
import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from helpers import rel_l2, require_reference

from ideogram4_mlx.dit_sequence import (
    OUTPUT_IMAGE_INDICATOR,
    mrope_cos_sin,
    sequence_ids,
    timestep_sinusoid,
)
from ideogram4_mlx.transformer import Ideogram4Transformer

T_MIN, T_MAX = 1.2339457598623172e-4, 0.9994472213630764
# (name, component, text lengths, grid (h, w), t). 0.375 and 0.75 are exact in bf16; 0.3123,
# t_min and t_max are not and must be rounded to bf16 by both sides.
CASES = [
    ("cond_single_bf16_exact_t", "transformer", [6], (5, 7), [0.375]),
    ("cond_batch2_left_padding", "transformer", [9, 4], (5, 7), [0.3123, 0.75]),
    ("uncond_single", "unconditional_transformer", [0], (7, 5), [0.3123]),
    ("uncond_batch2_t_min_t_max", "unconditional_transformer", [0, 0], (4, 6), [T_MIN, T_MAX]),
]


@pytest.fixture(scope="module")
def torch():
    return require_reference()


@pytest.fixture(scope="module")
def models(tiny_checkpoint, torch):
    from ideogram4_mlx.reference.transformer import load_reference_transformer

    cache = {}

    def get(side, component, dtype):
        key = (side, component, dtype)
        if key not in cache:
            path = tiny_checkpoint / component
            if side == "mlx":
                cache[key] = Ideogram4Transformer.from_pretrained(path, dtype=getattr(mx, dtype))
            else:
                cache[key] = load_reference_transformer(path, dtype=getattr(torch, dtype))
        return cache[key]

    return get


def case_inputs(model, text_lengths, grid, seed=0):
    """Inputs for both sides: the MLX layout from ``sequence_ids``, the reference's from
    diffusers' pipeline code (``reference_layout``), so neither side checks itself."""
    from ideogram4_mlx.reference.transformer import reference_layout

    rng = np.random.default_rng(seed)
    ref_layout = reference_layout(text_lengths, *grid)
    b, length = ref_layout[2].shape
    x = rng.standard_normal((b, length, model.config.in_channels)).astype(np.float32)
    feats = rng.standard_normal((b, length, model.config.llm_features_dim)).astype(np.float32)
    feats *= (ref_layout[2] == 3)[..., None]  # text features only at text slots
    return x, feats, sequence_ids(text_lengths, *grid), ref_layout


def run_both(models, component, dtype, text_lengths, grid, t, ref_dtype=None):
    from ideogram4_mlx.reference.transformer import reference_forward

    mlx_model = models("mlx", component, dtype)
    x, feats, ours_layout, ref_layout = case_inputs(mlx_model, text_lengths, grid)
    has_text = max(text_lengths) > 0
    t = np.array(t, np.float32)
    text = mx.array(feats) if has_text else None
    ours = np.array(mlx_model(mx.array(x), t, text, *ours_layout))
    ref = reference_forward(models("ref", component, ref_dtype or dtype), x, t, feats, *ref_layout)
    image = ref_layout[2] == OUTPUT_IMAGE_INDICATOR
    return ours[image], ref[image]


@pytest.mark.parametrize("name, component, text_lengths, grid, t", CASES, ids=[c[0] for c in CASES])
def test_fp32_parity(models, name, component, text_lengths, grid, t):
    ours, ref = run_both(models, component, "float32", text_lengths, grid, t)
    assert np.abs(ref).max() > 0.1, "degenerate reference output"
    err = rel_l2(ours, ref)
    assert err <= 1e-4, f"fp32 rel L2 {err:.2e}"


@pytest.mark.parametrize("name, component, text_lengths, grid, t", CASES, ids=[c[0] for c in CASES])
def test_bf16_parity_within_reference_noise(models, name, component, text_lengths, grid, t):
    ours, ref_bf16 = run_both(models, component, "bfloat16", text_lengths, grid, t)
    _, ref_fp32 = run_both(
        models, component, "bfloat16", text_lengths, grid, t, ref_dtype="float32"
    )
    floor = rel_l2(ref_bf16, ref_fp32)
    assert 1e-4 < floor < 5e-2, f"reference bf16 noise floor {floor} is implausible"
    assert rel_l2(ours, ref_fp32) <= 1.5 * floor
    assert rel_l2(ours, ref_bf16) <= 2.0 * floor


def test_cond_and_uncond_checkpoints_differ(models):
    """Guards against a loader that reads one file for both branches."""
    a, _ = run_both(models, "transformer", "float32", [0], (3, 3), [0.5])
    b, _ = run_both(models, "unconditional_transformer", "float32", [0], (3, 3), [0.5])
    assert rel_l2(a, b) > 1e-2


def test_dequantized_weights_equal_the_reference_bit_for_bit(models, torch):
    """The rounding of MODEL_NOTES#fp8-dequantization, MLX vs PyTorch: every parameter identical
    in bf16."""
    from mlx.utils import tree_flatten

    ours = dict(tree_flatten(models("mlx", "transformer", "bfloat16").parameters()))
    ref = models("ref", "transformer", "bfloat16").state_dict()
    for key, value in ours.items():
        if ".attention.qkv." in key:
            expected = torch.cat(
                [ref[key.replace(".qkv.", f".{n}.")] for n in ("to_q", "to_k", "to_v")]
            )
        else:
            expected = ref[key.replace(".attention.o.", ".attention.to_out.0.")]
        got = torch.from_numpy(np.array(value.astype(mx.float32))).to(torch.bfloat16)
        assert torch.equal(got, expected), key


def test_split_qkv_naming_loads_the_same_parameters(tiny_checkpoint, tmp_path, torch):
    """diffusers naming (to_q/to_k/to_v, to_out.0) with a repack prefix loads identically."""
    from mlx.utils import tree_flatten
    from safetensors.torch import load_file, save_file

    src = tiny_checkpoint / "transformer"
    state = load_file(src / "diffusion_pytorch_model.safetensors")
    split = {}
    for key, value in state.items():
        key = "model.diffusion_model." + key
        if ".attention.qkv." in key:
            for n, part in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0), strict=True):
                split[key.replace(".qkv.", f".{n}.")] = part.contiguous()
        else:
            split[key.replace(".attention.o.", ".attention.to_out.0.")] = value
    dst = tmp_path / "transformer"
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    save_file(split, dst / "diffusion_pytorch_model.safetensors")
    fused = dict(tree_flatten(Ideogram4Transformer.from_pretrained(src).parameters()))
    loaded = dict(tree_flatten(Ideogram4Transformer.from_pretrained(dst).parameters()))
    assert set(fused) == set(loaded)
    assert all(mx.array_equal(fused[k], loaded[k]) for k in fused)


def test_rope_tables_match_diffusers_mrope(torch):
    from diffusers.models.transformers.transformer_ideogram4 import Ideogram4MRoPE

    pos, _, _ = sequence_ids([7, 3], 9, 11)
    cos, sin = mrope_cos_sin(pos, 256, 5_000_000, (24, 20, 20))
    ref_cos, ref_sin = Ideogram4MRoPE(256, 5_000_000, (24, 20, 20))(torch.from_numpy(pos).long())
    # torch's powf leaves inv_freq[38] 1 ulp (9e-10) off the correctly rounded value; at
    # positions ~6.6e4 that moves an angle by ~6e-5 rad, hence atol 1e-4 in fp32.
    np.testing.assert_allclose(cos, ref_cos.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(sin, ref_sin.numpy(), atol=1e-4, rtol=0)
    # What the model uses is the bf16 table: at most one bf16 ulp apart, and rarely at all.
    ours_bf16 = np.array(mx.array(cos).astype(mx.bfloat16).astype(mx.float32))
    ref_bf16 = ref_cos.to(torch.bfloat16).float().numpy()
    assert np.abs(ours_bf16 - ref_bf16).max() <= 2**-8
    assert (ours_bf16 != ref_bf16).mean() < 1e-3


def test_timestep_sinusoid_matches_diffusers(torch):
    from diffusers.models.transformers.transformer_ideogram4 import _sinusoidal_embedding

    t = np.array([T_MIN, 0.3123, 0.75, T_MAX], np.float32)
    t_bf16 = torch.from_numpy(t).to(torch.bfloat16).float()
    ref = _sinusoidal_embedding(1e4 * t_bf16, 4608).numpy()
    diff = np.abs(timestep_sinusoid(t, 4608) - ref)
    # torch's fp32 exp is 1 ulp off the correctly rounded frequency at 18 of 2304 slots; with
    # s = 1e4*t up to 1e4 that moves those angles by up to ~6e-4 rad. Everything else is ~1 ulp.
    assert diff.max() <= 1e-3
    assert (diff <= 2e-6).mean() >= 0.98


def test_sequence_ids_match_the_diffusers_pipeline(torch):
    from diffusers.pipelines.ideogram4.pipeline_ideogram4 import Ideogram4Pipeline

    for lengths in ([5], [9, 4], [1, 3, 2]):
        ref = Ideogram4Pipeline._prepare_ids(lengths, 3, 5, max(lengths), torch.device("cpu"))
        for ours, theirs in zip(sequence_ids(lengths, 3, 5), ref, strict=True):
            np.testing.assert_array_equal(ours, theirs.numpy())


@pytest.mark.slow
def test_full_width_fp32_parity(tmp_path, torch):
    """Real DiT width (4608, 18x256 heads, FFN 12288, 53248 text features), 2 layers, fp32."""
    from ideogram4_mlx.reference.transformer import load_reference_transformer, reference_forward
    from ideogram4_mlx.synth import SYNTHETIC_PRESETS, write_synthetic_checkpoint

    spec = dataclasses.replace(SYNTHETIC_PRESETS["full-width"], dit_num_layers=2)
    ckpt = write_synthetic_checkpoint(tmp_path / "fw", spec, seed=3, components=("transformer",))
    config = json.loads((ckpt / "transformer" / "config.json").read_text())
    assert (config["num_attention_heads"], config["attention_head_dim"]) == (18, 256)
    assert config["llm_features_dim"] == 53248 and config["num_layers"] == 2

    model = Ideogram4Transformer.from_pretrained(ckpt / "transformer", dtype=mx.float32)
    x, feats, ours_layout, ref_layout = case_inputs(model, [12, 5], (4, 6))
    t = np.array([0.3123, 0.75], np.float32)
    ours = np.array(model(mx.array(x), t, mx.array(feats), *ours_layout))
    del model
    ref_model = load_reference_transformer(ckpt / "transformer", dtype=torch.float32)
    ref = reference_forward(ref_model, x, t, feats, *ref_layout)
    image = ref_layout[2] == OUTPUT_IMAGE_INDICATOR
    assert np.abs(ref[image]).max() > 0.1
    err = rel_l2(ours[image], ref[image])
    assert err <= 1e-4, f"full-width fp32 rel L2 {err:.2e}"
