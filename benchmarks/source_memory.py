"""Peak RSS and wall of `convert` per source format, on a full-width synthetic DiT.

For each block count (``--dit-layers``) a full-width synthetic fp8 ``transformer/`` (the
``full`` preset's sizes, fewer blocks) is written, then each source format is written from it
(nf4 with split names, Comfy fp8_scaled and nvfp4_mixed files, GGUF Q8_0 and Q4_K files) and
only the transformer is converted to bf16 and to affine 4-bit (GGUF Q8_0 also with
``quantize="keep"``). Every write and every conversion runs in a fresh subprocess, so each peak
is its own (the parent never imports MLX: a child's ru_maxrss would inherit the parent's peak
through exec). One row per (source, setting); sources and outputs are deleted as it goes, so the
disk holds the fp8 folder, one other source and one output at a time.

Peak RSS is ru_maxrss; the child also samples RssAnon/RssFile every 20 ms (file-backed pages of
a memory-mapped source count in RSS but are the page cache's, reclaimable). The converter holds
up to one output shard (``SHARD_BYTES``, 1 GiB) before writing it, so a peak grows with the
block count until the output fills a shard; with two block counts whose outputs both exceed a
shard, the 34-block projection is the line through both peaks (a flat peak stays flat). Rows
whose smaller count's output is under a shard are marked and not projected.

    python benchmarks/source_memory.py --workdir /tmp/source-bench --dit-layers 3 6
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

FULL_LAYERS = 34
SHARD_BYTES = 1 << 30  # convert's SHARD_BYTES: the output held before a shard is written
SOURCES = ("fp8", "nf4", "comfy-fp8_scaled", "comfy-nvfp4_mixed", "gguf-Q8_0", "gguf-Q4_K")
SETTINGS = {"gguf-Q8_0": ("bf16", "4", "keep")}
DEFAULT_SETTINGS = ("bf16", "4")


class Sampler:
    """Peaks of RssAnon and RssFile of this process, sampled from /proc/self/status."""

    def __init__(self, every_s: float = 0.02):
        self.anon = self.file = 0
        self.every_s, self.done = every_s, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    self.anon = max(self.anon, int(line.split()[1]) * 1024)
                elif line.startswith("RssFile:"):
                    self.file = max(self.file, int(line.split()[1]) * 1024)

    def run(self) -> None:
        while not self.done.wait(self.every_s):
            self.sample()

    def stop(self) -> dict:
        self.done.set()
        self.thread.join()
        self.sample()
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return {"peak_rss": peak_kb * 1024, "peak_anon": self.anon, "peak_file": self.file}


def child_convert(src: Path, dst: Path, setting: str, dit_file: str) -> None:
    from ideogram4_mlx.convert import convert

    kwargs: dict = {"files": {"transformer": dit_file}} if dit_file else {}
    if setting.isdigit():
        kwargs["quantize"] = int(setting)
    elif setting == "keep":
        kwargs["quantize"] = "keep"
    sampler = Sampler()
    start = time.perf_counter()
    convert(src, dst, components=("transformer",), progress=False, **kwargs)
    wall = time.perf_counter() - start
    print(json.dumps({"wall_s": wall, **sampler.stop()}))


def child_make(kind: str, fp8: Path, dst: Path, layers: int) -> None:
    """Write one source: the fp8 snapshot (``fp8``) or a format made from it."""
    sampler = Sampler()
    start = time.perf_counter()
    if kind == "fp8":
        from dataclasses import replace

        from ideogram4_mlx.synth import SYNTHETIC_PRESETS, write_synthetic_checkpoint

        spec = replace(SYNTHETIC_PRESETS["full"], dit_num_layers=layers)
        write_synthetic_checkpoint(dst, spec, seed=0, components=("transformer",))
    elif kind == "nf4":
        from ideogram4_mlx.synth.nf4 import write_nf4_checkpoint

        write_nf4_checkpoint(fp8, dst, naming="split", layout="nf4")
    elif kind.startswith("comfy-"):
        from ideogram4_mlx.synth.comfy import write_comfy_dit

        write_comfy_dit(fp8 / "transformer", dst, kind.removeprefix("comfy-"))
    elif kind.startswith("gguf-"):
        from ideogram4_mlx.synth.gguf import write_gguf_dit

        write_gguf_dit(fp8 / "transformer", dst, kind.removeprefix("gguf-"))
    else:
        raise SystemExit(f"unknown source kind {kind}")
    print(json.dumps({"wall_s": time.perf_counter() - start, **sampler.stop()}))


def run_child(*args: str) -> dict:
    cmd = [sys.executable, __file__, *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"child failed: {' '.join(args)}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def weight_bytes_bf16(folder: Path) -> int:
    """Bytes of the DiT's weights in bf16 (every tensor but the fp8 scales), from the headers:
    what "wall per GB" is per."""
    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        for key, entry in header.items():
            if key == "__metadata__" or key.endswith(".weight_scale"):
                continue
            count = 1
            for d in entry["shape"]:
                count *= d
            total += 2 * count
    return total


def gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/source-bench"))
    parser.add_argument("--dit-layers", type=int, nargs="+", default=[6])
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    parser.add_argument(
        "--repeat-on", nargs="*", default=None, choices=SOURCES,
        help="sources run at every block count (default: all); others only at the last count",
    )  # fmt: skip
    parser.add_argument("--child-convert", nargs=4, metavar=("SRC", "DST", "SETTING", "FILE"))
    parser.add_argument("--child-make", nargs=4, metavar=("KIND", "FP8", "DST", "LAYERS"))
    args = parser.parse_args()
    if args.child_convert:
        src, dst, setting, dit_file = args.child_convert
        child_convert(Path(src), Path(dst), setting, dit_file)
        return
    if args.child_make:
        kind, fp8, dst, layers = args.child_make
        child_make(kind, Path(fp8), Path(dst), int(layers))
        return

    print(f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()} {platform.system()}")
    print(f"# python {' '.join(sys.argv)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    header = (
        f"{'source':<18} {'L':>2} {'setting':>7} {'src GB':>7} {'out GB':>7} "
        f"{'peak RSS':>8} {'anon':>6} {'file':>6} {'wall s':>7} {'MB/s':>5} {'s/GB':>5}"
    )
    rows: list[dict] = []
    makes: list[str] = []
    for layers in args.dit_layers:
        fp8 = args.workdir / f"fp8-{layers}"
        shutil.rmtree(fp8, ignore_errors=True)
        made = run_child("--child-make", "fp8", str(fp8), str(fp8), str(layers))
        weights = weight_bytes_bf16(fp8 / "transformer")
        makes.append(f"# L={layers}: fp8 written in {made['wall_s']:.0f} s, "
                     f"peak {gb(made['peak_rss'])} GB; bf16 weights {gb(weights)} GB")  # fmt: skip
        print(makes[-1], flush=True)
        print(header, flush=True)
        last = layers == args.dit_layers[-1]
        for kind in args.sources:
            if not last and args.repeat_on is not None and kind not in args.repeat_on:
                continue
            if kind == "fp8":
                src, dit_file = fp8, ""
            else:
                suffix = "" if kind == "nf4" else (".gguf" if kind.startswith("gguf") else
                                                   ".safetensors")  # fmt: skip
                src = args.workdir / f"{kind}-{layers}{suffix}"
                shutil.rmtree(src, ignore_errors=True) if src.is_dir() else src.unlink(True)
                made = run_child("--child-make", kind, str(fp8), str(src), str(layers))
                makes.append(f"# L={layers}: {kind} written in {made['wall_s']:.0f} s, "
                             f"writer peak {gb(made['peak_rss'])} GB")  # fmt: skip
                src, dit_file = (src, "") if kind == "nf4" else (fp8, str(src))
            src_bytes = size(Path(dit_file) if dit_file else src / "transformer")
            for setting in SETTINGS.get(kind, DEFAULT_SETTINGS):
                dst = args.workdir / f"out-{kind}-{layers}-{setting}"
                shutil.rmtree(dst, ignore_errors=True)
                result = run_child("--child-convert", str(src), str(dst), setting, dit_file)
                out_bytes = size(dst / "transformer")
                shutil.rmtree(dst)
                row = dict(kind=kind, layers=layers, setting=setting, src=src_bytes,
                           out=out_bytes, weights=weights, **result)  # fmt: skip
                rows.append(row)
                print(
                    f"{kind:<18} {layers:>2} {setting:>7} {gb(src_bytes):>7} {gb(out_bytes):>7} "
                    f"{gb(row['peak_rss']):>8} {gb(row['peak_anon']):>6} "
                    f"{gb(row['peak_file']):>6} {row['wall_s']:>7.1f} "
                    f"{src_bytes / row['wall_s'] / 1e6:>5.0f} "
                    f"{row['wall_s'] / (weights / 1e9):>5.1f}",
                    flush=True,
                )
            if kind != "fp8":
                made_path = Path(dit_file) if dit_file else src
                shutil.rmtree(made_path) if made_path.is_dir() else made_path.unlink()
        shutil.rmtree(fp8)
    print("\n".join(makes))
    print(
        "# columns: src/out GB: the DiT source / output on disk; peak RSS: ru_maxrss; anon, "
        "file: peak RssAnon / RssFile (sampled every 20 ms); MB/s: source bytes / wall; s/GB: "
        "wall per GB of bf16 weights"
    )
    projection(rows, args.dit_layers)


def projection(rows: list[dict], counts: list[int]) -> None:
    """Peak RSS at 34 blocks: the line through the two block counts' peaks, per row."""
    if len(counts) < 2:
        return
    lo, hi = min(counts), max(counts)
    print(f"# peak RSS vs block count ({lo} -> {hi}) and projected to {FULL_LAYERS} blocks:")
    by = {(r["kind"], r["setting"], r["layers"]): r for r in rows}
    for kind, setting, layers in list(by):
        if layers != hi or (kind, setting, lo) not in by:
            continue
        a, b = by[(kind, setting, lo)]["peak_rss"], by[(kind, setting, hi)]["peak_rss"]
        if by[(kind, setting, lo)]["out"] < SHARD_BYTES:
            print(f"#   {kind:<18} {setting:>5}: {gb(a)} -> {gb(b)} GB (the {lo}-block output "
                  "is under one shard: not projected)")  # fmt: skip
            continue
        slope = (b - a) / (hi - lo)
        p34 = b + slope * (FULL_LAYERS - hi)
        print(
            f"#   {kind:<18} {setting:>5}: {gb(a)} -> {gb(b)} GB "
            f"({slope / 1e6:+.0f} MB/block) -> {gb(p34)} GB at {FULL_LAYERS}"
        )


if __name__ == "__main__":
    main()
