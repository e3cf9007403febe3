"""The server's work queue: one loaded pipeline, one worker thread, jobs run one at a time.

A job is a ``GenerationRequest`` checked before it is queued (``Ideogram4Pipeline.check``: the
same checks and messages as the CLI). The worker iterates the job's ``Generation``, records an
event per step (and a preview every ``preview_every`` steps), honours a cancel between steps,
and writes the PNG atomically into the output folder under a server-chosen name. A job that
checks its lettering (a ``text_retry.TextCheck``) runs through ``generate_checked``: each try is
one such run, every try's score lines become ``text`` events, and the kept image's scores its
summary's ``text_scores``. Everything that touches MLX runs on the worker thread (``run`` hands
it other work, such as a magic prompt), so requests never race on the model.

Each queue holds a shared ``flock`` on its output folder while it lives (the kernel drops it
however the process ends); one that finds no other holder at start removes the temporary PNGs
a killed server left there.
"""

from __future__ import annotations

import base64
import fcntl
import io
import os
import queue
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from ideogram4_mlx.errors import InputError
from ideogram4_mlx.files import temporary_pattern
from ideogram4_mlx.generation import Generation, GenerationResult
from ideogram4_mlx.metadata import read_metadata, save_png
from ideogram4_mlx.pipeline import Ideogram4Pipeline
from ideogram4_mlx.request import GenerationRequest, ResolvedRequest
from ideogram4_mlx.text_check import TextReport
from ideogram4_mlx.text_retry import TextCheck, generate_checked

TERMINAL = ("done", "failed", "cancelled")
PREVIEW_SIDE = 256  # previews are small PNGs: the longer side in pixels
ID_LENGTH = 32  # uuid4 hex
KEEP_ENDED = 256  # ended jobs kept in memory (their PNGs stay listed from disk after that)
KEEP_PREVIEWS = 8  # ended jobs that keep their preview images (data URLs, ~50 KB each)
# save_png writes <id>.png through files.write_file's temporary file
TEMPORARY_PNG = temporary_pattern(rf"[0-9a-f]{{{ID_LENGTH}}}\.png")


class QueueFull(RuntimeError):
    """More unfinished jobs than the queue holds: the client should retry later."""


class Cancelled(Exception):
    """Raised inside the worker when a job is cancelled between steps."""


@dataclass
class Job:
    id: str
    request: GenerationRequest | None  # None once ended: an edit's holds its decoded images
    created: float = field(default_factory=time.time)
    state: str = "queued"
    events: list[dict] = field(default_factory=list)
    error: str | None = None
    path: Path | None = None  # the PNG, once done
    metadata: dict | None = None
    cancel_requested: bool = False
    # check()'s result, so the run does not read an edit's images again; dropped at the end
    resolved: ResolvedRequest | None = None
    text_check: TextCheck | None = None  # the lettering check asked for (None: none)
    text_scores: dict | None = None  # the kept image's, once done (see scores_summary)

    def summary(self) -> dict:
        """The job as the API shows it (no pixels); ``progress`` is its last step event (with
        ``try``/``tries`` for a checked job), ``seed`` the image's once done (a checked job's
        kept seed)."""
        steps = [e for e in self.events if e["type"] == "step"]
        progress = None
        if steps:
            keys = ("step", "num_steps", "t", "eta_seconds", "try", "tries")
            progress = {k: steps[-1][k] for k in keys if k in steps[-1]}
        return {
            "progress": progress,
            "id": self.id,
            "state": self.state,
            "created": self.created,
            "error": self.error,
            "image": f"/v1/images/{self.id}.png" if self.path is not None else None,
            "metadata": self.metadata,
            "seed": self.metadata.get("seed") if self.metadata else None,
            "text_scores": self.text_scores,
            "events": len(self.events),
        }


def scores_summary(scores: TextReport, metadata: dict) -> dict:
    """A kept image's scores as the API shows them: ``TextReport.to_metadata()`` with each
    element's ``lines`` (``"OPEN": found, 1.00``) and ``tried``, the images made."""
    tried = len(metadata.get("text_check", {}).get("tries", ())) or 1
    return {**scores.to_metadata(), "lines": scores.lines(), "tried": tried}


