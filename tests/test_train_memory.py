"""``train.memory``: the projected peak of one LoRA training step and whether ``--memory-limit``
needs gradient checkpointing, against hand-computed cases (no model is built)."""

import pytest

from ideogram4_mlx.errors import InputError
from ideogram4_mlx.train import memory as tm
from ideogram4_mlx.transformer import TransformerConfig

FULL = TransformerConfig()
# 2 blocks, hidden 2 x 128 = 256, FFN 512 (the default mrope section fits head_dim 128).
TINY = TransformerConfig(
    num_layers=2, attention_head_dim=128, num_attention_heads=2, intermediate_size=512
)


def test_lora_parameters_of_the_real_dit():
    # per block, rank 16: qkv 3 pairs 16 x (4608 + 4608), o 16 x (4608 + 4608),
    # w1 / w2 / w3 16 x (4608 + 12288) each
    per_block = 3 * 16 * 9216 + 16 * 9216 + 3 * 16 * 16896
    # = the trainable bytes measured for one block (benchmarks/results/train_memory_cpu.jsonl:
    # lora_params_gb 0.005603328 at rank 16, fp32)
    assert 4 * per_block == 5_603_328
    assert tm.lora_parameters(FULL, 16) == 34 * per_block
    assert tm.lora_parameters(FULL, 32) == 2 * 34 * per_block
    # adaln_modulation: (4 x 4608, 512)
    adaln = tm.lora_parameters(FULL, 16, ("adaln_modulation",))
    assert adaln == 34 * 16 * (512 + 4 * 4608)


@pytest.fixture
def constants(monkeypatch):
    """Round constants, so the arithmetic below is done by hand."""
    monkeypatch.setattr(tm, "KEPT", (10.0, 1.0))
    monkeypatch.setattr(tm, "KEPT_CHECKPOINTED", (1.0, 0.0))
    monkeypatch.setattr(tm, "TRANSIENT", (2.0, 0.5))
    monkeypatch.setattr(tm, "TRANSIENT_CHECKPOINTED", (2.0, 0.5))


# TINY, 10 tokens, rank 4, base 1000 bytes, bf16 activations (half of the fp32 fits):
# kept       (10 x 10 x 256 + 1 x 2 x 10^2) x 4 = 103200; checkpointed (1 x 10 x 256) x 4 = 10240
# transient  (2 x 10 x 256 + 0.5 x 2 x 10^2) x 4 = 20880
# activations (2 x 103200 + 20880) / 2 = 113640; checkpointed (2 x 10240 + 20880) / 2 = 20680
# LoRA: per block qkv 3 x 4 x (256 + 256) + o 4 x 512 + 3 x 4 x (256 + 512) = 17408, x 2
# blocks = 34816 parameters, x 4 copies x 4 bytes = 557056
PEAK = 1000 + 557056 + 113640  # 671696
PEAK_CHECKPOINTED = 1000 + 557056 + 20680  # 578736


def test_plan_by_hand(constants):
    plan = tm.plan_training_memory(TINY, 10, 4, 1000)
    assert (plan.base, plan.lora) == (1000, 557056)
    assert (plan.activations, plan.activations_checkpointed) == (113640, 20680)
    assert (plan.peak(False), plan.peak(True)) == (PEAK, PEAK_CHECKPOINTED)
    fp32 = tm.plan_training_memory(TINY, 10, 4, 1000, itemsize=4)
    assert (fp32.activations, fp32.activations_checkpointed) == (227280, 41360)
    two = tm.plan_training_memory(TINY, 10, 4, 1000, batch=2)
    assert (two.activations, two.activations_checkpointed, two.lora) == (227280, 41360, 557056)


@pytest.mark.parametrize(
    ("limit", "checkpoint"),
    [(10**9, False), (PEAK, False), (PEAK - 1, True), (PEAK_CHECKPOINTED, True)],
)
def test_checkpointing_only_when_the_plain_step_does_not_fit(constants, limit, checkpoint):
    assert tm.plan_training_memory(TINY, 10, 4, 1000).needs_checkpointing(limit) is checkpoint


def test_over_the_limit_either_way_says_both_peaks(constants):
    with pytest.raises(InputError, match="even with gradient checkpointing") as info:
        tm.plan_training_memory(TINY, 10, 4, 1000).needs_checkpointing(PEAK_CHECKPOINTED - 1)
    assert "--memory-limit" in str(info.value)


@pytest.mark.parametrize("tokens", [0, -5, 1.5, True, "4352"])
def test_tokens_and_batch_must_be_positive_integers(tokens):
    with pytest.raises(InputError, match="tokens"):
        tm.plan_training_memory(FULL, tokens, 16, 0)
    with pytest.raises(InputError, match="batch"):
        tm.plan_training_memory(FULL, 4352, 16, 0, batch=tokens)


def test_checkpointing_saves_most_of_the_activations_at_full_size():
    # The fitted constants: at 1024^2 + a 256-token caption, rank 32, the plain step keeps every
    # block's intermediates; checkpointing keeps a few widths per block.
    plan = tm.plan_training_memory(FULL, 4352, 32, 0)
    assert plan.activations_checkpointed < plan.activations / 5
