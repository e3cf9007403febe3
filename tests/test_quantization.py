"""Which layers each quantization setting quantizes, to how many bits, on every component.

One table per model: rows are layer kinds, columns the settings (``--quantize 4/6/8`` and each
recipe). The plan (what convert records) and the skeleton rebuilt from that record (what
loading builds) must both follow it, so a recipe or predicate change shows up here. MLX's float
modes (mxfp4, mxfp8, nvfp4) follow the same float/quantized pattern, with their own fixed bits
and group size, and the >= 8-bit layers raised to affine 8-bit g64 under the 4-bit ones.
"""

import mlx.nn as nn
import pytest

from ideogram4_mlx.errors import InputError
from ideogram4_mlx.quantization import (
    FLOAT_MODES,
    GROUP_SIZES,
    MODES,
    RECIPES,
    check_record,
    check_settings,
    quantization_plan,
    quantize_skeleton,
    record_version,
)
from ideogram4_mlx.text_encoder import Qwen3VLTextEncoder, TextEncoderConfig
from ideogram4_mlx.transformer import Ideogram4Transformer, TransformerConfig
from ideogram4_mlx.vae import Flux2VAE, VAEConfig

SETTINGS = (4, 6, 8, "mixed-4-8", "mixed-4-6")
# Every input width a multiple of 128, so that each group size divides every layer.
DIT = TransformerConfig(
    num_layers=2,
    attention_head_dim=128,
    num_attention_heads=1,
    intermediate_size=256,
    adaln_dim=128,
    llm_features_dim=13 * 128,
)
TEXT = TextEncoderConfig(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=36,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=64,
    vocab_size=256,
)
VAE = VAEConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=8)

FLOAT = (None,) * len(SETTINGS)
# Bits of each layer kind (block layers without their "layers.N." prefix); None: kept float.
#                                    4  6  8  mixed-4-8  mixed-4-6
DIT_BITS = {
    "attention.qkv": (4, 6, 8, 8, 6),
    "attention.o": (4, 6, 8, 8, 6),
    "feed_forward.w1": (4, 6, 8, 4, 4),
    "feed_forward.w3": (4, 6, 8, 4, 4),
    "feed_forward.w2": (4, 6, 8, 4, 6),
    # The text projection sees features of very different scales: never below 8 bits.
    "llm_cond_proj": (8, 8, 8, 8, 8),
    # The timestep/AdaLN path, the indicator embedding, input and output stay float.
    "adaln_modulation": FLOAT,
    "input_proj": FLOAT,
    "t_embedding.mlp_in": FLOAT,
    "t_embedding.mlp_out": FLOAT,
    "adaln_proj": FLOAT,
    "embed_image_indicator": FLOAT,
    "final_layer.linear": FLOAT,
    "final_layer.adaln_modulation": FLOAT,
}
TEXT_BITS = {
    "self_attn.q_proj": (4, 6, 8, 8, 6),
    "self_attn.k_proj": (4, 6, 8, 8, 6),
    "self_attn.v_proj": (4, 6, 8, 8, 6),
    "self_attn.o_proj": (4, 6, 8, 8, 6),
    "mlp.gate_proj": (4, 6, 8, 4, 4),
    "mlp.up_proj": (4, 6, 8, 4, 4),
    "mlp.down_proj": (4, 6, 8, 4, 6),
    "embed_tokens": FLOAT,
}
MODELS = {
    "transformer": (lambda: Ideogram4Transformer(DIT), DIT_BITS),
    "text_encoder": (lambda: Qwen3VLTextEncoder(TEXT), TEXT_BITS),
}


def kind(path: str) -> str:
    """``layers.3.mlp.up_proj`` -> ``mlp.up_proj``; other paths as they are."""
    parts = path.split(".")
    return ".".join(parts[2:]) if parts[0] == "layers" and parts[1].isdigit() else path


def quantizable(model: nn.Module) -> dict[str, nn.Module]:
    return {p: m for p, m in model.named_modules() if p and hasattr(m, "to_quantized")}


