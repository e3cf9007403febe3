"""One tiny end-to-end case whose fp32 output is pinned in ``tests/data/``.

The files were written before the architecture pass (issue #13) by this module's ``write()``,
one per environment (the BLAS behind MLX's CPU fp32 matmul changes the last bits):
``regression_tiny_<environment>.npz``. ``test_regression.py`` checks that refactors leave the
latents and the image bit for bit unchanged where a file for this environment exists. Write
one for a new environment from a pre-change checkout, or for a deliberate numerical change
(say so in the commit):

    python tests/regression_case.py --write
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np

from ideogram4_mlx.environment import describe

DATA = Path(__file__).parent / "data"
CAPTION = (
    '{"high_level_description":"a blue door with the word EXIT","compositional_deconstruction":'
    '{"background":"brick wall","elements":[{"type":"text","text":"EXIT","desc":"white"}]}}'
)
CASE = {"width": 256, "height": 320, "preset": "V4_TURBO_12", "num_steps": 4, "seed": 3}


def environment() -> str:
    """What decides fp32 rounding on the CPU: MLX build, machine, the BLAS in use (the
    facts the PNG metadata records, ``ideogram4_mlx.environment.describe``)."""
    facts = describe()
    return f"mlx-{facts['mlx']}-{facts['platform']}-{facts['blas']}".replace(" ", "-").lower()


def pinned_file(env: str | None = None) -> Path:
    return DATA / f"regression_tiny_{env or environment()}.npz"


def run(checkpoint: Path) -> tuple[np.ndarray, np.ndarray]:
    """(latents (1, N, 128) float32, image (H, W, 3) uint8) of the pinned case, fp32 weights."""
    from ideogram4_mlx import load

    pipe = load(checkpoint, dtype=mx.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = pipe.generate(CAPTION, **CASE)
    return result.latents, np.array(result.image)


def write() -> None:
    from ideogram4_mlx.synth import write_synthetic_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_synthetic_checkpoint(Path(tmp) / "tiny", "tiny", seed=0)
        latents, image = run(ckpt)
    DATA.mkdir(exist_ok=True)
    np.savez_compressed(pinned_file(), latents=latents, image=image)
    print(f"wrote {pinned_file()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="(re)write the pinned file")
    if parser.parse_args().write:
        write()
