"""Renders one chat template for ``prompt.render_chat`` in a fresh interpreter (run as a
script with ``python -I``; it imports only jinja2, never this package). It renders as
transformers does (its sandboxed environment, filters and globals) under a wall-clock timer
(loops), a CPU limit (a long C call), a memory limit and an output cap, reads one JSON job on
stdin and answers one JSON line: ``{"text": ...}`` or ``{"error": ...}``.
"""

import json
import math
import resource
import signal
import sys
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment


def answer(**reply):
    signal.setitimer(signal.ITIMER_REAL, 0)
    sys.stdout.write(json.dumps(reply))
    sys.exit(0)


class OutOfTime(BaseException):  # not an Exception: no `except Exception` in jinja swallows it
    pass


def out_of_time(signum, frame):
    raise OutOfTime


class Generation(jinja2.ext.Extension):  # transformers' {% generation %} tag: the body as is
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        call = self.call_method("_body")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def set_limits(seconds: float, memory: int) -> None:
    """Memory (Linux: RLIMIT_AS over the current size), CPU time, and a SIGALRM timer."""
    try:
        with open("/proc/self/statm") as f:
            size = int(f.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (size + memory, size + memory))
    except (OSError, ValueError):
        pass  # no /proc (macOS), or a lower limit already: time and the output cap still hold
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = math.ceil(usage.ru_utime + usage.ru_stime + seconds)
    try:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    except ValueError:
        pass  # a lower CPU limit already
    signal.signal(signal.SIGALRM, out_of_time)
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.1)  # and again every 0.1 s until answered


def render(job: dict) -> None:
    seconds, memory, max_chars = job["seconds"], job["memory"], job["max_chars"]
    set_limits(seconds, memory)
    try:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
        pieces, length = [], 0
        for piece in env.from_string(job["template"]).generate(**job["variables"]):
            length += len(piece)
            if length > max_chars:
                answer(error=f"it wrote over {max_chars} characters")
            pieces.append(piece)
        answer(text="".join(pieces))
    except OutOfTime:
        answer(error=f"it ran over {seconds:g} s")
    except MemoryError:
        answer(error=f"MemoryError: it needed over {memory >> 20} MiB")
    except Exception as e:  # a template error, or any exception the template's code raised
        answer(error=" ".join(f"{type(e).__name__}: {e}".split())[:300])


if __name__ == "__main__":
    render(json.loads(sys.stdin.read()))
