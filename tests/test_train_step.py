"""LoRA training (``ideogram4_mlx.train``): the objective's conventions, one step's gradients
against torch autograd through diffusers' DiT with peft LoRA, checkpointing, overfitting one
latent, and the saved file read back.

Tolerances (tiny synthetic DiT in fp32, batch 2 with left padding; [measured]):
- loss vs torch: rel 1e-5 [8e-7]; gradients, rel L2 per tensor <= 1e-3 [2.4e-5 .. 6.5e-5 over
  the 56 A/B tensors], 15x headroom: the forward outputs differ by ~1e-5
  (test_transformer_parity: summation order, 1-ulp transcendentals) and the backward pass
  adds the same kind of error per op; every gradient tensor is far from zero (B is random,
  so A's gradients are not 0), so a missing scale, a wrong sign or a swapped q/k/v third fails.
- checkpointing: the same arithmetic recomputed, rel L2 <= 1e-6.
- overfitting one batch (rank 8, AdamW lr 3e-3, 60 steps, fixed seeds): the loss falls >= 3x
  [4.29 -> 1.08, 4.0x].
"""

import json

import mlx.core as mx
import numpy as np
import pytest
from helpers import rel_l2, require_reference
from mlx.utils import tree_flatten
from safetensors import safe_open

from ideogram4_mlx.dit_sequence import OUTPUT_IMAGE_INDICATOR
from ideogram4_mlx.errors import InputError
from ideogram4_mlx.lora import apply_loras, read_lora
from ideogram4_mlx.train.objective import (
    bell_weights,
    noisy_latents,
    sample_times,
    time_weights,
    training_times,
    velocity_target,
)
from ideogram4_mlx.train.save import TRAINING_KEY, diffusers_names, peft_config, save_lora
from ideogram4_mlx.train.step import (
    LoRASettings,
    add_lora,
    lora_gradients,
    loss_fn,
    make_optimizer,
    prepare_batch,
    train_step,
)
from ideogram4_mlx.transformer import Ideogram4Transformer

TEXT_LENGTHS, GRID = [5, 3], (4, 3)
SETTINGS = LoRASettings(rank=4, alpha=8.0, seed=0)


@pytest.fixture(scope="module")
def component(tiny_checkpoint):
    return tiny_checkpoint / "transformer"


def model_with_lora(component, settings=SETTINGS, checkpoint=False, random_b=True):
    model = Ideogram4Transformer.from_pretrained(component, dtype=mx.float32)
    adapters = add_lora(model, settings, checkpoint=checkpoint)
    if random_b:  # B = 0 (peft's init) would make A's gradients 0: nothing to compare
        rng = np.random.default_rng(1)
        for adapter in adapters.values():
            adapter.lora_B = [
                mx.array(0.1 * rng.standard_normal(b.shape).astype(np.float32))
                for b in adapter.lora_B
            ]
    return model, adapters


def inputs(config, seed=0):
    rng = np.random.default_rng(seed)
    b, n = len(TEXT_LENGTHS), GRID[0] * GRID[1]
    x1 = rng.standard_normal((b, n, config.in_channels)).astype(np.float32)
    x0 = rng.standard_normal((b, n, config.in_channels)).astype(np.float32)
    feats = np.zeros((b, max(TEXT_LENGTHS), config.llm_features_dim), np.float32)
    for i, length in enumerate(TEXT_LENGTHS):  # [left padding][text]
        feats[i, max(TEXT_LENGTHS) - length :] = rng.standard_normal((length, feats.shape[2]))
    table = training_times()
    t = sample_times(np.random.default_rng(seed), b, table)
    return x1, x0, feats, t, time_weights(t, table)


def batch_for(model, data):
    x1, x0, feats, t, w = data
    return prepare_batch(
        model, mx.array(x1), mx.array(feats), TEXT_LENGTHS, GRID, t, mx.array(x0), w
    )


# ---------------------------------------------------------------------------------------------
# The objective


def test_an_euler_step_with_the_target_moves_along_the_path_to_the_clean_latents():
    rng = np.random.default_rng(0)
    x1, x0 = (mx.array(rng.standard_normal((1, 6, 128)).astype(np.float32)) for _ in range(2))
    t, t_next = np.array([0.3], np.float32), np.array([0.55], np.float32)
    z = noisy_latents(x1, x0, t) + float(t_next[0] - t[0]) * velocity_target(x1, x0)
    np.testing.assert_allclose(np.array(z), np.array(noisy_latents(x1, x0, t_next)), atol=1e-6)
    np.testing.assert_allclose(np.array(noisy_latents(x1, x0, np.ones(1))), np.array(x1))
    np.testing.assert_allclose(np.array(noisy_latents(x1, x0, np.zeros(1))), np.array(x0))


