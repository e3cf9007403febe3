"""Test helpers shared by several test files."""

import importlib
import json
import math
import os
import socket
import threading
import time
from contextlib import contextmanager

import mlx.core as mx
import numpy as np
import pytest

from ideogram4_mlx.dit_sequence import sequence_ids


def require_modules(*names: str, extra: str):
    """Import ``names`` (the last is returned) for tests that need an optional extra.

    Skips when one is absent, unless ``IDEO4_REQUIRE_REFERENCE=1`` (CI installs every extra),
    where that is a failure: reference tests must never silently vanish there.
    """
    try:
        return [importlib.import_module(name) for name in names][-1]
    except ImportError as e:
        if os.environ.get("IDEO4_REQUIRE_REFERENCE") == "1":
            pytest.fail(f"IDEO4_REQUIRE_REFERENCE=1 but the {extra} is missing: {e}")
        pytest.skip(f"{extra} not installed ({e})")


def require_reference():
    """torch + diffusers (+ peft, for LoRA parity) for parity tests; returns torch."""
    return require_modules("diffusers", "peft", "torch", extra="reference extra")


def require_describe():
    """mlx-vlm (the ``describe`` extra) for the describe tests."""
    return require_modules("mlx_vlm", extra="describe extra")


def denoised(pipe, caption) -> np.ndarray:
    """Final latents of a 2-step 256^2 run, seed 3, not decoded (quality bounds are on latents)."""
    from ideogram4_mlx.request import GenerationRequest

    generation = pipe.start(GenerationRequest(caption, width=256, height=256, num_steps=2, seed=3))
    for step in generation:
        mx.eval(step.latents)
    return np.array(generation.latents)


def rel_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


# A caption with non-ASCII text in several scripts, and its canonical (minified) form.
CAPTION = {"high_level_description": "Café Ünïcode poster", "text": "東京 2025 🎆"}
CAPTION_TEXT = json.dumps(CAPTION, ensure_ascii=False, separators=(",", ":"))


@contextmanager
def serving(app):
    """``app`` under a real uvicorn server on a free loopback port; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # uvicorn takes the bound socket: no race for the port
    port = sock.getsockname()[1]
    import uvicorn  # the serve extra: only the server tests need it

    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True  # the app's lifespan then shuts its JobQueue down
        thread.join(60)
        sock.close()


def dit_inputs(model, n_text=5, grid=(4, 3), seed=0):
    """Random latents (1, n_text + gh*gw, 128), text features and the sequence ids for a DiT."""
    rng = np.random.default_rng(seed)
    ids = sequence_ids([n_text], *grid)
    x = mx.array(rng.standard_normal((1, ids[2].shape[1], 128)), mx.float32)
    feats = mx.array(rng.standard_normal((1, n_text, model.config.llm_features_dim)), mx.float32)
    return x, feats, ids


def assert_passes_equal(want_model, got_model, after_pass=lambda: None):
    """Two passes (t 0.3 and 0.8: a weight stream reopens its files each time) of
    ``got_model`` on :func:`dit_inputs` equal ``want_model``'s bit for bit; ``after_pass()``
    runs its checks after each."""
    x, feats, ids = dit_inputs(want_model)
    seq_want, seq_got = want_model.prepare(feats, *ids), got_model.prepare(feats, *ids)
    for t in (0.3, 0.8):
        want = want_model.run(x, np.array([t], np.float32), seq_want)
        got = got_model.run(x, np.array([t], np.float32), seq_got)
        np.testing.assert_array_equal(np.array(got), np.array(want))
        after_pass()


def served(monkeypatch) -> list:
    """For `serve` run in-process: no API key from the environment, uvicorn not started; the
    job queues it makes, recorded (shut them down after)."""
    import uvicorn

    from ideogram4_mlx.server.jobs import JobQueue

    monkeypatch.delenv("IDEO4_API_KEY", raising=False)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: None)
    queues = []

    class RecordedQueue(JobQueue):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            queues.append(self)

    monkeypatch.setattr("ideogram4_mlx.server.jobs.JobQueue", RecordedQueue)
    return queues


def text_report(worst: float, threshold: float = 0.9):
    """A fake OCR's ``TextReport``: "OPEN" found, "GRAND SALE" scoring ``worst``."""
    from ideogram4_mlx.text_check import ElementScore, TextReport

    best = "GRAND SAIE" if worst else None
    sale = ElementScore("GRAND SALE", (600, 100, 800, 900), worst, best)
    return TextReport("fake", threshold, (ElementScore("OPEN", None, 1.0, "OPEN"), sale))


def fake_ocr(monkeypatch, worst_by_seed: dict) -> list:
    """Fake the lettering check (``TextCheck.engine`` and ``TextCheck.check``; in-process
    servers only): an image of seed s scores ``worst_by_seed[s]`` (else 1.0). Returns the seeds
    checked, in order."""
    from types import SimpleNamespace

    from ideogram4_mlx.text_retry import TextCheck

    checked = []

    def check(self, result):
        seed = result.metadata["seed"]
        checked.append(seed)
        return text_report(worst_by_seed.get(seed, 1.0), self.threshold)

    monkeypatch.setattr(TextCheck, "engine", lambda self: SimpleNamespace(name="fake"))
    monkeypatch.setattr(TextCheck, "check", check)
    return checked


