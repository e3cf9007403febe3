"""The LoRA file ``train.save.save_lora`` writes, outside our trainer: diffusers'
``Ideogram4Pipeline.load_lora_weights`` (the call users make; the pipeline is built around the
reference DiT alone, its other components None) loads it into diffusers' DiT built from the same
synthetic weights, and that DiT's output matches ours with the file applied by ``read_lora`` +
``apply_loras``; ``lora-info`` describes it, training settings included.

The adapters have random A and B (seeded) on every block linear, adaln_modulation included, and
alpha 2 with rank 4: peft's scale alpha / r = 0.5, which both sides must apply (a reader taking
alpha = r would double the LoRA's effect).

Tolerances (tiny synthetic DiT in fp32, batch 2 with left padding; [measured]), as
test_lora_parity: output rel L2 <= 1e-4, the base DiTs' own difference (summation order, 1-ulp
transcendentals) [9.6e-6 fp32 and bf16 files]; the LoRA's effect (with minus without) agrees to
1e-3 of itself [2.8e-5 for both files], so a scale off by 0.5% fails; the LoRA moves the
output by >= 1e-2 [6.5e-2]. The bf16 file's values are exact bf16 numbers that both sides
compute with in fp32 (diffusers loads them into the fp32 model's peft layers: asserted), so the
same bounds hold. The fp32 file applied by us equals the trained model's own output to
rel L2 1e-5 [0: the same sums].

peft matches ``target_modules`` as name suffixes, so the header's ``adaln_modulation`` also
wraps ``final_layer.adaln_modulation``, which the file has no weights for: peft warns and leaves
that adapter at its init (B = 0), which changes nothing (the parity above shows it).
"""

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
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

from ideogram4_mlx.cli import main
from ideogram4_mlx.dit_sequence import OUTPUT_IMAGE_INDICATOR
from ideogram4_mlx.lora import TRAINING_KEY, apply_loras, read_lora
from ideogram4_mlx.train.save import peft_config, save_lora
from ideogram4_mlx.train.step import BLOCK_TARGETS, LoRASettings, add_lora
from ideogram4_mlx.transformer import Ideogram4Transformer

TEXT_LENGTHS, GRID, T = DIT_TEXT_LENGTHS, DIT_GRID, DIT_TIMES
SETTINGS = LoRASettings(rank=4, alpha=2.0, targets=BLOCK_TARGETS, seed=3)
TRAINING = {"steps": 7, "learning_rate": 1e-4}
DTYPES = {"fp32": (mx.float32, "F32"), "bf16": (mx.bfloat16, "BF16")}
N_LAYERS = 2 * len(BLOCK_TARGETS)  # the tiny DiT has 2 blocks


@pytest.fixture(scope="module")
def component(tiny_checkpoint):
    return tiny_checkpoint / "transformer"


