"""The repository's own docs: README.md's quick start, contents and links, the install and test
commands CI runs; docs/BAD_INPUT.md's table names tests that exist; docs/MODEL_NOTES.md holds
every section the code cites, and no code cites the spec that lives outside the repository;
what the README says about the generate() callback and the steps holds."""

import re
import shlex
from pathlib import Path

import mlx.core as mx
import pytest

from ideogram4_mlx import GenerationRequest, load

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NOTES = ROOT / "docs" / "MODEL_NOTES.md"
# Developer material moved out of the README (#27): each file, a heading it must have.
MOVED = {
    "docs/PERFORMANCE.md": "# Performance and memory",
    "docs/PARITY.md": "# Parity with the PyTorch reference",
    "docs/BAD_INPUT.md": "# Bad input: what happens",
}
# Wording a reader of the README or docs/ cannot follow: the sessions that wrote the project,
# the spec outside the repository, the machine's own folders, the test's internals.
FORBIDDEN = (
    "lent to this task",
    "no GPU was lent",
    "this session",
    "\u00a7",
    "spec \u00a7",
    "not run by the README test",
    "is the next issue",
    "/work/",
    "/opt/",
)
FIRST_SCREEN = 45  # lines: where the quick start's commands must begin
CODE_DIRS = ("ideogram4_mlx", "cli", "convert", "tests", "benchmarks")
CODE_SUFFIXES = {".py", ".sh", ".html", ".js", ".jinja"}
# ``MODEL_NOTES#<anchor>`` or ``docs/MODEL_NOTES.md#<anchor>``, more sections as ``, #<anchor>``.
CITATION = re.compile(r"MODEL_NOTES(?:\.md)?#[\w-]+(?:,\s*#[\w-]+)*")
# The former citations of the spec: a section sign, or the word spec before a section letter.
SPEC_CITATION = re.compile("\u00a7|\\bspec\\s+(?:section\\s+)?[A-J](?:\\.\\d+)*\\b", re.IGNORECASE)


def table_rows() -> list[str]:
    text = (ROOT / "docs" / "BAD_INPUT.md").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.startswith("| ")][2:]


def test_every_bad_input_row_names_existing_tests():
    rows = table_rows()
    assert len(rows) >= 30
    for row in rows:
        cell = row.rstrip(" |").split(" | ")[-1]
        named = 0
        for part in cell.split(";"):
            file, _, names = part.strip().partition(" ")
            path = ROOT / "tests" / f"test_{file}.py"
            assert path.is_file(), f"{row[:60]}...: no {path.name}"
            source = path.read_text(encoding="utf-8")
            for name in re.findall(r"`(test_\w+)`", names):
                assert f"def {name}(" in source, f"{path.name} has no {name}"
                named += 1
        assert named, f"row names no test: {row[:80]}"


def github_anchor(heading: str) -> str:
    """GitHub's automatic anchor of a heading: lower case, punctuation dropped, spaces -> '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(path: Path) -> list[str]:
    """The Markdown headings of ``path``, outside code blocks, as written (without the #s)."""
    found, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6} (.+)", line)):
            found.append(m.group(1))
    return found


def notes_anchors() -> list[str]:
    return [github_anchor(h) for h in headings(NOTES)]


def code_files() -> list[Path]:
    return sorted(
        path
        for folder in CODE_DIRS
        for path in (ROOT / folder).rglob("*")
        if path.suffix in CODE_SUFFIXES and "__pycache__" not in path.parts
    )


def cited_anchors() -> list[tuple[str, str]]:
    """(``file:line``, anchor) for every section the code cites."""
    out = []
    for path in code_files():
        text = path.read_text(encoding="utf-8")
        for m in CITATION.finditer(text):
            where = f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}"
            out += [(where, anchor) for anchor in re.findall(r"#([\w-]+)", m.group(0))]
    return out


def test_model_notes_headings_are_unique():
    anchors = notes_anchors()
    assert len(anchors) >= 30
    assert len(set(anchors)) == len(anchors), sorted(a for a in anchors if anchors.count(a) > 1)


def test_model_notes_internal_links_resolve():
    anchors = set(notes_anchors())
    links = re.findall(r"\]\(#([\w-]+)\)", NOTES.read_text(encoding="utf-8"))
    assert links and not [link for link in links if link not in anchors]


def test_every_cited_model_notes_section_exists():
    anchors = set(notes_anchors())
    cited = cited_anchors()
    assert len(cited) >= 100, f"only {len(cited)} citations found: is CITATION still right?"
    missing = [f"{where}: #{anchor}" for where, anchor in cited if anchor not in anchors]
    assert not missing, "no such heading in docs/MODEL_NOTES.md:\n" + "\n".join(missing)


def test_no_code_cites_the_spec_outside_the_repository():
    found = []
    for path in code_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if SPEC_CITATION.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "cite docs/MODEL_NOTES.md sections instead:\n" + "\n".join(found)


