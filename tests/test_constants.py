"""Constants against docs/MODEL_NOTES.md: the 256 latent normalisation values, in order
(MODEL_NOTES#latent-normalization) (the dtype table: test_dtypes.py).

The notes are in the repository, so the constants are always checked against them. Where the
spec the notes were written from sits beside the repository (``../shared/docs/IDEOGRAM4_SPEC.md``),
the notes' tables are also checked against the spec's; elsewhere that test skips.
"""

import re
from pathlib import Path

import numpy as np
import pytest

from ideogram4_mlx.constants import LATENT_SCALE, LATENT_SHIFT, PACKED_CHANNELS

ROOT = Path(__file__).resolve().parents[1]
NOTES = ROOT / "docs" / "MODEL_NOTES.md"
SPEC = ROOT.parent / "shared" / "docs" / "IDEOGRAM4_SPEC.md"
NUMBER = re.compile(r"[-\u2212]?\d+\.\d+")
TABLES = [("LATENT_SHIFT", LATENT_SHIFT), ("LATENT_SCALE", LATENT_SCALE)]


def numbers(lines: list[str]) -> np.ndarray:
    values = [float(v.replace("\u2212", "-")) for line in lines for v in NUMBER.findall(line)]
    return np.array(values, dtype=np.float32)


def notes_table(name: str) -> np.ndarray:
    """The values in the ```text block after the notes' line that starts with `NAME`."""
    lines = NOTES.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"`{name}`"))
    fence = lines.index("```text", start)
    return numbers(lines[fence + 1 : lines.index("```", fence + 1)])


def spec_table(name: str) -> np.ndarray:
    """The values listed under the spec's ``* `NAME` (128...`` bullet, in order."""
    if not SPEC.is_file():
        pytest.skip(f"{SPEC} not found (the notes are checked against it only where it is)")
    lines = SPEC.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"* `{name}` (128"))
    end = start + 1
    while end < len(lines) and lines[end].startswith("  ") and not lines[end].strip()[:1] == "(":
        end += 1
    return numbers(lines[start + 1 : end])


@pytest.mark.parametrize("name, ours", TABLES)
def test_latent_constants_equal_the_notes_in_order(name, ours):
    expected = notes_table(name)
    assert expected.shape == (PACKED_CHANNELS,), f"parsed {expected.shape} values from the notes"
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("name", [name for name, _ in TABLES])
def test_notes_tables_equal_the_spec(name):
    expected = spec_table(name)
    assert expected.shape == (PACKED_CHANNELS,), f"parsed {expected.shape} values from the spec"
    np.testing.assert_array_equal(notes_table(name), expected)
