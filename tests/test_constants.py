"""Constants against the spec itself: the 256 latent normalisation values (spec §F.4).

The spec sits beside the repository (``../shared/docs/IDEOGRAM4_SPEC.md``), as in CI. Where it
is absent the spec test skips, except under CI (``CI=true``), where it must run.
"""

import os
import re
from pathlib import Path

import numpy as np
import pytest

from ideogram4_mlx.constants import LATENT_SCALE, LATENT_SHIFT, PACKED_CHANNELS

SPEC = Path(__file__).resolve().parents[2] / "shared" / "docs" / "IDEOGRAM4_SPEC.md"
NUMBER = re.compile(r"[-\u2212]?\d+\.\d+")


def spec_table(name: str) -> np.ndarray:
    """The values listed under the spec's ``* `NAME` (128...`` bullet, as float32, in order."""
    if not SPEC.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{SPEC} is missing: CI must check the constants against the spec")
        pytest.skip(f"{SPEC} not found (it sits beside the repository in CI)")
    lines = SPEC.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"* `{name}` (128"))
    values = []
    for line in lines[start + 1 :]:
        if line.startswith("*") or not line.startswith("  ") or line.strip().startswith("("):
            break
        values += [float(v.replace("\u2212", "-")) for v in NUMBER.findall(line)]
    return np.array(values, dtype=np.float32)


@pytest.mark.parametrize(
    "name, ours", [("LATENT_SHIFT", LATENT_SHIFT), ("LATENT_SCALE", LATENT_SCALE)]
)
def test_latent_constants_equal_the_spec_in_order(name, ours):
    expected = spec_table(name)
    assert expected.shape == (PACKED_CHANNELS,), f"parsed {expected.shape} values from the spec"
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, expected)
