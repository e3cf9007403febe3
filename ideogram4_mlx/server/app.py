"""The HTTP API (FastAPI) over a :class:`~ideogram4_mlx.server.jobs.JobQueue`.

Routes: ``/`` (the web page), ``/healthz``, ``/v1/models``, ``/v1/images/generations`` (the
OpenAI Images API shape), ``/v1/jobs`` (native jobs, server-sent events, cancel),
``/v1/images`` (results), ``/v1/captions/verify``, ``/v1/magic-prompt``, ``/v1/describe`` (an
image as a caption; a job with ``remix`` describes its ``image`` first). A job (and an OpenAI
request) may ask to check its lettering: ``check_text``, ``retry_text``, ``ocr``,
``text_threshold`` (``text_retry.text_check_from``; docs/TEXT_CHECK.md). Bad input is a 422
with the message the CLI prints; a full queue a 429 with ``Retry-After``. Clients never name
files: images come and go as base64 or as server-named PNGs in the output folder.

Browsers: a ``Host`` that names no address of this server is refused (DNS rebinding), and so
is a POST or DELETE from another site's page (``Origin``, ``Sec-Fetch-Site``) unless it is the
``cors_origin``; a POST body must be ``application/json``, which no page can send cross-site
without a CORS preflight.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import time
from collections.abc import Iterator, Sequence
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, HTTPException, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool

from ideogram4_mlx.batch import image_requests
from ideogram4_mlx.edit import MAX_INPUT_PIXELS
from ideogram4_mlx.errors import Ideo4Error, InputError
from ideogram4_mlx.request import (
    ALIASES,
    SETTINGS,
    GenerationRequest,
    caption_findings,
    field_names,
)
from ideogram4_mlx.server.hosts import LOOPBACK_NAMES, host_name, is_ip_address
from ideogram4_mlx.server.jobs import TERMINAL, JobQueue, QueueFull
from ideogram4_mlx.text_retry import TextCheck, text_check_from
from ideogram4_mlx.version import __version__

MAX_BODY_BYTES = 32 * 2**20  # room for a base64 input image and mask
MAX_IMAGES = 4  # n of one OpenAI request
RETRY_AFTER_SECONDS = 5
EVENT_POLL_SECONDS = 1.0
# OpenAI fields a client may send that do not change an Ideogram 4 image.
IGNORED_OPENAI_FIELDS = ("model", "user", "quality", "style", "background", "moderation")
# Request fields a client never sets: fingerprints come from the images it sends.
CLIENT_SETTINGS = tuple(k for k in SETTINGS if k not in ("image_sha256", "mask_sha256"))
# POST /v1/describe's fields: the image (base64), and pipe.describe's own.
DESCRIBE_FIELDS = ("image", "idea", "seed", "keep_bboxes")
# The lettering check's fields (not request fields: they ride on the job).
TEXT_FIELDS = ("check_text", "retry_text", "ocr", "text_threshold")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")  # change nothing: any page may send them
# Exceptions that bad settings raise in the request's checks (besides our BadRequest).
BAD_SETTINGS = (ValueError, TypeError, ArithmeticError, OSError)


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """The OpenAI error shape (the ``openai`` client reads ``error.message``)."""
    body = {"error": {"message": message, "type": "invalid_request_error", "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a body over ``max_bytes`` is a 413, whether it declares its length or
    is sent in chunks (counted as the route reads it; nothing is buffered here)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def too_large(self, scope, receive, send) -> None:
        n = self.max_bytes
        limit = f"{n // 2**20} MiB" if n >= 2**20 else f"{n} bytes"
        message = f"the request body is over the server's limit of {limit} (serve --max-body-mb)"
        await error(413, message)(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self.too_large(scope, receive, send)
        seen, over, started = 0, False, False

        async def counted():
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    over = True
                    raise BodyTooLarge  # stops the route's read; answered below
            return message

        async def watched(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except Exception:  # BodyTooLarge, possibly wrapped by the middleware between
            if not over or started:
                raise
            await self.too_large(scope, receive, send)


class HostCheck:
    """ASGI middleware: refuse a ``Host`` that is not this server's. A page whose own name an
    attacker re-points at 127.0.0.1 (DNS rebinding) is same-origin with the server; its
    requests still carry that name. An IP address cannot be re-pointed, so any is accepted,
    as is any port (tunnels and proxies change it; the name is what tells a page apart)."""

    def __init__(self, app, allowed_hosts: Sequence[str] = ()):
        self.app = app
        self.names = {*LOOPBACK_NAMES, *(host_name(h) for h in allowed_hosts)}

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        name = host_name(host)
        if name in self.names or is_ip_address(name):
            return await self.app(scope, receive, send)
        message = (
            f"the Host {host!r} is not a name of this server (a page may be re-pointing its "
            f"own name at it); to serve under it: serve --allowed-host {name or 'NAME'}"
        )
        await error(403, message)(scope, receive, send)


def origin_host(origin: str) -> str:
    """ "http://127.0.0.1:8000" -> "127.0.0.1:8000" (the Host its page's requests carry)."""
    try:
        return urlsplit(origin).netloc.lower()
    except ValueError:  # e.g. an unclosed "[" of an IPv6 address
        return ""


def cross_site(request: Request, cors_origin: str | None) -> str | None:
    """Why a state-changing request is refused as another site's, or None. Browsers send
    ``Sec-Fetch-Site`` (and ``Origin``) and pages cannot forge them; clients that are not
    browsers send neither, and are not refused."""
    origin, site = request.headers.get("origin"), request.headers.get("sec-fetch-site")
    if origin is not None and origin == cors_origin:
        return None
    if site in ("same-origin", "none"):  # the server's own page; a bookmark or the URL bar
        return None
    if site is None and origin is None:
        return None
    if site is None and origin_host(origin) == request.headers.get("host", "").lower():
        return None  # a browser without Sec-Fetch-Site, on the server's own page
    return (
        f"refused a {request.method} from {origin or 'another site'}'s page: this server takes "
        "them only from its own page; to allow one other page, start it with "
        "serve --cors-origin ORIGIN"
    )


def not_json(request: Request) -> str | None:
    """Why the body's Content-Type is refused, or None: a POST body is JSON, and a page can
    send that cross-site only after a CORS preflight (text/plain and forms need none)."""
    kind = request.headers.get("content-type")
    if kind is None and request.method != "POST":
        return None  # DELETE: no body
    if kind is not None and kind.split(";")[0].strip().lower() == "application/json":
        return None
    return (
        f"send the body as JSON with Content-Type: application/json "
        f"(got {kind or 'no Content-Type'})"
    )


class BadRequest(Exception):
    def __init__(self, message: str):
        self.message = message


class NotFinite:
    """What the JSON parser puts where a body has NaN or Infinity (Python's parser accepts
    them; JSON has no such numbers), so the field holding one can be named."""

    def __init__(self, text: str):
        self.value = float(text)


def parse_json(raw: bytes) -> Any:
    """A request body as JSON: NaN, Infinity and lone surrogates are refused naming the field
    (a surrogate cannot be encoded again, e.g. into a PNG's metadata or an error message)."""
    try:
        body = json.loads(raw, parse_constant=NotFinite)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise BadRequest(f"the request body is not JSON ({e})") from None
    fields = body.items() if isinstance(body, dict) else [("the request body", body)]
    for name, value in fields:
        check_value(name, value)
    return body


def check_value(name: str, value: Any) -> None:
    """``value`` (at any depth, keys included) holds no NaN, Infinity or lone surrogate."""
    shown = name.encode(errors="backslashreplace").decode()
    stack = [(value, False)]
    while stack:  # not recursive: a body may nest as deep as the parser allows
        item, nested = stack.pop()
        if isinstance(item, NotFinite):
            holds = "hold finite numbers" if nested else "be a finite number"
            raise BadRequest(f"{shown} must {holds}, got {item.value}")
        if isinstance(item, str) and not item.isascii():
            try:
                item.encode()
            except UnicodeEncodeError as e:
                bad = e.object[e.start : e.end].encode(errors="backslashreplace").decode()
                message = f"{shown} holds a lone surrogate ({bad}): send UTF-8 text"
                raise BadRequest(message) from None
        elif isinstance(item, dict):
            stack.extend((v, True) for pair in item.items() for v in pair)
        elif isinstance(item, list):
            stack.extend((v, True) for v in item)


def decode_image(value: Any, name: str) -> Image.Image:
    """A base64 PNG/JPEG/WebP (or a ``data:`` URL of one) -> a loaded PIL image; never a path."""
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a base64-encoded image (or a data: URL)")
    payload = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(
            f"{name} is not base64 image data (the server reads no file paths)"
        ) from None
    try:
        image = Image.open(io.BytesIO(raw))
        if image.width * image.height > MAX_INPUT_PIXELS:
            raise BadRequest(f"{name} is {image.width}x{image.height}, over the input limit")
        image.load()
    # PIL raises SyntaxError for a broken chunk ("broken PNG file")
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadRequest(f"{name} cannot be read as an image ({e})") from None
    return image


def request_from_json(body: Any) -> GenerationRequest:
    """A ``GenerationRequest`` from the native job JSON (its field names; images as base64)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    unknown = sorted(set(body) - set(CLIENT_SETTINGS) - set(ALIASES))
    if unknown:
        valid = ", ".join((*CLIENT_SETTINGS, *TEXT_FIELDS))
        raise BadRequest(f"unknown field(s) {unknown}; valid: {valid}")
    try:
        fields = field_names(body)  # "steps" for "num_steps", as the CLI and Python take it
    except InputError as e:
        raise BadRequest(str(e)) from None
    for name in ("image", "mask"):
        if fields.get(name) is not None:
            fields[name] = decode_image(fields[name], name)
    if "prompt" not in fields and fields.get("remix") is not True:
        raise BadRequest("the request needs a prompt")
    try:
        return GenerationRequest(**fields)
    except BAD_SETTINGS as e:
        raise BadRequest(str(e)) from None


def describe_json(body: Any) -> dict:
    """``POST /v1/describe`` -> ``pipe.describe``'s keywords, the image decoded."""
    if not isinstance(body, dict) or body.get("image") is None:
        raise BadRequest('send {"image": BASE64} (and optionally idea, seed, keep_bboxes)')
    unknown = sorted(set(body) - set(DESCRIBE_FIELDS))
    if unknown:
        raise BadRequest(f"unknown field(s) {unknown}; valid: {', '.join(DESCRIBE_FIELDS)}")
    fields = {k: v for k, v in body.items() if v is not None}
    return {**fields, "image": decode_image(body["image"], "image")}


def text_check_json(body: dict) -> TextCheck | None:
    """The lettering check ``body`` asks for (None: none), its fields taken out of it; null
    is a field left out. ``text_check_from`` checks them."""
    given = {k: body.pop(k) for k in TEXT_FIELDS if k in body}
    given = {k: v for k, v in given.items() if v is not None}
    check_text = given.get("check_text", False)
    if not isinstance(check_text, bool):
        raise BadRequest(f"check_text must be true or false, got {check_text!r}")
    try:
        return text_check_from(
            check_text, given.get("retry_text", 0), given.get("ocr"), given.get("text_threshold")
        )
    except InputError as e:
        raise BadRequest(str(e)) from None


def job_from_json(body: Any) -> tuple[GenerationRequest, TextCheck | None]:
    """``POST /v1/jobs`` -> the request and the lettering check it asks for (or None)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    body = dict(body)
    check = text_check_json(body)
    return request_from_json(body), check


def openai_requests(body: Any) -> tuple[list[GenerationRequest], str, TextCheck | None]:
    """``POST /v1/images/generations`` -> one request per image, the response format and the
    lettering check (each image checked; retries only for one image: image i has seed + i)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    body = {k: v for k, v in body.items() if k not in IGNORED_OPENAI_FIELDS}
    check = text_check_json(body)
    n = body.pop("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_IMAGES:
        raise BadRequest(f"n {n!r} is out of range: use 1..{MAX_IMAGES}")
    if check is not None and check.tries > 1 and n > 1:
        raise BadRequest(
            f"retry_text {check.tries} with n {n}: image i has seed + i, so the retries of one "
            "would be the seeds of the next; ask for one image, or check_text without retries"
        )
    response_format = body.pop("response_format", "b64_json")
    if response_format not in ("b64_json", "url"):
        raise BadRequest(f"response_format {response_format!r}: use b64_json or url")
    output_format = body.pop("output_format", None)
    if output_format not in (None, "png"):
        raise BadRequest(f"output_format {output_format!r}: only png")
    size = body.pop("size", None)
    if size not in (None, "auto"):
        try:
            width, height = (int(v) for v in str(size).lower().split("x"))
        except ValueError:
            raise BadRequest(f"size {size!r} is not WIDTHxHEIGHT (e.g. 1024x1024)") from None
        body.update(width=width, height=height)
    # image i gets seed + i (a random start when None), as generate --num-images
    return image_requests(request_from_json(body), n), response_format, check


def create_app(
    jobs: JobQueue,
    api_key: str | None = None,
    cors_origin: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    allowed_hosts: Sequence[str] = (),
) -> FastAPI:
    """The application; ``jobs`` holds the loaded pipeline (shut down with the app).
    ``allowed_hosts``: names besides localhost and IP addresses that ``Host`` may give (serve
    passes its ``--host`` and each ``--allowed-host``)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        # Ctrl-C: cancel what is queued, stop the running job after its step; PNGs are
        # written atomically, so nothing half-done is left.
        await run_in_threadpool(jobs.shutdown)

    app = FastAPI(title="ideogram4-mlx", version=__version__, lifespan=lifespan)

    def authorized(request: Request) -> bool:
        given = request.headers.get("authorization", "")
        return api_key is None or hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.method not in SAFE_METHODS:
            refused = cross_site(request, cors_origin)
            if refused is not None:
                return error(403, refused)
            refused = not_json(request)
            if refused is not None:
                return error(415, refused)
        if request.url.path.startswith("/v1/") and not authorized(request):
            return error(401, "missing or wrong API key: send Authorization: Bearer KEY")
        return await call_next(request)

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    # Added after the guard, so outside it: preflights (no key) and 401s get CORS headers.
    if cors_origin:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=[cors_origin],
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(HostCheck, allowed_hosts=allowed_hosts)  # outermost: every request

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest):
        return error(422, exc.message)

    async def read_json(request: Request, build=lambda body: body) -> Any:
        """The body parsed, then ``build(body)``, in a worker thread: a large upload's JSON
        and image decoding must not hold the event loop (and every other request)."""
        raw = await request.body()
        return await run_in_threadpool(lambda: build(parse_json(raw)))

    async def submit(requests: list[GenerationRequest], check: TextCheck | None = None) -> list:
        try:
            return await run_in_threadpool(jobs.submit_all, requests, check)
        except QueueFull as e:
            raise HTTPException(429, str(e), {"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        except (*BAD_SETTINGS, Ideo4Error) as e:  # the CLI's checks and messages; no OCR
            raise BadRequest(str(e)) from None

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail), exc.headers)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return resources.files("ideogram4_mlx.server").joinpath("static/index.html").read_text()

    @app.get("/healthz")
    async def health(request: Request) -> dict:
        if not authorized(request):  # the model and job ids are for key holders
            return {"status": "ok"}
        held = jobs.snapshot()
        running = [j.id for j in held if j.state == "running"]
        queued = sum(1 for j in held if j.state == "queued")
        return {"status": "ok", "model": jobs.pipe.model_id, "running": running, "queued": queued}

    @app.get("/v1/models")
    async def models() -> dict:
        entry = {"id": jobs.pipe.model_id, "object": "model", "owned_by": "ideogram4-mlx"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/images/generations")
    async def openai_generate(request: Request) -> dict:
        requests, response_format, check = await read_json(request, openai_requests)
        accepted = await submit(requests, check)  # all n, or a 429 for all
        data = []
        for job in accepted:
            await run_in_threadpool(jobs.wait, job)
            if job.state != "done":
                raise HTTPException(500, f"job {job.id} {job.state}: {job.error or ''}".strip())
            if response_format == "url":
                data.append({"url": str(request.base_url) + f"v1/images/{job.id}.png"})
            else:
                encoded = base64.b64encode(job.path.read_bytes()).decode()
                data.append({"b64_json": encoded, "revised_prompt": job.metadata["prompt"]})
            if check is not None:  # an extension, like the fields that asked for it
                data[-1].update(seed=job.metadata["seed"], text_scores=job.text_scores)
        return {"created": int(time.time()), "data": data}

    @app.post("/v1/jobs", status_code=202)
    async def create_job(request: Request) -> dict:
        generation, check = await read_json(request, job_from_json)
        (job,) = await submit([generation], check)
        return job.summary()

    @app.get("/v1/jobs")
    async def list_jobs() -> dict:
        return {"data": [j.summary() for j in jobs.snapshot()]}

    def find(job_id: str):
        job = jobs.get(job_id)
        if job is None:
            message = f"no job {job_id} (unknown, or ended long ago: see /v1/images)"
            raise HTTPException(404, message)
        return job

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str) -> dict:
        return find(job_id).summary()

    @app.delete("/v1/jobs/{job_id}")
    async def cancel_job(job_id: str) -> dict:
        find(job_id)
        return jobs.cancel(job_id).summary()

    @app.get("/v1/jobs/{job_id}/events")
    async def job_events(job_id: str) -> StreamingResponse:
        job = find(job_id)

        def stream() -> Iterator[str]:
            sent = 0
            while True:
                events = jobs.events_since(job, sent, EVENT_POLL_SECONDS)
                for event in events:
                    yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
                sent += len(events)
                if job.state in TERMINAL and sent >= len(job.events):
                    return
                if not events:
                    yield ": waiting\n\n"  # a comment: keeps proxies from closing the stream

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.get("/v1/images")
    async def results() -> dict:
        return {"data": await run_in_threadpool(jobs.results)}

    @app.get("/v1/images/{name}")
    async def image(name: str) -> FileResponse:
        path = jobs.image_path(name)
        if path is None:
            raise HTTPException(404, f"no image {name}")
        return FileResponse(path, media_type="image/png")

    @app.post("/v1/captions/verify")
    async def verify(request: Request) -> dict:
        body = await read_json(request)
        caption = body.get("caption") if isinstance(body, dict) else None
        if isinstance(caption, dict):
            caption = json.dumps(caption, ensure_ascii=False)
        if not isinstance(caption, str) or not caption.strip():
            raise BadRequest('send {"caption": "..."} with a caption (JSON text or object)')
        return {"findings": caption_findings(caption)}

    @app.post("/v1/magic-prompt")
    async def magic_prompt(request: Request) -> dict:
        body = await read_json(request)
        if not isinstance(body, dict) or not isinstance(body.get("idea"), str):
            raise BadRequest('send {"idea": "..."} (and optionally width, height, seed)')
        # the request's size and seed; the rest is serve's command line (pipe.options)
        options = {k: body[k] for k in ("width", "height", "seed") if body.get(k) is not None}
        try:
            caption = await run_in_threadpool(
                jobs.run, lambda: jobs.pipe.expand(body["idea"], **options)
            )
        except BAD_SETTINGS as e:
            raise BadRequest(str(e)) from None
        return {"caption": caption, "findings": caption_findings(caption)}

    @app.post("/v1/describe")
    async def describe(request: Request) -> dict:
        fields = await read_json(request, describe_json)
        try:  # on the worker thread, between jobs, as the magic prompt
            caption = await run_in_threadpool(jobs.run, lambda: jobs.pipe.describe(**fields))
        except BAD_SETTINGS as e:
            raise BadRequest(str(e)) from None
        return {"caption": caption, "findings": caption_findings(caption)}

    return app
