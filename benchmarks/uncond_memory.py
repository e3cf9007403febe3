"""Denoise-stage peak memory by what runs the unconditional pass, side by side.

Three runs of one image, each in its own process (MLX peak memory, GB = 1e9 bytes):

- ``cfg``: the preset's guidance with the checkpoint's unconditional DiT (two DiTs held);
- ``guidance 1``: ``--guidance-schedule 1``, the unconditional DiT never loaded, run on a copy
  of the checkpoint without ``unconditional_transformer/`` (the same image bit for bit as with
  it, ``tests/test_uncond.py``);
- ``self``: ``--uncond self``, the conditional DiT runs both passes (one DiT held).

``held`` is the DiTs' parameters in memory after loading (each DiT counted once).

    python benchmarks/uncond_memory.py --workdir /tmp/ideo4-uncond            # synthetic tiny
    python benchmarks/uncond_memory.py --model CHECKPOINT --size 1024 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

CAPTION = (
    '{"high_level_description":"a red sign","compositional_deconstruction":'
    '{"background":"white","elements":[{"type":"text","text":"OPEN","desc":"bold"}]}}'
)
RUNS = {
    "cfg": ("full", {}, {}),
    "guidance 1": ("no-uncond", {}, {"guidance_schedule": (1.0,)}),
    "self": ("no-uncond", {"uncond": "self"}, {}),
}
CHILD = """
import json, sys
import mlx.core as mx
from mlx.utils import tree_flatten
from ideogram4_mlx import load
model, dtype, size, steps, options, settings = json.loads(sys.argv[1])
pipe = load(model, dtype=dtype, keep_in_memory=True, **options)
result = pipe.generate(sys.argv[2], width=size, height=size, num_steps=steps, seed=1, **settings)
held = {id(d): d for d in pipe._dits if d is not None}.values()
nbytes = sum(v.nbytes for d in held for _, v in tree_flatten(d.parameters()))
print(json.dumps({"peak_gb": result.stats["denoise"]["peak_gb"], "held_gb": nbytes / 1e9,
                  "dits": len(held)}))
"""


def checkpoints(model: Path | None, workdir: Path) -> dict[str, Path]:
    """The full checkpoint and a copy without ``unconditional_transformer/`` (linked files)."""
    if model is None:
        from ideogram4_mlx.synth import write_synthetic_checkpoint

        model = workdir / "tiny"
        if not model.exists():
            write_synthetic_checkpoint(model, "tiny", seed=0)
    copy = workdir / "no-uncond"
    if not copy.exists():
        copy.mkdir(parents=True)
        for item in Path(model).iterdir():
            if item.name != "unconditional_transformer":
                (copy / item.name).symlink_to(item.resolve())
    return {"full": Path(model), "no-uncond": copy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a checkpoint folder (default: synthetic tiny)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ideo4-uncond"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    folders = checkpoints(args.model, args.workdir)
    print(f"{'run':<12} {'DiTs':>5} {'held GB':>9} {'denoise peak GB':>16}")
    rows = {}
    for name, (folder, options, settings) in RUNS.items():
        spec = [str(folders[folder]), args.dtype, args.size, args.steps, options, settings]
        child = [sys.executable, "-W", "ignore", "-c", CHILD, json.dumps(spec), CAPTION]
        out = subprocess.run(child, capture_output=True, text=True, check=True).stdout
        rows[name] = row = json.loads(out.strip().splitlines()[-1])
        print(f"{name:<12} {row['dits']:>5} {row['held_gb']:>9.4f} {row['peak_gb']:>16.3f}")
    base = rows["cfg"]["peak_gb"]
    for name in ("guidance 1", "self"):
        print(f"{name}: {rows[name]['peak_gb'] / base:.2f}x the cfg peak")
    if args.model is None:
        shutil.rmtree(args.workdir / "no-uncond")


if __name__ == "__main__":
    main()
