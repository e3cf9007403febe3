"""LoRAs: the MLX DiT with ``ideogram4_mlx.lora`` vs diffusers' DiT with the same file loaded by
diffusers + peft (``ideogram4_mlx.reference.lora``), for every layout we read; then MLX-only
properties: scale 0, fused vs unfused, quantized bases, unmatched and mis-shaped files.

Tolerances (tiny synthetic DiT, batch 2 with left padding; [measured]):
- parity, fp32: output rel L2 <= 1e-4, the base DiT's own bound (test_transformer_parity): the
  bases differ by ~1e-5 (summation order, 1-ulp transcendentals) and the LoRA only adds two
  rank-r fp32 matmuls per linear [9.4e-6 .. 9.7e-6; 9.6e-6 without LoRA]. The LoRA's effect
  (with minus without) agrees to 1e-3 of itself [2.8e-5 .. 5.0e-5]: the shared base error
  cancels there, so a scale or alpha off by 0.5% fails. Every LoRA moves the output by >= 1e-2
  [3.1e-2 .. 4.0e-2], 100x the tolerance, so applying nothing (or the wrong alpha) cannot pass.
  The same bounds hold for the bf16 and fp16 files (every layout has one, as trainers save
  them): their values are exactly fp32 values, and both sides compute with those same values in
  fp32 (we upcast at read; diffusers loads them into the fp32 model's peft layers, which is
  asserted), so only the fp32 base error is left [9.6e-6 .. 9.7e-6; effect 2.9e-5 .. 5.0e-5].
  Except that diffusers folds a kohya/ai-toolkit ``.alpha`` / r into lora_A and lora_B in the
  file's dtype (``_convert_non_diffusers_ideogram4_lora_to_diffusers``), rounding them again
  unless the factor is a power of two (alpha 3, r 4 in bf16: effect off by 1.8e-3 of itself,
  all of it diffusers' rounding; we apply alpha / r in fp32); those files use powers of two.
- fused vs unfused: fp32 <= 2e-6 [4e-7], the same sums in another order. bf16: fusing rounds
  W + dW to bf16 once, unfused rounds the bf16 low-rank term; both are bf16 rounding noise, so
  each stays within 1.5x the bf16 floor (bf16 vs fp32 without LoRA) [floor 6.6e-3; fused vs
  unfused 5.7e-3, vs the fp32 result 6.9e-3 and 6.6e-3].
- quantized base: a LoRA-wrapped QuantizedLinear returns its base output plus the float64
  low-rank term within 2 fp32 ulps of the output [< 1 ulp]. Whole DiT in fp32: the LoRA's effect
  on the 4-bit (8-bit) model vs on the float one, rel L2 <= 0.3 (0.03) [0.175 (0.010)]: the
  LoRA sees quantized activations (the 4-bit output itself is off by 6%); a LoRA skipped on
  quantized layers gives 1.0.
"""

import json
import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import (
    DIT_GRID,
    DIT_TEXT_LENGTHS,
    DIT_TIMES,
    padded_dit_forward,
    padded_dit_inputs,
    rel_l2,
    require_reference,
)
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from ideogram4_mlx.dit_sequence import OUTPUT_IMAGE_INDICATOR
from ideogram4_mlx.lora import (
    LoRAError,
    LoRAQuantizedLinear,
    apply_loras,
    fuse_loras,
    linear_shapes,
    match,
    read_lora,
    set_scale,
)
from ideogram4_mlx.quantization import quantization_plan, quantize_skeleton
from ideogram4_mlx.synth.lora import ALL_MODULES, write_synthetic_lora
from ideogram4_mlx.transformer import Ideogram4Transformer

