"""`ideo4-mlx serve` end to end (issue #19): a real uvicorn server on a free loopback port,
driven by the ``openai`` client and httpx, on the tiny synthetic checkpoint in float32.

One module-scoped server (one pipeline, loaded once) serves most tests; tests that need other
app settings (queue size, API key, body limit, a restart) start their own on the same
pipeline. Only one worker runs MLX at a time: every test waits for the jobs it starts.
"""

import base64
import http.client
import io
import json
import threading
from contextlib import contextmanager
from types import SimpleNamespace

import click
import httpx
import numpy as np
import openai
import pytest
import uvicorn
from click.testing import CliRunner
from fastapi.testclient import TestClient
from helpers import served, serving
from PIL import Image

import ideogram4_mlx.generation as generation_module
import ideogram4_mlx.pipeline as pipeline_module
from ideogram4_mlx.caption import PLAIN_PROMPT_WARNING
from ideogram4_mlx.cli import main
from ideogram4_mlx.cli.options import DISTRIBUTED_GROUP, LORA_GROUP, MAGIC_GROUP, MEMORY_GROUP
from ideogram4_mlx.metadata import read_metadata, save_png
from ideogram4_mlx.pipeline import load
from ideogram4_mlx.request import GenerationRequest
from ideogram4_mlx.server.app import RETRY_AFTER_SECONDS, create_app
from ideogram4_mlx.server.jobs import JobQueue, QueueFull

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # the CPU-backend note

CAPTION = (
    '{"high_level_description":"a café sign","compositional_deconstruction":'
    '{"background":"white","elements":[{"type":"text","text":"CAFÉ","desc":"bold"}]}}'
)
PRESET = "V4_TURBO_12"
JOB = {"prompt": CAPTION, "width": 256, "height": 256, "preset": PRESET}
WAIT = 120  # seconds: an upper bound for any one job here, never reached when things work


@contextmanager
def worker_held(jobs: JobQueue):
    """Hold the worker in a task of its own (``jobs.run`` is not a job: it takes no queue
    slot), so no accepted job can start or finish until the block ends."""
    held, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=jobs.run, args=(lambda: (held.set(), release.wait(WAIT)),))
    holder.start()
    assert held.wait(WAIT)
    try:
        yield release
    finally:
        release.set()  # before the server's shutdown waits for the worker
        holder.join(WAIT)


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return load(tiny_checkpoint, dtype="float32", keep_in_memory=True)


