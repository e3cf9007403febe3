"""The magic prompt end to end on the tiny synthetic checkpoint (random weights, the real
grammar): expand(), generate(magic_prompt=True) and `ideo4-mlx magic-prompt`.

A random model writes nonsense, but under the grammar always a caption the verifier accepts;
the grammar's string and element bounds are tightened (``SMALL``) only to keep the test short.
"""

import functools
import json
import math
import re
import shutil
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner

from ideogram4_mlx import GenerationRequest, load
from ideogram4_mlx.caption import verify_raw
from ideogram4_mlx.cli import main
from ideogram4_mlx.magic import constrain
from ideogram4_mlx.magic.expand import SYSTEM_PROMPT, MagicPromptError, aspect_ratio, user_message
from ideogram4_mlx.magic.options import MAX_SYSTEM_PROMPT_CHARS
from ideogram4_mlx.metadata import read_metadata
from ideogram4_mlx.request import MAX_IDEA_CHARS

SMALL = {"max_string_chars": 12, "max_elements": 3}
FAST = {"width": 256, "height": 256, "num_steps": 2}
EXPAND_MODULE = "ideogram4_mlx.magic.expand"


class ModelInput(Exception):
    """Raised by ``capture_model_input`` with the text the model was given."""


def capture_model_input(monkeypatch):
    """stream_generate replaced: it raises ``ModelInput(decoded prompt)`` instead of decoding."""

    def first_call(model, tokenizer, prompt, *args, **kwargs):
        raise ModelInput(tokenizer.decode(prompt))

    monkeypatch.setattr(sys.modules[EXPAND_MODULE], "stream_generate", first_call)


@pytest.fixture(scope="module")
def pipe(magic_checkpoint):
    return load(
        magic_checkpoint,
        dtype=mx.float32,
        keep_in_memory=True,
        magic_options={"grammar_limits": SMALL},
    )


def test_expand_is_verifier_clean_and_seeded(pipe):
    first = pipe.expand("a fox reading a neon sign", 1536, 1024, seed=3, grammar_limits=SMALL)
    assert verify_raw(first) == [] and json.loads(first)["compositional_deconstruction"]
    again = pipe.expand("a fox reading a neon sign", 1536, 1024, seed=3, grammar_limits=SMALL)
    assert again == first
    other = pipe.expand("a fox reading a neon sign", 1536, 1024, seed=4, grammar_limits=SMALL)
    assert other != first and verify_raw(other) == []


def test_the_aspect_ratio_goes_into_the_request():
    assert aspect_ratio(1536, 1024) == "3:2" and aspect_ratio(1024, 1024) == "1:1"
    assert "Target aspect ratio 3:2 (width:height)" in user_message("a fox", 1536, 1024)


def test_bad_ideas_and_too_few_tokens_are_clear_errors(pipe, tmp_path):
    with pytest.raises(MagicPromptError, match="the idea is empty"):
        pipe.expand("   ")
    with pytest.raises(MagicPromptError, match="max_tokens 5000 is out of range"):
        pipe.expand("a fox", max_tokens=5000)
    with pytest.raises(MagicPromptError, match="not finished within max_tokens 32"):
        pipe.expand("a fox", seed=1, max_tokens=32)
    empty = tmp_path / "system.txt"
    empty.write_text(" ")
    with pytest.raises(MagicPromptError, match="the system prompt is empty"):
        pipe.expand("a fox", system_prompt=empty)


def test_seed_zero_seeds_the_sampler(pipe):
    mx.random.seed(1)
    first = pipe.expand("a fox", seed=0, grammar_limits=SMALL)
    mx.random.seed(2)
    assert pipe.expand("a fox", seed=0, grammar_limits=SMALL) == first
    mx.random.seed(0)
    assert pipe.expand("a fox", seed=None, grammar_limits=SMALL) == first  # None: as it is


