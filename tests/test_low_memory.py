"""Low-memory mode: DiT blocks streamed from disk per pass, attention heads grouped.

Both must give exactly the resident model's numbers (the same ops on the same weights) and
must actually keep the block weights out of memory between uses.
"""

import gc
import shutil
import warnings
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import assert_passes_equal, dit_inputs, rel_l2
from mlx.utils import tree_flatten
from PIL import Image

from ideogram4_mlx.cli import main
from ideogram4_mlx.config import CheckpointError
from ideogram4_mlx.convert import convert
from ideogram4_mlx.dit_sequence import sequence_ids
from ideogram4_mlx.pipeline import load
from ideogram4_mlx.request import GenerationRequest
from ideogram4_mlx.step_cache import BlockCache
from ideogram4_mlx.synth import SYNTHETIC_PRESETS, write_synthetic_checkpoint
from ideogram4_mlx.transformer import (
    LOW_MEMORY_FFN_TOKENS,
    FeedForward,
    Ideogram4Transformer,
    attention,
)

CAPTION = '{"high_level_description":"a blue door"}'


def block_bytes(model):
    return sum(v.nbytes for k, v in tree_flatten(model.parameters()) if k.startswith("layers."))


@pytest.fixture(scope="module")
def quantized(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("lowmem") / "q4"
    return convert(tiny_checkpoint, out, quantize=4, components=("transformer",), progress=False)


@pytest.mark.parametrize("source", ["raw fp8", "converted 4-bit"])
def test_streamed_dit_equals_resident_dit_pass_after_pass(tiny_checkpoint, quantized, source):
    folder = (tiny_checkpoint if source == "raw fp8" else quantized) / "transformer"
    resident = Ideogram4Transformer.from_pretrained(folder, mx.float32)
    streamed = Ideogram4Transformer.from_pretrained(folder, mx.float32, low_memory=True)
    assert block_bytes(streamed) == 0 < block_bytes(resident)

    def dropped():  # dropped again after the pass
        assert block_bytes(streamed) == 0

    assert_passes_equal(resident, streamed, dropped)


def test_streaming_bounds_the_peak_to_about_one_block(tmp_path):
    # Blocks dominate this checkpoint, so holding them all would show in the peak.
    spec = replace(
        SYNTHETIC_PRESETS["tiny"],
        dit_num_layers=6,
        dit_num_attention_heads=4,
        dit_intermediate_size=2048,
    )
    ckpt = write_synthetic_checkpoint(tmp_path / "six", spec, components=("transformer",))
    resident = Ideogram4Transformer.from_pretrained(ckpt / "transformer", mx.float32)
    one_block = block_bytes(resident) / spec.dit_num_layers
    peak_resident = peak_of_a_pass(resident)
    del resident
    streamed = Ideogram4Transformer.from_pretrained(ckpt / "transformer", mx.float32, True)
    peak_streamed = peak_of_a_pass(streamed)
    # Resident: all six blocks are live. Streamed: about one block beyond the small resident
    # part (the block in use, plus its fp8 bytes while they are being dequantized).
    assert peak_streamed < peak_resident - 3 * one_block


def peak_of_a_pass(model):
    x, feats, ids = dit_inputs(model)
    seq = model.prepare(feats, *ids)
    mx.eval(model.run(x, np.array([0.5], np.float32), seq))  # first pass warms the caches
    mx.clear_cache()
    mx.reset_peak_memory()
    mx.eval(model.run(x, np.array([0.5], np.float32), seq))
    return mx.get_peak_memory()


@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.parametrize(
    "score_bytes",
    [3 * 7 * 7 * 4, 7 * 7 * 4, 4 * 7 * 4, 1],  # 3 heads; 1 head; 1 head in 2 row pieces; 7 pieces
)
def test_attention_in_pieces_equals_one_call(score_bytes, with_mask):
    rng = np.random.default_rng(1)
    q, k, v = (mx.array(rng.standard_normal((1, 6, 7, 16)), mx.float32) for _ in range(3))
    mask = mx.array(rng.random((1, 1, 7, 7)) > 0.3) | mx.eye(7, dtype=mx.bool_)
    mask = mask if with_mask else None
    full = attention(q, k, v, 0.25, mask, 1 << 40)
    pieces = attention(q, k, v, 0.25, mask, score_bytes)
    np.testing.assert_array_equal(np.array(pieces), np.array(full))


def test_low_memory_pipeline_and_cli_make_the_same_image(tiny_checkpoint, tmp_path):
    kwargs = {"width": 256, "height": 256, "num_steps": 2, "seed": 3}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = load(tiny_checkpoint, dtype=mx.float32).generate(CAPTION, **kwargs)
        # Latents only: low_memory changes the DiTs, not the decode (the CLI run below decodes).
        got = load(tiny_checkpoint, dtype=mx.float32, low_memory=True).start(
            GenerationRequest(CAPTION, **kwargs)
        )
        for step in got:
            mx.eval(step.latents)
    np.testing.assert_array_equal(np.array(got.latents), want.latents)
    out = tmp_path / "low.png"
    result = CliRunner().invoke(
        main,
        ["generate", "--model", str(tiny_checkpoint), "--prompt", CAPTION, "--dtype", "float32",
         "--steps", "2", "--seed", "3", "--width", "256", "--height", "256", "--low-memory",
         "--output", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        np.testing.assert_array_equal(np.array(image), np.array(want.image))


@pytest.mark.parametrize("source", ["raw fp8", "converted 4-bit"])
def test_unconditional_dit_without_text_input_is_exact_and_skips_the_text_projection(
    tiny_checkpoint, quantized, source
):
    folder = (tiny_checkpoint if source == "raw fp8" else quantized) / "transformer"
    full = Ideogram4Transformer.from_pretrained(folder, mx.float32)
    gc.collect()  # earlier tests' garbage (cycles holding arrays) must not be freed while measuring
    mx.clear_cache()
    before = mx.get_active_memory()
    lean = Ideogram4Transformer.from_pretrained(folder, mx.float32, text_input=False)
    lean_bytes = mx.get_active_memory() - before
    keys = {k for k, _ in tree_flatten(lean.parameters())}
    assert not any(k.startswith(("llm_cond_norm.", "llm_cond_proj.")) for k in keys)
    text_bytes = sum(
        v.nbytes for k, v in tree_flatten(full.parameters()) if k.startswith("llm_cond_")
    )
    # What was read is the model less its text projection (never read, not only dropped);
    # the allocator rounds small buffers up (seen: 1-8 KB here), hence the slack.
    expected = sum(v.nbytes for _, v in tree_flatten(full.parameters())) - text_bytes
    assert expected <= lean_bytes < expected + text_bytes / 10
    x, _, _ = dit_inputs(full)
    ids = sequence_ids([0], 4, 3)
    for t in (0.3, 0.8):
        want = full.run(x[:, -12:], np.array([t], np.float32), full.prepare(None, *ids))
        got = lean.run(x[:, -12:], np.array([t], np.float32), lean.prepare(None, *ids))
        np.testing.assert_array_equal(np.array(got), np.array(want))
    with pytest.raises(ValueError, match="text_input=False"):
        lean.prepare(*dit_inputs(lean)[1:2], *sequence_ids([5], 4, 3))


def test_unconditional_dit_without_text_input_still_checks_the_text_keys(quantized, tmp_path):
    folder = tmp_path / "uncond"
    shutil.copytree(quantized / "transformer", folder)
    (shard,) = [p for p in folder.glob("*.safetensors")]
    tensors = mx.load(str(shard))
    del tensors["llm_cond_proj.bias"]
    mx.save_safetensors(str(shard), tensors)
    with pytest.raises(CheckpointError, match=r"llm_cond_proj\.bias"):
        Ideogram4Transformer.from_pretrained(folder, mx.float32, text_input=False)


def test_pipeline_loads_the_unconditional_dit_without_its_text_projection(tiny_checkpoint):
    cond_dit, uncond_dit = load(tiny_checkpoint, dtype=mx.float32).dits()
    assert cond_dit.llm_cond_proj is not None and uncond_dit.llm_cond_proj is None


@pytest.mark.parametrize(
    "length, chunk, sizes", [(40, 16, [14, 14, 12]), (40, 30, [20, 20]), (5096, 4096, [2548] * 2)]
)
def test_chunked_feed_forward_equals_one_call(length, chunk, sizes, monkeypatch):
    ffn = FeedForward(64, 192)
    x = mx.array(np.random.default_rng(2).standard_normal((1, length, 64)), mx.float32)
    want = ffn(x)
    seen = []
    swiglu = ffn.swiglu
    monkeypatch.setattr(ffn, "swiglu", lambda part: seen.append(part.shape[1]) or swiglu(part))
    ffn.chunk_tokens = chunk
    got = ffn(x)
    assert seen == sizes  # equal-sized chunks, never a 1-2 row remainder
    # The same dot products; a BLAS may still pick another kernel for a few-row matrix (seen
    # here: 1 ulp at 12-14 rows, bit for bit at 2548). Bound: fp32 rounding, 1e-6.
    assert rel_l2(np.array(got), np.array(want)) < 1e-6


def test_low_memory_dit_chunks_the_feed_forward(tiny_checkpoint):
    model = Ideogram4Transformer.from_pretrained(tiny_checkpoint / "transformer", low_memory=True)
    assert {layer.feed_forward.chunk_tokens for layer in model.layers} == {LOW_MEMORY_FFN_TOKENS}


def test_a_cached_pass_reads_only_block_0_and_streaming_changes_no_bit(tiny_checkpoint):
    folder = tiny_checkpoint / "transformer"
    resident = Ideogram4Transformer.from_pretrained(folder, mx.float32)
    streamed = Ideogram4Transformer.from_pretrained(folder, mx.float32, True)
    x, feats, ids = dit_inputs(resident)
    seq_r, seq_s = resident.prepare(feats, *ids), streamed.prepare(feats, *ids)
    caches = BlockCache(0.05), BlockCache(0.05)
    for t in (0.3, 0.3):  # the same input twice: the second pass is a hit
        want = resident.run(x, np.array([t], np.float32), seq_r, caches[0])
        got = streamed.run(x, np.array([t], np.float32), seq_s, caches[1])
        np.testing.assert_array_equal(np.array(got), np.array(want))
    assert caches[1].counts() == {"full_passes": 1, "cached_passes": 1}
    # Blocks 1.. were left in the stream, unread (lazy arrays, dropped at the next pass).
    assert any(k.startswith("layers.1.") for k in streamed.stream.pending)
    assert not any(k.startswith("layers.0.") for k in streamed.stream.pending)
