"""`ideo4-mlx serve` checking the lettering (issue #29): the job JSON's ``check_text``,
``retry_text``, ``ocr`` and ``text_threshold``, the worker's tries through
``text_retry.generate_checked`` (events, summary, PNG metadata), the OpenAI route's extension
and a missing OCR engine refused at submit.

The OCR is faked (``TextCheck.engine`` and ``TextCheck.check`` monkeypatched to return
``TextReport``\\ s built here, by seed), so nothing here needs an OCR engine; the real server
runs on the tiny synthetic checkpoint in float32.
"""

import base64
import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from helpers import fake_ocr, serving
from helpers import text_report as report
from PIL import Image

from ideogram4_mlx.errors import Ideo4Error, InputError
from ideogram4_mlx.metadata import read_metadata
from ideogram4_mlx.pipeline import load
from ideogram4_mlx.request import GenerationRequest
from ideogram4_mlx.server.app import create_app
from ideogram4_mlx.server.jobs import JobQueue
from ideogram4_mlx.text_retry import MAX_TRIES, TextCheck

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # the CPU-backend note

CAPTION = (
    '{"high_level_description":"a shop sign","compositional_deconstruction":'
    '{"background":"white","elements":[{"type":"text","text":"OPEN","desc":"bold"},'
    '{"type":"text","text":"GRAND SALE","desc":"red"}]}}'
)
JOB = {"prompt": CAPTION, "width": 256, "height": 256, "preset": "V4_TURBO_12", "num_steps": 2}
WAIT = 120
PAGE = Path(__file__).resolve().parent.parent / "ideogram4_mlx" / "server" / "static"


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return load(tiny_checkpoint, dtype="float32", keep_in_memory=True)


@pytest.fixture(scope="module")
def server(pipe, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("served")
    jobs = JobQueue(pipe, output_dir, max_queue=8)
    with serving(create_app(jobs)) as url:
        with httpx.Client(base_url=url, timeout=60) as api:
            yield SimpleNamespace(url=url, jobs=jobs, output_dir=output_dir, api=api)


def error_message(response, status: int = 422) -> str:
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    assert "\n" not in message, message
    return message


def run_job(server, **settings) -> tuple[dict, list[dict]]:
    """Submit a job, wait for it; its summary and events."""
    response = server.api.post("/v1/jobs", json={**JOB, **settings})
    assert response.status_code == 202, response.text
    job = server.jobs.wait(server.jobs.get(response.json()["id"]), WAIT)
    summary = server.api.get(f"/v1/jobs/{job.id}").json()
    assert summary["state"] == "done", summary
    return summary, json.loads(json.dumps(job.events))  # as a client reads them


def pixels(server, path: str) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(server.api.get(path).content)))


# -- the job JSON ------------------------------------------------------------------------------

BAD_FIELDS = {
    "check-str": ('"check_text": "yes"', "check_text must be true or false"),
    "check-int": ('"check_text": 1', "check_text must be true or false"),
    "retry-str": ('"retry_text": "3"', "retry_text must be a whole number"),
    "retry-float": ('"retry_text": 1.5', "retry_text must be a whole number"),
    "retry-bool": ('"retry_text": true', "retry_text must be a whole number"),
    "retry-negative": ('"retry_text": -1', "retry_text must be a whole number >= 0"),
    "retry-over": (f'"retry_text": {MAX_TRIES + 1}', f"use 1..{MAX_TRIES} images"),
    "threshold-over": ('"check_text": true, "text_threshold": 1.5', "text_threshold 1.5"),
    "threshold-negative": ('"check_text": true, "text_threshold": -0.1', "text_threshold"),
    "threshold-str": ('"check_text": true, "text_threshold": "0.9"', "text_threshold must"),
    "threshold-nan": ('"check_text": true, "text_threshold": NaN', "text_threshold must"),
    "threshold-inf": ('"retry_text": 2, "text_threshold": Infinity', "text_threshold must"),
    "ocr-int": ('"check_text": true, "ocr": 3', "ocr must be an engine name"),
    "ocr-alone": ('"ocr": "rapidocr"', "ocr and text_threshold need check_text or retry"),
    "threshold-alone": ('"text_threshold": 0.5', "ocr and text_threshold need check_text"),
    "ocr-check-false": ('"check_text": false, "ocr": "rapidocr"', "need check_text"),
}


@pytest.mark.parametrize("field, expected", BAD_FIELDS.values(), ids=BAD_FIELDS.keys())
@pytest.mark.parametrize("route", ["/v1/jobs", "/v1/images/generations"])
def test_bad_text_fields_get_one_line_naming_the_field(server, monkeypatch, route, field, expected):
    checked = fake_ocr(monkeypatch, {})
    before = len(server.jobs.snapshot())
    body = json.dumps({"prompt": CAPTION, "num_steps": 1})[:-1] + ", " + field + "}"
    headers = {"Content-Type": "application/json"}
    response = server.api.post(route, content=body, headers=headers)
    assert expected in error_message(response)
    assert len(server.jobs.snapshot()) == before and checked == []


