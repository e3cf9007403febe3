"""Prompt preparation and the prompt encoder: chat template, canonical captions, cache, release."""

import copy
import json
import shutil
import subprocess
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import CAPTION, CAPTION_TEXT

from ideogram4_mlx import prompt as prompt_module
from ideogram4_mlx.config import CheckpointError
from ideogram4_mlx.prompt import (
    KNOWN_TEMPLATES,
    MAX_PROMPT_CHARS,
    MAX_TEXT_TOKENS,
    PromptEncoder,
    canonical_prompt,
    pad_left,
    prompt_token_ids,
    render_chat,
    template_digest,
)


@pytest.fixture
def encoder(tiny_checkpoint):
    """A fresh encoder per test (cache and release state are per test); loads in ~0.1 s."""
    return PromptEncoder.from_pretrained(tiny_checkpoint, dtype=mx.float32)


def count_model_calls(encoder, monkeypatch) -> list[int]:
    """Record the batch size of every model run."""
    calls, run = [], encoder.model.hidden_taps

    def counted(input_ids, attention_mask=None):
        calls.append(np.asarray(input_ids).shape[0])
        return run(input_ids, attention_mask)

    monkeypatch.setattr(encoder.model, "hidden_taps", counted)
    return calls


# ---------------------------------------------------------------------------------------------
# Prompt preparation


@pytest.mark.parametrize("prompt", ["a red fox in fresh snow", CAPTION_TEXT, ""])
def test_chat_template_ids_equal_transformers(tokenizer, prompt):
    messages = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
    expected = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    ids = prompt_token_ids(tokenizer, prompt)
    assert ids == list(expected)
    # MODEL_NOTES#prompt-format, literally: no system prompt, no special tokens added around it.
    assert tokenizer.decode(ids) == f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def test_json_escapes_and_literal_characters_encode_the_same(tokenizer):
    escaped = json.dumps(CAPTION, ensure_ascii=True)  # "Caf\u00e9 ...", spaces after , and :
    pretty = json.dumps(CAPTION, ensure_ascii=False, indent=2)
    assert "\\u00e9" in escaped
    assert canonical_prompt(escaped) == canonical_prompt(pretty) == CAPTION_TEXT
    ids = prompt_token_ids(tokenizer, CAPTION_TEXT)
    assert prompt_token_ids(tokenizer, escaped) == ids == prompt_token_ids(tokenizer, pretty)


@pytest.mark.parametrize("prompt", [" plain text, kept as given ", "[1, 2]", "42", '{"a": 1'])
def test_non_object_prompts_are_kept_as_given(prompt):
    assert canonical_prompt(prompt) == prompt


def test_json_key_order_is_kept():
    assert canonical_prompt('{"b": 1, "a": {"d": 2, "c": 3}}') == '{"b":1,"a":{"d":2,"c":3}}'


def test_overlong_prompt_error_names_the_token_count(tokenizer):
    prompt = "fox " * (MAX_TEXT_TOKENS + 10)
    messages = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    count = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert count > MAX_TEXT_TOKENS
    with pytest.raises(ValueError, match=f"prompt is {count} tokens .* limit is 2048"):
        prompt_token_ids(tokenizer, prompt)


# ---------------------------------------------------------------------------------------------
# Damaged tokenizer folders: one line naming the file and the fix, before any model loads


def tokenizer_copy(tiny_checkpoint, tmp_path):
    shutil.copytree(tiny_checkpoint / "tokenizer", tmp_path / "tokenizer")
    return tmp_path / "tokenizer"