# A caption the describe tests' fake model writes (verifier-clean, two elements, lettering).
DESCRIPTION = {
    "high_level_description": "A red fox sits in front of a neon sign.",
    "style_description": {
        "aesthetics": "moody, centred",
        "lighting": "neon glow at night",
        "photo": "35mm lens, eye level",
        "medium": "photograph",
    },
    "compositional_deconstruction": {
        "background": "A dark brick wall.",
        "elements": [
            {"type": "obj", "bbox": [400, 300, 900, 700], "desc": "A red fox, sitting."},
            {"type": "text", "bbox": [100, 200, 300, 800], "text": "OPEN", "desc": "Pink neon."},
        ],
    },
}


def without_bboxes(caption: dict) -> dict:
    comp = caption["compositional_deconstruction"]
    elements = [{k: v for k, v in e.items() if k != "bbox"} for e in comp["elements"]]
    return {**caption, "compositional_deconstruction": {**comp, "elements": elements}}


class FakeDescribeModel:
    """``describe.model.DescribeModel`` without a model: ``generate`` writes ``text`` (default:
    :data:`DESCRIPTION`, its bboxes only when the system prompt asks for them) token by token
    through the logits processors it is given (a token they forbid fails the test), and stops
    at ``max_tokens`` or EOS. ``calls`` records each call's arguments."""

    def __init__(self, tokenizer, text: str | None = None):
        self.tokenizer = tokenizer  # an mlx-lm TokenizerWrapper (magic.model.magic_tokenizer)
        self.text = text
        self.calls: list[dict] = []

    def generate(self, image, system, user, *, max_tokens, temperature=0.0, top_p=1.0,
                 seed=None, logits_processors=None, on_text=None) -> str:  # fmt: skip
        self.calls.append(dict(image=image, system=system, user=user, max_tokens=max_tokens,
                               temperature=temperature, top_p=top_p, seed=seed))  # fmt: skip
        hf = self.tokenizer._tokenizer
        text = self.text
        if text is None:
            text = json.dumps(DESCRIPTION if '"bbox"' in system else without_bboxes(DESCRIPTION))
        script = [*hf.encode(text, add_special_tokens=False), self.tokenizer.eos_token_id]
        tokens, written = [0], []  # a one-token "prompt": the processors' first call sees it
        for token in script[:max_tokens]:
            logits = mx.zeros((1, len(hf)))
            for processor in logits_processors or ():
                logits = processor(mx.array(tokens), logits)
            assert logits[0, token].item() > -math.inf, f"the grammar forbids {hf.decode(token)!r}"
            tokens.append(token)
            if token in self.tokenizer.eos_token_ids:
                break
            written.append(token)
            if on_text is not None:
                on_text(hf.decode([token]))
        return hf.decode(written)


def fake_describe_model(monkeypatch, tokenizer_dir, text: str | None = None) -> list:
    """``describe.model.load_describe_model`` replaced (its module too, before it exists): it
    returns a :class:`FakeDescribeModel` on the tokenizer in ``tokenizer_dir``. Returns the
    loads, each ``(checkpoint_dir, dtype, head_dir, model)``."""
    import sys
    import types

    from ideogram4_mlx.magic.model import magic_tokenizer

    loads = []

    def load_describe_model(checkpoint_dir, dtype, head_dir):
        model = FakeDescribeModel(magic_tokenizer(tokenizer_dir), text)
        loads.append((checkpoint_dir, dtype, head_dir, model))
        return model

    name = "ideogram4_mlx.describe.model"
    module = sys.modules.get(name) or types.ModuleType(name)
    monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(module, "load_describe_model", load_describe_model, raising=False)
    return loads


# -- a DiT forward on fixed inputs (the LoRA parity tests) ----------------------------------------

DIT_TEXT_LENGTHS, DIT_GRID, DIT_TIMES = [9, 4], (4, 5), [0.3123, 0.75]


def padded_dit_inputs(component):
    """A padded batch of two for the DiT of ``component``: (x, text features at the text
    slots, times, sequence ids), seeded."""
    from ideogram4_mlx.transformer import Ideogram4Transformer

    config = Ideogram4Transformer.build(component).config
    rng = np.random.default_rng(0)
    ids = sequence_ids(DIT_TEXT_LENGTHS, *DIT_GRID)
    b, length = ids[2].shape
    x = rng.standard_normal((b, length, config.in_channels)).astype(np.float32)
    feats = rng.standard_normal((b, length, config.llm_features_dim)).astype(np.float32)
    feats *= (ids[2] == 3)[..., None]  # text features only at text slots
    return x, feats, np.array(DIT_TIMES, np.float32), ids


def padded_dit_forward(model, inputs):
    """``model``'s output at the image slots for :func:`padded_dit_inputs`."""
    from ideogram4_mlx.dit_sequence import OUTPUT_IMAGE_INDICATOR

    x, feats, t, ids = inputs
    out = np.array(model(mx.array(x), t, mx.array(feats), *ids))
    return out[ids[2] == OUTPUT_IMAGE_INDICATOR]
