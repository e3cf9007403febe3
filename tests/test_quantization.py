"""Which layers each quantization setting quantizes, to how many bits, on every component.

One table per model: rows are layer kinds, columns the settings (``--quantize 4/6/8`` and each
recipe). The plan (what convert records) and the skeleton rebuilt from that record (what
loading builds) must both follow it, so a recipe or predicate change shows up here.
"""

import mlx.nn as nn
import pytest

from ideogram4_mlx.quantization import (
    GROUP_SIZES,
    RECIPES,
    quantization_plan,
    quantize_skeleton,
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
    return {"bits": None, "recipe": setting} if isinstance(setting, str) else {"bits": setting}


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
