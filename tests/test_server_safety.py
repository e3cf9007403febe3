"""`ideo4-mlx serve` against hostile or broken input (issue #25): cross-site pages and DNS
rebinding, wrongly typed JSON, memory held by ended edits, an event loop kept free while an
upload is decoded, temporary files left by a killed server, and the body limit's count.

Real uvicorn servers on the tiny synthetic checkpoint, as in ``test_server.py`` (whose helpers
this file uses); the body-limit test drives the ASGI middleware alone.
"""

import asyncio
import base64
import ctypes
import gc
import io
import json
import struct
import subprocess
import sys
import threading
import time
import warnings
import weakref
from pathlib import Path

import httpx
import mlx.core as mx
import numpy as np
import pytest
import uvicorn
from helpers import serving
from PIL import Image
from test_server import CAPTION, JOB, WAIT, cli, error_message, pipe, worker_held  # noqa: F401

import ideogram4_mlx.server.app as app_module
from ideogram4_mlx.metadata import read_metadata, save_png
from ideogram4_mlx.server.app import BodyLimit, create_app
from ideogram4_mlx.server.jobs import JobQueue

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # the CPU-backend note

EVIL = "http://evil.example"


@pytest.fixture(scope="module")
def url(pipe, tmp_path_factory):  # noqa: F811
    jobs = JobQueue(pipe, tmp_path_factory.mktemp("safety"), max_queue=8)
    with serving(create_app(jobs)) as url:
        yield url


def port(url: str) -> str:
    return url.rsplit(":", 1)[1]