def settings(setting) -> dict:
    return (
        {"quantize": None, "recipe": setting} if isinstance(setting, str) else {"quantize": setting}
    )


def test_the_tables_cover_every_setting_and_every_quantizable_layer():
    assert set(RECIPES) == {s for s in SETTINGS if isinstance(s, str)}
    for build, table in MODELS.values():
        assert {kind(p) for p in quantizable(build())} == set(table)


@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("component", list(MODELS))
def test_plan_and_rebuilt_skeleton_follow_the_table(component, setting, group_size):
    build, table = MODELS[component]
    plan = quantization_plan(build(), group_size=group_size, **settings(setting))
    assert (plan["bits"], plan["group_size"], plan["recipe"]) == (
        4 if isinstance(setting, str) else setting,
        group_size,
        setting if isinstance(setting, str) else None,
    )
    column = SETTINGS.index(setting)
    for path in quantizable(build()):
        want = table[kind(path)][column]
        override = plan["overrides"].get(path, {"bits": plan["bits"]})
        got = None if override is False else override["bits"]
        assert got == want, f"plan: {path} has {got} bits under {setting}, expected {want}"

    skeleton = quantize_skeleton(build(), {"quantization": plan})
    for path, module in skeleton.named_modules():
        if not path or kind(path) not in table:
            continue
        want = table[kind(path)][column]
        if want is None:
            assert not isinstance(module, nn.QuantizedLinear), path
        else:
            assert isinstance(module, nn.QuantizedLinear), path
            assert (module.bits, module.group_size) == (want, group_size), path


@pytest.mark.parametrize("setting", SETTINGS)
def test_the_vae_is_never_quantized(setting):
    assert quantization_plan(Flux2VAE(VAE), **settings(setting)) is None


# ---------------------------------------------------------------------------------------------
# MLX's float modes

# mode -> (bits, group size, the >= 8-bit text projection's override or None when none differs)
AFFINE_8 = {"mode": "affine", "bits": 8, "group_size": 64}
FLOAT_PLANS = {"mxfp4": (4, 32, AFFINE_8), "mxfp8": (8, 32, None), "nvfp4": (4, 16, AFFINE_8)}


def test_the_float_modes_are_mlx_s_table():
    """The bits and group sizes MLX 0.32 documents for mx.quantize
    (MODEL_NOTES#mlx-quantization-modes)."""
    assert set(FLOAT_PLANS) == set(FLOAT_MODES)
    for mode, (bits, group_size, _) in FLOAT_PLANS.items():
        assert (MODES[mode].bits, MODES[mode].group_sizes) == ((bits,), (group_size,))


@pytest.mark.parametrize("mode", FLOAT_MODES)
@pytest.mark.parametrize("component", list(MODELS))
def test_float_mode_plans_and_skeletons_follow_the_table(component, mode):
    """The same layers stay float as under affine; the rest take the mode, except the >= 8-bit
    text projection under a 4-bit mode: affine 8-bit in groups of 64 (quantization's rule)."""
    build, table = MODELS[component]
    bits, group_size, raised = FLOAT_PLANS[mode]
    plan = quantization_plan(build(), mode)
    assert (plan["mode"], plan["bits"], plan["group_size"], plan["recipe"]) == (
        mode,
        bits,
        group_size,
        None,
    )
    float_kinds = {k for k, column in table.items() if column == FLOAT}
    for path in quantizable(build()):
        override = plan["overrides"].get(path)
        if kind(path) in float_kinds:
            assert override is False, path
        elif kind(path) == "llm_cond_proj":
            assert override == raised, path
        else:
            assert override is None, path

    expected = {"mode": mode, "bits": bits, "group_size": group_size}
    for path, module in quantize_skeleton(build(), {"quantization": plan}).named_modules():
        if not path or kind(path) not in table:
            continue
        if kind(path) in float_kinds:
            assert not isinstance(module, nn.QuantizedLinear), path
            continue
        want = raised if kind(path) == "llm_cond_proj" and raised else expected
        got = {"mode": module.mode, "bits": module.bits, "group_size": module.group_size}
        assert got == want, path
        assert ("biases" in module) == (module.mode == "affine"), path


