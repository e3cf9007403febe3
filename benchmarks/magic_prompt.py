"""Magic prompt decoding, side by side: constrained vs unconstrained tokens/s, the caption
constraint's per-token cost at the real 151,936-token vocabulary, and three grammar engines.

- Tokenizer: the synthetic byte-level BPE (``ideogram4_mlx/synth/tokenizer.py``) grown by
  random valid merges (pairs of existing word pieces) to Qwen's 151,643 + 26 special tokens,
  logits 151,936 wide. Real Qwen has more punctuation/CJK/code pieces; mask cost depends on
  the vocabulary's shape, so treat the numbers as the right order, not exact.
- Engines: llguidance, xgrammar and outlines-core on the same caption JSON schema (compile time,
  per-token mask time while teacher-forcing a real-sized caption), plus ours (llguidance on
  the Lark grammar of ``magic/constrain.py``, through the mlx-lm processor).
- Decode: a small random Qwen3 with the full vocabulary through ``mlx_lm.stream_generate``,
  with and without the processor; and one decode step of the 8B text decoder (4096 wide) timed
  on ``--slice-layers`` layers + the 151,936 lm_head and scaled to 36 layers.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python benchmarks/magic_prompt.py
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import random
import statistics
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.models import qwen3
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from ideogram4_mlx.magic.constrain import caption_processor
from ideogram4_mlx.synth.tokenizer import tokenizer_files

QWEN_BPE_TOKENS = 151_643
LOGITS_WIDTH = 151_936
REAL_LAYERS = 36
RESULTS = Path(__file__).parent / "results"
CAPTION = {
    "high_level_description": "A red fox in a worn tweed coat sits on a wet city curb at night, "
    "reading a flickering neon sign that says OPEN above a small noodle shop.",
    "style_description": {
        "aesthetics": "cinematic, moody, rain-soaked urban night with warm and cool contrast",
        "lighting": "pink and cyan neon from the sign, soft reflections on wet asphalt",
        "photo": "35mm lens, f/1.8, shallow depth of field, slight film grain",
        "medium": "photograph",
        "color_palette": ["#FF3EA5", "#1EC8E6", "#2B1B17", "#F2C14E"],
    },
    "compositional_deconstruction": {
        "background": "a narrow street with shuttered shops, puddles and light rain",
        "elements": [
            {"type": "obj", "desc": "a red fox sitting upright, head tilted up at the sign"},
            {"type": "text", "text": "OPEN", "desc": "pink neon script, slightly flickering"},
            {"type": "obj", "desc": "a steaming noodle shop doorway with a paper lantern"},
        ],
    },
}


def big_tokenizer(seed: int = 0) -> PreTrainedTokenizerFast:
    """The synthetic BPE grown to Qwen's size by merges of existing word pieces."""
    spec = json.loads(dict(tokenizer_files()["files"])["tokenizer.json"])
    vocab, merges, added = spec["model"]["vocab"], spec["model"]["merges"], spec["added_tokens"]
    words = [t for t in vocab if t.lstrip("Ġ").isalpha()]
    tails = [t for t in words if not t.startswith("Ġ")]
    rng = random.Random(seed)
    while len(vocab) < QWEN_BPE_TOKENS:
        a, b = rng.choice(words), rng.choice(tails)
        if len(a + b) <= 16 and a + b not in vocab:
            vocab[a + b] = len(vocab)
            merges.append(f"{a} {b}")
            words.append(a + b)
    for i, t in enumerate(added):
        t["id"] = QWEN_BPE_TOKENS + i
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    assert len(tok) == QWEN_BPE_TOKENS + len(added), len(tok)
    return tok


def caption_schema() -> dict:
    """The caption as a JSON schema, for comparing engines on equal terms."""
    s = {"type": "string", "minLength": 1, "maxLength": 1000}
    color = {"type": "string", "pattern": "^#[0-9A-F]{6}$"}

    def palette(n):
        return {"type": "array", "items": color, "minItems": 1, "maxItems": n}

    def obj(props, required):
        return {
            "type": "object",
            "properties": props,
            "required": required,
            "additionalProperties": False,
        }

    photo = obj(
        {"aesthetics": s, "lighting": s, "photo": s, "medium": s, "color_palette": palette(16)},
        ["aesthetics", "lighting", "photo", "medium"],
    )
    art = obj(
        {"aesthetics": s, "lighting": s, "medium": s, "art_style": s, "color_palette": palette(16)},
        ["aesthetics", "lighting", "medium", "art_style"],
    )
    o = obj({"type": {"const": "obj"}, "desc": s, "color_palette": palette(5)}, ["type", "desc"])
    t = obj(
        {"type": {"const": "text"}, "text": s, "desc": s, "color_palette": palette(5)},
        ["type", "text", "desc"],
    )
    elements = {"type": "array", "items": {"anyOf": [o, t]}, "minItems": 1, "maxItems": 16}
    comp = obj({"background": s, "elements": elements}, ["background", "elements"])
    return obj(
        {
            "high_level_description": s,
            "style_description": {"anyOf": [photo, art]},
            "compositional_deconstruction": comp,
        },
        ["high_level_description", "compositional_deconstruction"],
    )


