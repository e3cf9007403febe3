"""Describe and remix on the tiny synthetic checkpoint with a fake describe model (the real
one, the checkpoint's Qwen3-VL with its vision tower, is ``describe/model.py``'s): the
workflow (system prompt, user message, grammar, strict verify), ``pipe.describe``,
``generate(remix=True)`` and its replay, ``ideo4-mlx describe``, ``generate --remix``, the
server's ``/v1/describe`` and a remix job.

The fake writes a fixed caption token by token through the real caption grammar (llguidance
on the checkpoint's tokenizer), so a grammar that refused the schema would fail here.
"""

import base64
import json
import re
import sys
import time
import types
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import FakeDescribeModel, fake_describe_model
from PIL import Image

from ideogram4_mlx import GenerationRequest, load
from ideogram4_mlx.caption import verify_raw
from ideogram4_mlx.cli import main
from ideogram4_mlx.describe.describe import describe, user_message
from ideogram4_mlx.describe.options import (
    BBOX_NOTE,
    SYSTEM_PROMPT,
    DescribeError,
    prepare,
)
from ideogram4_mlx.edit import REMIX_STRENGTH, fingerprint
from ideogram4_mlx.magic.model import magic_tokenizer
from ideogram4_mlx.metadata import read_metadata

FAST = {"num_steps": 2}


