"""The caption constraint (magic/constrain.py): a tiny random Qwen3 under the grammar always
writes captions the verifier accepts in strict mode; without it, it does not."""

import json

import mlx.core as mx
import pytest
from mlx_lm.generate import stream_generate
from mlx_lm.models import qwen3
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper
from transformers import PreTrainedTokenizerFast

from ideogram4_mlx.caption import verify_raw
from ideogram4_mlx.magic.constrain import (
    MAX_ELEMENTS,
    MAX_STRING_CHARS,
    CaptionIncompleteError,
    caption_processor,
    finish_caption,
)

# Short strings and few elements keep a random sampler's captions ~200 tokens (the test's time);
# the grammar is the same one the defaults build, only the bounds differ.
SMALL = {"max_string_chars": 12, "max_elements": 3}
IDEAS = ("a fox reading a neon sign", "a red bicycle", "a poster that says OPEN", "rain at dusk")
CAPTION = {
    "high_level_description": "A fox reads a sign.",
    "style_description": {
        "aesthetics": "moody",
        "lighting": "neon",
        "photo": "35mm",
        "medium": "photograph",
        "color_palette": ["#FF00AA", "#001122"],
    },
    "compositional_deconstruction": {
        "background": "a wet street",
        "elements": [
            {"type": "obj", "bbox": [500, 600, 100, 200], "desc": "a fox"},
            {"type": "text", "text": "OPEN", "desc": "pink neon", "color_palette": ["#FF00AA"]},
        ],
    },
}


@pytest.fixture(scope="module")
def wrapper(tiny_checkpoint):
    tok = PreTrainedTokenizerFast.from_pretrained(str(tiny_checkpoint / "tokenizer"))
    return TokenizerWrapper(tok)


@pytest.fixture(scope="module")
def model(wrapper):
    mx.random.seed(0)
    args = qwen3.ModelArgs(
        model_type="qwen3",
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        rms_norm_eps=1e-6,
        vocab_size=len(wrapper._tokenizer),
        num_key_value_heads=2,
        max_position_embeddings=4096,
        head_dim=16,
        tie_word_embeddings=True,
        rope_theta=1e6,
    )
    m = qwen3.Model(args)
    mx.eval(m.parameters())
    return m


def generate(model, wrapper, idea, seed, max_tokens=1024, constrained=True, keep_bboxes=False):
    """(text, finish_reason, processor) of one sampled caption at temperature 1."""
    processor = caption_processor(wrapper, keep_bboxes=keep_bboxes, **SMALL)
    mx.random.seed(seed)
    pieces, finish = [], None
    for r in stream_generate(
        model,
        wrapper,
        wrapper.encode(f"Write a caption for: {idea}"),
        max_tokens,
        sampler=make_sampler(temp=1.0),
        logits_processors=[processor] if constrained else None,
    ):
        pieces.append(r.text)
        finish = r.finish_reason
    return "".join(pieces), finish, processor


def test_constrained_captions_always_verify(model, wrapper):
    for i in range(50):
        text, finish, processor = generate(model, wrapper, IDEAS[i % len(IDEAS)], seed=i)
        assert finish == "stop" and processor.done, (i, text)
        assert verify_raw(text) == [], (i, text)
        assert verify_raw(finish_caption(text)) == []


def test_unconstrained_captions_fail(model, wrapper):
    findings = [
        verify_raw(generate(model, wrapper, idea, seed=i, max_tokens=64, constrained=False)[0])
        for i, idea in enumerate(IDEAS * 3)
    ]
    assert sum(bool(f) for f in findings) >= 0.9 * len(findings)


def test_same_seed_same_caption(model, wrapper):
    first = generate(model, wrapper, IDEAS[0], seed=7)[0]
    assert generate(model, wrapper, IDEAS[0], seed=7)[0] == first
    assert generate(model, wrapper, IDEAS[0], seed=8)[0] != first