TEXT_LENGTHS, GRID, T = DIT_TEXT_LENGTHS, DIT_GRID, DIT_TIMES
BF16 = "bfloat16"
# name -> write_synthetic_lora arguments; each seed differs, so no two files are alike.
LORAS = {
    "diffusers": dict(layout="diffusers", rank=4, alpha=8.0, seed=1),
    "diffusers-alpha-pattern": dict(
        layout="diffusers", rank=4, alpha=8.0, alpha_pattern={"to_k": 2.0, "w2": 16.0}, seed=2
    ),
    "diffusers-no-metadata": dict(layout="diffusers", rank=3, seed=3),
    "split": dict(layout="split", rank=4, seed=4),
    "ai-toolkit": dict(layout="ai-toolkit", rank=8, alpha=4.0, seed=5),
    "ai-toolkit-no-alpha": dict(layout="ai-toolkit", rank=2, seed=6),
    "kohya": dict(layout="kohya", rank=4, alpha=3.0, modules=ALL_MODULES, seed=7),
    "diffsynth": dict(layout="diffsynth", rank=2, seed=8),
    "diffsynth-default": dict(layout="diffsynth", rank=2, default_infix=True, seed=9),
    # what trainers save: bf16 (ai-toolkit, diffusers) in every layout, fp16 (kohya); alpha / r
    # is a power of two where diffusers folds it into the weights (see the tolerances above)
    "diffusers-bf16": dict(
        layout="diffusers", rank=4, alpha=8.0, alpha_pattern={"to_v": 4.0}, dtype=BF16, seed=10
    ),
    "split-bf16": dict(layout="split", rank=4, dtype=BF16, seed=11),
    "ai-toolkit-bf16": dict(layout="ai-toolkit", rank=8, alpha=4.0, dtype=BF16, seed=12),
    "kohya-bf16": dict(layout="kohya", rank=4, alpha=8.0, modules=ALL_MODULES, dtype=BF16, seed=13),
    "kohya-fp16": dict(layout="kohya", rank=4, alpha=2.0, dtype="float16", seed=14),
    "diffsynth-default-bf16": dict(
        layout="diffsynth", rank=2, default_infix=True, dtype=BF16, seed=15
    ),
}
# The safetensors dtype of each file's tensors, by write_synthetic_lora's dtype.
STORED = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
# Words of read_lora's layout name for each file (the writer writes what it says).
DETECTED = {
    "diffusers": "diffusers",
    "split": "split",
    "ai-toolkit": "ai-toolkit",
    "kohya": "kohya",
    "diffsynth": "DiffSynth",
}


@pytest.fixture(scope="module")
def component(tiny_checkpoint):
    return tiny_checkpoint / "transformer"