def _walk(compute_mask, consume, tokens) -> list[float]:
    times = []
    for t in tokens:
        start = time.perf_counter()
        compute_mask()
        times.append(time.perf_counter() - start)
        if consume(t) is False:
            raise RuntimeError(f"token {t} rejected after {len(times)} tokens")
    return times


def engine_llguidance(tok, tokens):
    import llguidance
    import llguidance.hf

    start = time.perf_counter()
    ll = llguidance.hf.from_tokenizer(tok, n_vocab=LOGITS_WIDTH)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        caption_schema(), defaults={"whitespace_flexible": False}
    )
    m = llguidance.LLMatcher(ll, grammar)
    compile_s = time.perf_counter() - start
    assert not m.is_error(), m.get_error()
    return compile_s, _walk(m.compute_bitmask, m.consume_token, tokens)


def engine_xgrammar(tok, tokens):
    import xgrammar as xgr

    start = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=LOGITS_WIDTH)
    compiled = xgr.GrammarCompiler(info).compile_json_schema(
        caption_schema(), any_whitespace=False, separators=(",", ":")
    )
    m = xgr.GrammarMatcher(compiled)
    compile_s = time.perf_counter() - start
    mask = xgr.allocate_token_bitmask(1, LOGITS_WIDTH)
    return compile_s, _walk(lambda: m.fill_next_token_bitmask(mask), m.accept_token, tokens)


def engine_outlines_core(tok, tokens):
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    start = time.perf_counter()
    decode = {i: tok.convert_tokens_to_string([t]) for t, i in tok.get_vocab().items()}
    vocab = {}
    for i, text in decode.items():
        if i != tok.eos_token_id and i < QWEN_BPE_TOKENS:
            vocab.setdefault(text, []).append(i)
    regex = build_regex_from_schema(json.dumps(caption_schema()))
    guide = Guide(Index(regex, Vocabulary(tok.eos_token_id, vocab)))
    compile_s = time.perf_counter() - start
    return compile_s, _walk(guide.get_tokens, guide.advance, tokens)


ENGINES = {
    "llguidance": engine_llguidance,
    "xgrammar": engine_xgrammar,
    "outlines-core": engine_outlines_core,
}


def _run_engine(name, queue):
    tok = big_tokenizer()
    tokens = tok.encode(json.dumps(CAPTION, ensure_ascii=False, separators=(",", ":")))
    compile_s, times = ENGINES[name](tok, tokens)
    queue.put((compile_s, times))


def engine_row(name: str, timeout_s: float) -> dict:
    """One engine in its own process (outlines-core's index build can run for minutes)."""
    queue = multiprocessing.get_context("spawn").Queue()
    proc = multiprocessing.get_context("spawn").Process(target=_run_engine, args=(name, queue))
    proc.start()
    proc.join(timeout_s)
    if proc.is_alive():
        proc.kill()
        return {"engine": name, "error": f"did not compile within {timeout_s:.0f} s"}
    if queue.empty():
        return {"engine": name, "error": f"failed (exit code {proc.exitcode})"}
    compile_s, times = queue.get()
    return {"engine": name, "compile_s": compile_s, **_stats(times)}


