"""The repository's own docs: README.md's "Bad input: what happens" table names tests that exist;
docs/MODEL_NOTES.md holds every section the code cites, and no code cites the spec that lives
outside the repository."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTES = ROOT / "docs" / "MODEL_NOTES.md"
CODE_DIRS = ("ideogram4_mlx", "cli", "convert", "tests", "benchmarks")
CODE_SUFFIXES = {".py", ".sh", ".html", ".js", ".jinja"}
# ``MODEL_NOTES#<anchor>`` or ``docs/MODEL_NOTES.md#<anchor>``, more sections as ``, #<anchor>``.
CITATION = re.compile(r"MODEL_NOTES(?:\.md)?#[\w-]+(?:,\s*#[\w-]+)*")
# The former citations of the spec: a section sign, or the word spec before a section letter.
SPEC_CITATION = re.compile("\u00a7|\\bspec\\s+(?:section\\s+)?[A-J](?:\\.\\d+)*\\b", re.IGNORECASE)


def table_rows() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("## Bad input: what happens")
    end = text.index("\n## ", start + 1)
    return [line for line in text[start:end].splitlines() if line.startswith("| ")][2:]


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


def notes_anchors() -> list[str]:
    anchors, fenced = [], False
    for line in NOTES.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6} (.+)", line)):
            anchors.append(github_anchor(m.group(1)))
    return anchors


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