def test_the_system_prompt_reaches_the_model(pipe, tmp_path, monkeypatch):
    capture_model_input(monkeypatch)
    with pytest.raises(ModelInput) as ours:
        pipe.expand("a fox")
    assert SYSTEM_PROMPT in str(ours.value) and "Idea: a fox" in str(ours.value)
    path = tmp_path / "haiku.txt"
    path.write_text("Reply with a haiku about the idea.", encoding="utf-8")
    for given in ("Reply with a haiku about the idea.", path):
        with pytest.raises(ModelInput) as theirs:
            pipe.expand("a fox", system_prompt=given)
        text = str(theirs.value)
        assert "Reply with a haiku about the idea." in text and SYSTEM_PROMPT not in text
        assert text.index("haiku") < text.index("Idea: a fox")  # the system turn comes first


NAN, INF = math.nan, math.inf
BAD_EXPAND_INPUTS = [
    ({"idea": "x" * 100_000}, "the idea is 100000 characters long; the limit is 2000"),
    ({"idea": 42}, "the idea must be text, got int"),
    ({"temperature": NAN}, "temperature nan is out of range: use a finite number in 0..2"),
    ({"temperature": INF}, "temperature inf is out of range"),
    ({"temperature": -0.5}, "temperature -0.5 is out of range"),
    ({"temperature": "hot"}, "temperature must be a number, got 'hot'"),
    ({"top_p": NAN}, "top_p nan is out of range: use a finite number in 0..1"),
    ({"top_p": 1.5}, "top_p 1.5 is out of range"),
    ({"max_tokens": 5000}, "max_tokens 5000 is out of range: use 32..4096"),
    ({"max_tokens": 64.0}, "max_tokens must be an integer, got 64.0"),
    ({"width": 0}, "width 0 is out of range: use 1..2048"),
    ({"height": 1024.5}, "height must be an integer, got 1024.5"),
    ({"width": True}, "width must be an integer, got True"),
    ({"seed": -1}, "seed -1 is out of range: use 0..9223372036854775807"),
    ({"seed": 2**64}, f"seed {2**64} is out of range"),
    ({"seed": "7"}, "seed must be an integer, got '7'"),
    ({"system_prompt": "x" * 20_000}, "the system prompt is 20000 characters long; the limit"),
    ({"system_prompt": Path("/dev/zero")}, "system prompt: /dev/zero is over 256 KiB"),
    ({"system_prompt": 3}, "the system prompt must be text or a file, got int"),
]


@pytest.mark.parametrize("change, message", BAD_EXPAND_INPUTS)
def test_bad_inputs_fail_before_any_model_work(pipe, monkeypatch, change, message):
    capture_model_input(monkeypatch)
    pipe.magic_model()  # loaded: the time below is the check's
    kwargs = {"idea": "a fox", **change}
    start = time.monotonic()
    with pytest.raises(MagicPromptError, match=re.escape(message)) as info:
        pipe.expand(kwargs.pop("idea"), **kwargs)
    assert time.monotonic() - start < 2 and "\n" not in str(info.value)


def test_the_limits_themselves_pass(pipe, monkeypatch):
    capture_model_input(monkeypatch)
    at_limit = {"temperature": 2.0, "top_p": 0.0, "width": 2048, "height": 1, "seed": 0}
    with pytest.raises(ModelInput):  # all checks passed: the model was reached
        pipe.expand("x" * MAX_IDEA_CHARS, system_prompt="y" * MAX_SYSTEM_PROMPT_CHARS, **at_limit)


