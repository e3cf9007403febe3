"""Peak RSS, wall time and throughput of `convert` on a full-size synthetic DiT file (9.29 GB).

Writes the synthetic `transformer/` (the real layout and sizes), converts it once per setting in
a fresh subprocess (so each peak RSS is its own), prints one line per setting, deletes the
outputs as it goes and the source at the end. Needs ~30 GB of free disk for bf16.

    python benchmarks/convert_memory.py --workdir /tmp/convert-bench --settings bf16 4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

TARGET_PEAK_GB = 3.0


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def child(src: Path, dst: Path, setting: str) -> None:
    from ideogram4_mlx.convert import convert

    kwargs = {"recipe": setting} if setting.startswith("mixed") else {}
    if setting.isdigit():
        kwargs["quantize"] = int(setting)
    start = time.perf_counter()
    convert(src, dst, components=("transformer",), progress=False, **kwargs)
    wall = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"wall_s": wall, "peak_rss_gb": peak_kb * 1024 / 1e9}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/convert-bench"))
    parser.add_argument("--settings", nargs="+", default=["bf16", "4"])
    parser.add_argument("--keep-source", action="store_true")
    parser.add_argument("--child", nargs=3, metavar=("SRC", "DST", "SETTING"))
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]), args.child[2])
        return

    from ideogram4_mlx.synth import SYNTHETIC_PRESETS, write_synthetic_checkpoint

    src = args.workdir / "src"
    if not src.exists():
        spec = dataclasses.replace(SYNTHETIC_PRESETS["full"])
        start = time.perf_counter()
        write_synthetic_checkpoint(src, spec, seed=0, components=("transformer",), progress=True)
        print(f"synthetic source written in {time.perf_counter() - start:.0f} s")
    src_bytes = folder_bytes(src / "transformer")
    print(f"source transformer/: {src_bytes / 1e9:.2f} GB")
    try:
        for setting in args.settings:
            dst = args.workdir / f"out-{setting}"
            shutil.rmtree(dst, ignore_errors=True)
            cmd = [sys.executable, __file__, "--child", str(src), str(dst), setting]
            result = json.loads(subprocess.run(cmd, check=True, capture_output=True).stdout)
            out_bytes = folder_bytes(dst / "transformer")
            print(
                f"{setting:>9}: peak RSS {result['peak_rss_gb']:.2f} GB "
                f"(target <= {TARGET_PEAK_GB:g}), {result['wall_s']:.0f} s, "
                f"read {src_bytes / result['wall_s'] / 1e6:.0f} MB/s, "
                f"wrote {out_bytes / 1e9:.2f} GB ({out_bytes / result['wall_s'] / 1e6:.0f} MB/s)",
                flush=True,
            )
            shutil.rmtree(dst)
    finally:
        if not args.keep_source:
            shutil.rmtree(src, ignore_errors=True)


if __name__ == "__main__":
    main()
