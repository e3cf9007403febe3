"""One byte rule for the memory policy (``ideogram4_mlx.memory``): the keep-in-memory default
and the denoise plan count a checkpoint's bytes the same way, as the loaded models hold them."""

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

import ideogram4_mlx.memory as memory
from ideogram4_mlx.memory import (
    KEEP_FRACTION,
    MemoryBudget,
    checkpoint_sizes,
    held_bytes,
    models_bytes,
)
from ideogram4_mlx.text_encoder import Qwen3VLTextEncoder
from ideogram4_mlx.transformer import DIT_COMPONENTS, Ideogram4Transformer
from ideogram4_mlx.vae import Flux2VAE


def parameter_bytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def test_the_byte_rule_on_hand_built_headers():
    assert held_bytes("a.weight", "F8_E4M3", (4, 8), mx.bfloat16) == 64  # dequantized to bf16
    assert held_bytes("a.weight", "F8_E4M3", (4, 8), mx.float32) == 128
    assert held_bytes("a.weight_scale", "F32", (4,), mx.bfloat16) == 0  # folded into a.weight
    assert held_bytes("a.bias", "BF16", (4,), mx.float32) == 16  # cast to the dtype
    assert held_bytes("a.weight", "U32", (4, 2), mx.bfloat16) == 32  # packed, as stored
    assert held_bytes("a.scales", "BF16", (4, 1), mx.float32) == 16  # a quantized layer's


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["fp32", "bf16"])
def test_models_bytes_are_what_the_loaded_models_hold(tiny_checkpoint, dtype):
    """Every model loaded as the pipeline loads it (the unconditional DiT without its text
    projection): the vision tower, the fp8 scales and the VAE's bn buffers in the files count
    for nothing, and the DiTs count what the denoise plan counts."""
    dits = [
        Ideogram4Transformer.from_pretrained(tiny_checkpoint / name, dtype, text_input=text)
        for name, text in DIT_COMPONENTS
    ]
    encoder = Qwen3VLTextEncoder.from_pretrained(tiny_checkpoint / "text_encoder", dtype)
    vae = Flux2VAE.from_pretrained(tiny_checkpoint / "vae", dtype)
    dit_bytes = [parameter_bytes(model) for model in dits]
    sizes = checkpoint_sizes(tiny_checkpoint, dtype)
    assert [s.total for s in sizes] == dit_bytes
    held = sum(dit_bytes) + parameter_bytes(encoder) + parameter_bytes(vae)
    assert models_bytes(tiny_checkpoint, dtype) == held
    assert MemoryBudget(tiny_checkpoint, dtype, 10**12).models_bytes() == held


def test_keep_models_at_the_edge_of_ram_and_of_the_limit(tiny_checkpoint, monkeypatch):
    held = models_bytes(tiny_checkpoint, mx.float32)
    ram = int(held / KEEP_FRACTION) + 2  # KEEP_FRACTION of it just holds the models

    def keeps(ram_bytes, limit=10**12):
        monkeypatch.setattr(memory, "physical_memory", lambda: ram_bytes)
        return MemoryBudget(tiny_checkpoint, mx.float32, limit).keep_models()

    assert keeps(ram) and keeps(ram, limit=held)
    assert not keeps(int(held / KEEP_FRACTION) - 1)
    assert not keeps(ram, limit=held - 1)  # kept models would share the denoise budget


def test_a_budget_reads_each_dit_header_once(tiny_checkpoint, monkeypatch):
    reads = []
    tensor_headers = memory.tensor_headers

    def counting(files):
        reads.append(files[0].parent.name)
        return tensor_headers(files)

    monkeypatch.setattr(memory, "tensor_headers", counting)
    budget = MemoryBudget(tiny_checkpoint, mx.float32, 10**12)
    assert reads == []  # nothing read until asked
    previous = mx.set_cache_limit(0)
    try:
        budget.keep_models()
        budget.plan(100)
        budget.plan(300)
    finally:
        mx.set_cache_limit(previous)
    assert budget.streamed((1, 0)) == 3
    assert sorted(reads) == sorted(["text_encoder", "vae", *(n for n, _ in DIT_COMPONENTS)])