def test_records_with_a_float_mode_are_version_2_affine_ones_stay_version_1():
    """Readers from before the float modes read version 1 and refuse version 2 asking for an
    upgrade: an affine record must stay exactly as they wrote it."""
    build = MODELS["transformer"][0]
    for setting in SETTINGS:
        plan = quantization_plan(build(), **settings(setting))
        assert record_version(plan) == 1
        assert not [o for o in plan["overrides"].values() if o and "mode" in o]
    assert record_version(None) == 1
    for mode in FLOAT_MODES:
        assert record_version(quantization_plan(build(), mode)) == 2
    # a float mode in one override is enough
    plan = quantization_plan(build(), 4)
    plan["overrides"]["layers.0.attention.o"] = {"mode": "mxfp8", "bits": 8, "group_size": 32}
    assert record_version(plan) == 2


@pytest.mark.parametrize("mode", FLOAT_MODES)
def test_float_mode_records_pass_the_check(mode):
    check_record(quantization_plan(MODELS["transformer"][0](), mode))


PLAN = {"mode": "mxfp4", "bits": 4, "group_size": 32, "recipe": None, "overrides": {}}


@pytest.mark.parametrize(
    "change, match",
    [
        ({"mode": "fp4"}, "quantization mode is 'fp4', expected one of"),
        ({"bits": 8}, r"quantization bits is 8, expected one of \[4\] \(mxfp4\)"),
        ({"group_size": 64}, r"quantization group_size is 64, expected one of \[32\] \(mxfp4\)"),
        ({"mode": "nvfp4"}, r"group_size is 32, expected one of \[16\] \(nvfp4\)"),
        ({"mode": "mxfp8"}, r"bits is 4, expected one of \[8\] \(mxfp8\)"),
        ({"overrides": {"x": {"mode": "mxfp8", "bits": 4, "group_size": 32}}}, "x bits is 4"),
        ({"overrides": {"x": {"mode": "int4", "bits": 4, "group_size": 32}}}, "x mode is 'int4'"),
        # an override without a mode takes the plan's: 8 bits is no mxfp4 setting
        ({"overrides": {"x": {"bits": 8, "group_size": 64}}}, r"x bits is 8, .*\(mxfp4\)"),
    ],
)
def test_bad_float_mode_records_are_refused_in_one_line(change, match):
    with pytest.raises(InputError, match=match) as info:
        check_record({**PLAN, **change})
    assert "\n" not in str(info.value)


def test_an_affine_override_under_a_float_plan_is_valid():
    check_record({**PLAN, "overrides": {"llm_cond_proj": AFFINE_8, "input_proj": False}})


@pytest.mark.parametrize(
    "quantize, group_size, match",
    [
        ("mxfp4", 64, "group size 64 does not apply to mxfp4: its groups are fixed at 32"),
        ("mxfp8", 16, "group size 16 does not apply to mxfp8: its groups are fixed at 32"),
        ("nvfp4", 32, "group size 32 does not apply to nvfp4: its groups are fixed at 16"),
        ("fp4", None, "bits fp4 is not supported; use one of .* or a float mode"),
        (5, None, "bits 5 is not supported"),
        (4, 16, "group size 16 is not supported"),
    ],
)
def test_bad_settings_are_refused(quantize, group_size, match):
    with pytest.raises(InputError, match=match):
        check_settings(quantize, group_size, None)


def test_a_float_mode_takes_its_own_group_size_given_or_not():
    for mode in FLOAT_MODES:
        default = check_settings(mode, None, None)
        assert default == check_settings(mode, MODES[mode].group_size, None)
        assert (default.mode, default.group_size) == (mode, MODES[mode].group_size)
    assert check_settings(4, None, None).group_size == 64  # affine's default, as before
    with pytest.raises(InputError, match="not both"):
        check_settings("mxfp4", None, "mixed-4-8")
