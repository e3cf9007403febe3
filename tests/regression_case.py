"""One tiny end-to-end case whose fp32 output is pinned in ``tests/data/``.

A pin holds only where everything that decides the bits is the same, so each file is named
by that key (:func:`environment`): MLX version, backend, OS and machine, and the BLAS behind
MLX's CPU fp32 matmul as it runs: the wheel's bundled library, or a preloaded OpenBLAS with
its version, the kernel it picked for this CPU (``OPENBLAS_CORETYPE`` overrides it) and its
number of threads (measured here: Haswell kernels with 1 thread and with 2 differ in 93% of
the latents). ``test_regression.py`` checks that refactors leave the latents and the image
bit for bit unchanged where a file for this key exists. Write one for a new key from a
pre-change checkout, or for a deliberate numerical change (say so in the commit):

    python tests/regression_case.py --write
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np

from ideogram4_mlx.environment import blas, describe

DATA = Path(__file__).parent / "data"
CAPTION = (
    '{"high_level_description":"a blue door with the word EXIT","compositional_deconstruction":'
    '{"background":"brick wall","elements":[{"type":"text","text":"EXIT","desc":"white"}]}}'
)
CASE = {"width": 256, "height": 320, "preset": "V4_TURBO_12", "num_steps": 4, "seed": 3}


def environment() -> tuple[str | None, str]:
    """(key, reason): the key names the pinned file; None (and why) when some of what decides
    the bits cannot be told, as on a GPU backend or with an unknown BLAS."""
    facts = describe()
    if facts["backend"] != "cpu":
        return None, f"backend {facts['backend']}: only the CPU backend is keyed"
    key, how = blas()
    if key is None:
        return None, f"the BLAS behind MLX's CPU matmul is not known ({how})"
    env = f"mlx-{facts['mlx']}-{facts['backend']}-{facts['platform']}-{key}"
    return env.replace(" ", "-").lower(), how


def pinned_file(env: str) -> Path:
    return DATA / f"regression_tiny_{env}.npz"


def run(checkpoint: Path, **settings) -> tuple[np.ndarray, np.ndarray]:
    """(latents (1, N, 128) float32, image (H, W, 3) uint8) of the pinned case, fp32 weights;
    ``settings`` are added to it (ones that must change no bit)."""
    from ideogram4_mlx import load

    pipe = load(checkpoint, dtype=mx.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = pipe.generate(CAPTION, **CASE, **settings)
    return result.latents, np.array(result.image)


def write() -> None:
    from ideogram4_mlx.synth import write_synthetic_checkpoint

    env, why = environment()
    if env is None:
        raise SystemExit(f"no key for this environment, so no pin: {why}")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_synthetic_checkpoint(Path(tmp) / "tiny", "tiny", seed=0)
        latents, image = run(ckpt)
    DATA.mkdir(exist_ok=True)
    np.savez_compressed(pinned_file(env), latents=latents, image=image)
    print(f"wrote {pinned_file(env)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="(re)write the pinned file")
    if parser.parse_args().write:
        write()
    else:
        print(*environment(), sep="\n")