def test_the_time_table_is_diffsynths_and_its_weights_have_mean_one():
    # DiffSynth-Studio set_timesteps_ideogram4(1000, image_resolution=(1024, 1024)), float64
    from statistics import NormalDist

    mean, std = 0.5 * np.log(4.0), 1.5
    u = np.linspace(0.0, 1.0, 1001)[1:][::-1]
    z = np.array([np.inf if v >= 1 else NormalDist().inv_cdf(v) for v in u])
    lo, hi = 1 / (1 + np.exp(0.5 * 18)), 1 / (1 + np.exp(-0.5 * 15))
    expected = np.clip(1 - 1 / (1 + np.exp(-(mean + std * z))), lo, hi)
    np.testing.assert_allclose(training_times(), expected, atol=1e-6)
    w = bell_weights(training_times())
    assert (
        abs(w.mean() - 1) < 1e-5 and w.min() == 0 and w.argmax() == np.abs(expected - 0.5).argmin()
    )
    t = sample_times(np.random.default_rng(3), 64, training_times())
    assert np.isin(t, training_times()).all()
    assert (sample_times(np.random.default_rng(3), 64, training_times()) == t).all()
    assert (time_weights(t, training_times(), "none") == 1).all()
    with pytest.raises(InputError, match="weighting"):
        time_weights(t, training_times(), "snr")


# ---------------------------------------------------------------------------------------------
# The step


def test_only_the_adapters_train_and_they_start_at_the_base_model(component):
    model, adapters = model_with_lora(component, random_b=False)
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert names and all(".adapter.lora_" in k for k in names)
    assert len(adapters) == 2 * 5  # tiny DiT: 2 blocks x (qkv, o, w1, w2, w3)
    base = Ideogram4Transformer.from_pretrained(component, dtype=mx.float32)
    data = inputs(model.config)
    loss, grads = lora_gradients(model, batch_for(model, data))
    assert float(loss) == float(loss_fn(base, batch_for(base, data)))  # B = 0: the base model
    assert set(dict(tree_flatten(grads))) == set(names)
    with pytest.raises(InputError, match="targets"):
        LoRASettings(targets=("llm_cond_proj",))


def test_checkpointing_gives_the_same_gradients(component):
    data = inputs(Ideogram4Transformer.build(component).config)
    plain, _ = model_with_lora(component)
    ckpt, _ = model_with_lora(component, checkpoint=True)
    loss_p, g_p = lora_gradients(plain, batch_for(plain, data))
    loss_c, g_c = lora_gradients(ckpt, batch_for(ckpt, data))
    assert float(loss_c) == pytest.approx(float(loss_p), rel=1e-6)
    for (k, a), (_, b) in zip(tree_flatten(g_p), tree_flatten(g_c), strict=True):
        assert rel_l2(np.array(b), np.array(a)) <= 1e-6, k


def test_a_tiny_model_overfits_one_latent(component):
    model, _ = model_with_lora(component, LoRASettings(rank=8, alpha=8.0), random_b=False)
    data = inputs(model.config)
    batch = batch_for(model, data)
    optimizer = make_optimizer(learning_rate=3e-3, weight_decay=0.0)
    losses = [float(train_step(model, optimizer, batch)) for _ in range(60)]
    assert losses[-1] < losses[0] / 3, losses[::10]


# ---------------------------------------------------------------------------------------------
# Saving


def test_the_saved_lora_reads_back_and_applies_as_trained(component, tmp_path):
    model, _ = model_with_lora(component)
    data = inputs(model.config)
    path = save_lora(tmp_path / "a.safetensors", model, SETTINGS, {"steps": 1}, dtype=mx.float32)
    with safe_open(str(path), framework="numpy") as f:
        meta, keys = f.metadata(), list(f.keys())
    # diffusers' saver and loader prefix the config's keys with the component
    expected = {f"transformer.{k}": v for k, v in peft_config(SETTINGS).items()}
    assert json.loads(meta["lora_adapter_metadata"]) == expected
    assert json.loads(meta[TRAINING_KEY]) == {"seed": 0, "steps": 1}
    assert "transformer.layers.1.attention.to_k.lora_B.weight" in keys
    lora = read_lora(path)
    assert lora.layout == "diffusers/PEFT" and lora.ranks == [4]
    base = Ideogram4Transformer.from_pretrained(component, dtype=mx.float32)
    apply_loras(base, [(lora, 1.0)])
    ours = float(loss_fn(model, batch_for(model, data)))
    assert float(loss_fn(base, batch_for(base, data))) == pytest.approx(ours, rel=1e-5)
    with pytest.raises(FileExistsError):
        save_lora(path, model, SETTINGS)
    bf16 = save_lora(tmp_path / "b.safetensors", model, SETTINGS)
    with safe_open(str(bf16), framework="numpy") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