def test_null_is_a_field_left_out_and_unknown_fields_list_the_text_fields(server, monkeypatch):
    fake_ocr(monkeypatch, {})
    nulls = {k: None for k in ("check_text", "retry_text", "ocr", "text_threshold")}
    summary, events = run_job(server, seed=3, **nulls)
    assert summary["text_scores"] is None and "text_check" not in summary["metadata"]
    assert summary["seed"] == 3
    assert not any(e["type"] == "text" for e in events)
    message = error_message(server.api.post("/v1/jobs", json={**JOB, "check_txt": True}))
    assert "check_txt" in message and "check_text, retry_text, ocr, text_threshold" in message


# -- checked jobs ------------------------------------------------------------------------------


def test_check_text_job_scores_in_summary_events_and_png(server, monkeypatch):
    checked = fake_ocr(monkeypatch, {})
    summary, events = run_job(server, seed=5, check_text=True)
    assert checked == [5]
    scores = summary["text_scores"]
    assert scores["engine"] == "fake" and scores["passed"] is True and scores["tried"] == 1
    assert scores["threshold"] == 0.9
    assert [e["text"] for e in scores["elements"]] == ["OPEN", "GRAND SALE"]
    assert scores["lines"] == ['"OPEN": found, 1.00', '"GRAND SALE": found, 1.00']
    assert summary["seed"] == 5
    steps = [e for e in events if e["type"] == "step"]
    assert [(e["step"], e["try"], e["tries"]) for e in steps] == [(1, 1, 1), (2, 1, 1)]
    assert summary["progress"]["try"] == 1 and summary["progress"]["tries"] == 1
    lines = [e["line"] for e in events if e["type"] == "text"]
    assert lines == [
        "text check, seed 5 (1/1)",
        '  "OPEN": found, 1.00',
        '  "GRAND SALE": found, 1.00',
    ]
    kinds = [e["type"] for e in events]
    assert kinds.index("text") > max(i for i, k in enumerate(kinds) if k == "step")
    done = events[-1]
    assert done["type"] == "done" and done["seed"] == 5 and done["text_scores"] == scores

    png = server.output_dir / f"{summary['id']}.png"
    stored = read_metadata(png)["text_check"]
    assert stored == summary["metadata"]["text_check"]
    assert stored["seed"] == 5 and stored["passed"] is True and stored["engine"] == "fake"
    assert stored["tries"] == [{"seed": 5, "passed": True, "worst": 1.0, "scores": [1.0, 1.0]}]


def test_retry_keeps_the_second_seed_when_it_passes(server, monkeypatch):
    checked = fake_ocr(monkeypatch, {7: 0.5})
    summary, events = run_job(server, seed=7, retry_text=4)
    assert checked == [7, 8]  # stopped at the first that passed
    assert summary["seed"] == 8 and summary["metadata"]["seed"] == 8
    scores = summary["text_scores"]
    assert scores["passed"] is True and scores["tried"] == 2
    steps = [(e["step"], e["try"], e["tries"]) for e in events if e["type"] == "step"]
    assert steps == [(1, 1, 4), (2, 1, 4), (1, 2, 4), (2, 2, 4)]
    lines = [e["line"] for e in events if e["type"] == "text"]
    assert lines[0] == "text check, seed 7 (1/4)"
    assert '  "GRAND SALE": best match "GRAND SAIE", 0.50' in lines
    assert "text check, seed 8 (2/4)" in lines
    assert lines[-1] == "kept seed 8 (passed), 2 tried"
    stored = read_metadata(server.output_dir / f"{summary['id']}.png")["text_check"]
    assert [t["seed"] for t in stored["tries"]] == [7, 8] and stored["seed"] == 8

    # the kept seed replays that image
    plain, _ = run_job(server, seed=8)
    np.testing.assert_array_equal(pixels(server, summary["image"]), pixels(server, plain["image"]))


def test_retry_keeps_the_best_when_none_passes(server, monkeypatch):
    checked = fake_ocr(monkeypatch, {3: 0.2, 4: 0.6, 5: 0.4})
    summary, events = run_job(server, seed=3, retry_text=3, text_threshold=0.95)
    assert checked == [3, 4, 5]
    scores = summary["text_scores"]
    assert summary["seed"] == 4 and scores["passed"] is False and scores["tried"] == 3
    assert scores["threshold"] == 0.95
    assert scores["lines"] == ['"OPEN": found, 1.00', '"GRAND SALE": best match "GRAND SAIE", 0.60']
    lines = [e["line"] for e in events if e["type"] == "text"]
    assert lines[-1] == "kept seed 4 (best of the tries, below the threshold), 3 tried"