@pytest.fixture(scope="module")
def loras(component, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {
        name: write_synthetic_lora(root / f"{name}.safetensors", component, **kwargs)
        for name, kwargs in LORAS.items()
    }


@pytest.fixture(scope="module")
def inputs(component):
    return padded_dit_inputs(component)


def forward(model, inputs):
    return padded_dit_forward(model, inputs)


def load_mlx(component, files=(), dtype=mx.float32, fuse=False, bits=None):
    model = Ideogram4Transformer.from_pretrained(component, dtype=dtype)
    if bits is not None:
        quantize_skeleton(model, {"quantization": quantization_plan(model, bits)})
    if files:
        (fuse_loras if fuse else apply_loras)(model, [(read_lora(p), s) for p, s in files])
    return model


def mlx_out(component, inputs, files=(), **kwargs):
    return forward(load_mlx(component, files, **kwargs), inputs)


# ---------------------------------------------------------------------------------------------
# MLX vs diffusers


@pytest.fixture(scope="module")
def reference(component, inputs):
    """``run(files, rescale)``: diffusers' DiT outputs with ``files`` ((path, scale) pairs)
    loaded as adapters, then again after ``set_adapters(weights=rescale)`` if given."""
    require_reference()
    import torch

    from ideogram4_mlx.reference.lora import load_reference_loras
    from ideogram4_mlx.reference.transformer import (
        load_reference_transformer,
        reference_forward,
        reference_layout,
    )

    x, feats, t, _ = inputs
    layout = reference_layout(TEXT_LENGTHS, *GRID)  # diffusers' own, not sequence_ids
    image = layout[2] == OUTPUT_IMAGE_INDICATOR

    def run(files=(), rescale=None):
        model = load_reference_transformer(component)
        names = load_reference_loras(model, list(files)) if files else []
        # bf16/fp16 files: peft holds their (exact) values in the fp32 model's dtype, as we do
        lora_dtypes = {p.dtype for n, p in model.named_parameters() if ".lora_" in n}
        assert lora_dtypes <= {torch.float32}, lora_dtypes
        outs = [reference_forward(model, x, t, feats, *layout)[image]]
        if rescale is not None:
            model.set_adapters(names, weights=rescale)
            outs.append(reference_forward(model, x, t, feats, *layout)[image])
        return outs

    return run


@pytest.fixture(scope="module")
def bases(component, inputs, reference):
    return mlx_out(component, inputs), reference()[0]


def assert_parity(ours, ref, base_ours, base_ref):
    err = rel_l2(ours, ref)
    assert err <= 1e-4, f"LoRA DiT output differs from diffusers' by rel L2 {err:.2e}"
    effect = rel_l2(ours - base_ours, ref - base_ref)
    assert effect <= 1e-3, f"LoRA effect differs from diffusers' by {effect:.2e} of itself"


@pytest.mark.parametrize("name", list(LORAS))
def test_layout_matches_diffusers_at_scales_1_and_half(
    name, loras, component, inputs, reference, bases
):
    base_ours, base_ref = bases
    with safe_open(str(loras[name]), framework="numpy") as f:
        stored = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert stored == {STORED[LORAS[name].get("dtype", "float32")]}
    lora = read_lora(loras[name])
    assert DETECTED[LORAS[name]["layout"]] in lora.layout
    model = load_mlx(component)
    apply_loras(model, [(lora, 1.0)])
    ours = forward(model, inputs)
    assert set_scale(model, lora.name, 0.5) > 0
    ours_half = forward(model, inputs)
    ref, ref_half = reference([(loras[name], 1.0)], rescale=[0.5])

    assert rel_l2(ref, base_ref) >= 1e-2, "the LoRA barely changes the reference output"
    assert rel_l2(ref_half, ref) >= 5e-3, "scale 0.5 should differ visibly from scale 1"
    assert_parity(ours, ref, base_ours, base_ref)
    assert_parity(ours_half, ref_half, base_ours, base_ref)


# peft warns whenever a model gets a second adapter; that is the point here.
@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")
def test_two_loras_of_different_layouts_compose_like_diffusers(
    loras, component, inputs, reference, bases
):
    files = [(loras["kohya"], 0.8), (loras["diffusers"], -0.5)]
    base_ours, base_ref = bases
    ours = mlx_out(component, inputs, files)
    (ref,) = reference(files)
    single = mlx_out(component, inputs, files[:1])
    assert rel_l2(ours, single) >= 1e-2, "the second LoRA should change the output"
    assert_parity(ours, ref, base_ours, base_ref)


def test_diffusers_layout_is_what_save_lora_weights_writes(loras, tmp_path):
    """Same keys and the same header (``lora_adapter_metadata`` included) as diffusers' own
    ``save_lora_weights`` given the file's tensors and adapter config."""
    require_reference()
    from diffusers.loaders.lora_pipeline import Ideogram4LoraLoaderMixin
    from safetensors.torch import load_file as load_torch

    path = loras["diffusers-alpha-pattern"]
    with safe_open(str(path), framework="pt") as f:
        ours = f.metadata()
    config = json.loads(ours["lora_adapter_metadata"])
    config = {k.removeprefix("transformer."): v for k, v in config.items()}
    tensors = {k.removeprefix("transformer."): v for k, v in load_torch(str(path)).items()}
    Ideogram4LoraLoaderMixin.save_lora_weights(
        tmp_path, transformer_lora_layers=tensors, transformer_lora_adapter_metadata=config
    )
    with safe_open(str(tmp_path / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        assert f.metadata() == ours
        assert sorted(f.keys()) == sorted(load_file(str(path)))


# ---------------------------------------------------------------------------------------------
# MLX only


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["fp32", "bf16"])
def test_scale_zero_equals_no_lora_bit_for_bit(loras, component, inputs, dtype):
    base = mlx_out(component, inputs, dtype=dtype)
    files = [(loras["kohya"], 0.0), (loras["diffusers"], 0.0)]
    assert np.array_equal(mlx_out(component, inputs, files, dtype=dtype), base)


def test_fused_equals_unfused_fp32(loras, component, inputs):
    files = [(loras["kohya"], 0.8), (loras["diffusers"], -0.5)]
    unfused = mlx_out(component, inputs, files)
    fused = mlx_out(component, inputs, files, fuse=True)
    assert rel_l2(unfused, mlx_out(component, inputs)) >= 1e-2
    assert rel_l2(fused, unfused) <= 2e-6


def test_fused_equals_unfused_bf16_within_rounding_noise(loras, component, inputs):
    files = [(loras["kohya"], 0.8), (loras["diffusers"], -0.5)]
    floor = rel_l2(mlx_out(component, inputs, dtype=mx.bfloat16), mlx_out(component, inputs))
    assert 1e-3 < floor < 5e-2, f"bf16 noise floor {floor} is implausible"
    exact = mlx_out(component, inputs, files)
    unfused = mlx_out(component, inputs, files, dtype=mx.bfloat16)
    fused = mlx_out(component, inputs, files, dtype=mx.bfloat16, fuse=True)
    assert rel_l2(fused, unfused) <= 1.5 * floor
    assert rel_l2(fused, exact) <= 1.5 * floor
    assert rel_l2(unfused, exact) <= 1.5 * floor


def test_lora_on_a_quantized_linear_adds_the_exact_low_rank_term(loras, component):
    """Split q/k/v deltas with an alpha on a 4-bit fused qkv: base output + term in float64."""
    path, scale = loras["diffusers"], 0.5
    model = load_mlx(component, [(path, scale)], bits=4)
    layer = model.layers[0].attention.qkv
    assert isinstance(layer, LoRAQuantizedLinear)
    x = np.random.default_rng(1).standard_normal((2, 7, model.config.hidden_size))
    x = x.astype(np.float32)
    out = np.array(layer(mx.array(x)))
    base = np.array(nn.QuantizedLinear.__call__(layer, mx.array(x)))
    weights = load_file(str(path))
    s = scale * LORAS["diffusers"]["alpha"] / LORAS["diffusers"]["rank"]

    def low_rank(name):
        key = f"transformer.layers.0.attention.{name}"
        down, up = weights[f"{key}.lora_A.weight"], weights[f"{key}.lora_B.weight"]
        return s * (x.astype(np.float64) @ down.T) @ up.T

    term = np.concatenate([low_rank(n) for n in ("to_q", "to_k", "to_v")], axis=-1)
    assert np.abs(term).max() > 1e-2
    ulp = np.finfo(np.float32).eps * np.abs(out).max()
    assert np.abs(out - (base + term)).max() <= 2 * ulp


@pytest.mark.parametrize("bits, bound", [(4, 0.3), (8, 0.03)])
def test_lora_effect_on_a_quantized_dit_matches_the_float_one(
    loras, component, inputs, bits, bound
):
    files = [(loras["ai-toolkit"], 1.0)]
    float_effect = mlx_out(component, inputs, files) - mlx_out(component, inputs)
    quant = mlx_out(component, inputs, bits=bits)
    quant_effect = mlx_out(component, inputs, files, bits=bits) - quant
    assert rel_l2(quant_effect, float_effect) <= bound


def test_unmatched_module_is_named_or_skipped_with_allow_partial(
    loras, component, inputs, tmp_path
):
    path = loras["ai-toolkit"]
    tensors = load_file(str(path))
    for key in [k for k in tensors if k.startswith("diffusion_model.layers.0.attention.qkv.")]:
        tensors[key.replace("layers.0.", "layers.99.")] = tensors[key]
    extra = tmp_path / "extra.safetensors"
    save_file(tensors, str(extra))
    lora = read_lora(extra)
    shapes = linear_shapes(Ideogram4Transformer.build(component))
    with pytest.raises(LoRAError, match=re.escape("layers.99.attention.qkv")):
        match(lora, shapes)
    assert match(lora, shapes, allow_partial=True) == ["layers.99.attention.qkv"]
    # The matched rest is applied exactly as the file without the extra module.
    assert np.array_equal(
        mlx_out(component, inputs, [(extra, 1.0)]), mlx_out(component, inputs, [(path, 1.0)])
    )


def test_lora_for_a_bigger_model_names_key_and_shapes(component, tmp_path):
    bigger = dict(
        num_layers=2,
        num_attention_heads=3,
        attention_head_dim=128,
        intermediate_size=512,
        adaln_dim=32,
    )
    path = write_synthetic_lora(
        tmp_path / "big.safetensors", bigger, "kohya", modules=["feed_forward.w2"], layers=[0]
    )
    shapes = linear_shapes(Ideogram4Transformer.build(component))
    with pytest.raises(LoRAError) as error:
        match(read_lora(path), shapes, allow_partial=True)
    message = str(error.value)
    assert "diffusion_model.layers.0.feed_forward.w2.lora_up.weight" in message
    assert "(384, 512)" in message and "(256, 256)" in message


def test_synthetic_lora_writer(component, tmp_path):
    a = write_synthetic_lora(tmp_path / "a.safetensors", component, "kohya", seed=3)
    b = write_synthetic_lora(tmp_path / "b.safetensors", component, "kohya", seed=3)
    c = write_synthetic_lora(tmp_path / "c.safetensors", component, "kohya", seed=4)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    keys = sorted(load_file(str(a)))
    assert "diffusion_model.layers.1.attention.qkv.lora_down.weight" in keys
    assert "diffusion_model.layers.1.attention.qkv.alpha" in keys
    assert not any("adaln_modulation" in k for k in keys)  # not a default target
    with pytest.raises(FileExistsError):
        write_synthetic_lora(a, component, "kohya")
    write_synthetic_lora(a, component, "kohya", seed=4, force=True)
    assert a.read_bytes() == c.read_bytes()
    link = tmp_path / "link.safetensors"
    link.symlink_to(a)
    with pytest.raises(FileExistsError, match="symbolic link"):
        write_synthetic_lora(link, component, "kohya", force=True)
    with pytest.raises(ValueError, match="stores no alpha"):
        write_synthetic_lora(tmp_path / "d.safetensors", component, "diffsynth", alpha=4.0)
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        write_synthetic_lora(tmp_path / "e.safetensors", component, "kohya", dtype="int8")
    # bf16 / fp16: the fp32 file's values rounded to nearest (the alpha too), by MLX
    fp32 = mx.load(str(c))
    for name, dtype in (("bfloat16", mx.bfloat16), ("float16", mx.float16)):
        path = tmp_path / f"{name}.safetensors"
        low = mx.load(str(write_synthetic_lora(path, component, "kohya", seed=4, dtype=name)))
        assert low.keys() == fp32.keys()
        for key, value in low.items():
            assert value.dtype == dtype
            assert mx.array_equal(value, fp32[key].astype(dtype)).item(), key