# ---------------------------------------------------------------------------------------------
# Gradient parity with torch autograd through diffusers' DiT + peft


def test_gradients_match_torch_autograd_through_diffusers_and_peft(component):
    require_reference()
    import torch
    from peft import LoraConfig

    from ideogram4_mlx.reference.transformer import load_reference_transformer, reference_layout

    model, adapters = model_with_lora(component)
    data = inputs(model.config)
    loss, grads = lora_gradients(model, batch_for(model, data))
    grads = dict(tree_flatten(grads))

    x1, x0, feats, t, w = data
    ref = load_reference_transformer(component)
    config = peft_config(SETTINGS)
    ref.add_adapter(
        LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"],
                   target_modules=config["target_modules"])
    )  # fmt: skip
    ref.requires_grad_(False)
    pairs = {}  # our gradient key -> the peft parameter
    for path, adapter in adapters.items():
        for i, name in enumerate(diffusers_names(path)):
            layer = ref.get_submodule(name)
            for part, values in (("A", adapter.lora_A[i]), ("B", adapter.lora_B[i])):
                p = getattr(layer, f"lora_{part}")["default"].weight
                p.data = torch.tensor(np.array(values))
                p.requires_grad_(True)
                pairs[f"{path}.adapter.lora_{part}.{i}"] = p
    layout = reference_layout(TEXT_LENGTHS, *GRID)
    n_text = max(TEXT_LENGTHS)
    z = t[:, None, None] * x1 + (1 - t[:, None, None]) * x0
    x = np.concatenate([np.zeros((z.shape[0], n_text, z.shape[2]), np.float32), z], axis=1)
    full = np.zeros((*x.shape[:2], feats.shape[2]), np.float32)
    full[:, :n_text] = feats
    out = ref(
        hidden_states=torch.tensor(x),
        timestep=torch.tensor(t).to(torch.bfloat16).float(),  # as reference_forward rounds it
        encoder_hidden_states=torch.tensor(full),
        position_ids=torch.as_tensor(layout[0]).long(),
        segment_ids=torch.as_tensor(layout[1]).long(),
        indicator=torch.as_tensor(layout[2]).long(),
        return_dict=False,
    )[0]
    assert (layout[2][:, n_text:] == OUTPUT_IMAGE_INDICATOR).all()
    per_sample = ((out[:, n_text:] - torch.tensor(x1 - x0)) ** 2).mean(dim=(1, 2))
    ref_loss = (per_sample * torch.tensor(w)).mean()
    ref_loss.backward()

    assert float(loss) == pytest.approx(ref_loss.item(), rel=1e-5)
    assert set(pairs) == set(grads)
    errors = {k: rel_l2(np.array(grads[k]), p.grad.numpy()) for k, p in pairs.items()}
    assert all(np.linalg.norm(p.grad.numpy()) > 0 for p in pairs.values())
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-3, (
        f"{worst}: LoRA gradient off torch's by rel L2 {errors[worst]:.2e}"
    )


@pytest.mark.parametrize("base", ["bfloat16", "8-bit", "4-bit"])
def test_a_bf16_or_quantized_base_trains_its_lora_only(component, base):
    """The base as a Mac holds it (bf16, or its block linears quantized, QLoRA-style): the
    adapters train in fp32 (the loss falls as for fp32), and no base weight moves."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    dtype = mx.bfloat16 if base == "bfloat16" else mx.float32
    model = Ideogram4Transformer.from_pretrained(component, dtype=dtype)
    if base != "bfloat16":
        bits = int(base.split("-")[0])
        nn.quantize(model, group_size=32, bits=bits, class_predicate=lambda path, m: (
            path.startswith("layers.") and isinstance(m, nn.Linear)
            and m.weight.shape[1] % 32 == 0))  # fmt: skip
        assert any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    before = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}
    add_lora(model, LoRASettings(rank=8, alpha=8.0))
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert trainable and all(v.dtype == mx.float32 for v in trainable.values())
    assert all("lora_" in k for k in trainable)
    batch = batch_for(model, inputs(model.config))
    optimizer = make_optimizer(learning_rate=3e-3, weight_decay=0.0)
    losses = [float(train_step(model, optimizer, batch)) for _ in range(40)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] / 2, losses[::10]
    after = dict(tree_flatten(model.parameters()))
    for key, value in before.items():
        np.testing.assert_array_equal(np.array(after[key].astype(mx.float32)), value, key)