@pytest.fixture(scope="module")
def trained(component):
    """The DiT with adapters as training leaves them: random A and B, seeded."""
    model = Ideogram4Transformer.from_pretrained(component, dtype=mx.float32)
    adapters = add_lora(model, SETTINGS)
    rng = np.random.default_rng(5)
    for adapter in adapters.values():
        adapter.lora_A = [
            mx.array(rng.uniform(-0.1, 0.1, a.shape).astype(np.float32)) for a in adapter.lora_A
        ]
        adapter.lora_B = [
            mx.array(0.1 * rng.standard_normal(b.shape).astype(np.float32)) for b in adapter.lora_B
        ]
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def files(trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    return {
        name: save_lora(root / f"{name}.safetensors", trained, SETTINGS, TRAINING, dtype=dtype)
        for name, (dtype, _) in DTYPES.items()
    }


@pytest.fixture(scope="module")
def inputs(component):
    return padded_dit_inputs(component)


def forward(model, inputs):
    return padded_dit_forward(model, inputs)


def ours(component, inputs, path=None):
    model = Ideogram4Transformer.from_pretrained(component, dtype=mx.float32)
    if path is not None:
        lora = read_lora(path)
        scales = {d.alpha_scale for ds in lora.deltas.values() for d in ds}
        assert scales == {SETTINGS.scale}, scales  # alpha / r from the header
        assert sum(len(ds) for ds in lora.deltas.values()) == 2 * (len(BLOCK_TARGETS) + 2)
        apply_loras(model, [(lora, 1.0)])
    return forward(model, inputs)


def test_the_saved_header_is_diffusers_own(files):
    for name, (_, stored) in DTYPES.items():
        with safe_open(str(files[name]), framework="numpy") as f:
            meta, keys = f.metadata(), list(f.keys())
            assert {f.get_slice(k).get_dtype() for k in keys} == {stored}
        config = json.loads(meta["lora_adapter_metadata"])
        # diffusers' save_lora_weights prefixes the config's keys; its loader keeps only those
        assert config == {f"transformer.{k}": v for k, v in peft_config(SETTINGS).items()}
        assert json.loads(meta[TRAINING_KEY]) == {"seed": 3, **TRAINING}
        assert "transformer.layers.1.adaln_modulation.lora_B.weight" in keys
        assert len(keys) == 2 * 2 * (len(BLOCK_TARGETS) + 2)  # q/k/v split: 8 pairs per block


@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters, an inconsistency")
@pytest.mark.parametrize("name", list(DTYPES))
def test_diffusers_load_lora_weights_gives_our_output(name, files, component, inputs, trained):
    require_reference()
    import torch
    from diffusers import Ideogram4Pipeline

    from ideogram4_mlx.reference.transformer import (
        load_reference_transformer,
        reference_forward,
        reference_layout,
    )

    x, feats, t, _ = inputs
    layout = reference_layout(TEXT_LENGTHS, *GRID)
    image = layout[2] == OUTPUT_IMAGE_INDICATOR
    dit = load_reference_transformer(component)
    base_ref = reference_forward(dit, x, t, feats, *layout)[image]
    pipe = Ideogram4Pipeline(
        scheduler=None,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        transformer=dit,
        unconditional_transformer=None,
    )
    pipe.load_lora_weights(str(files[name]), adapter_name="trained")
    config = dit.peft_config["trained"]
    assert (config.r, config.lora_alpha) == (SETTINGS.rank, SETTINGS.alpha)
    layers = [m for m in dit.modules() if hasattr(m, "lora_A") and "trained" in m.lora_A]
    assert len(layers) == 2 * (len(BLOCK_TARGETS) + 2)
    assert {m.scaling["trained"] for m in layers} == {SETTINGS.scale}
    params = [p for n, p in dit.named_parameters() if ".lora_" in n]
    assert {p.dtype for p in params} == {torch.float32}
    ref = reference_forward(dit, x, t, feats, *layout)[image]

    base_ours, got = ours(component, inputs), ours(component, inputs, files[name])
    assert rel_l2(ref, base_ref) >= 1e-2, "the LoRA barely changes diffusers' output"
    err = rel_l2(got, ref)
    assert err <= 1e-4, f"our output differs from diffusers' by rel L2 {err:.2e}"
    effect = rel_l2(got - base_ours, ref - base_ref)
    assert effect <= 1e-3, f"the LoRA's effect differs from diffusers' by {effect:.2e}"
    if name == "fp32":  # the file is the trained model
        assert rel_l2(got, forward(trained, inputs)) <= 1e-5


def test_lora_info_describes_the_saved_file(files, tiny_checkpoint):
    result = CliRunner().invoke(
        main, ["lora-info", str(files["bf16"]), "--model", str(tiny_checkpoint)]
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert "layout    : diffusers/PEFT\n" in out
    assert "rank(s)   : 4\n" in out and "alpha / r : 0.5\n" in out
    assert f"shapes    : fits: {N_LAYERS} layers\n" in out
    training = json.dumps({"seed": 3, **TRAINING}, sort_keys=True)
    assert f"training  : {training}\n" in out
