"""The package's import graph: no cycle, and no module imports one on a floor above its own.

Every import counts, at module level or inside a function, under ``if TYPE_CHECKING`` too, read
with ``ast`` (nothing is imported). ``import ideogram4_mlx.a.b`` and ``from ideogram4_mlx.a import
b`` are edges to ``a.b`` only: Python runs the packages' ``__init__`` on the way, but a package's
``__init__`` is its front door, not its dependency. ``from ideogram4_mlx import __version__`` is
an edge to the package root, which imports the pipeline.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "ideogram4_mlx"
# Where each package's modules live (pyproject's package-dir): cli/ and convert/ are installed
# as ideogram4_mlx.cli and ideogram4_mlx.convert.
SOURCES = {PACKAGE: ROOT / "ideogram4_mlx", "cli": ROOT / "cli", "convert": ROOT / "convert"}

# Bottom to top. A module may import modules on its own floor or below, never above. A name
# covers a module and, unless a longer name is listed, everything under it ("cli" is cli/*);
# "ideogram4_mlx" is the package root (its __init__). A new module gets a line here.
FLOORS = [
    # The error base every module raises from: imports nothing of the package.
    ("errors", ["errors"]),
    # Definitions and pure helpers: import nothing of the package but the error base.
    ("leaves", ["version", "constants", "config", "dtypes", "caption", "sampler",
                "quantization", "files", "template_child"]),
    # Reading checkpoints and the machine; the layers the models share; an edit's inputs.
    # OCR engines (reading an image's text). The checkpoint formats decoded on the way in.
    ("loading", ["weights", "hub", "environment", "layers", "latents", "edit", "catalog",
                 "ocr", "sources"]),
    # The models, one a file, LoRA on top of them, the DiT's step cache and a DiT loaded
    # from a single weight file.
    ("models", ["text_encoder", "dit_sequence", "transformer", "vae", "vae_strips", "lora",
                "lora_spec", "lora_info", "uncond_delta", "step_cache", "dit_file"]),
    # What a generation is made of: the request, the encoded prompt, the memory plan, the
    # CFG-parallel ranks, the load options, the PNG metadata, the magic prompt, the scores of
    # an image's text, an image described as a caption (Qwen3-VL on the magic prompt's head).
    ("stages", ["request", "prompt", "memory", "distributed", "pipeline_options", "metadata",
                "magic", "text_check", "describe"]),
    # One generation in flight, handed its components; many images of one request; the
    # retries of its text check.
    ("generation", ["generation", "batch", "text_retry"]),
    # LoRA training: the dataset and its caches, the objective, one step on the DiT and its
    # LoRA, the loop, the saved file (handed a pipeline, never importing it).
    ("training", ["train"]),
    # Loads the components and starts generations; the package root re-exports it.
    ("pipeline", ["pipeline", PACKAGE]),
    # Consumers of the pipeline and tools beside it.
    ("consumers", ["previews", "server", "reference", "convert", "synth"]),
    # The commands.
    ("commands", ["cli", "__main__"]),
]  # fmt: skip


def modules() -> dict[str, Path]:
    """Every module, by its name under the package ("pipeline", "magic.model", "cli.generate";
    the root is "ideogram4_mlx")."""
    found = {}
    for prefix, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            if prefix != PACKAGE:
                parts.insert(0, prefix)
            found[".".join(parts) or PACKAGE] = path
    return found


def short(dotted: str) -> str | None:
    """``ideogram4_mlx.a.b`` -> ``a.b``; None for another package's module."""
    if dotted == PACKAGE:
        return PACKAGE
    return dotted.removeprefix(PACKAGE + ".") if dotted.startswith(PACKAGE + ".") else None


def imports(name: str, path: Path, known: dict) -> dict[str, int]:
    """The package's modules that ``name`` imports -> the first line importing each."""

    def resolve(dotted: str) -> str | None:
        name = short(dotted)
        while name and name not in known:  # an attribute of a module: the module
            name = name.rpartition(".")[0] or None
        return name

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    package = PACKAGE if package in ("", PACKAGE) else f"{PACKAGE}.{package}"
    found = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                submodule = short(f"{base}.{alias.name}")
                targets.append(f"{base}.{alias.name}" if submodule in known else base)
        for target in targets:
            module = resolve(target)
            if module is not None and module != name:
                found.setdefault(module, node.lineno)
    return found


def graph() -> tuple[dict[str, Path], dict[str, dict[str, int]]]:
    known = modules()
    return known, {name: imports(name, path, known) for name, path in known.items()}


def floor(name: str) -> int | None:
    best = None
    for level, (_, names) in enumerate(FLOORS):
        for entry in names:
            if name == entry or name.startswith(entry + "."):
                if best is None or len(entry) > len(best[1]):
                    best = (level, entry)
    return None if best is None else best[0]


def cycle_from(start: str, edges: dict[str, dict[str, int]]) -> list[str] | None:
    """The shortest import path from ``start`` back to itself, or None."""
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for nxt in sorted(edges[path[-1]]):
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                paths.append(path + [nxt])
    return None


def test_every_module_has_a_floor_and_every_floor_name_a_module():
    known = modules()
    names = [entry for _, entries in FLOORS for entry in entries]
    missing = sorted(name for name in known if floor(name) is None)
    assert not missing, f"modules without a floor: {missing}; add each to FLOORS"
    stale = [e for e in names if not any(m == e or m.startswith(e + ".") for m in known)]
    assert not stale, f"FLOORS names modules that do not exist: {stale}"
    assert len(names) == len(set(names)), "a name is listed twice in FLOORS"


def test_no_import_cycle():
    _, edges = graph()
    cycles = {}
    for name in sorted(edges):
        cycle = cycle_from(name, edges)
        if cycle is not None and frozenset(cycle) not in cycles:
            cycles[frozenset(cycle)] = " -> ".join(cycle)
    assert not cycles, "import cycles: " + "; ".join(cycles.values())


def test_no_module_imports_one_above_it():
    known, edges = graph()
    upward = [
        f"{name} ({FLOORS[floor(name)][0]}) imports {other} ({FLOORS[floor(other)][0]}) at "
        f"{known[name].relative_to(ROOT)}:{line}"
        for name, targets in sorted(edges.items())
        for other, line in sorted(targets.items())
        if floor(name) is not None and floor(other) is not None and floor(other) > floor(name)
    ]
    assert not upward, "upward imports:\n" + "\n".join(upward)


MAX_LINES = 600  # a module a reader takes in at once (STYLE: files of ~150-400 lines)


def test_no_module_is_over_600_lines():
    counts = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    long = {name: n for name, n in counts.items() if n > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them at a seam): {long}"


def test_the_reader_sees_every_kind_of_import(tmp_path):
    path = tmp_path / "x.py"
    path.write_text(
        "from typing import TYPE_CHECKING\n"
        "import numpy\n"
        "import ideogram4_mlx.server.app as app\n"
        "from ideogram4_mlx import hub, __version__\n"
        "from .sampler import euler_steps\n"
        "if TYPE_CHECKING:\n"
        "    from ideogram4_mlx.pipeline import Ideogram4Pipeline\n"
        "def f():\n"
        "    from ideogram4_mlx.magic.model import load_head\n"
    )
    found = imports("x", path, modules())
    assert found == {"server.app": 3, "hub": 4, PACKAGE: 4, "sampler": 5, "pipeline": 7,
                     "magic.model": 9}  # fmt: skip