@pytest.fixture
def photo(tmp_path):
    """A 320x256 RGB PNG (the output fits it to 320x256: multiples of 16)."""
    rng = np.random.default_rng(0)
    path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 255, (256, 320, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def loads(monkeypatch, tiny_checkpoint):
    return fake_describe_model(monkeypatch, tiny_checkpoint / "tokenizer")


@pytest.fixture
def pipe(magic_checkpoint):
    return load(magic_checkpoint, dtype=mx.float32, keep_in_memory=True)


def model(tiny_checkpoint, text=None):
    return FakeDescribeModel(magic_tokenizer(tiny_checkpoint / "tokenizer"), text)


def test_describe_writes_a_strict_caption_under_the_grammar(tiny_checkpoint, photo):
    fake = model(tiny_checkpoint)
    caption = describe(fake, photo)
    assert verify_raw(caption) == []
    parsed = json.loads(caption)
    assert parsed["compositional_deconstruction"]["elements"][1]["text"] == "OPEN"
    assert all("bbox" not in e for e in parsed["compositional_deconstruction"]["elements"])
    (call,) = fake.calls
    assert call["system"] == SYSTEM_PROMPT and call["temperature"] == 0.0
    assert call["user"] == user_message(None, 320, 256) and "5:4" in call["user"]
    assert call["image"].mode == "RGB" and call["image"].size == (320, 256)
    kept = json.loads(describe(fake, photo, keep_bboxes=True))
    assert kept["compositional_deconstruction"]["elements"][0]["bbox"] == [400, 300, 900, 700]
    assert fake.calls[-1]["system"] == SYSTEM_PROMPT + BBOX_NOTE


def test_the_idea_steers_the_user_message(tiny_checkpoint, photo):
    fake = model(tiny_checkpoint)
    describe(fake, photo, idea="  make it winter  ", seed=3, temperature=0.7)
    call = fake.calls[-1]
    assert "changed as follows: make it winter\n" in call["user"]
    assert call["seed"] == 3 and call["temperature"] == 0.7
    describe(fake, photo, idea="   ")  # blank: no idea
    assert fake.calls[-1]["user"] == user_message(None, 320, 256)


def test_images_are_read_as_edit_inputs(tiny_checkpoint, tmp_path):
    """EXIF rotation applied, transparency on white, the 64 MP bound."""
    fake = model(tiny_checkpoint)
    rgba = np.zeros((32, 48, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent: white once composited
    describe(fake, rgba)
    assert fake.calls[-1]["image"].getpixel((0, 0)) == (255, 255, 255)
    rotated = Image.new("RGB", (48, 32), "blue")
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    path = tmp_path / "rotated.jpg"
    rotated.save(path, exif=exif)
    describe(fake, path)
    assert fake.calls[-1]["image"].size == (32, 48)


BAD_INPUTS = [
    ({"image": "missing.png"}, FileNotFoundError, "image missing.png does not exist"),
    ({"image": "notes.txt"}, ValueError, "cannot be read as an image"),
    ({"idea": "x" * 3000}, DescribeError, "the idea is 3000 characters long; the limit is 2000"),
    ({"idea": 7}, DescribeError, "the idea must be text, got int"),
    ({"seed": -1}, DescribeError, "seed -1 is out of range"),
    ({"seed": "1"}, DescribeError, "seed must be an integer, got '1'"),
    ({"temperature": float("nan")}, DescribeError, "temperature nan is out of range"),
    ({"max_tokens": 5000}, DescribeError, "max_tokens 5000 is out of range: use 32..4096"),
    ({"keep_bboxes": "yes"}, DescribeError, "keep_bboxes must be True or False"),
    ({"system_prompt": " "}, DescribeError, "the system prompt is empty"),
]


@pytest.mark.parametrize("change, error, message", BAD_INPUTS)
def test_bad_inputs_fail_before_the_model_loads(
    pipe, loads, tmp_path, monkeypatch, change, error, message
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not an image")
    Image.new("RGB", (32, 32)).save(tmp_path / "ok.png")
    kwargs = {"image": "ok.png", **change}
    with pytest.raises(error, match=re.escape(message)) as info:
        pipe.describe(kwargs.pop("image"), **kwargs)
    assert loads == [] and "\n" not in str(info.value)


def test_huge_images_are_refused_before_decoding(tiny_checkpoint, tmp_path):
    from ideogram4_mlx.edit import MAX_INPUT_PIXELS

    path = tmp_path / "huge.png"
    Image.new("1", (MAX_INPUT_PIXELS // 4096 + 1, 4096)).save(path)
    with pytest.raises(ValueError, match="over the 64 MP limit: downscale it first"):
        prepare(path)


def test_a_caption_cut_off_by_max_tokens_is_an_error(tiny_checkpoint, photo):
    with pytest.raises(DescribeError, match="not finished within max_tokens 32; raise it"):
        describe(model(tiny_checkpoint), photo, max_tokens=32)


def test_a_model_outside_the_grammar_fails_the_test_not_silently(tiny_checkpoint, photo):
    fake = model(tiny_checkpoint, text='{"caption": "a fox"}')
    with pytest.raises(AssertionError, match="the grammar forbids"):
        describe(fake, photo)


def test_pipe_describe_loads_the_model_once_with_the_head(pipe, loads, photo, magic_checkpoint):
    first = pipe.describe(photo)
    assert verify_raw(first) == [] and pipe.describe(photo) == first
    (load_call,) = loads
    checkpoint_dir, dtype, head_dir, _ = load_call
    assert checkpoint_dir == magic_checkpoint and dtype == mx.float32
    assert head_dir == magic_checkpoint / "prompt_enhancer_head"  # the bundled head
    pipe.keep_in_memory = False
    pipe.release("text_encoder")  # released with the text encoder
    pipe.describe(photo)
    assert len(loads) == 2


def test_no_head_is_the_magic_prompts_message(tiny_checkpoint, loads, photo, tmp_path):
    pipe = load(tiny_checkpoint, dtype=mx.float32, magic_head=str(tmp_path / "nohead"))
    with pytest.raises(ValueError, match="no such folder, and not a Hugging Face repo id"):
        pipe.describe(photo)
    assert loads == []


def test_remix_describes_then_edits_and_replays_without_describing(pipe, loads, photo):
    result = pipe.generate("", image=photo, remix=True, idea="at night", seed=4, **FAST)
    m = result.metadata
    fake = loads[0][3]
    (call,) = fake.calls
    assert "changed as follows: at night" in call["user"] and call["seed"] == 4
    assert call["image"].size == (320, 256)  # the input as fitted to the output
    assert verify_raw(m["prompt"]) == [] and m["caption_findings"] == []
    assert m["strength"] == REMIX_STRENGTH and m["image_sha256"]
    assert m["remix"] == {"description": m["prompt"], "idea": "at night",
                          "image_sha256": m["image_sha256"]}  # fmt: skip
    assert "describe" in result.stats
    replayed = GenerationRequest.from_metadata(m)
    assert replayed.prompt == m["prompt"] and not replayed.remix and replayed.idea is None
    again = pipe.generate(replace(replayed, image=photo))
    assert len(fake.calls) == 1  # the stored caption, not a second description
    np.testing.assert_array_equal(np.asarray(again.image), np.asarray(result.image))


def test_remix_strength_can_be_given(pipe, loads, photo):
    result = pipe.generate("", image=photo, remix=True, strength=0.4, seed=1, **FAST)
    assert result.metadata["strength"] == 0.4 and result.metadata["remix"]["idea"] is None


BAD_REMIXES = [
    ({"remix": True}, "remix describes an input image: give one with --remix IMAGE"),
    ({"idea": "snow", "image": "photo"}, "idea steers a remix: give --remix IMAGE"),
    ({"remix": True, "image": "photo", "prompt": "a fox"}, "give --idea to steer it, not a prompt"),
    ({"remix": True, "image": "photo", "magic_prompt": True}, "not magic_prompt"),
    ({"remix": True, "image": "photo", "expand": (16, 0, 0, 0)}, "not with mask or expand"),
    ({"remix": True, "image": "photo", "mask": "photo"}, "not with mask or expand"),
    ({"remix": True, "image": "photo", "idea": "x" * 3000}, "the idea is 3000 characters long"),
    ({"remix": "yes", "image": "photo"}, "remix 'yes' must be True or False"),
    ({"remix": True, "image": "photo", "idea": 5}, "idea 5 must be text"),
]


@pytest.mark.parametrize("change, message", BAD_REMIXES)
def test_bad_remixes_fail_before_any_model_loads(pipe, loads, photo, change, message):
    settings = {"prompt": "", **change}
    settings.update({k: photo for k, v in settings.items() if v == "photo"})
    with pytest.raises(ValueError, match=re.escape(message)):
        pipe.generate(settings.pop("prompt"), **settings, **FAST)
    assert loads == [] and pipe._dits is None


def test_describe_command(magic_checkpoint, tiny_checkpoint, loads, photo, tmp_path):
    out = tmp_path / "photo.json"
    args = ["describe", str(photo), "--model", str(magic_checkpoint), "--dtype", "float32"]
    result = CliRunner().invoke(main, [*args, "-o", str(out), "--idea", "in snow", "--seed", "2"])
    assert result.exit_code == 0, result.output
    caption = out.read_text(encoding="utf-8").strip()
    assert verify_raw(caption) == [] and result.stdout.strip() == str(out)
    check = CliRunner().invoke(main, ["verify-caption", str(out)])  # no finding: exit 0
    assert check.exit_code == 0, check.output
    call = loads[0][3].calls[0]
    assert "changed as follows: in snow" in call["user"] and call["seed"] == 2
    again = CliRunner().invoke(main, [*args, "-o", str(out)])
    assert again.exit_code == 1 and "already exists; pass --force" in again.output
    printed = CliRunner().invoke(main, [*args, "--keep-bboxes", "--verbose"])
    assert printed.exit_code == 0, printed.output
    assert json.loads(printed.stdout)["compositional_deconstruction"]["elements"][0]["bbox"]
    assert "[describe] peak" in printed.stderr


def test_describe_command_refuses_bad_inputs_before_loading(tmp_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(sys.modules["ideogram4_mlx.cli.describe"], "load", no_load)
    (tmp_path / "notes.txt").write_text("not an image")
    Image.new("RGB", (32, 32)).save(tmp_path / "ok.png")
    ok = str(tmp_path / "ok.png")
    cases = [
        ([str(tmp_path / "missing.png")], "missing.png does not exist"),
        ([str(tmp_path / "notes.txt")], "cannot be read as an image"),
        ([ok, "--idea", "x" * 3000], "the idea is 3000 characters long"),
        ([ok, "--temperature", "nan"], "temperature nan is out of range"),
        ([ok, "--seed", "-1"], "seed -1 is out of range"),
        ([ok, "--max-tokens", "8"], "max_tokens 8 is out of range"),
        ([ok, "--system-prompt", "/dev/zero"], "system prompt: /dev/zero is over 256 KiB"),
    ]
    for args, message in cases:
        start = time.monotonic()
        result = CliRunner().invoke(main, ["describe", *args, "--model", str(tmp_path)])
        assert time.monotonic() - start < 5
        assert result.exit_code == 1, (args, result.output)
        assert result.output.startswith("Error: ") and result.output.count("\n") == 1
        assert message in result.output and "Traceback" not in result.output


def test_generate_remix_command_and_replay(magic_checkpoint, loads, photo, tmp_path):
    out = tmp_path / "remix.png"
    args = ["generate", "--model", str(magic_checkpoint), "--dtype", "float32", "--steps", "2"]
    result = CliRunner().invoke(
        main, [*args, "--remix", str(photo), "--idea", "at dusk", "--seed", "3", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "warning: caption" not in result.stderr
    m = read_metadata(out)
    assert m["remix"]["idea"] == "at dusk" and m["strength"] == REMIX_STRENGTH
    assert m["remix"]["image_sha256"] == fingerprint(Image.open(photo)) == m["image_sha256"]
    calls = len(loads[0][3].calls)
    replay = tmp_path / "replay.png"
    again = CliRunner().invoke(
        main, ["generate", "--from-metadata", str(out), "--image", str(photo), "-o", str(replay)]
    )
    assert again.exit_code == 0, again.output
    assert "replay: identical" in again.stderr
    assert sum(len(load[3].calls) for load in loads) == calls  # described once
    missing = CliRunner().invoke(main, ["generate", "--from-metadata", str(out), "-o", str(replay)])
    assert missing.exit_code == 1 and "give that image with --image" in missing.output


def test_generate_remix_command_refuses_bad_combinations(tmp_path, photo):
    base = ["generate", "--model", str(tmp_path), "--output", str(tmp_path / "a.png")]
    cases = [
        (["--remix", str(photo), "--prompt", "a fox"], "give --idea to steer it, not a prompt"),
        (["--remix", str(photo), "--image", str(photo)], "--remix IMAGE is the input image"),
        (["--prompt", "a fox", "--idea", "snow"], "idea steers a remix"),
        (["--remix", str(photo), "--mask", str(photo)], "not with mask or expand"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(main, [*base, *args])
        assert result.exit_code != 0, (args, result.output)
        assert message in result.output and "Traceback" not in result.output


def b64_png(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


@pytest.fixture
def client(pipe, loads, tmp_path):
    from fastapi.testclient import TestClient

    from ideogram4_mlx.server.app import create_app
    from ideogram4_mlx.server.jobs import JobQueue

    jobs = JobQueue(pipe, tmp_path / "outputs", max_queue=4)
    try:
        yield TestClient(create_app(jobs), base_url="http://127.0.0.1")
    finally:
        jobs.shutdown()


def test_the_server_describes_an_image(client, loads, photo):
    response = client.post("/v1/describe", json={"image": b64_png(photo)})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["findings"] == [] and verify_raw(answer["caption"]) == []
    data_url = "data:image/png;base64," + b64_png(photo)
    body = {"image": data_url, "idea": "in snow", "keep_bboxes": True, "seed": None}
    answer = client.post("/v1/describe", json=body).json()
    assert json.loads(answer["caption"])["compositional_deconstruction"]["elements"][0]["bbox"]
    assert "changed as follows: in snow" in loads[0][3].calls[-1]["user"]


BAD_DESCRIBE_BODIES = [
    ({}, 'send {"image": BASE64}'),
    ({"image": "/etc/passwd"}, "image is not base64 image data"),
    ({"image": "aGVsbG8="}, "image cannot be read as an image"),
    ({"image": "PHOTO", "prompt": "x"}, "unknown field(s) ['prompt']"),
    ({"image": "PHOTO", "seed": "1"}, "seed must be an integer, got '1'"),
    ({"image": "PHOTO", "idea": "x" * 3000}, "the idea is 3000 characters long"),
    ({"image": "PHOTO", "keep_bboxes": 1}, "keep_bboxes must be True or False, got 1"),
]


@pytest.mark.parametrize("body, message", BAD_DESCRIBE_BODIES)
def test_bad_describe_requests_are_422s(client, loads, photo, body, message):
    body = {k: b64_png(photo) if v == "PHOTO" else v for k, v in body.items()}
    response = client.post("/v1/describe", json=body)
    assert response.status_code == 422, response.text
    assert message in response.json()["error"]["message"] and loads == []


def test_a_remix_job_on_the_server(client, loads, photo):
    body = {"image": b64_png(photo), "remix": True, "idea": "at night", **FAST}  # no prompt
    job = client.post("/v1/jobs", json={**body, "seed": 2})
    assert job.status_code == 202, job.text
    deadline = time.monotonic() + 120
    while (summary := client.get(f"/v1/jobs/{job.json()['id']}").json())["state"] in (
        "queued",
        "running",
    ):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert summary["state"] == "done", summary["error"]
    m = summary["metadata"]
    assert m["remix"]["idea"] == "at night" and m["strength"] == REMIX_STRENGTH
    bad = client.post("/v1/jobs", json={**body, "prompt": "a fox"})
    assert bad.status_code == 422 and "give --idea to steer it" in bad.json()["error"]["message"]


def test_a_checkpoint_without_vision_weights_is_one_line(pipe, client, photo, monkeypatch):
    """What the describe model's loader raises (CheckpointError, MissingHeadError) reaches
    the command in one line and the server as a 422."""
    from ideogram4_mlx.config import CheckpointError

    message = "tiny: the checkpoint has no vision weights (visual.*); describe needs them"

    def no_vision(checkpoint_dir, dtype, head_dir):
        raise CheckpointError(message)

    name = "ideogram4_mlx.describe.model"
    module = sys.modules.get(name) or types.ModuleType(name)
    monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(module, "load_describe_model", no_vision, raising=False)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        pipe.describe(photo)
    args = ["describe", str(photo), "--model", str(pipe.checkpoint_dir), "--dtype", "float32"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and result.output == f"Error: {message}\n"
    response = client.post("/v1/describe", json={"image": b64_png(photo)})
    assert response.status_code == 422 and response.json()["error"]["message"] == message


def test_python_remix_needs_no_prompt(pipe, loads, photo):
    result = pipe.generate(image=photo, remix=True, idea="in winter", seed=1, **FAST)
    assert result.metadata["remix"]["idea"] == "in winter"
    assert GenerationRequest(image=photo, remix=True).validate().request.strength == 0.7


# -- the real describe model (no fake): the synthetic checkpoint's vision tower and head ----------


def test_the_real_model_describes_and_remixes_through_python_and_the_server(
    magic_checkpoint, photo, tmp_path
):
    """#30's done-when without a fake: ``pipe.describe`` and a remix on the synthetic
    checkpoint's own Qwen3-VL (random weights: well-formed nonsense, greedy, so the same
    caption twice), then ``POST /v1/describe`` on the server's worker thread."""
    from fastapi.testclient import TestClient
    from helpers import require_describe

    from ideogram4_mlx.magic.options import MagicOptions
    from ideogram4_mlx.server.app import create_app
    from ideogram4_mlx.server.jobs import JobQueue

    require_describe()
    # Random weights ramble: short strings and two elements make the caption end in bounds.
    short = MagicOptions(grammar_limits={"max_string_chars": 24, "max_elements": 2})
    pipe = load(magic_checkpoint, dtype=mx.float32, keep_in_memory=True, magic_options=short)
    caption = pipe.describe(photo)
    assert verify_raw(caption) == [], caption  # strict: the grammar's promise
    res = pipe.generate(image=photo, remix=True, seed=3, **FAST)
    assert res.metadata["remix"]["description"] == res.metadata["prompt"] == caption
    assert res.metadata["strength"] == REMIX_STRENGTH
    jobs = JobQueue(pipe, tmp_path / "outputs", max_queue=2)
    try:
        client = TestClient(create_app(jobs), base_url="http://127.0.0.1")
        answer = client.post("/v1/describe", json={"image": b64_png(photo)})
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"caption": caption, "findings": []}
    finally:
        jobs.shutdown()
