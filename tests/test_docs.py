"""README.md's "Bad input: what happens" table: every row names tests that exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