def doc_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def section(path: Path, heading: str) -> str:
    """The text under ``## heading`` up to the next ``## `` heading."""
    text = path.read_text(encoding="utf-8")
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def test_readme_opens_with_the_quick_start():
    """The first section is the quick start, and its commands begin on the first screen."""
    lines = README.read_text(encoding="utf-8").splitlines()
    sections = [line for line in lines if line.startswith("## ")]
    assert sections[0] == "## Quick start", sections[:3]
    first_command = next(i for i, line in enumerate(lines) if line.startswith("ideo4-mlx "))
    assert first_command < FIRST_SCREEN, f"the first command is on line {first_command + 1}"


def test_readme_contents_list_every_section_and_resolve():
    contents = section(README, "Contents")
    listed = re.findall(r"^- \[[^\]]+\]\(#([\w-]+)\)", contents, re.M)
    anchors = [github_anchor(h) for h in headings(README)]
    assert len(set(anchors)) == len(anchors), sorted(a for a in anchors if anchors.count(a) > 1)
    missing = [a for a in listed if a not in anchors]
    assert not missing, f"Contents links to no heading: {missing}"
    level2 = [
        github_anchor(line[3:])
        for line in README.read_text(encoding="utf-8").splitlines()
        if line.startswith("## ") and line != "## Contents"
    ]
    assert listed == level2, f"Contents and the ## headings differ:\n{listed}\n{level2}"


def test_moved_docs_exist_are_linked_and_left_the_readme():
    readme = README.read_text(encoding="utf-8")
    for name, heading in MOVED.items():
        path = ROOT / name
        assert path.is_file(), name
        assert path.read_text(encoding="utf-8").startswith(heading + "\n"), name
        assert f"]({name})" in readme, f"README does not link {name}"
        title = heading.lstrip("# ")
        assert f"\n## {title}" not in readme, f"README still has the section {title!r}"


def test_markdown_links_resolve():
    """Every relative link in README.md and docs/ names a file of the repository, and its
    #anchor a heading of that file."""
    broken = []
    for path in doc_files():
        text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                broken.append(f"{path.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md":
                if anchor not in [github_anchor(h) for h in headings(linked)]:
                    broken.append(f"{path.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_no_wording_a_reader_cannot_follow():
    found = [
        f"{path.relative_to(ROOT)}:{number}: {phrase!r}"
        for path in doc_files()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        for phrase in FORBIDDEN
        if phrase in line
    ]
    assert not found, "\n".join(found)


def ci_command(name: str) -> str:
    """A command .ci/run runs, as assigned there (``NAME='...'``)."""
    text = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    (value,) = re.findall(rf"^{name}='(.*)'$", text, re.M)
    return value


def test_ci_runs_the_readmes_install_and_test_commands():
    lines = README.read_text(encoding="utf-8").splitlines()
    install, test = ci_command("INSTALL"), ci_command("TEST")
    assert install in lines and test in lines, "README.md and .ci/run disagree"
    assert install in section(README, "Quick start")


def test_the_install_takes_torchs_cpu_build_and_says_what_it_costs():
    """A plain ``pip install torch`` on Linux brings the CUDA build from PyPI: the README's
    install names the CPU build and PyTorch's CPU-only index, and states its cost."""
    first = shlex.split(ci_command("INSTALL").split("&&")[0])
    assert first[:2] == ["pip", "install"], first
    torch = [arg for arg in first if arg.startswith("torch")]
    assert len(torch) == 1 and torch[0].endswith("+cpu"), torch
    index = first.index("--extra-index-url")  # PyPI stays the index of everything else
    assert first[index + 1] == "https://download.pytorch.org/whl/cpu", first
    cost = section(README, "Set up")
    assert re.search(r"\d+ MB of downloads", cost) and re.search(r"\d+ minutes", cost), cost


def test_the_test_command_shows_progress_and_its_time_is_stated():
    """pytest's default output names each file as it runs; -q hides that."""
    test = shlex.split(ci_command("TEST"))
    assert test[:3] == ["python", "-m", "pytest"], test
    assert not {"-q", "--quiet", "-qq"} & set(test), test
    text = section(README, "Run the tests")
    assert re.search(r"\d+-\d+ minutes on 2 idle cores", text), text
    assert "depends on" in text


@pytest.mark.filterwarnings("ignore:caption. plain-text prompt")
def test_callback_steps_and_step_times_are_as_the_readme_says(tiny_checkpoint):
    """README, Python API: the callback's ``step`` counts from 0; ``Step.t`` runs from 0 (noise)
    to 1 (clean), the last step ending at 0.99945."""
    python_api = section(README, "Python API")
    assert "`step` counts from 0" in python_api
    assert "`t` runs from 0 (noise) to 1 (clean" in python_api
    pipe = load(tiny_checkpoint, dtype=mx.float32, keep_in_memory=True)
    settings = dict(width=256, height=256, num_steps=3, seed=1)
    calls = []
    pipe.generate("a cat", callback=lambda step, n, latents: calls.append((step, n)), **settings)
    assert calls == [(0, 3), (1, 3), (2, 3)]
    times = []
    generation = pipe.start(GenerationRequest("a cat", **settings))
    for step in generation:
        mx.eval(step.latents)
        times.append((step.index, step.t))
    assert [i for i, _ in times] == [0, 1, 2]
    ts = [t for _, t in times]
    assert 0 < ts[0] < ts[1] < ts[2] and round(ts[2], 5) == 0.99945, ts
