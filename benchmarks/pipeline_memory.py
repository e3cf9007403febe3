"""Peak memory per stage at full size with 4-bit DiTs, normal and ``--low-memory``.

Measured pieces, each in its own process (MLX active/peak memory, in GB = 1e9 bytes):

- ``weights``: the full-size synthetic DiT and text encoder (real layout and sizes, fp8),
  converted with ``ideo4-mlx convert --quantize 4`` and loaded as the pipeline loads them.
  The DiT is loaded twice (conditional and unconditional have the same layout and size),
  the second time as the unconditional branch (without its text projection).
- ``activations``: one full-width DiT block (``benchmarks/dit_step.py``'s 1-layer synthetic
  checkpoint) at the real token counts (caption 300 tokens at 512^2, 1000 above); the peak of
  a conditional and an unconditional pass minus what was resident before. Blocks run one
  after another, so one block's activations are the whole DiT's.

The table adds them: encode = text-encoder weights + its activations (an analytic bound, the
text encoder is not run here); denoise = DiT weights (both resident, or in low-memory mode the
resident parts + one streamed block) + activations; decode = the strip decoder's measured peak
(``benchmarks/vae_memory.py``, docs/PERFORMANCE.md).

    python benchmarks/pipeline_memory.py --workdir /tmp/ideo4-mem --sizes 512 1024 2048
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ideogram4_mlx.transformer import (
    FFN_TOKENS,
    LOW_MEMORY_FFN_TOKENS,
    LOW_MEMORY_SCORE_BYTES,
    SCORE_BYTES,
)

CAPTION_TOKENS = {512: 300, 1024: 1000, 2048: 1000}
# benchmarks/vae_memory.py, full-size VAE in bf16, strip decode, MLX peak (measured 2026-11-22:
# 1.47 GiB at 1024^2, 4.63 GiB at 2048^2; 512^2 was not measured and is bounded by 1024^2).
GIB = 1 << 30
VAE_DECODE_PEAK_GB = {512: 1.47 * GIB / 1e9, 1024: 1.47 * GIB / 1e9, 2048: 4.63 * GIB / 1e9}
# Per mode: attention score budget, feed-forward tokens per chunk (as from_pretrained sets them).
MODES = {
    "normal": (SCORE_BYTES, FFN_TOKENS),
    "low-memory": (LOW_MEMORY_SCORE_BYTES, LOW_MEMORY_FFN_TOKENS),
}


def prepare(workdir: Path) -> Path:
    from ideogram4_mlx.convert import convert
    from ideogram4_mlx.synth import SYNTHETIC_PRESETS, write_synthetic_checkpoint

    src, q4 = workdir / "src", workdir / "q4"
    parts = ("transformer", "text_encoder")
    if not src.exists():
        write_synthetic_checkpoint(src, SYNTHETIC_PRESETS["full"], components=parts, progress=True)
    if not q4.exists():
        convert(src, q4, quantize=4, components=parts, progress=True)
    return q4


def weights_child(q4: Path, what: str) -> dict:
    import mlx.core as mx

    from ideogram4_mlx.text_encoder import Qwen3VLTextEncoder
    from ideogram4_mlx.transformer import Ideogram4Transformer

    if what == "text_encoder":
        keep = [Qwen3VLTextEncoder.from_pretrained(q4 / "text_encoder")]
    else:
        low = what == "dits-low-memory"
        # As the pipeline loads them: the unconditional DiT without its text projection.
        keep = [
            Ideogram4Transformer.from_pretrained(q4 / "transformer", low_memory=low, text_input=t)
            for t in (True, False)
        ]
    out = {"resident_gb": mx.get_active_memory() / 1e9, "models": len(keep)}
    if what == "dits-low-memory":
        out["stream_s"] = stream_seconds(keep)
    return out


def stream_seconds(models: list) -> list[float]:
    """Seconds to read every streamed block of both DiTs once, as one low-memory step does
    (reads only, no compute); two rounds: the first may come from disk, the second from the
    OS file cache when it holds the files."""
    import mlx.core as mx

    rounds = []
    for _ in range(2):
        start = time.perf_counter()
        for model in models:
            model.stream.open()
            for i in range(len(model.layers)):
                block = model.stream.take(f"layers.{i}.")
                mx.eval(block)
                del block
        rounds.append(time.perf_counter() - start)
    return rounds


def block_gb(q4: Path) -> float:
    """Bytes of one converted block (``layers.0.*``), from the lazily loaded tensors."""
    from ideogram4_mlx.weights import component_files, load_safetensors

    weights = load_safetensors(component_files(q4 / "transformer"))
    return sum(v.nbytes for k, v in weights.items() if k.startswith("layers.0.")) / 1e9


def activations_child(ckpt: Path, side: int, mode: str, dtype_name: str) -> dict:
    import mlx.core as mx

    from ideogram4_mlx import transformer as dit
    from ideogram4_mlx.generation import velocity_fns

    dtype = getattr(mx, dtype_name)
    cond_dit = dit.Ideogram4Transformer.from_pretrained(ckpt / "transformer", dtype)
    uncond_dit = dit.Ideogram4Transformer.from_pretrained(
        ckpt / "unconditional_transformer", dtype, text_input=False
    )
    for model in (cond_dit, uncond_dit):
        for layer in model.layers:
            layer.attention.score_bytes, layer.feed_forward.chunk_tokens = MODES[mode]
    resident = mx.get_active_memory()
    mx.reset_peak_memory()
    grid, n_text = side // 16, CAPTION_TOKENS[side]
    rng = np.random.default_rng(0)
    feats = mx.array(rng.standard_normal((1, n_text, cond_dit.config.llm_features_dim)), dtype)
    z = mx.array(rng.standard_normal((1, grid * grid, 128)), mx.float32)
    start = time.perf_counter()
    cond, uncond = velocity_fns(cond_dit, uncond_dit, feats, grid, grid)
    mx.eval(cond(z, 0.5))
    mx.eval(uncond(z, 0.5))
    return {
        "activation_gb": (mx.get_peak_memory() - resident) / 1e9,
        "seconds": time.perf_counter() - start,
    }


def spawn(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(f"child {args} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def text_encoder_activation_gb(n_text: int) -> float:
    """Upper bound: 13 bf16 taps + the fp32 features + one layer's temporaries (bf16)."""
    d, f, heads = 4096, 12288, 32
    taps = 13 * n_text * d * 2
    features = 13 * n_text * d * 4
    layer = 3 * n_text * f * 2 + 2 * heads * n_text * n_text * 2 + 4 * n_text * d * 2
    return (taps + features + layer) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ideo4-mem"))
    parser.add_argument(
        "--block-ckpt", type=Path, default=Path("/tmp/ideo4-dit-bench/dit-1-layers")
    )
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 1024, 2048])
    parser.add_argument("--dtype", default="float32", help="activation dtype (CPU: float32)")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs="+")
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "weights":
            out = weights_child(Path(rest[0]), rest[1])
        else:
            out = activations_child(Path(rest[0]), int(rest[1]), rest[2], rest[3])
        print(json.dumps(out))
        return

    q4 = prepare(args.workdir)
    loaded = {
        what: spawn("weights", str(q4), what)
        for what in ("text_encoder", "dits", "dits-low-memory")
    }
    w = {what: r["resident_gb"] for what, r in loaded.items()}
    stream_s = loaded["dits-low-memory"]["stream_s"]
    block = block_gb(q4)
    print(
        f"resident weights (GB): text encoder {w['text_encoder']:.2f}, both DiTs "
        f"{w['dits']:.2f}, both DiTs low-memory {w['dits-low-memory']:.2f}; one block {block:.3f}"
    )
    print(f"low-memory: reading both DiTs' blocks once (one step) took {stream_s} s")
    rows = []
    for side in args.sizes:
        for mode in args.modes:
            act = spawn("activations", str(args.block_ckpt), str(side), mode, args.dtype)
            encode = w["text_encoder"] + text_encoder_activation_gb(CAPTION_TOKENS[side])
            dits = w["dits"] if mode == "normal" else w["dits-low-memory"] + block
            denoise = dits + act["activation_gb"]
            decode = VAE_DECODE_PEAK_GB[side]
            rows.append(
                {
                    "side": side,
                    "mode": mode,
                    "encode": encode,
                    "denoise": denoise,
                    "activations": act["activation_gb"],
                    "decode": decode,
                    "peak": max(encode, denoise, decode),
                }
            )
            r = rows[-1]
            print(
                f"{side}^2 {mode:<10} encode {encode:5.2f}  denoise {denoise:5.2f} "
                f"(activations {r['activations']:.2f})  decode {decode:4.2f}  "
                f"peak {r['peak']:5.2f} GB",
                flush=True,
            )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "weights": w,
                    "block_gb": block,
                    "stream_s": stream_s,
                    "rows": rows,
                    "activation_dtype": args.dtype,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
