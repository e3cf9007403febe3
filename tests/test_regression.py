"""The pinned end-to-end case (``regression_case.py``): refactors must not move a bit.

Where a file pinned in this environment exists (MLX version, OS, machine, BLAS), the fp32
latents and the image must be identical to it. Elsewhere (a new MLX, a Mac) the comparison is
against every pinned file within the spread that a change of BLAS alone causes here: latents
max abs 1.4e-5 and one uint8 level between the bundled BLAS and OpenBLAS, so 1e-4 relative L2
and 2 levels leave a margin yet catch any change of formula (those move latents by >1e-2).
"""

import numpy as np
import regression_case
from helpers import rel_l2


def test_tiny_end_to_end_is_pinned(tiny_checkpoint):
    latents, image = regression_case.run(tiny_checkpoint)
    pinned = regression_case.pinned_file()
    if pinned.exists():
        data = np.load(pinned)
        np.testing.assert_array_equal(latents, data["latents"])
        np.testing.assert_array_equal(image, data["image"])
        return
    files = sorted(regression_case.DATA.glob("regression_tiny_*.npz"))
    assert files, "no pinned regression file in tests/data"
    for path in files:
        data = np.load(path)
        assert rel_l2(latents, data["latents"]) <= 1e-4, path.name
        assert np.abs(image.astype(int) - data["image"]).max() <= 2, path.name