def load_error(checkpoint_dir) -> str:
    with pytest.raises(CheckpointError) as info:
        PromptEncoder.from_pretrained(checkpoint_dir, load_model=False)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("tokenizer.json", "garbage{", "tokenizer.json: invalid JSON"),
        ("tokenizer.json", "{}", "tokenizer: the tokenizer cannot be loaded (Exception: "),
        ("tokenizer_config.json", "{bad", "tokenizer_config.json: invalid JSON"),
        ("tokenizer_config.json", "[1, 2]", "tokenizer_config.json: expected a JSON object"),
    ],
)
def test_damaged_tokenizer_file_is_one_line_naming_it(
    tiny_checkpoint, tmp_path, name, text, message
):
    folder = tokenizer_copy(tiny_checkpoint, tmp_path)
    (folder / name).write_text(text)
    error = load_error(tmp_path)
    assert error.startswith(str(tmp_path / "tokenizer")) and message in error
    assert "restore" in error


@pytest.mark.parametrize(
    "template, kind",
    [
        ("{{ messages.append(1) }}", "SecurityError"),
        ("{% for %}", "TemplateSyntaxError"),
        ("{{ range(10**9) | list }}", "OverflowError"),
    ],
)
def test_chat_template_the_sandbox_refuses_is_one_line_naming_it(
    tiny_checkpoint, tmp_path, template, kind
):
    folder = tokenizer_copy(tiny_checkpoint, tmp_path)
    (folder / "chat_template.jinja").write_text(template)
    error = load_error(tmp_path)
    assert error.startswith(f"{folder / 'chat_template.jinja'}: the chat template failed ({kind}")
    assert error.endswith("restore the Qwen3-VL template of the original checkpoint")


# A template is a program: each of these ran for hours or filled the memory in the sandbox.
HOSTILE_TEMPLATES = [
    # pure work, no output, no call or attribute access per iteration
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    # one huge value (MemoryError under the memory cap, else the output cap)
    '{{ "x" * 10**9 }}',
    # output, a little at a time
    "{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxx{% endfor %}{% endfor %}",
    # a long calculation inside one C call
    "{{ 7 ** (7 ** 9) }}",
]


@pytest.mark.parametrize("template", HOSTILE_TEMPLATES)
def test_hostile_chat_template_ends_in_one_line_within_seconds(tiny_checkpoint, tmp_path, template):
    folder = tokenizer_copy(tiny_checkpoint, tmp_path)
    (folder / "chat_template.jinja").write_text(template)
    start = time.monotonic()
    error = load_error(tmp_path)
    assert time.monotonic() - start < 20  # a 2 s budget plus a fresh interpreter
    assert error.startswith(f"{folder / 'chat_template.jinja'}: the chat template failed (")
    assert any(k in error for k in ("ran over 2 s", "MemoryError", "wrote over 1000000")), error


def test_the_known_template_renders_in_process_and_is_the_synthetic_one(tokenizer, monkeypatch):
    synth = Path(prompt_module.__file__).parent / "synth/data/qwen3_vl_chat_template.jinja"
    assert template_digest(synth.read_text(encoding="utf-8")) in KNOWN_TEMPLATES
    assert template_digest(tokenizer.chat_template) in KNOWN_TEMPLATES

    def no_child(*args, **kwargs):
        raise AssertionError("the known template was rendered in a child process")

    monkeypatch.setattr(subprocess, "run", no_child)
    assert prompt_token_ids(tokenizer, "a fox")


# What expand() sends (a system prompt, then the idea) and what generate sends.
CHATS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a fox"}],
    [{"role": "user", "content": [{"type": "text", "text": CAPTION_TEXT}]}],
]
# Templates that are not the known one render in a child process; the output is transformers'.
OTHER_TEMPLATES = [
    "{#- a copy of the official template -#}\n{template}",
    "{{ bos_token }}{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
    "{% if m.role == 'system' %}{% continue %}{% endif %}{{ ns.n }}:{{ m.content | tojson }}"
    "{% endfor %}{% if add_generation_prompt %}{{ eos_token }}{% endif %}"
    "{% if tools is none and documents is none %}!{% endif %}"
    "{% generation %}{{ 'x' }}{% endgeneration %}",
]