class JobQueue:
    """Holds the jobs; ``max_queue`` bounds the unfinished ones (queued + running)."""

    def __init__(
        self,
        pipe: Ideogram4Pipeline,
        output_dir: Path,
        max_queue: int = 16,
        preview_every: int = 0,
        keep_ended: int = KEEP_ENDED,
    ):
        if max_queue < 1:
            raise InputError(f"max_queue must be >= 1, got {max_queue}")
        if keep_ended < 1:
            raise InputError(f"keep_ended must be >= 1, got {keep_ended}")
        self.pipe = pipe
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._folder_lock: int | None = self._claim_output_dir()
        self.max_queue = max_queue
        self.preview_every = preview_every
        self.keep_ended = keep_ended
        # Insertion-ordered; read it through snapshot()/get() (the worker changes it).
        self.jobs: dict[str, Job] = {}
        self._ended: list[str] = []  # ids of ended jobs still held, oldest first
        self.changed = threading.Condition()
        self._work: queue.Queue = queue.Queue()
        self._unfinished = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="ideo4-worker", daemon=True)
        self._thread.start()

    # -- submitting -----------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, text_check: TextCheck | None = None) -> Job:
        """Check ``request`` (``ValueError``/``OSError`` with the CLI's message) and queue it;
        ``QueueFull`` when ``max_queue`` jobs are unfinished. ``text_check``: check its
        lettering (its OCR engine is made here, once per process: ``ocr.get_engine``)."""
        return self.submit_all([request], text_check)[0]

    def submit_all(
        self, requests: list[GenerationRequest], text_check: TextCheck | None = None
    ) -> list[Job]:
        """Queue all of ``requests`` or none (each checked first; ``QueueFull`` when they do
        not all fit), each with ``text_check``."""
        resolved = [self.pipe.check(request) for request in requests]
        if text_check is not None:  # no OCR engine: one line at submit, before any image
            text_check.engine()
        with self.changed:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if self._unfinished + len(requests) > self.max_queue:
                raise QueueFull(
                    f"{self._unfinished} jobs are queued or running and the limit is "
                    f"{self.max_queue}: {len(requests)} more do not fit"
                )
            created = []
            for request, checked in zip(requests, resolved, strict=True):
                job = Job(uuid.uuid4().hex, request, resolved=checked, text_check=text_check)
                self.jobs[job.id] = job
                self._unfinished += 1
                self._event(job, {"type": "queued", "position": self._unfinished})
                created.append(job)
        for job in created:
            self._work.put(job)
        return created

    def snapshot(self) -> list[Job]:
        """The jobs held now, oldest first (a copy: safe while the worker changes them)."""
        with self.changed:
            return list(self.jobs.values())

    def get(self, job_id: str) -> Job | None:
        with self.changed:
            return self.jobs.get(job_id)

    def run(self, work: Callable[[], object], timeout: float | None = None) -> object:
        """Run ``work`` on the worker thread (between jobs) and return its result."""
        future: Future = Future()
        self._work.put((work, future))
        return future.result(timeout)

    def cancel(self, job_id: str) -> Job | None:
        """Ask a job to stop: a queued one never starts, a running one stops after its step."""
        with self.changed:
            job = self.jobs.get(job_id)
            if job is not None:
                self._cancel(job)
            return job

    def wait(self, job: Job, timeout: float | None = None) -> Job:
        """Block until ``job`` has ended (or ``timeout`` seconds passed)."""
        end = None if timeout is None else time.monotonic() + timeout
        with self.changed:
            while job.state not in TERMINAL:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    break
                self.changed.wait(left)
        return job

    def events_since(self, job: Job, index: int, timeout: float) -> list[dict]:
        """The job's events from ``index`` on, waiting up to ``timeout`` s for a new one."""
        with self.changed:
            if len(job.events) <= index and job.state not in TERMINAL:
                self.changed.wait(timeout)
            return job.events[index:]

    def shutdown(self, timeout: float = 60.0) -> None:
        """Stop taking jobs, cancel what is queued or running, and wait for the worker."""
        with self.changed:
            self._stopping = True
            for job in self.jobs.values():
                self._cancel(job)
        self._work.put(None)
        self._thread.join(timeout)
        # still alive: it may be writing a PNG, so the folder stays claimed until we exit
        if not self._thread.is_alive() and self._folder_lock is not None:
            os.close(self._folder_lock)
            self._folder_lock = None

    # -- results on disk ------------------------------------------------------------------------

    def results(self) -> list[dict]:
        """Every PNG in the output folder with our metadata, newest first (survives restarts)."""
        found = []
        for path in self.output_dir.glob("*.png"):
            if len(path.stem) != ID_LENGTH or path.is_symlink():
                continue
            try:
                metadata = read_metadata(path)
            except (ValueError, OSError):
                continue
            found.append(
                {
                    "id": path.stem,
                    "image": f"/v1/images/{path.name}",
                    "created": path.stat().st_mtime,
                    "metadata": metadata,
                }
            )
        return sorted(found, key=lambda r: r["created"], reverse=True)

    def image_path(self, name: str) -> Path | None:
        """The PNG ``name`` (``<id>.png``) in the output folder, or None: only server names."""
        stem, dot, ext = name.partition(".")
        if ext != "png" or not dot or len(stem) != ID_LENGTH or not stem.isalnum():
            return None
        path = self.output_dir / name
        return path if path.is_file() and not path.is_symlink() else None

    def _claim_output_dir(self) -> int:
        """A shared ``flock`` on the output folder, held while the queue lives. Taken
        exclusively first: when that succeeds no live server writes here, so temporary PNGs
        in it are a killed writer's and go."""
        fd = os.open(self.output_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # another server writes here: its temporary files are its own
            else:
                self._remove_temporary_pngs()
            fcntl.flock(fd, fcntl.LOCK_SH)  # blocks only while another queue starts and cleans
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _remove_temporary_pngs(self) -> None:
        removed = []
        with os.scandir(self.output_dir) as entries:
            for entry in entries:
                # a link is never ours (and never followed): only regular files go
                if TEMPORARY_PNG.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                    Path(entry.path).unlink(missing_ok=True)
                    removed.append(entry.name)
        if removed:
            warnings.warn(
                f"removed {len(removed)} temporary PNG file(s) in {self.output_dir} that a "
                f"server stopped mid-write left (e.g. {removed[0]})",
                stacklevel=4,  # JobQueue's caller
            )

    # -- the worker -----------------------------------------------------------------------------

    def _event(self, job: Job, event: dict) -> None:
        # callers hold self.changed
        job.events.append({"time": round(time.time(), 3), **event})
        self.changed.notify_all()

    def _cancel(self, job: Job) -> None:
        # callers hold self.changed; an ended job stays as it is
        if job.state in TERMINAL:
            return
        job.cancel_requested = True
        if job.state == "queued":
            self._finish(job, "cancelled", {"type": "cancelled"})

    def _finish(self, job: Job, state: str, event: dict) -> None:
        # callers hold self.changed; the summary needs neither request (an edit's hold its
        # input images, ~200 MB decoded at 64 MP) and up to keep_ended jobs stay held
        job.state, job.request, job.resolved = state, None, None
        self._unfinished -= 1
        self._event(job, event)
        self._ended.append(job.id)
        self._prune()

    def _prune(self) -> None:
        """Bound what a long-running server holds: the oldest ended jobs beyond ``keep_ended``
        are forgotten (a client already following one keeps its object; the PNG stays listed
        from disk) and only the newest ``KEEP_PREVIEWS`` ended jobs keep their previews."""
        # callers hold self.changed
        while len(self._ended) > self.keep_ended:
            self.jobs.pop(self._ended.pop(0), None)
        if len(self._ended) > KEEP_PREVIEWS:
            job = self.jobs.get(self._ended[-KEEP_PREVIEWS - 1])
            for i, event in enumerate(job.events if job is not None else ()):
                if "preview" in event:  # a new dict: a stream may be writing out the old one
                    kept = {k: v for k, v in event.items() if k != "preview"}
                    job.events[i] = {**kept, "preview_dropped": True}

    def _loop(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            if isinstance(item, tuple):
                work, future = item
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(work())
                    except BaseException as e:  # handed to the waiting request
                        future.set_exception(e)
                continue
            self._run(item)

    def _run(self, job: Job) -> None:
        with self.changed:
            if job.state != "queued":
                return  # cancelled while queued
            job.state = "running"
            self._event(job, {"type": "started"})
        scores = None
        try:
            check = job.text_check
            if check is None:
                result = self._generate(job, job.resolved or job.request)
            else:
                tries = iter(range(1, check.tries + 1))

                def attempt(request: ResolvedRequest) -> GenerationResult:
                    return self._generate(job, request, (next(tries), check.tries))

                def report(line: str) -> None:
                    with self.changed:
                        self._event(job, {"type": "text", "line": line})

                result = generate_checked(attempt, job.resolved, check, report)
                scores = scores_summary(result.text_scores, result.metadata)
            path = save_png(result.image, self.output_dir / f"{job.id}.png", result.metadata)
        except Cancelled:
            with self.changed:
                self._finish(job, "cancelled", {"type": "cancelled"})
            return
        except Exception as e:  # the server survives a failed job and says why
            with self.changed:
                job.error = str(e) or type(e).__name__
                self._finish(job, "failed", {"type": "failed", "error": job.error})
            return
        with self.changed:
            job.path, job.metadata, job.text_scores = path, result.metadata, scores
            done = {"type": "done", "image": f"/v1/images/{path.name}"}
            if scores is not None:
                done.update(seed=result.metadata.get("seed"), text_scores=scores)
            self._finish(job, "done", done)

    def _generate(
        self,
        job: Job,
        request: GenerationRequest | ResolvedRequest,
        attempt: tuple[int, int] | None = None,
    ) -> GenerationResult:
        """One image of ``job``: a ``step`` event per step (``try``/``tries`` from ``attempt``
        for a checked job's), a preview every ``preview_every``, ``Cancelled`` between steps."""
        generation = self.pipe.start(request)
        start = time.monotonic()
        for step in generation:
            mx.eval(step.latents)
            done = step.index + 1
            eta = (time.monotonic() - start) / done * (step.num_steps - done)
            event = {
                "type": "step",
                "step": done,
                "num_steps": step.num_steps,
                "t": round(step.t, 6),
                "eta_seconds": round(eta, 2),
            }
            if attempt is not None:
                event["try"], event["tries"] = attempt
            if self.preview_every and done % self.preview_every == 0:
                event["preview"] = self._preview(generation, step.latents)
            with self.changed:
                self._event(job, event)
                if job.cancel_requested:
                    raise Cancelled
        return generation.result()

    def _preview(self, generation: Generation, latents: mx.array) -> str:
        """A small PNG of the current latents, as a data URL (a full VAE decode)."""
        image = generation.preview(latents)
        scale = PREVIEW_SIDE / max(image.size)
        if scale < 1:
            image = image.resize(
                (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
            )
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