def _stats(times: list[float]) -> dict:
    ms = sorted(t * 1e3 for t in times)
    return {
        "tokens": len(ms),
        "mask_ms_mean": statistics.fmean(ms),
        "mask_ms_p50": ms[len(ms) // 2],
        "mask_ms_p99": ms[int(len(ms) * 0.99)],
    }


def ours_row(wrapper: TokenizerWrapper) -> dict:
    """Our processor end to end (mask + bit unpack + mx.where on 151,936 logits) per token."""
    start = time.perf_counter()
    proc = caption_processor(wrapper)
    compile_s = time.perf_counter() - start
    logits = mx.zeros((1, LOGITS_WIDTH))
    tokens = wrapper.encode("prompt")
    times = []
    for t in [None, *wrapper.encode(json.dumps(CAPTION, ensure_ascii=False))]:
        tokens = tokens + ([t] if t is not None else [])
        start = time.perf_counter()
        mx.eval(proc(mx.array(tokens), logits))
        times.append(time.perf_counter() - start)
    assert proc.done
    return {
        "engine": "ours (llguidance Lark + mlx-lm processor)",
        "compile_s": compile_s,
        **_stats(times),
    }


def qwen3_model(hidden: int, layers: int, heads: int, kv_heads: int, mlp: int) -> qwen3.Model:
    args = qwen3.ModelArgs(
        model_type="qwen3",
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=mlp,
        num_attention_heads=heads,
        rms_norm_eps=1e-6,
        vocab_size=LOGITS_WIDTH,
        num_key_value_heads=kv_heads,
        max_position_embeddings=40960,
        head_dim=hidden // heads if hidden < 4096 else 128,
        tie_word_embeddings=False,
        rope_theta=5e6,
    )
    model = qwen3.Model(args)
    mx.eval(model.parameters())
    return model


def decode_rows(wrapper: TokenizerWrapper, max_tokens: int) -> list[dict]:
    """tokens/s of a small full-vocabulary Qwen3, without and with the constraint."""
    mx.random.seed(0)
    model = qwen3_model(hidden=512, layers=4, heads=8, kv_heads=4, mlp=1536)
    prompt = wrapper.encode("Write a caption for: a fox reading a neon sign that says OPEN")
    rows = []
    for constrained in (False, True, False, True):  # twice each; the second pair is reported
        mx.random.seed(1)
        procs = [caption_processor(wrapper)] if constrained else None
        last = None
        for response in stream_generate(
            model,
            wrapper,
            prompt,
            max_tokens,
            sampler=make_sampler(temp=1.0),
            logits_processors=procs,
        ):
            last = response
        rows.append(
            {
                "constrained": constrained,
                "tokens": last.generation_tokens,
                "tokens_per_s": last.generation_tps,
            }
        )
    return rows[2:]


def full_step_ms(slice_layers: int, repeats: int = 5) -> dict:
    """One decode step of the 8B text decoder (fp32 here): slice of layers + head, scaled."""

    def step_ms(layers):
        model = qwen3_model(hidden=4096, layers=layers, heads=32, kv_heads=8, mlp=12288)
        cache = make_prompt_cache(model)
        mx.eval(model(mx.zeros((1, 64), dtype=mx.int32), cache=cache))  # a 64-token context
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            mx.eval(model(mx.zeros((1, 1), dtype=mx.int32), cache=cache))
            times.append(time.perf_counter() - start)
        del model, cache
        return statistics.median(times) * 1e3

    small, big = step_ms(slice_layers), step_ms(2 * slice_layers)
    per_layer = (big - small) / slice_layers
    return {
        "slice_layers": [slice_layers, 2 * slice_layers],
        "step_ms": [small, big],
        "per_layer_ms": per_layer,
        "estimate_36_layers_ms": small + per_layer * (REAL_LAYERS - slice_layers),
    }


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    cores = multiprocessing.cpu_count()
    return (
        f"{platform.platform()}, {cpu}, {cores} cores, mlx {mx.__version__} {mx.default_device()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--slice-layers", type=int, default=1)
    parser.add_argument("--engine-timeout", type=float, default=180.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "magic_prompt_cpu.json")
    args = parser.parse_args()

    tok = big_tokenizer()
    wrapper = TokenizerWrapper(tok)
    result = {"machine": machine(), "vocab": len(tok), "logits_width": LOGITS_WIDTH}
    result["engines"] = [engine_row(n, args.engine_timeout) for n in ENGINES]
    result["engines"].append(ours_row(wrapper))
    result["decode"] = decode_rows(wrapper, args.max_tokens)
    result["full_width_step"] = full_step_ms(args.slice_layers)
    ours = result["engines"][-1]["mask_ms_mean"]
    result["overhead_vs_8b_step"] = ours / result["full_width_step"]["estimate_36_layers_ms"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(report(result))
    args.out.with_suffix(".txt").write_text(report(result) + "\n")


def report(r: dict) -> str:
    lines = [
        f"machine: {r['machine']}",
        f"vocabulary {r['vocab']}, logits {r['logits_width']}",
        "",
        f"{'engine':44} {'compile s':>9} {'mask ms mean':>12} {'p50':>7} {'p99':>7}",
    ]
    for e in r["engines"]:
        if "error" in e:
            lines.append(f"{e['engine']:44} {e['error']}")
        else:
            lines.append(
                f"{e['engine']:44} {e['compile_s']:9.2f} {e['mask_ms_mean']:12.3f} "
                f"{e['mask_ms_p50']:7.3f} {e['mask_ms_p99']:7.3f}"
            )
    lines += ["", "decode (random Qwen3 512x4, full vocabulary, temperature 1):"]
    for d in r["decode"]:
        kind = "constrained  " if d["constrained"] else "unconstrained"
        lines.append(f"  {kind} {d['tokens']:4d} tokens  {d['tokens_per_s']:8.1f} tokens/s")
    f = r["full_width_step"]
    lines += [
        "",
        f"8B decoder step (fp32, {f['slice_layers']} layers + head measured): "
        f"{f['estimate_36_layers_ms']:.0f} ms estimated for 36 layers",
        f"constraint overhead per token: {r['overhead_vs_8b_step']:.2%} of that step "
        "(target <= 10%)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