@pytest.mark.parametrize("other", OTHER_TEMPLATES)
@pytest.mark.parametrize("messages", CHATS)
def test_another_template_renders_as_transformers_does(tokenizer, other, messages):
    tokenizer = copy.copy(tokenizer)
    tokenizer.chat_template = other.replace("{template}", tokenizer.chat_template)
    assert template_digest(tokenizer.chat_template) not in KNOWN_TEMPLATES
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert render_chat(tokenizer, messages) == expected


def test_overlong_prompt_in_characters_is_refused_before_tokenizing(tokenizer, monkeypatch):
    def no_render(*args, **kwargs):
        raise AssertionError("the prompt was rendered")

    monkeypatch.setattr(prompt_module, "render_chat", no_render)
    with pytest.raises(ValueError, match=f"prompt is {MAX_PROMPT_CHARS + 1} characters long"):
        prompt_token_ids(tokenizer, "x" * (MAX_PROMPT_CHARS + 1))


def test_missing_chat_template_is_one_line(tiny_checkpoint, tmp_path):
    (tokenizer_copy(tiny_checkpoint, tmp_path) / "chat_template.jinja").unlink()
    assert "no chat template (chat_template.jinja" in load_error(tmp_path)


def test_template_failing_for_one_prompt_names_the_template(tiny_checkpoint, tmp_path):
    folder = tokenizer_copy(tiny_checkpoint, tmp_path)
    template = (folder / "chat_template.jinja").read_text()
    refuse = "{% if 'boom' in messages[0].content[0].text %}{{ raise_exception('no boom') }}"
    (folder / "chat_template.jinja").write_text(refuse + "{% endif %}" + template)
    encoder = PromptEncoder.from_pretrained(tmp_path, load_model=False)
    assert encoder.token_ids("a fox")
    with pytest.raises(CheckpointError, match=r"chat_template\.jinja: .*\(TemplateError: no boom"):
        encoder.token_ids("boom")


# ---------------------------------------------------------------------------------------------
# PromptEncoder: batches, cache, release


def test_encode_batch_layout_matches_the_model(encoder, model32):
    prompts = [CAPTION_TEXT, "a quiet lake"]
    out = encoder.encode(prompts)
    rows = [encoder.token_ids(p) for p in prompts]
    assert out.lengths == [len(r) for r in rows]
    ids, mask = pad_left(rows)
    assert out.features.dtype == mx.float32
    np.testing.assert_array_equal(np.array(out.features), np.array(model32(ids, mask)))
    single = encoder.encode("a quiet lake")  # one prompt: no padding at all
    assert single.features.shape == (1, len(rows[1]), 13 * 64)


def test_cache_hit_returns_the_same_features_without_the_model(encoder, monkeypatch):
    calls = count_model_calls(encoder, monkeypatch)
    first = encoder.encode(CAPTION_TEXT).features
    again = encoder.encode(json.dumps(CAPTION)).features  # same caption, escaped: same key
    assert calls == [1]
    assert mx.array_equal(first, again)
    batch = encoder.encode(["a new prompt", CAPTION_TEXT])
    assert calls == [1, 1], "only the uncached prompt is run"
    assert mx.array_equal(batch.features[1:, -first.shape[1] :], first)


def test_cache_is_lru_and_bounded(tiny_checkpoint, monkeypatch):
    encoder = PromptEncoder.from_pretrained(tiny_checkpoint, cache_size=2)
    calls = count_model_calls(encoder, monkeypatch)
    for p in ("a", "b", "a", "c", "a", "b"):  # "b" is evicted by "c"; "a" stays recent
        encoder.encode(p)
    assert len(calls) == 4


def test_release_model_keeps_cached_prompts_and_new_ones_need_load_model(encoder):
    before = encoder.encode("a red fox").features
    encoder.release_model()
    assert encoder.model is None
    assert mx.array_equal(encoder.encode("a red fox").features, before)
    with pytest.raises(RuntimeError, match="load_model"):
        encoder.encode(["a red fox", "a new prompt"])
    with pytest.raises(ValueError, match="tokens"):  # length errors still come first
        encoder.encode("fox " * 3000)
    encoder.load_model()
    assert encoder.encode("a new prompt").features.shape[0] == 1
