"""Loading a GGUF DiT directly (``--transformer FILE.gguf``) against converting it first
(``convert --quantize keep``) and loading the folder: time and peak memory of each load.

Each measurement runs in a fresh process (peak memory is per process): MLX's peak
(``mx.get_peak_memory``) and the process's peak resident set (``VmHWM`` of /proc/self/status,
which counts the GGUF file's memory-mapped pages read; ``ru_maxrss`` would carry the parent's
peak over ``fork``). The convert step is timed once per type.

    python benchmarks/dit_file_load.py --preset tiny
    python benchmarks/dit_file_load.py --preset full-width --layers 1   # one real-width block
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx

from ideogram4_mlx.dtypes import parse_dtype
from ideogram4_mlx.synth import write_synthetic_checkpoint
from ideogram4_mlx.synth.plan import SYNTHETIC_PRESETS


def peak_rss() -> int:
    """Bytes of this process's peak resident set (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(route: str, source: str, config_dir: str, dtype: str) -> dict:
    """One load in this process: ``route`` "file" (dit_file) or "folder" (from_pretrained)."""
    from ideogram4_mlx.dit_file import DiTFile, load_file
    from ideogram4_mlx.transformer import Ideogram4Transformer

    start = time.perf_counter()
    if route == "file":
        model = load_file(DiTFile(source, config_dir), parse_dtype(dtype))
    else:
        model = Ideogram4Transformer.from_pretrained(source, parse_dtype(dtype))
    mx.eval(model.parameters())
    seconds = time.perf_counter() - start
    return {
        "seconds": round(seconds, 2),
        "mlx_peak_mb": round(mx.get_peak_memory() / 1e6, 1),
        "peak_rss_mb": round(peak_rss() / 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "full-width"])
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--types", nargs="+", default=["Q8_0", "Q4_0", "Q4_K"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dit-file-load"))
    parser.add_argument("--measure", nargs=4, metavar=("ROUTE", "SRC", "CONFIG", "DTYPE"))
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return

    from ideogram4_mlx.convert import convert
    from ideogram4_mlx.synth.gguf import write_gguf_dit

    spec = SYNTHETIC_PRESETS[args.preset]
    if args.layers is not None:
        spec = dataclasses.replace(spec, dit_num_layers=args.layers)
    root = args.workdir / f"{args.preset}-{spec.dit_num_layers}"
    ckpt = root / "ckpt"
    if not ckpt.exists():
        write_synthetic_checkpoint(ckpt, spec, components=("transformer",))
    rows = []
    for qtype in args.types:
        path = root / f"{qtype}.gguf"
        if not path.exists():
            write_gguf_dit(ckpt / "transformer", path, qtype)
        out = root / f"keep-{qtype}-{args.dtype}"
        convert_s = None
        if not out.exists():
            start = time.perf_counter()
            convert(
                ckpt,
                out,
                components=["transformer"],
                files={"transformer": path},
                quantize="keep",
                dtype=args.dtype,
                progress=False,
            )
            convert_s = round(time.perf_counter() - start, 2)
        routes = {
            "file": (str(path), str(ckpt / "transformer")),
            "folder": (str(out / "transformer"), "-"),
        }
        for route, (source, config) in routes.items():
            command = [sys.executable, __file__, "--measure", route, source, config, args.dtype]
            result = json.loads(subprocess.run(command, check=True, capture_output=True).stdout)
            rows.append({"type": qtype, "route": route, **result, "convert_s": convert_s})
            print(json.dumps(rows[-1]), flush=True)
        size = path.stat().st_size / 1e6
        folder = sum(f.stat().st_size for f in (out / "transformer").glob("*")) / 1e6
        print(json.dumps({"type": qtype, "gguf_mb": round(size, 1), "folder_mb": round(folder, 1)}))


if __name__ == "__main__":
    main()