def test_cancel_between_tries_stops_the_job(server, monkeypatch):
    fake_ocr(monkeypatch, {})
    calls = []

    def failing_check(self, result):  # every try misses; the cancel comes during the first
        calls.append(result.metadata["seed"])
        (running,) = [j for j in server.jobs.snapshot() if j.state == "running"]
        server.jobs.cancel(running.id)
        return report(0.0, self.threshold)

    monkeypatch.setattr(TextCheck, "check", failing_check)
    response = server.api.post("/v1/jobs", json={**JOB, "seed": 1, "retry_text": 3})
    job_id = response.json()["id"]
    job = server.jobs.wait(server.jobs.get(job_id), WAIT)
    assert job.state == "cancelled" and calls == [1]
    steps = [(e["step"], e["try"]) for e in job.events if e["type"] == "step"]
    assert steps == [(1, 1), (2, 1), (1, 2)]  # the second try stops after its first step
    assert not (server.output_dir / f"{job_id}.png").exists()


# -- the OpenAI route --------------------------------------------------------------------------


def test_openai_route_takes_the_same_fields(server, monkeypatch, tmp_path):
    checked = fake_ocr(monkeypatch, {11: 0.3})
    body = {"prompt": CAPTION, "size": "256x256", "seed": 11, "num_steps": 2, "retry_text": 2}
    response = server.api.post("/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    (item,) = response.json()["data"]
    assert checked == [11, 12] and item["seed"] == 12 and item["text_scores"]["passed"] is True
    png = tmp_path / "item.png"
    png.write_bytes(base64.b64decode(item["b64_json"]))
    assert read_metadata(png)["text_check"]["seed"] == 12

    body = {**body, "n": 2, "retry_text": 0, "check_text": True, "response_format": "url"}
    data = server.api.post("/v1/images/generations", json=body).json()["data"]
    assert [d["seed"] for d in data] == [11, 12] and checked[2:] == [11, 12]
    assert data[0]["text_scores"]["passed"] is False and data[1]["text_scores"]["passed"]

    message = error_message(
        server.api.post("/v1/images/generations", json={**body, "n": 2, "retry_text": 2})
    )
    assert message.startswith("retry_text 2 with n 2: image i has seed + i")


# -- no OCR engine ------------------------------------------------------------------------------


class MissingEngine(Ideo4Error):
    pass


@pytest.mark.parametrize("error", [InputError, MissingEngine])
def test_a_missing_ocr_engine_is_refused_at_submit(pipe, tmp_path, monkeypatch, error):
    message = "no OCR engine is installed: pip install 'ideogram4-mlx[ocr]'"

    def get_engine(name=None):
        raise error(message)

    monkeypatch.setattr("ideogram4_mlx.ocr.get_engine", get_engine)
    generated = []
    monkeypatch.setattr(pipe, "start", lambda *a, **k: generated.append(a))
    jobs = JobQueue(pipe, tmp_path, max_queue=2)
    with serving(create_app(jobs)) as url, httpx.Client(base_url=url, timeout=60) as api:
        for route in ("/v1/jobs", "/v1/images/generations"):
            response = api.post(route, json={**JOB, "check_text": True, "ocr": "rapidocr"})
            assert error_message(response) == message
        assert jobs.snapshot() == [] and generated == [] and list(tmp_path.glob("*.png")) == []


def test_the_engine_is_made_once_per_name(pipe, tmp_path, monkeypatch):
    """Jobs that name one engine share it (``ocr.get_engine`` makes each once per process):
    the models load at the first submit that names it, and never again."""
    from ideogram4_mlx import ocr

    made = []

    def maker(name):
        def make():
            made.append(name)
            return SimpleNamespace(name=name, scripts=frozenset({"latin"}))

        return make

    monkeypatch.setattr(ocr, "_MADE", {})
    monkeypatch.setattr(ocr, "_missing", lambda name: None)
    monkeypatch.setattr(ocr, "_MAKERS", {n: maker(n) for n in ocr.ENGINES})
    monkeypatch.setattr(pipe, "start", lambda *a, **k: None)
    jobs = JobQueue(pipe, tmp_path, max_queue=8)
    try:
        checks = [TextCheck("rapidocr", 2, 0.5), TextCheck("rapidocr", 3), TextCheck("tesseract")]
        for check in checks:
            jobs.submit(GenerationRequest(CAPTION, width=256, height=256), check)
        assert made == ["rapidocr", "tesseract"]
        assert checks[0].engine() is checks[1].engine() and checks[2].engine().name == "tesseract"
        assert made == ["rapidocr", "tesseract"]
    finally:
        jobs.shutdown()


# -- the page ----------------------------------------------------------------------------------


def test_the_page_tries_field_matches_max_tries():
    html = (PAGE / "index.html").read_text()
    tries = re.search(r'<input id="tries"[^>]*>', html)[0]
    assert f'max="{MAX_TRIES}"' in tries and 'min="1"' in tries