def test_magic_prompt_command_refuses_bad_inputs_before_loading(tmp_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(sys.modules["ideogram4_mlx.cli.magic"], "load", no_load)
    cases = [
        (["x" * 100_000], "the idea is 100000 characters long; the limit is 2000"),
        (["a fox", "--temperature", "nan"], "temperature nan is out of range"),
        (["a fox", "--top-p", "nan"], "top_p nan is out of range"),
        (["a fox", "--system-prompt", "/dev/zero"], "system prompt: /dev/zero is over 256 KiB"),
        (["a fox", "--seed", str(2**64)], f"seed {2**64} is out of range"),
        (["a fox", "--seed", "-1"], "seed -1 is out of range"),
        (["a fox", "--width", "0"], "width 0 is out of range"),
        (["a fox", "--max-tokens", "8"], "max_tokens 8 is out of range"),
    ]
    for args, message in cases:
        start = time.monotonic()
        result = CliRunner().invoke(main, ["magic-prompt", *args, "--model", str(tmp_path)])
        assert time.monotonic() - start < 5
        assert result.exit_code == 1, (args, result.output)
        assert result.output.startswith("Error: ") and result.output.count("\n") == 1
        assert message in result.output and "Traceback" not in result.output


def test_generate_command_refuses_bad_magic_inputs_before_loading(tmp_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(sys.modules["ideogram4_mlx.cli.generate"], "load", no_load)
    base = ["generate", "--model", str(tmp_path), "--output", str(tmp_path / "a.png")]
    cases = [
        (["--prompt", "x" * 100_000, "--magic-prompt"], "the idea is 100000 characters long"),
        (["--prompt", "a fox", "--magic-prompt", "--temperature", "nan"], "temperature nan"),
        (["--prompt", "a fox", "--magic-prompt", "--system-prompt", "/dev/zero"], "/dev/zero"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(main, [*base, *args])
        assert result.exit_code == 1, (args, result.output)
        assert message in result.output and "Traceback" not in result.output


def test_the_system_prompt_file_reaches_the_model_from_the_command(
    magic_checkpoint, tmp_path, monkeypatch
):
    capture_model_input(monkeypatch)
    path = tmp_path / "haiku.txt"
    path.write_text("Reply with a haiku about the idea.", encoding="utf-8")
    args = ["magic-prompt", "a fox", "--model", str(magic_checkpoint), "--dtype", "float32"]
    result = CliRunner().invoke(main, [*args, "--system-prompt", str(path)])
    assert isinstance(result.exception, ModelInput), result.output
    assert "Reply with a haiku about the idea." in str(result.exception)
    assert SYSTEM_PROMPT not in str(result.exception)


def test_generate_expands_the_idea_and_stores_both(pipe):
    result = pipe.generate("a fox reading a neon sign", magic_prompt=True, seed=5, **FAST)
    metadata = result.metadata
    assert metadata["idea"] == "a fox reading a neon sign"
    assert verify_raw(metadata["prompt"]) == [] and metadata["caption_findings"] == []
    assert "expand" in result.stats
    replayed = GenerationRequest.from_metadata(metadata)  # replay uses the caption as it is
    assert replayed.prompt == metadata["prompt"] and not replayed.magic_prompt


def test_magic_prompt_command(magic_checkpoint, tmp_path, monkeypatch):
    small = functools.partial(constrain.caption_processor, **SMALL)
    monkeypatch.setattr(sys.modules["ideogram4_mlx.magic.expand"], "caption_processor", small)
    out = tmp_path / "fox.json"
    args = ["magic-prompt", "a fox", "--model", str(magic_checkpoint), "--dtype", "float32"]
    result = CliRunner().invoke(main, [*args, "--seed", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert verify_raw(out.read_text(encoding="utf-8").strip()) == []
    again = CliRunner().invoke(main, [*args, "--seed", "2", "-o", str(out)])
    assert again.exit_code == 1 and "already exists; pass --force" in again.output
    short = CliRunner().invoke(main, [*args, "--max-tokens", "32", "-o", str(tmp_path / "x.json")])
    assert short.exit_code == 1 and "not finished within max_tokens 32" in short.output
    assert not (tmp_path / "x.json").exists()  # no partial JSON written
    missing = CliRunner().invoke(main, [*args, "--magic-head", str(tmp_path / "nohead")])
    assert missing.exit_code == 1 and "Traceback" not in missing.output


def test_generate_command_with_magic_prompt(magic_checkpoint, tmp_path, monkeypatch):
    small = functools.partial(constrain.caption_processor, **SMALL)
    monkeypatch.setattr(sys.modules["ideogram4_mlx.magic.expand"], "caption_processor", small)
    out = tmp_path / "fox.png"
    args = ["generate", "--model", str(magic_checkpoint), "--dtype", "float32", "--steps", "2"]
    args += ["--width", "256", "--height", "256", "--seed", "3", "--output", str(out)]
    result = CliRunner().invoke(main, [*args, "--prompt", "a fox", "--magic-prompt"])
    assert result.exit_code == 0, result.output
    assert "warning: caption" not in result.stderr  # the idea is not checked as a caption
    metadata = read_metadata(out)
    assert metadata["idea"] == "a fox" and verify_raw(metadata["prompt"]) == []


@pytest.fixture(scope="module")
def chat_model(tiny_checkpoint, tmp_path_factory):
    """A tiny random mlx-lm Qwen3 chat model folder (config, weights, tokenizer)."""
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen3

    folder = tmp_path_factory.mktemp("chat") / "qwen3-tiny"
    shutil.copytree(tiny_checkpoint / "tokenizer", folder)
    config = {
        "model_type": "qwen3", "hidden_size": 32, "num_hidden_layers": 2,
        "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 16, "rms_norm_eps": 1e-6, "vocab_size": 2048, "rope_theta": 1e6,
        "max_position_embeddings": 4096, "tie_word_embeddings": True,
    }  # fmt: skip
    mx.random.seed(0)
    model = qwen3.Model(qwen3.ModelArgs.from_dict(config))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_another_mlx_lm_chat_model_expands_too(magic_checkpoint, chat_model, tmp_path, monkeypatch):
    small = functools.partial(constrain.caption_processor, **SMALL)
    monkeypatch.setattr(sys.modules["ideogram4_mlx.magic.expand"], "caption_processor", small)
    args = ["magic-prompt", "a fox", "--model", str(magic_checkpoint), "--seed", "1"]
    result = CliRunner().invoke(main, [*args, "--magic-model", str(chat_model), "--verbose"])
    assert result.exit_code == 0, result.output
    assert verify_raw(result.stdout.strip()) == [] and "[expand] peak" in result.stderr
    for bad in (str(tmp_path / "missing"), "no-such-form"):
        result = CliRunner().invoke(main, [*args, "--magic-model", bad])
        assert result.exit_code == 1 and f"--magic-model {bad}: no such folder" in result.output
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, [*args, "--magic-model", str(tmp_path / "empty")])
    assert result.exit_code == 1 and "mlx-lm cannot load it" in result.output


def test_a_hostile_chat_template_of_another_model_ends_in_one_line(
    magic_checkpoint, chat_model, tmp_path
):
    folder = tmp_path / "hostile"
    shutil.copytree(chat_model, folder)
    loops = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    (folder / "chat_template.jinja").write_text(loops)
    args = ["magic-prompt", "a fox", "--model", str(magic_checkpoint), "--magic-model", str(folder)]
    start = time.monotonic()
    result = CliRunner().invoke(main, args)
    assert time.monotonic() - start < 20
    # one error line (after the model loaded: the line saying which dtype it chose)
    lines = [line for line in result.output.splitlines() if not line.startswith("dtype: ")]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "chat_template.jinja: the chat template failed (it ran over 2 s)" in result.output


def test_convert_quantizes_a_bundled_head_with_the_text_encoder(magic_checkpoint, tmp_path):
    from ideogram4_mlx.convert import convert
    from ideogram4_mlx.magic.model import load_magic_model
    from ideogram4_mlx.weights import conversion_record

    parts = ("text_encoder", "tokenizer", "prompt_enhancer_head")
    dst = convert(magic_checkpoint, tmp_path / "q8", quantize=8, components=parts, progress=False)
    record = conversion_record(dst / "prompt_enhancer_head")
    assert record["quantization"]["bits"] == 8
    model, tokenizer = load_magic_model(dst, dtype=mx.float32)  # the bundled head, quantized
    assert isinstance(model.lm_head, nn.QuantizedLinear)
    float_model, _ = load_magic_model(magic_checkpoint, dtype=mx.float32)
    ids = mx.array([tokenizer.encode("a fox")])
    a, b = np.array(model(ids)), np.array(float_model(ids))
    # 8-bit affine weights in every linear of a random model (head included): a few percent.
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 0.1
    # by default the head comes along when the source has one (test_convert: and not otherwise)
    everything = convert(magic_checkpoint, tmp_path / "all", progress=False)
    assert conversion_record(everything / "prompt_enhancer_head") is not None