@pytest.fixture(scope="module")
def server(pipe, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("served")
    jobs = JobQueue(pipe, output_dir, max_queue=8)
    with serving(create_app(jobs)) as url:
        yield SimpleNamespace(url=url, jobs=jobs, output_dir=output_dir)


@pytest.fixture
def api(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def submit(api, **settings) -> str:
    response = api.post("/v1/jobs", json={**JOB, **settings})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def wait(server, job_id: str) -> dict:
    """The job's summary once it has ended."""
    job = server.jobs.wait(server.jobs.jobs[job_id], WAIT)
    assert job.state in ("done", "failed", "cancelled"), f"job {job_id} still {job.state}"
    return job.summary()


def wait_for_a_step(jobs: JobQueue, job) -> None:
    seen = 0
    while True:
        events = jobs.events_since(job, seen, WAIT)
        assert events, "no event"
        if any(e["type"] == "step" for e in events):
            return
        seen += len(events)


def sse(response):
    """The events of a text/event-stream response, as ``(type, data)``, comments skipped."""
    kind = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            kind = line[len("event: ") :]
        elif line.startswith("data: "):
            yield kind, json.loads(line[len("data: ") :])


def png_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return np.array(image)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def cli_error(result) -> str:
    """The message ``ideo4-mlx`` printed after ``Error: ``."""
    assert result.exit_code != 0, result.output
    return result.output.split("Error: ", 1)[1].strip()


def error_message(response, status: int) -> str:
    """The OpenAI error shape's message, after checking the status and the shape."""
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "code"} and body["code"] == status
    return body["message"]


# -- the OpenAI Images API ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_png(tiny_checkpoint, tmp_path_factory):
    """`ideo4-mlx generate` for the request the OpenAI tests send."""
    output = tmp_path_factory.mktemp("cli") / "cli.png"
    result = cli(
        "generate", "--model", tiny_checkpoint, "--dtype", "float32", "--prompt", CAPTION,
        "--width", 256, "--height", 256, "--steps", 2, "--seed", 1, "--preset", PRESET,
        "--output", output,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return output


def openai_client(url: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0)


def test_openai_b64_json_equals_the_cli_pixels(server, cli_png):
    response = openai_client(server.url).images.generate(
        prompt=CAPTION,
        size="256x256",
        response_format="b64_json",
        extra_body={"seed": 1, "num_steps": 2, "preset": PRESET},
    )
    assert len(response.data) == 1
    served = png_pixels(base64.b64decode(response.data[0].b64_json))
    assert served.shape == (256, 256, 3)
    np.testing.assert_array_equal(served, png_pixels(cli_png.read_bytes()))
    assert response.data[0].revised_prompt == read_metadata(cli_png)["prompt"]


def test_openai_url_is_a_fetchable_png_with_our_metadata(server, cli_png, tmp_path):
    response = openai_client(server.url).images.generate(
        prompt=CAPTION,
        size="256x256",
        n=2,
        response_format="url",
        extra_body={"seed": 1, "num_steps": 2, "preset": PRESET},
    )
    assert len(response.data) == 2
    expected = read_metadata(cli_png)
    for seed, item in enumerate(response.data, start=1):  # image i gets seed + i
        assert item.url.startswith(f"{server.url}/v1/images/") and item.url.endswith(".png")
        fetched = httpx.get(item.url, timeout=30)
        assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
        copy = tmp_path / f"{seed}.png"
        copy.write_bytes(fetched.content)
        metadata = read_metadata(copy)
        assert metadata["seed"] == seed
        for key in ("prompt", "width", "height", "preset", "num_steps", "dtype", "model"):
            assert metadata[key] == expected[key], key
    first = png_pixels((tmp_path / "1.png").read_bytes())
    np.testing.assert_array_equal(first, png_pixels(cli_png.read_bytes()))


# -- native jobs: events, cancel, failures ----------------------------------------------------


def test_events_arrive_in_order_one_per_step(server, api):
    job_id = submit(api, num_steps=3, seed=2)
    with api.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = list(sse(response))
    kinds = [kind for kind, _ in events]
    assert kinds == ["queued", "started", "step", "step", "step", "done"]
    assert all(kind == data["type"] for kind, data in events)
    steps = [data for kind, data in events if kind == "step"]
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert all(s["num_steps"] == 3 for s in steps)
    times = [s["t"] for s in steps]
    assert all(0 <= t <= 1 for t in times) and times == sorted(set(times))
    assert all(s["eta_seconds"] >= 0 for s in steps) and steps[-1]["eta_seconds"] == 0
    done = events[-1][1]
    assert done["image"] == f"/v1/images/{job_id}.png"
    summary = api.get(f"/v1/jobs/{job_id}").json()
    assert summary["state"] == "done" and summary["image"] == done["image"]
    assert summary["metadata"]["seed"] == 2 and summary["metadata"]["num_steps"] == 3
    assert summary["progress"] == {
        k: steps[-1][k] for k in ("step", "num_steps", "t", "eta_seconds")
    }
    assert api.get(done["image"]).status_code == 200


def test_cancel_stops_within_one_step_and_the_next_job_runs(server, api):
    job_id = submit(api, num_steps=200, seed=3)
    with api.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        events = sse(response)
        assert [kind for kind, _ in (next(events), next(events))] == ["queued", "started"]
        assert next(events)[0] == "step"
        cancelled = api.delete(f"/v1/jobs/{job_id}")
        assert cancelled.status_code == 200, cancelled.text
        rest = [kind for kind, _ in events]
    # the events the job had when the cancel was recorded; after them, at most the step in
    # flight, then "cancelled"
    seen = cancelled.json()["events"]
    after = [e["type"] for e in server.jobs.jobs[job_id].events[seen:]]
    assert after in (["cancelled"], ["step", "cancelled"]), after
    assert rest[-1] == "cancelled" and "done" not in rest
    summary = wait(server, job_id)
    assert summary["state"] == "cancelled" and summary["image"] is None
    assert not (server.output_dir / f"{job_id}.png").exists()
    assert api.delete(f"/v1/jobs/{job_id}").json()["state"] == "cancelled"  # idempotent
    assert wait(server, submit(api, num_steps=1, seed=4))["state"] == "done"


def test_a_failed_job_says_why_and_the_server_keeps_serving(server, api, monkeypatch):
    real = generation_module.velocity_fns

    def failing_velocity_fns(*args):
        cond, uncond = real(*args)
        calls = []

        def cond_failing_in_step_2(z, t):
            calls.append(t)
            if len(calls) == 2:
                raise RuntimeError("injected failure in step 2")
            return cond(z, t)

        return cond_failing_in_step_2, uncond

    monkeypatch.setattr(generation_module, "velocity_fns", failing_velocity_fns)
    job_id = submit(api, num_steps=3, seed=5)
    summary = wait(server, job_id)
    assert summary["state"] == "failed" and summary["image"] is None
    assert summary["error"] == "injected failure in step 2"
    with api.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        events = list(sse(response))
    assert [kind for kind, _ in events] == ["queued", "started", "step", "failed"]
    assert events[-1][1]["error"] == "injected failure in step 2"
    assert not (server.output_dir / f"{job_id}.png").exists()
    monkeypatch.undo()
    assert wait(server, submit(api, num_steps=1, seed=5))["state"] == "done"
    assert api.get("/healthz").json()["status"] == "ok"


def test_a_client_leaving_mid_stream_stops_neither_job_nor_server(server, api):
    job_id = submit(api, num_steps=20, seed=6)
    with httpx.Client(base_url=server.url, timeout=30) as leaving:
        with leaving.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            for kind, _ in sse(response):
                if kind == "step":
                    break  # closes the connection mid-stream
    summary = wait(server, job_id)
    assert summary["state"] == "done"
    steps = [e for e in server.jobs.jobs[job_id].events if e["type"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 21))
    with api.stream("GET", f"/v1/jobs/{job_id}/events") as response:  # a later stream replays
        assert [kind for kind, _ in sse(response)][-1] == "done"
    assert api.get("/healthz").json() == {
        "status": "ok", "model": server.jobs.pipe.model_id, "running": [], "queued": 0,
    }  # fmt: skip


def test_shutdown_cancels_the_running_job_after_its_step_and_writes_no_png(pipe, tmp_path):
    jobs = JobQueue(pipe, tmp_path, max_queue=4)
    running = jobs.submit(GenerationRequest(**JOB, num_steps=200, seed=7))
    queued = jobs.submit(GenerationRequest(**JOB, num_steps=1, seed=8))
    wait_for_a_step(jobs, running)
    steps_before = sum(e["type"] == "step" for e in running.events)
    jobs.shutdown()
    assert running.state == "cancelled" and running.events[-1]["type"] == "cancelled"
    # one step may end as we count, and the one in flight when the flag is set
    assert sum(e["type"] == "step" for e in running.events) <= steps_before + 2
    assert queued.state == "cancelled"
    assert [e["type"] for e in queued.events] == ["queued", "cancelled"]
    assert list(tmp_path.iterdir()) == []  # no PNG, no temporary file
    with pytest.raises(QueueFull, match="shutting down"):
        jobs.submit(GenerationRequest(**JOB, num_steps=1))


# -- bad requests: 422 with the CLI's message -------------------------------------------------


@pytest.mark.parametrize(
    "settings, options",
    [
        ({"width": 250}, ["--width", 250]),
        ({"num_steps": 2000}, ["--steps", 2000]),
        ({"num_steps": 0}, ["--steps", 0]),
        ({"mu": float("nan")}, ["--mu", "nan"]),
        ({"cache_threshold": 1.5}, ["--cache-threshold", 1.5]),
    ],
    ids=["width-250", "steps-2000", "steps-0", "mu-nan", "cache-threshold-1.5"],
)
def test_bad_settings_get_422_with_the_cli_message(
    server, api, tiny_checkpoint, tmp_path, settings, options
):
    before = len(server.jobs.jobs)
    body = json.dumps({**JOB, **settings})  # NaN as JSON's common extension
    response = api.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    message = error_message(response, 422)
    result = cli(
        "generate", "--model", tiny_checkpoint, "--dtype", "float32", "--prompt", CAPTION,
        "--width", 256, "--height", 256, "--preset", PRESET, *options,
        "--output", tmp_path / "out.png",
    )  # fmt: skip
    assert message == cli_error(result)
    assert len(server.jobs.jobs) == before  # nothing was queued


def test_bad_size_through_the_openai_client_has_the_cli_message(server, tiny_checkpoint, tmp_path):
    with pytest.raises(openai.UnprocessableEntityError) as raised:
        openai_client(server.url).images.generate(prompt=CAPTION, size="250x256")
    result = cli(
        "generate", "--model", tiny_checkpoint, "--prompt", CAPTION, "--width", 250,
        "--height", 256, "--output", tmp_path / "out.png",
    )  # fmt: skip
    assert raised.value.body["message"] == cli_error(result)


def test_bad_requests_without_a_cli_twin_get_422(server, api):
    before = len(server.jobs.jobs)
    message = error_message(api.post("/v1/jobs", json={**JOB, "stepz": 2, "foo": 1}), 422)
    assert message.startswith("unknown field(s) ['foo', 'stepz']; valid: prompt, width")
    # steps is the CLI's name for num_steps (taken); both names at once are not
    message = error_message(api.post("/v1/jobs", json={**JOB, "steps": 2, "num_steps": 2}), 422)
    assert message == "steps is another name for num_steps: give one of them"
    assert "image_sha256" not in message  # fingerprints come from the images sent

    json_type = {"content-type": "application/json"}
    response = api.post("/v1/jobs", content=b"{not json", headers=json_type)
    assert error_message(response, 422).startswith("the request body is not JSON")
    assert error_message(api.post("/v1/jobs", json=[JOB]), 422) == (
        "the request body must be a JSON object"
    )
    assert error_message(api.post("/v1/jobs", json={"width": 256}), 422) == (
        "the request needs a prompt"
    )
    assert error_message(api.post("/v1/jobs", json={**JOB, "prompt": "  "}), 422) == (
        "the prompt is empty"
    )
    assert len(server.jobs.jobs) == before


def test_an_image_field_that_is_a_path_is_refused(server, api, tmp_path):
    real_png = tmp_path / "input.png"
    Image.new("RGB", (256, 256), "red").save(real_png)
    before = len(server.jobs.jobs)
    for path in (str(real_png), "/etc/passwd"):
        response = api.post("/v1/jobs", json={**JOB, "image": path})
        message = error_message(response, 422)
        assert message == "image is not base64 image data (the server reads no file paths)"
    # a "path" that happens to be valid base64 is still only bytes, and not an image
    message = error_message(api.post("/v1/jobs", json={**JOB, "image": "/etc/passwd/"}), 422)
    assert message.startswith("image cannot be read as an image")
    assert len(server.jobs.jobs) == before
    # the same image sent as base64 is accepted (image-to-image, 1 step)
    encoded = base64.b64encode(real_png.read_bytes()).decode()
    assert wait(server, submit(api, image=encoded, num_steps=1, seed=9))["state"] == "done"


# -- the queue: 20 at once against max_queue 4 ------------------------------------------------


def test_twenty_concurrent_submissions_get_4_accepted_and_16_429(pipe, tmp_path):
    jobs = JobQueue(pipe, tmp_path, max_queue=4)
    # The worker is held, so no accepted job can start or finish during the burst: the split
    # is exact.
    with serving(create_app(jobs)) as url, worker_held(jobs) as release:
        barrier = threading.Barrier(20)
        responses = [None] * 20

        def post(i):
            with httpx.Client(base_url=url, timeout=60) as client:
                barrier.wait()
                responses[i] = client.post("/v1/jobs", json={**JOB, "num_steps": 1, "seed": i})

        threads = [threading.Thread(target=post, args=(i,)) for i in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [202] * 4 + [429] * 16, statuses
        for r in responses:
            if r.status_code == 429:
                assert r.headers["retry-after"] == str(RETRY_AFTER_SECONDS)
                assert "4 jobs are queued or running" in error_message(r, 429)
        accepted = [r.json()["id"] for r in responses if r.status_code == 202]
        health = httpx.get(f"{url}/healthz").json()
        assert health["status"] == "ok" and health["queued"] == 4 and health["running"] == []
        release.set()
        for job_id in accepted:
            assert jobs.wait(jobs.jobs[job_id], WAIT).state == "done"
        health = httpx.get(f"{url}/healthz").json()
        assert health["status"] == "ok" and health["queued"] == 0 and health["running"] == []
        assert len(httpx.get(f"{url}/v1/jobs").json()["data"]) == 4


# -- auth, and `ideo4-mlx serve` ----------------------------------------------------------------


def test_api_key_is_required_on_v1(pipe, tmp_path):
    jobs = JobQueue(pipe, tmp_path, max_queue=2)
    with serving(create_app(jobs, api_key="k")) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k"}):
            response = httpx.get(f"{url}/v1/models", headers=headers)
            assert "API key" in error_message(response, 401)
        response = httpx.post(f"{url}/v1/jobs", json=JOB)
        assert response.status_code == 401 and not jobs.jobs
        assert httpx.get(f"{url}/healthz").status_code == 200  # not under /v1
        response = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer k"})
        assert response.status_code == 200
        assert response.json()["data"][0]["id"] == pipe.model_id

        with pytest.raises(openai.AuthenticationError):
            openai_client(url, api_key="wrong").models.list()
        client = openai_client(url, api_key="k")
        assert [m.id for m in client.models.list()] == [pipe.model_id]
        image = client.images.generate(
            prompt=CAPTION, size="256x256", extra_body={"num_steps": 1, "seed": 1}
        )
        assert png_pixels(base64.b64decode(image.data[0].b64_json)).shape == (256, 256, 3)


def test_cors_preflight_needs_no_key_and_a_401_carries_the_origin(server, pipe, tmp_path):
    page, preflight = (
        "http://page.example",
        {
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    jobs = JobQueue(pipe, tmp_path, max_queue=2)
    with serving(create_app(jobs, api_key="k", cors_origin=page)) as url:
        response = httpx.options(f"{url}/v1/jobs", headers={"Origin": page, **preflight})
        assert response.status_code == 200  # a browser sends no key with a preflight
        assert response.headers["access-control-allow-origin"] == page
        assert "authorization" in response.headers["access-control-allow-headers"].lower()
        response = httpx.get(f"{url}/v1/models", headers={"Origin": page})
        assert response.status_code == 401  # the page can read why
        assert response.headers["access-control-allow-origin"] == page
        response = httpx.get(
            f"{url}/v1/models", headers={"Origin": page, "Authorization": "Bearer k"}
        )
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == page
        other = httpx.options(
            f"{url}/v1/jobs", headers={"Origin": "http://other.example", **preflight}
        )
        assert "access-control-allow-origin" not in other.headers
    # without --cors-origin, no origin is allowed
    response = httpx.get(f"{server.url}/v1/models", headers={"Origin": page})
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers


def test_serve_refuses_a_public_host_without_a_key_before_loading(monkeypatch):
    monkeypatch.delenv("IDEO4_API_KEY", raising=False)
    loaded = []
    monkeypatch.setattr(pipeline_module, "load", lambda *a, **k: loaded.append(a))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("uvicorn.run was called"))
    result = cli("serve", "--host", "0.0.0.0", "--model", "not/loaded")
    assert result.exit_code == 2, result.output  # a usage error
    message = cli_error(result)
    assert "--host 0.0.0.0 is reachable from other machines" in message
    assert "--api-key" in message and "--no-auth" in message
    assert loaded == []


@pytest.mark.parametrize(
    "options, warns", [(["--no-auth"], True), (["--api-key", "k"], False)], ids=["no-auth", "key"]
)
def test_serve_on_a_public_host_with_no_auth_or_a_key(
    monkeypatch, tiny_checkpoint, tmp_path, options, warns
):
    queues, runs = served(monkeypatch), []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: runs.append(kwargs))
    result = cli(
        "serve", "--host", "0.0.0.0", "--port", 8123, "--model", tiny_checkpoint,
        "--dtype", "float32", "--output-dir", tmp_path / "out", "--max-queue", 3, *options,
    )  # fmt: skip
    for jobs in queues:
        jobs.shutdown()
    assert result.exit_code == 0, result.output
    assert [(r["host"], r["port"]) for r in runs] == [("0.0.0.0", 8123)]
    assert len(queues) == 1 and queues[0].max_queue == 3
    assert ("without an API key (--no-auth)" in result.output) == warns
    assert "serving" in result.output and "http://0.0.0.0:8123/" in result.output


# -- body limit, output safety, restarts ------------------------------------------------------


def test_serve_shows_a_jobs_warnings_as_one_line_each(monkeypatch, tiny_checkpoint, tmp_path):
    """A plain-text prompt's caption finding, raised on the worker thread while serving, is
    one ``warning: ...`` line on stderr (as generate shows it), not Python's two-line form."""
    queues, states = served(monkeypatch), []

    def run(app, **kwargs):  # while serving: one plain-text job, twice
        client = TestClient(app, base_url="http://127.0.0.1")
        for _ in range(2):
            body = {**JOB, "prompt": "a red sign", "steps": 1}  # the CLI's name for num_steps
            response = client.post("/v1/jobs", json=body)
            assert response.status_code == 202, response.text
            states.append(queues[0].wait(queues[0].get(response.json()["id"]), WAIT).state)

    monkeypatch.setattr(uvicorn, "run", run)
    result = cli(
        "serve", "--model", tiny_checkpoint, "--dtype", "float32", "--output-dir", tmp_path
    )  # fmt: skip
    for jobs in queues:
        jobs.shutdown()
    assert result.exit_code == 0, result.output
    assert states == ["done", "done"]
    said = [line for line in result.stderr.splitlines() if "plain-text prompt" in line]
    assert said == [f"warning: caption: {PLAIN_PROMPT_WARNING}"] * 2  # each job's
    assert "UserWarning" not in result.stderr and "warnings.warn" not in result.stderr


def test_a_body_over_the_limit_gets_413_with_or_without_a_length(pipe, tmp_path):
    jobs = JobQueue(pipe, tmp_path, max_queue=2)
    with serving(create_app(jobs, max_body_bytes=2048)) as url:
        big = json.dumps({**JOB, "prompt": "x" * 4096}).encode()
        json_type = {"content-type": "application/json"}
        response = httpx.post(f"{url}/v1/jobs", content=big, headers=json_type)  # with a length
        assert "over" in error_message(response, 413)

        def chunks(data: bytes):
            for i in range(0, len(data), 512):
                yield data[i : i + 512]

        response = httpx.post(f"{url}/v1/jobs", content=chunks(big), headers=json_type)  # chunked
        assert "over" in error_message(response, 413)
        assert not jobs.jobs
        # a small chunked body is counted as the route reads it, and reaches the route whole
        small = json.dumps({"caption": CAPTION}).encode()
        response = httpx.post(f"{url}/v1/captions/verify", content=chunks(small), headers=json_type)
        assert response.status_code == 200 and response.json() == {"findings": []}


def test_a_long_running_server_forgets_old_ended_jobs_and_their_previews(
    pipe, tmp_path, monkeypatch
):
    monkeypatch.setattr("ideogram4_mlx.server.jobs.KEEP_PREVIEWS", 1)
    jobs = JobQueue(pipe, tmp_path, max_queue=4, preview_every=1, keep_ended=2)
    with serving(create_app(jobs)) as url:
        ids = []
        for seed in (1, 2, 3):
            response = httpx.post(f"{url}/v1/jobs", json={**JOB, "num_steps": 1, "seed": seed})
            ids.append(response.json()["id"])
            assert jobs.wait(jobs.get(ids[-1]), WAIT).state == "done"
        first, second, third = ids
        assert [j.id for j in jobs.snapshot()] == [second, third]
        assert "ended long ago" in error_message(httpx.get(f"{url}/v1/jobs/{first}"), 404)
        listed = {r["id"] for r in httpx.get(f"{url}/v1/images").json()["data"]}
        assert listed == set(ids)  # the PNGs stay listed from disk
        assert httpx.get(f"{url}/v1/images/{first}.png").status_code == 200

        def steps(job_id):
            return [e for e in jobs.get(job_id).events if e["type"] == "step"]

        (old,), (new,) = steps(second), steps(third)
        assert "preview" not in old and old["preview_dropped"] is True
        assert new["preview"].startswith("data:image/png;base64,")


def raw_get(url: str, path: str) -> int:
    """The status of a GET sent with ``path`` exactly as given (httpx would normalize it)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    finally:
        connection.close()


def test_only_server_named_pngs_are_served(server, api, cli_png):
    assert raw_get(server.url, "/v1/images/../../etc/passwd") == 404
    assert raw_get(server.url, "/v1/images/..%2F..%2Fetc%2Fpasswd") == 404
    assert raw_get(server.url, "/v1/images/%2Fetc%2Fpasswd") == 404
    for name in ("passwd", "passwd.png", "a" * 32 + ".png", "a" * 32 + ".png.png"):
        assert api.get(f"/v1/images/{name}").status_code == 404, name
    # a link with a server-shaped name, to a PNG with our metadata outside the folder
    link = server.output_dir / ("b" * 32 + ".png")
    link.symlink_to(cli_png)
    try:
        message = error_message(api.get(f"/v1/images/{link.name}"), 404)
        assert message == f"no image {link.name}"
        assert link.stem not in [r["id"] for r in api.get("/v1/images").json()["data"]]
    finally:
        link.unlink()


def test_results_survive_a_restart(pipe, tmp_path):
    first = JobQueue(pipe, tmp_path, max_queue=2)
    with serving(create_app(first)) as url:
        response = httpx.post(f"{url}/v1/jobs", json={**JOB, "num_steps": 1, "seed": 11})
        job = first.wait(first.jobs[response.json()["id"]], WAIT)
        assert job.state == "done"
        metadata = httpx.get(f"{url}/v1/jobs/{job.id}").json()["metadata"]
        served = httpx.get(f"{url}/v1/images/{job.id}.png").content
    # a file in the folder that is not ours is not listed
    save_png(Image.new("RGB", (16, 16)), tmp_path / "mine.png", {"prompt": "x"})
    (tmp_path / ("c" * 32 + ".png")).write_bytes(b"not a png")

    second = JobQueue(pipe, tmp_path, max_queue=2)
    with serving(create_app(second)) as url:
        listed = httpx.get(f"{url}/v1/images").json()["data"]
        assert [r["id"] for r in listed] == [job.id]
        assert listed[0]["image"] == f"/v1/images/{job.id}.png"
        assert listed[0]["metadata"]["seed"] == 11
        assert listed[0]["metadata"] == metadata
        assert httpx.get(f"{url}{listed[0]['image']}").content == served
        assert httpx.get(f"{url}/v1/jobs").json() == {"data": []}  # jobs are not kept


def test_openai_n_is_accepted_whole_or_not_at_all(pipe, tmp_path):
    """n images are queued together: when they do not all fit, none is (a 429), so a client
    never loses images it was not told about."""
    jobs = JobQueue(pipe, tmp_path, max_queue=4)
    with serving(create_app(jobs)) as url, worker_held(jobs):
        with httpx.Client(base_url=url, timeout=60) as client:
            for i in range(3):
                assert client.post("/v1/jobs", json={**JOB, "seed": i}).status_code == 202
            body = {"prompt": CAPTION, "n": 2, "size": "256x256", "num_steps": 1}
            response = client.post("/v1/images/generations", json=body)
            assert "2 more do not fit" in error_message(response, 429)
            assert len(jobs.jobs) == 3


# -- serve's load options ---------------------------------------------------------------------


def load_option_names(command: str) -> set[str]:
    params = main.commands[command].params
    return {name for p in params if isinstance(p, click.Option) for name in p.opts} & LOAD_FLAGS


# Every flag the load-options decorator can declare (cli/options.pipeline_options).
LOAD_FLAGS = {
    opt
    for group in (MEMORY_GROUP, LORA_GROUP, MAGIC_GROUP, DISTRIBUTED_GROUP)
    for decorate in group
    for opt in decorate(lambda: None).__click_params__[0].opts
} | {"--model", "--revision", "--dtype"}


def test_serve_offers_every_load_option_generate_does():
    # --distributed is generate's alone: the ranks split one generation, a server is one process
    assert load_option_names("generate") - load_option_names("serve") == {"--distributed"}
    assert {"--memory-limit", "--magic-head", "--magic-model", "--temperature"} <= (
        load_option_names("serve")
    )


def test_the_servers_magic_prompt_uses_serves_options(monkeypatch, tiny_checkpoint, tmp_path):
    """serve's --temperature, --max-tokens, --top-p, --keep-bboxes and --system-prompt reach
    the server's magic prompt; the request gives the size and seed; --memory-limit and
    --magic-model reach the pipeline."""
    queues, apps, expanded = served(monkeypatch), [], []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: apps.append(app))
    monkeypatch.setattr(pipeline_module.Ideogram4Pipeline, "magic_model", lambda self: (1, 2))

    def fake_expand(model, tokenizer, idea, width, height, seed, **options):
        expanded.append(((model, tokenizer, idea, width, height, seed), options))
        return '{"high_level_description": "a fox"}'

    monkeypatch.setattr("ideogram4_mlx.magic.expand.expand", fake_expand)
    (tmp_path / "system.txt").write_text("Write captions.", encoding="utf-8")
    result = cli(
        "serve", "--model", tiny_checkpoint, "--dtype", "float32", "--output-dir",
        tmp_path / "out", "--temperature", 0.25, "--max-tokens", 300, "--top-p", 0.5,
        "--keep-bboxes", "--system-prompt", tmp_path / "system.txt", "--memory-limit", 3,
        "--magic-model", "owner/chat-model",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (app,), (jobs,) = apps, queues
    pipe = jobs.pipe
    try:
        body = {"idea": "a fox", "width": 512, "height": 256, "seed": 4}
        response = TestClient(app, base_url="http://127.0.0.1").post("/v1/magic-prompt", json=body)
    finally:
        jobs.shutdown()
    assert response.status_code == 200, response.text
    assert expanded == [
        (
            (1, 2, "a fox", 512, 256, 4),
            {
                "max_tokens": 300,
                "temperature": 0.25,
                "top_p": 0.5,
                "keep_bboxes": True,
                "system_prompt": "Write captions.",
                "grammar_limits": None,
            },
        )
    ]
    assert pipe.options.memory_limit == 3 and pipe.memory_limit == 3e9
    assert pipe.options.magic_model == "owner/chat-model"


def test_serve_runs_the_fast_and_light_modes(monkeypatch, tiny_checkpoint, tmp_path):
    """serve's --uncond self and --transformer reach the pipeline, and a job with a step cache
    runs through the server's queue with them and records all three (#28)."""
    from ideogram4_mlx.synth import write_synthetic_checkpoint

    other = write_synthetic_checkpoint(
        tmp_path / "other", "tiny", seed=1, components=("transformer",)
    )
    queues = served(monkeypatch)
    result = cli(
        "serve", "--model", tiny_checkpoint, "--dtype", "float32", "--output-dir",
        tmp_path / "out", "--uncond", "self", "--transformer", other,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (jobs,) = queues
    try:
        assert jobs.pipe.options.uncond == "self" and jobs.pipe.dit_components()[1] is None
        assert jobs.pipe.transformer_dir == other / "transformer"
        request = GenerationRequest(**{**JOB, "num_steps": 2, "cache_threshold": 0.5})
        job = jobs.wait(jobs.submit(request), timeout=WAIT)
        assert job.state == "done", job.summary()
        metadata = read_metadata(job.path)
        assert metadata["uncond"] == "self" and metadata["cache_threshold"] == 0.5
        assert metadata["transformer"]["source"] == str(other)
    finally:
        jobs.shutdown()
