"""The magic-prompt LM: the text body + lm_head on mlx-lm, against diffusers' prompt enhancer."""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import rel_l2, require_reference
from mlx_lm.generate import generate_step

from ideogram4_mlx.config import CheckpointError
from ideogram4_mlx.convert import convert
from ideogram4_mlx.magic import model as magic
from ideogram4_mlx.magic.model import (
    DEFAULT_HEAD_REPO,
    HEAD_FOLDER,
    MissingHeadError,
    TextBody,
    from_text_encoder,
    load_magic_model,
    model_args,
    resolve_head,
)
from ideogram4_mlx.text_encoder import Qwen3VLTextEncoder, TextEncoderConfig

IDEA = "a fox reading a neon sign that says OPEN"
GREEDY_TOKENS = 32
NORM_KEY = "language_model.norm.weight"


@pytest.fixture(scope="module")
def head_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint (linked, not copied) plus a synthetic ``prompt_enhancer_head/``."""
    from ideogram4_mlx.synth import write_synthetic_checkpoint

    root = tmp_path_factory.mktemp("magic") / "tiny"
    write_synthetic_checkpoint(root, "tiny", components=(HEAD_FOLDER,))
    for folder in ("text_encoder", "tokenizer"):
        (root / folder).symlink_to(tiny_checkpoint / folder, target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def magic32(head_checkpoint):
    return load_magic_model(head_checkpoint, dtype=mx.float32)


def prompt_ids(tokenizer) -> list[int]:
    messages = [{"role": "user", "content": IDEA}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def test_args_are_qwen3_vl_text(tiny_checkpoint):
    config = TextEncoderConfig.from_file(tiny_checkpoint / "text_encoder" / "config.json")
    args = model_args(config)
    assert args.rope_theta == 5_000_000 and not args.tie_word_embeddings
    assert (args.head_dim, args.vocab_size) == (config.head_dim, config.vocab_size)


def test_body_keeps_the_final_norm_and_matches_the_feature_taps(magic32, tiny_checkpoint):
    model, tokenizer = magic32
    assert "norm" in model.model  # the taps skip it; the LM head needs it
    ids = mx.array([prompt_ids(tokenizer)])
    encoder = Qwen3VLTextEncoder.from_pretrained(tiny_checkpoint / "text_encoder", dtype=mx.float32)
    # The last tap is the body's output before the final norm: the same weights, same math.
    h = model.model.embed_tokens(ids)
    for layer in model.model.layers:
        h = layer(h, "causal")
    expected = np.array(encoder.hidden_taps(ids)[-1])
    assert rel_l2(np.array(h), expected) < 1e-5


def test_from_text_encoder_shares_the_encoders_arrays(magic32, head_checkpoint):
    model, tokenizer = magic32
    text_dir = head_checkpoint / "text_encoder"
    encoder = Qwen3VLTextEncoder.from_pretrained(text_dir, dtype=mx.float32)
    shared = from_text_encoder(encoder, text_dir, model.lm_head)
    assert shared.model.layers[3].mlp.up_proj.weight is encoder.layers[3].mlp.up_proj.weight
    ids = mx.array([prompt_ids(tokenizer)])
    np.testing.assert_array_equal(np.array(shared(ids)), np.array(model(ids)))


def test_sanitize_is_idempotent_and_drops_vision_and_prefixes():
    weights = {
        "model.language_model.norm.weight": mx.ones(4),
        "visual.blocks.0.attn.qkv.weight": mx.ones((3, 3)),
        "language_model.embed_tokens.weight": mx.ones((8, 4)),
    }
    body = TextBody.__new__(TextBody)
    once = body.sanitize(weights)
    assert set(once) == {"norm.weight", "embed_tokens.weight"}
    assert set(body.sanitize(once)) == set(once)


def test_logits_and_greedy_tokens_match_diffusers_prompt_enhancer(magic32, head_checkpoint):
    torch = require_reference()
    from ideogram4_mlx.reference.magic import load_reference_enhancer

    model, tokenizer = magic32
    ids = prompt_ids(tokenizer)
    reference = load_reference_enhancer(head_checkpoint, head_checkpoint / HEAD_FOLDER)
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([ids])).logits.numpy()
    logits = np.array(model(mx.array([ids])))
    # fp32 on both sides with the same weights: only summation order and fast-kernel rounding
    # (rms_norm, rope, SDPA) differ, ~1e-6 relative per op over 36 layers; 1e-4 leaves 10x room
    # while a wrong norm, RoPE theta or head would be off by O(1).
    assert logits.shape == expected.shape
    assert rel_l2(logits, expected) < 1e-4

    # Greedy decoding, no stop on end tokens (neither side), 32 new tokens.
    reference.generation_config.eos_token_id = None
    with torch.no_grad():
        out = reference.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=GREEDY_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )
    expected_tokens = out[0, len(ids) :].tolist()
    steps = generate_step(mx.array(ids), model, max_tokens=GREEDY_TOKENS)
    tokens = [int(token) for token, _ in steps]
    assert tokens == expected_tokens


def drop_final_norm(converted) -> None:
    """Make a converted text encoder look like one written before convert kept the norm."""
    folder = converted / "text_encoder"
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for key in [k for k in index["weight_map"] if k.endswith(NORM_KEY)]:
        shard = folder / index["weight_map"].pop(key)
        tensors = mx.load(str(shard))
        tensors.pop(key)
        mx.save_safetensors(str(shard), tensors, metadata={"format": "mlx"})
    index_path.write_text(json.dumps(index))


def test_quantized_converted_text_encoder_loads_with_its_record(
    magic32, tiny_checkpoint, head_checkpoint, tmp_path
):
    dst = convert(
        tiny_checkpoint, tmp_path / "q8", quantize=8, components=("text_encoder",), progress=False
    )
    (dst / "tokenizer").symlink_to(tiny_checkpoint / "tokenizer", target_is_directory=True)
    head = head_checkpoint / HEAD_FOLDER
    quantized, tokenizer = load_magic_model(dst, head, dtype=mx.float32)  # convert keeps the norm
    assert isinstance(quantized.model.layers[0].mlp.down_proj, nn.QuantizedLinear)
    assert not isinstance(quantized.model.embed_tokens, nn.QuantizedEmbedding)  # as recorded
    ids = mx.array([prompt_ids(tokenizer)])
    # 8-bit affine weights in all 36 x 7 linears of a random model: measured 3.7% here.
    assert rel_l2(np.array(quantized(ids)), np.array(magic32[0](ids))) < 0.1
    encoder = Qwen3VLTextEncoder.from_pretrained(dst / "text_encoder", dtype=mx.float32)
    shared = from_text_encoder(encoder, dst / "text_encoder", quantized.lm_head)
    np.testing.assert_array_equal(np.array(shared(ids)), np.array(quantized(ids)))
    drop_final_norm(dst)
    with pytest.raises(CheckpointError, match="no final norm"):
        load_magic_model(dst, head, dtype=mx.float32)


def test_head_folder_is_checked_against_the_text_encoder(head_checkpoint, tmp_path):
    bad = tmp_path / "head"
    shutil.copytree(head_checkpoint / HEAD_FOLDER, bad)
    config = json.loads((bad / "config.json").read_text())
    config["vocab_size"] += 1
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="vocab_size"):
        load_magic_model(head_checkpoint, bad, dtype=mx.float32)


def test_missing_head_names_the_repo_and_the_option(tmp_path, monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("offline")

    monkeypatch.setattr(magic, "snapshot_download", offline)
    with pytest.raises(MissingHeadError, match="--magic-head") as error:
        resolve_head(None, tmp_path)  # no bundled head: the default repo, offline
    assert DEFAULT_HEAD_REPO in str(error.value)
    with pytest.raises(MissingHeadError, match="no such folder"):
        resolve_head(tmp_path / "nowhere", tmp_path)


def test_bundled_head_is_preferred(head_checkpoint):
    assert resolve_head(None, head_checkpoint) == head_checkpoint / HEAD_FOLDER