def test_keep_bboxes_repairs_order(model, wrapper):
    for i in range(5):
        text, finish, _ = generate(model, wrapper, IDEAS[i % 4], seed=100 + i, keep_bboxes=True)
        assert finish == "stop", text
        assert verify_raw(finish_caption(text, keep_bboxes=True)) == []


def test_max_tokens_too_small_is_a_clear_error(model, wrapper):
    text, finish, processor = generate(model, wrapper, IDEAS[0], seed=0, max_tokens=8)
    assert finish == "length" and not processor.done
    with pytest.raises(CaptionIncompleteError, match="max_tokens"):
        finish_caption(text)


def test_grammar_accepts_a_pretty_caption_and_then_only_eos(wrapper):
    caption = dict(CAPTION)
    comp = caption["compositional_deconstruction"]
    caption["compositional_deconstruction"] = {**comp, "elements": comp["elements"][1:]}
    text = json.dumps(caption, indent=2, ensure_ascii=False)
    processor = caption_processor(wrapper)
    logits = mx.zeros((1, len(wrapper._tokenizer)))
    tokens = mx.array(wrapper.encode("prompt"))
    first = processor(tokens, logits)
    assert mx.isinf(first[0, sorted(wrapper.eos_token_ids)]).all()  # no EOS before the JSON
    for t in wrapper.encode(text):
        tokens = mx.concatenate([tokens, mx.array([t])])
        out = processor(tokens, logits)
    allowed = mx.isfinite(out[0]).tolist()
    assert processor.done and {i for i, a in enumerate(allowed) if a} == wrapper.eos_token_ids


def grammar_accepts(wrapper, caption: dict, **limits) -> bool:
    """Whether the grammar lets the caption's minified JSON through, up to EOS."""
    processor = caption_processor(wrapper, **limits)
    text = json.dumps(caption, ensure_ascii=False, separators=(",", ":"))
    tokens = wrapper.encode(text)
    return all(processor.matcher.consume_token(t) for t in tokens) and processor.done


def caption_with(elements: int, desc: str = "a fox") -> dict:
    return {
        "high_level_description": "Foxes.",
        "compositional_deconstruction": {
            "background": "snow",
            "elements": [{"type": "obj", "desc": desc} for _ in range(elements)],
        },
    }


@pytest.mark.parametrize("limit", [SMALL["max_elements"], MAX_ELEMENTS])
def test_grammar_allows_max_elements_and_not_one_more(wrapper, limit):
    assert grammar_accepts(wrapper, caption_with(1), max_elements=limit)
    assert grammar_accepts(wrapper, caption_with(limit), max_elements=limit)
    assert not grammar_accepts(wrapper, caption_with(limit + 1), max_elements=limit)


@pytest.mark.parametrize("limit", [SMALL["max_string_chars"], MAX_STRING_CHARS])
def test_grammar_allows_max_string_chars_and_not_one_more(wrapper, limit):
    assert grammar_accepts(wrapper, caption_with(1, "x" * limit), max_string_chars=limit)
    assert not grammar_accepts(wrapper, caption_with(1, "x" * (limit + 1)), max_string_chars=limit)


def test_finish_caption_drops_or_repairs_bboxes():
    text = json.dumps(CAPTION)
    assert verify_raw(text) != []  # the reversed bbox
    dropped = json.loads(finish_caption(text))
    assert all("bbox" not in e for e in dropped["compositional_deconstruction"]["elements"])
    kept = json.loads(finish_caption(text, keep_bboxes=True))
    assert kept["compositional_deconstruction"]["elements"][0]["bbox"] == [100, 200, 500, 600]
    assert list(kept) == list(CAPTION)
    # An ensure_ascii=True input comes out with literal characters (the escape heuristic).
    assert "café" in finish_caption(json.dumps({**CAPTION, "high_level_description": "café"}))


def test_finish_caption_names_the_findings():
    with pytest.raises(ValueError, match="photo or art_style"):
        finish_caption(json.dumps({**CAPTION, "style_description": {"aesthetics": "x"}}))