def png_bytes(size: tuple[int, int], color="red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


# -- Origin, Host and Content-Type (item 1) -----------------------------------------------------


def test_cross_site_posts_and_foreign_hosts_are_refused(pipe, tmp_path):  # noqa: F811
    jobs = JobQueue(pipe, tmp_path, max_queue=4)
    with serving(create_app(jobs)) as url, worker_held(jobs):
        body = json.dumps({**JOB, "num_steps": 1})

        def post(headers, path="/v1/jobs", content=body):
            return httpx.post(f"{url}{path}", content=content, headers=headers, timeout=30)

        # a page can send these without a preflight: a form, fetch with text/plain or a Blob
        for kind in ("text/plain;charset=UTF-8", "application/x-www-form-urlencoded", None):
            headers = {} if kind is None else {"Content-Type": kind}
            message = error_message(post(headers), 415)
            assert "application/json" in message and (kind or "no Content-Type") in message
            assert post({**headers, "Origin": EVIL}).status_code in (403, 415)
        json_type = {"Content-Type": "application/json"}
        for headers in (
            {"Origin": EVIL},
            {"Origin": EVIL, "Sec-Fetch-Site": "cross-site"},
            {"Origin": "http://127.0.0.1:1", "Sec-Fetch-Site": "same-site"},
            {"Sec-Fetch-Site": "cross-site"},  # no Origin: still a browser, from elsewhere
            {"Origin": "null"},  # a sandboxed frame or a file:// page
            {"Origin": "http://[::1"},  # not even a URL
        ):
            message = error_message(post({**json_type, **headers}), 403)
            assert "serve --cors-origin" in message, message
        cancel = httpx.delete(f"{url}/v1/jobs/{'a' * 32}", headers={"Origin": EVIL})
        assert "serve --cors-origin" in error_message(cancel, 403)
        # DNS rebinding: evil.example resolves to 127.0.0.1; the page is then same-origin
        rebound = {"Host": f"evil.example:{port(url)}"}
        for method, path in (("GET", "/v1/images"), ("GET", "/"), ("GET", "/healthz")):
            response = httpx.request(method, f"{url}{path}", headers=rebound)
            assert "serve --allowed-host" in error_message(response, 403), path
        response = post({**json_type, **rebound, "Origin": f"http://{rebound['Host']}"})
        assert "evil.example" in error_message(response, 403)
        assert not jobs.jobs  # nothing refused was queued

        # the same origin, a client that is no browser, and the loopback names are fine
        same = {"Origin": url, "Sec-Fetch-Site": "same-origin"}
        for headers in (same, {"Sec-Fetch-Site": "none"}, {}):
            assert post({**json_type, **headers}).status_code == 202, headers
        verify = json.dumps({"caption": CAPTION})
        charset = {"Content-Type": "application/json; charset=utf-8"}
        assert post(charset, "/v1/captions/verify", verify).status_code == 200
        for host in ("localhost", "127.0.0.1", "[::1]", "LOCALHOST"):
            for shown in (f"{host}:{port(url)}", host, f"{host}:9"):  # any port
                response = httpx.get(f"{url}/healthz", headers={"Host": shown})
                assert response.status_code == 200, shown


def test_cors_origin_and_allowed_host_let_those_in(pipe, tmp_path):  # noqa: F811
    page = "http://page.example"
    jobs = JobQueue(pipe, tmp_path, max_queue=4)
    app = create_app(jobs, cors_origin=page, allowed_hosts=["ideo.lan"])
    with serving(app) as url:
        verify = {"caption": CAPTION}
        response = httpx.post(
            f"{url}/v1/captions/verify",
            json=verify,
            headers={"Origin": page, "Sec-Fetch-Site": "cross-site"},
        )
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == page
        response = httpx.post(f"{url}/v1/captions/verify", json=verify, headers={"Origin": EVIL})
        assert error_message(response, 403)
        lan = {"Host": f"ideo.lan:{port(url)}"}
        assert httpx.get(f"{url}/v1/images", headers=lan).status_code == 200
        response = httpx.get(f"{url}/v1/images", headers={"Host": "other.lan"})
        assert "serve --allowed-host" in error_message(response, 403)


def test_healthz_says_only_ok_without_the_key(pipe, tmp_path):  # noqa: F811
    jobs = JobQueue(pipe, tmp_path, max_queue=2)
    with serving(create_app(jobs, api_key="k")) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            response = httpx.get(f"{url}/healthz", headers=headers)
            assert response.status_code == 200 and response.json() == {"status": "ok"}
        full = httpx.get(f"{url}/healthz", headers={"Authorization": "Bearer k"}).json()
        assert full == {"status": "ok", "model": jobs.pipe.model_id, "running": [], "queued": 0}


# -- wrong JSON types: a 422 naming the field, never a 500 (item 6) -----------------------------


def broken_idat_png() -> str:
    """A PNG whose IDAT chunk claims 10 bytes: PIL raises SyntaxError ("broken PNG file")."""
    data = png_bytes((64, 64))
    at = data.find(b"IDAT")
    return base64.b64encode(data[: at - 4] + struct.pack(">I", 10) + data[at:]).decode()


BAD_JOBS = {
    "width-str": ('"width": "256"', "width"),
    "steps-list": ('"num_steps": [2]', "num_steps"),
    "seed-inf": ('"seed": Infinity', "seed"),
    "seed-minus-inf": ('"seed": -Infinity', "seed"),
    "mu-str": ('"mu": "abc"', "mu"),
    "preset-list": ('"preset": [1]', "preset"),
    "strength-str": ('"strength": "0.5", "image": "PNG"', "strength"),
    "prompt-surrogate": ('"prompt": "a \\ud800 sign"', "prompt"),
    "guidance-nan": ('"guidance_schedule": [7, NaN]', "guidance_schedule"),
    "image-broken-idat": ('"image": "BROKEN"', "image"),
}


@pytest.mark.parametrize("field, name", BAD_JOBS.values(), ids=BAD_JOBS.keys())
def test_wrong_json_types_get_422_naming_the_field(url, field, name):
    # JSON text, as a client could send it; the field comes last, and a later key wins
    settings = {"width": 256, "height": 256, "preset": "V4_TURBO_12", "num_steps": 1}
    body = json.dumps({"prompt": "a sign", **settings})[:-1] + ", " + field + "}"
    body = body.replace('"PNG"', json.dumps(base64.b64encode(png_bytes((64, 64))).decode()))
    body = body.replace('"BROKEN"', json.dumps(broken_idat_png()))
    response = httpx.post(
        f"{url}/v1/jobs", content=body, headers={"Content-Type": "application/json"}, timeout=60
    )
    message = error_message(response, 422)
    assert name in message and "\n" not in message, message


@pytest.mark.parametrize(
    "field, name",
    [('"seed": "5"', "seed"), ('"seed": 1.5', "seed"), ('"seed": Infinity', "seed")],
    ids=["seed-str", "seed-float", "seed-inf"],
)
def test_openai_route_wrong_types_get_422_naming_the_field(url, field, name):
    body = '{"prompt": "a sign", "size": "256x256", "num_steps": 1, "n": 2, ' + field + "}"
    response = httpx.post(
        f"{url}/v1/images/generations",
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    message = error_message(response, 422)
    assert name in message and "\n" not in message, message


def test_serve_allowed_hosts_and_its_one_line_on_removed_temporary_pngs(
    monkeypatch, tiny_checkpoint, tmp_path
):
    monkeypatch.delenv("IDEO4_API_KEY", raising=False)
    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: apps.append(app))
    (tmp_path / f".{'b' * 32}.png.k2j_8x0q.tmp").write_bytes(b"half a PNG")
    result = cli(
        "serve", "--host", "ideo.box", "--no-auth", "--allowed-host", "ideo.lan",
        "--allowed-host", "Photos.Home", "--model", tiny_checkpoint, "--dtype", "float32",
        "--output-dir", tmp_path,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (line,) = [line for line in result.output.splitlines() if "temporary" in line]
    assert line.startswith(f"warning: removed 1 temporary PNG file(s) in {tmp_path}")
    with serving(apps[0]) as url:
        for host in ("ideo.box", "ideo.lan:8000", "photos.home", "localhost:1", "10.0.0.7"):
            assert httpx.get(f"{url}/healthz", headers={"Host": host}).status_code == 200, host
        response = httpx.get(f"{url}/healthz", headers={"Host": "ideo.lan.evil.example"})
        assert "serve --allowed-host ideo.lan.evil.example" in error_message(response, 403)


# -- an upload is decoded off the event loop (item 3) -------------------------------------------


@pytest.mark.parametrize("route", ["/v1/jobs", "/v1/images/generations"])
def test_decoding_an_upload_leaves_the_event_loop_free(url, monkeypatch, route):
    """While the image is decoded, /healthz answers: the decode waits (up to 30 s) for that
    answer, so on the event loop it would wait in vain and the answer come after it."""
    decoding, answered, waited = threading.Event(), threading.Event(), []
    real = app_module.decode_image

    def decode_once_healthz_answered(value, name):
        decoding.set()
        waited.append(answered.wait(30))
        return real(value, name)

    monkeypatch.setattr(app_module, "decode_image", decode_once_healthz_answered)
    image = base64.b64encode(png_bytes((1024, 1024))).decode()
    body = {**JOB, "image": image, "num_steps": 1, "seed": 1}
    if route != "/v1/jobs":
        body = {**body, "size": "256x256", "response_format": "url"}
        del body["width"], body["height"]
    posted = []

    def post():
        posted.append(httpx.post(url + route, json=body, timeout=WAIT))

    upload = threading.Thread(target=post)
    upload.start()
    assert decoding.wait(WAIT)
    start = time.monotonic()
    health = httpx.get(f"{url}/healthz", timeout=WAIT)
    took = time.monotonic() - start
    answered.set()
    upload.join(WAIT)
    assert health.status_code == 200 and waited == [True], f"/healthz took {took:.1f} s"
    assert posted[0].status_code in (200, 202), posted[0].text


# -- ended jobs let go of their input images (item 2) -------------------------------------------


def resident_bytes() -> int | None:
    """This process's RSS after a full collection, with freed memory handed back to the system
    (MLX's buffer cache and glibc's heap keep it otherwise); None where /proc is absent."""
    gc.collect()
    mx.clear_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    kb = next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(kb) * 1024


def test_ended_edit_jobs_let_go_of_their_input_images(pipe, tmp_path, monkeypatch):  # noqa: F811
    decoded = []  # a weak reference to each input image the server decodes
    real = app_module.decode_image

    def recorded(value, name):
        image = real(value, name)
        decoded.append(weakref.ref(image))
        return image

    monkeypatch.setattr(app_module, "decode_image", recorded)
    jobs = JobQueue(pipe, tmp_path, max_queue=8)
    rng = np.random.default_rng(0)  # noise: a solid image could be stored in less memory
    noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    image = Image.fromarray(noise).resize((4096, 4096), Image.NEAREST)  # 48 MB, a small PNG
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    edit = {**JOB, "image": base64.b64encode(buffer.getvalue()).decode(), "num_steps": 1}
    del image, buffer
    with serving(create_app(jobs)) as url, httpx.Client(base_url=url, timeout=WAIT) as api:
        baseline = resident_bytes()
        with worker_held(jobs):
            ids = [api.post("/v1/jobs", json={**edit, "seed": i}).json()["id"] for i in range(6)]
            held = resident_bytes()
            for job_id in ids[:5]:  # cancelled while queued; the last one runs to the end
                assert api.delete(f"/v1/jobs/{job_id}").json()["state"] == "cancelled"
        assert jobs.wait(jobs.get(ids[-1]), WAIT).state == "done"
        jobs.run(lambda: None)  # the worker has let go of the last job it ran
        after = resident_bytes()
        assert len(decoded) == 6 and [ref() for ref in decoded] == [None] * 6
        assert api.get("/v1/jobs").json()["data"][0]["state"] == "cancelled"  # still listed
    if baseline is not None:
        grew, kept = (held - baseline) / 2**20, (after - baseline) / 2**20
        assert grew > 6 * 40 and kept < grew / 4, f"grew {grew:.0f} MB, kept {kept:.0f} MB"


# -- temporary PNGs left by a killed server (item 10) -------------------------------------------

# A server stand-in: a JobQueue on the folder whose worker is writing a PNG (save_png's way)
# when it is killed.
WRITER = """
import sys, time
from ideogram4_mlx.files import write_file
from ideogram4_mlx.server.jobs import JobQueue

JobQueue(None, sys.argv[1])
def write(f):
    f.write(b"half a PNG")
    f.flush()
    print("writing", flush=True)
    time.sleep(120)
write_file(sys.argv[1] + "/" + "f" * 32 + ".png", write)
"""


def queue_warnings(pipe, folder) -> tuple[JobQueue, list[str]]:  # noqa: F811
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jobs = JobQueue(pipe, folder, max_queue=2)
    return jobs, [str(w.message) for w in caught]


def test_temporary_pngs_of_a_killed_server_are_removed_at_start(pipe, tmp_path):  # noqa: F811
    folder = tmp_path / "out"
    folder.mkdir()
    ours = save_png(Image.new("RGB", (16, 16)), folder / ("a" * 32 + ".png"), {"prompt": "x"})
    leftover = folder / f".{'b' * 32}.png.k2j_8x0q.tmp"
    leftover.write_bytes(b"half a PNG")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    kept = [
        folder / f".{'c' * 32}.png.abcdefgh.tmp",  # a link with our temporary name
        folder / ".notes.txt.abcdefgh.tmp",  # another program's temporary file
        folder / f".{'d' * 32}.png.abcdefgh.partial",
    ]
    kept[0].symlink_to(victim)
    kept[1].write_text("not ours")
    kept[2].mkdir()
    jobs, said = queue_warnings(pipe, folder)
    jobs.shutdown()
    assert not leftover.exists() and not leftover.is_symlink()
    assert len(said) == 1 and "removed 1 temporary PNG" in said[0] and str(folder) in said[0]
    assert all(p.exists() or p.is_symlink() for p in kept) and victim.read_text() == "keep"
    assert read_metadata(ours) == {"prompt": "x"}

    # a live server writing into the folder: its temporary file stays, until it is killed
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(folder)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout.readline() == "writing\n"
        (writing,) = folder.glob(f".{'f' * 32}.png.*.tmp")
        jobs, said = queue_warnings(pipe, folder)
        jobs.shutdown()
        assert said == [] and writing.exists()
    finally:
        writer.kill()  # SIGKILL: no cleanup runs
        writer.wait()
    jobs, said = queue_warnings(pipe, folder)
    jobs.shutdown()
    assert not writing.exists() and len(said) == 1 and "removed 1" in said[0]
    assert all(p.exists() or p.is_symlink() for p in kept) and ours.exists()


# -- the body limit counts every chunk ----------------------------------------------------------


def test_body_limit_adds_up_chunks_each_under_the_limit():
    """Four 400-byte chunks, no Content-Length, against a 1000-byte limit: a 413 once the
    third arrives (a per-chunk count would let all four through)."""

    async def route(scope, receive, send):  # reads the whole body, as a route does
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(len(body)).encode()})

    async def call(chunks: list[bytes]) -> tuple[int, bytes]:
        messages = [
            {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
            for i, c in enumerate(chunks)
        ]
        sent = []

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/jobs", "headers": []}
        await BodyLimit(route, max_bytes=1000)(scope, receive, send)
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return sent[0]["status"], body

    status, body = asyncio.run(call([b"x" * 400] * 4))
    assert status == 413 and b"over the server's limit of 1000 bytes" in body
    assert asyncio.run(call([b"x" * 400] * 2)) == (200, b"800")
