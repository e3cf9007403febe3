"""LoRA files without the reference: layouts read onto our names, alphas, strict matching,
unfused application, scales, the pipeline, metadata and replay, and the CLI. Parity with
diffusers' own LoRA loading is in test_lora_parity.py."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from ideogram4_mlx.cli import main
from ideogram4_mlx.lora import (
    LoRAError,
    apply_loras,
    fuse_loras,
    linear_shapes,
    map_module,
    match,
    read_lora,
    set_scale,
)
from ideogram4_mlx.lora_info import describe
from ideogram4_mlx.lora_spec import LoRASpec, parse_lora_option, replay_loras
from ideogram4_mlx.metadata import read_metadata, replay
from ideogram4_mlx.pipeline import load
from ideogram4_mlx.pipeline_options import PipelineOptions
from ideogram4_mlx.transformer import Ideogram4Transformer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
RANK = 4


@pytest.fixture(scope="module")
def shapes(tiny_checkpoint):
    return linear_shapes(Ideogram4Transformer.build(tiny_checkpoint / "transformer"))


def rounded(x, dtype=mx.float32):
    """``x`` rounded to ``dtype`` and back to fp32 (exact: fp16 and bf16 are subsets of fp32)."""
    return np.array(mx.array(x).astype(dtype).astype(mx.float32))


def pair(rng, out, inp, rank=RANK, size=0.1, dtype=mx.float32):
    down = (rng.standard_normal((rank, inp)) * size).astype(np.float32)
    up = (rng.standard_normal((out, rank)) * size).astype(np.float32)
    return rounded(down, dtype), rounded(up, dtype)


def write(path, tensors, metadata=None, dtype=mx.float32):
    """A safetensors file; fp16/bf16 ones are written by MLX (numpy has no bf16)."""
    if dtype == mx.float32:
        save_file(tensors, str(path), metadata=metadata)
    else:
        arrays = {k: mx.array(v).astype(dtype) for k, v in tensors.items()}
        mx.save_safetensors(str(path), arrays, metadata=metadata)
    return path


def layout_file(tmp_path, shapes, layout, seed=0, alpha=None, dtype=mx.float32):
    """Block 0's attention and w1 in ``layout``, every tensor in ``dtype``; returns (path,
    expected {module: W delta})."""
    rng = np.random.default_rng(seed)
    out3, inp = shapes["layers.0.attention.qkv"]
    w1_out, w1_in = shapes["layers.0.feed_forward.w1"]
    tensors, expected = {}, {}
    scale = 1.0 if alpha is None else alpha / RANK
    down, up = pair(rng, w1_out, w1_in, dtype=dtype)
    expected["layers.0.feed_forward.w1"] = scale * up @ down
    if layout in ("diffusers", "split"):
        prefix = "transformer." if layout == "diffusers" else ""
        delta = np.zeros((out3, inp), np.float32)
        for k, name in enumerate(("to_q", "to_k", "to_v")):
            d, u = pair(rng, out3 // 3, inp, dtype=dtype)
            tensors[f"{prefix}layers.0.attention.{name}.lora_A.weight"] = d
            tensors[f"{prefix}layers.0.attention.{name}.lora_B.weight"] = u
            delta[k * out3 // 3 : (k + 1) * out3 // 3] = scale * u @ d
        expected["layers.0.attention.qkv"] = delta
        tensors[f"{prefix}layers.0.feed_forward.w1.lora_A.weight"] = down
        tensors[f"{prefix}layers.0.feed_forward.w1.lora_B.weight"] = up
        metadata = None
        if alpha is not None:
            config = {"transformer.lora_alpha": alpha, "transformer.r": RANK}
            metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(config)}
        return write(tmp_path / f"{layout}.safetensors", tensors, metadata, dtype), expected
    prefix = {"ai-toolkit": "diffusion_model.", "kohya": "diffusion_model.", "diffsynth": ""}
    a, b = ("lora_down", "lora_up") if layout == "kohya" else ("lora_A", "lora_B")
    mid = ".default" if layout == "diffsynth" else ""
    d, u = pair(rng, out3, inp, dtype=dtype)
    expected["layers.0.attention.qkv"] = scale * u @ d
    for module, (dd, uu) in (("attention.qkv", (d, u)), ("feed_forward.w1", (down, up))):
        base = f"{prefix[layout]}layers.0.{module}"
        tensors[f"{base}.{a}{mid}.weight"] = dd
        tensors[f"{base}.{b}{mid}.weight"] = uu
        if alpha is not None:
            tensors[f"{base}.alpha"] = np.array(alpha, np.float32)
    return write(tmp_path / f"{layout}.safetensors", tensors, None, dtype), expected


# --- reading -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout, name, alpha",
    [
        ("diffusers", "diffusers/PEFT", None),
        ("diffusers", "diffusers/PEFT", 8.0),
        ("ai-toolkit", "ai-toolkit", 2.0),
        ("kohya", "ai-toolkit (kohya names)", 16.0),
        ("diffsynth", "DiffSynth-Studio", None),
        ("split", "split to_q/to_k/to_v names", None),
    ],
)
@pytest.mark.parametrize(
    "dtype", [mx.float32, mx.bfloat16, mx.float16], ids=["fp32", "bf16", "fp16"]
)
def test_layouts_read_onto_our_modules_with_their_alphas(
    tmp_path, shapes, layout, name, alpha, dtype
):
    """fp16 and bf16 files (what trainers save) read exactly: their values are fp32 values."""
    path, expected = layout_file(tmp_path, shapes, layout, alpha=alpha, dtype=dtype)
    lora = read_lora(path)
    assert lora.layout == name and lora.ranks == [RANK] and len(lora.sha256) == 64
    assert match(lora, shapes) == []
    for module, delta in expected.items():
        got = np.zeros_like(delta)
        rows = delta.shape[0] // 3
        for d in lora.deltas[module]:
            update = d.alpha_scale * np.array(d.up) @ np.array(d.down)
            if d.third is None:
                got += update
            else:
                got[d.third * rows : (d.third + 1) * rows] += update
        np.testing.assert_allclose(got, delta, rtol=1e-6, atol=1e-7)


def test_float64_files_read_as_fp32(tmp_path, shapes):
    """numpy-made files (F64 weights and alpha; MLX reads no F64) read through numpy; F64 with
    BF16 in one file is refused by name."""
    path, expected = layout_file(tmp_path, shapes, "kohya", alpha=16.0)
    tensors = {k: v.astype(np.float64) for k, v in load_file(str(path)).items()}
    lora = read_lora(write(tmp_path / "f64.safetensors", tensors))
    assert {d.up.dtype for ds in lora.deltas.values() for d in ds} == {mx.float32}
    w1 = lora.deltas["layers.0.feed_forward.w1"][0]
    got = w1.alpha_scale * np.array(w1.up) @ np.array(w1.down)
    np.testing.assert_allclose(got, expected["layers.0.feed_forward.w1"], rtol=1e-6, atol=1e-7)
    torch = pytest.importorskip("torch")  # the one writer here of F64 and BF16 in one file
    from safetensors.torch import save_file as save_torch

    mixed = {k: torch.from_numpy(v) for k, v in tensors.items()}
    mixed[next(iter(mixed))] = mixed[next(iter(mixed))].bfloat16()
    save_torch(mixed, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(LoRAError, match="mixed.safetensors mixes F64 and BF16 tensors"):
        read_lora(tmp_path / "mixed.safetensors")


def test_module_names_map_to_the_checkpoint_names():
    assert map_module("layers.3.attention.to_k") == ("layers.3.attention.qkv", 1)
    assert map_module("layers.3.attention.to_out.0") == ("layers.3.attention.o", None)
    assert map_module("layers.3.feed_forward.w2") == ("layers.3.feed_forward.w2", None)
    assert map_module("final_layer.adaln_modulation") == ("final_layer.adaln_modulation", None)


QKV = "layers.0.attention.qkv"
A_B = {
    f"{QKV}.lora_A.weight": np.ones((4, 8), np.float32),
    f"{QKV}.lora_B.weight": np.ones((8, 4), np.float32),
}
TO_Q = {
    "transformer.layers.0.attention.to_q.lora_A.weight": np.ones((4, 8), np.float32),
    "transformer.layers.0.attention.to_q.lora_B.weight": np.ones((8, 4), np.float32),
}


# ~3**23 ways to split a 23-character module name: hours for `re`, stopped by the deadline
BACKTRACKING = {"([a-z_.0-9]|[a-z_.0-9]|[a-z_.0-9])*[A-Y]": 2}


def peft_header(**config):
    """``lora_adapter_metadata`` holding ``config`` (json.dumps writes NaN as ``NaN``)."""
    return {"lora_adapter_metadata": json.dumps({"lora_alpha": 8, "r": 4, **config})}


@pytest.mark.parametrize(
    "tensors, metadata, message",
    [
        ({f"{QKV}.dora_scale": np.ones((4,), np.float32)}, None, "is DoRA"),
        ({f"{QKV}.weight": np.ones((4, 4), np.float32)}, None, "not a LoRA weight"),
        ({f"{QKV}.lora_A.weight": np.ones((4, 4), np.float32)}, None, "no matching"),
        (
            {**A_B, f"{QKV}.lora_B.weight": np.ones((8, 3), np.float32)},
            None,
            "not a LoRA pair",
        ),
        (
            {**A_B, f"{QKV}.lora_A.weight": np.full((4, 8), np.nan, np.float32)},
            None,
            r"qkv.lora_A.weight holds NaN or inf",
        ),
        (
            {**A_B, f"{QKV}.lora_B.weight": np.full((8, 4), np.inf, np.float32)},
            None,
            r"qkv.lora_B.weight holds NaN or inf",
        ),
        (
            {**A_B, f"{QKV}.lora_A.weight": np.ones((4, 8), np.int32)},
            None,
            r"qkv.lora_A.weight is I32: LoRA weights are floating point",
        ),
        (
            {**A_B, f"{QKV}.lora_B.weight": np.ones((8, 4), np.uint8)},
            None,
            r"qkv.lora_B.weight is U8: LoRA weights are floating point",
        ),
        ({**A_B, f"{QKV}.alpha": np.zeros((0,), np.float32)}, None, r"qkv.alpha has shape \(0,\)"),
        ({**A_B, f"{QKV}.alpha": np.ones((2,), np.float32)}, None, r"qkv.alpha has shape \(2,\)"),
        ({**A_B, f"{QKV}.alpha": np.array(np.nan, np.float32)}, None, r"qkv.alpha is nan"),
        ({**A_B, f"{QKV}.alpha": np.array([np.inf], np.float32)}, None, r"qkv.alpha is inf"),
        ({**A_B, f"{QKV}.alpha": np.array(True)}, None, r"qkv.alpha is BOOL"),
        (TO_Q, {"lora_adapter_metadata": "{"}, "lora_adapter_metadata .* is not valid JSON"),
        (TO_Q, {"lora_adapter_metadata": "[1]"}, "lora_adapter_metadata .* not a JSON object"),
        (TO_Q, peft_header(lora_alpha=float("nan")), "lora_alpha nan is not a finite number"),
        (TO_Q, peft_header(alpha_pattern=["to_q"]), "alpha_pattern is a list, not an object"),
        (TO_Q, peft_header(alpha_pattern={"to_q": "2"}), r"alpha_pattern\['to_q'\] is '2'"),
        (TO_Q, peft_header(alpha_pattern={"to_q": float("nan")}), r"\['to_q'\] is nan, not a"),
        (TO_Q, peft_header(alpha_pattern={"to_q[": 2}), r"key 'to_q\[' is not a valid regular"),
        (TO_Q, peft_header(alpha_pattern={"q" * 300: 2}), r"key 'q+'\.\.\. is 300 characters"),
        (TO_Q, peft_header(use_rslora="yes"), "use_rslora is 'yes', not true or false"),
        # a short pattern that backtracks exponentially on a module name: stopped, not hung
        (TO_Q, peft_header(alpha_pattern=BACKTRACKING), r"took over 0.25 s to match"),
        (TO_Q, peft_header(alpha_pattern=dict.fromkeys(map(str, range(4097)), 2)), "4097 keys"),
    ],
)
def test_bad_lora_files_name_the_key(tmp_path, tensors, metadata, message):
    """One line naming the file and the key or header field; no traceback from the contents."""
    with pytest.raises(LoRAError, match=message) as error:
        read_lora(write(tmp_path / "bad.safetensors", tensors, metadata))
    assert str(error.value).startswith(str(tmp_path / "bad.safetensors"))
    assert "\n" not in str(error.value)


def test_damaged_or_missing_files(tmp_path):
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(LoRAError, match="cut.safetensors is not a readable safetensors file"):
        read_lora(tmp_path / "cut.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_lora(tmp_path / "none.safetensors")


# --- matching --------------------------------------------------------------------------------


def test_unmatched_modules_fail_unless_partial(tmp_path, shapes):
    path, _ = layout_file(tmp_path, shapes, "diffsynth")
    tensors = load_file(str(path))
    d, u = pair(np.random.default_rng(1), *shapes["layers.0.attention.o"])
    tensors["layers.99.attention.o.lora_A.weight"] = d
    tensors["layers.99.attention.o.lora_B.weight"] = u
    lora = read_lora(write(tmp_path / "extra.safetensors", tensors))
    with pytest.raises(LoRAError, match=r"1 of 3 LoRA modules match no layer \(e.g. layers.99"):
        match(lora, shapes)
    assert match(lora, shapes, allow_partial=True) == ["layers.99.attention.o"]
    report = describe(lora, shapes, "tiny")
    assert "shapes    : fits: 2 layers (1 of 3 modules match no layer: " in report[-1]


def test_a_lora_for_another_size_names_key_and_shapes(tmp_path, shapes):
    out, inp = shapes["layers.0.feed_forward.w1"]
    d, u = pair(np.random.default_rng(2), out * 2, inp)
    path = write(
        tmp_path / "big.safetensors",
        {"layers.0.feed_forward.w1.lora_A.weight": d, "layers.0.feed_forward.w1.lora_B.weight": u},
    )
    message = rf"w1.lora_B.weight gives a \({out * 2}, {inp}\) update, but .* is \({out}, {inp}\)"
    with pytest.raises(LoRAError, match=message):
        match(read_lora(path), shapes)


def test_text_encoder_keys_are_refused_by_name(tmp_path, shapes):
    path, _ = layout_file(tmp_path, shapes, "diffusers")
    tensors = load_file(str(path))
    tensors["text_encoder.layers.0.mlp.lora_A.weight"] = np.ones((4, 8), np.float32)
    lora = read_lora(write(tmp_path / "te.safetensors", tensors))
    with pytest.raises(LoRAError, match="1 text-encoder keys .* not supported"):
        match(lora, shapes)


# --- applying ---------------------------------------------------------------------------------


def test_unfused_adds_the_exact_low_rank_term_on_float_and_quantized_layers(tmp_path, shapes):
    path, expected = layout_file(tmp_path, shapes, "split")
    lora = read_lora(path)
    x = mx.random.normal((1, 5, shapes["layers.0.attention.qkv"][1]), key=mx.random.key(0))
    for quantize in (False, True):
        model = nn.Linear(*shapes["layers.0.attention.qkv"][::-1], bias=False)
        holder = nn.Module()
        holder.layers = [nn.Module()]
        holder.layers[0].attention = nn.Module()
        holder.layers[0].attention.qkv = model
        if quantize:
            nn.quantize(holder, group_size=64, bits=4)
        base = holder.layers[0].attention.qkv(x)
        apply_loras(holder, [(lora, 0.5)])
        out = holder.layers[0].attention.qkv(x)
        term = np.array(x) @ (0.5 * expected["layers.0.attention.qkv"]).T
        np.testing.assert_allclose(np.array(out) - np.array(base), term, rtol=1e-4, atol=1e-5)
        assert [k for k, _ in __import__("mlx.utils").utils.tree_flatten(holder.parameters())] == (
            ["layers.0.attention.qkv.weight"]
            if not quantize
            else [
                "layers.0.attention.qkv.weight",
                "layers.0.attention.qkv.scales",
                "layers.0.attention.qkv.biases",
            ]
        )  # the checkpoint's names, nothing added
        assert set_scale(holder, lora.name, 0.0) == 3
        np.testing.assert_array_equal(np.array(holder.layers[0].attention.qkv(x)), np.array(base))
        if quantize:
            with pytest.raises(LoRAError, match="is quantized: a LoRA cannot be fused"):
                fuse_loras(holder, [(lora, 1.0)])


def test_fused_equals_unfused_in_fp32(tmp_path, tiny_checkpoint, shapes):
    path, _ = layout_file(tmp_path, shapes, "ai-toolkit", alpha=2.0)
    lora = read_lora(path)
    component = tiny_checkpoint / "transformer"
    x = mx.random.normal((1, 6, shapes["layers.0.feed_forward.w1"][1]), key=mx.random.key(1))
    outs = []
    for apply in (apply_loras, fuse_loras):
        model = Ideogram4Transformer.from_pretrained(component, mx.float32)
        apply(model, [(lora, 0.7)])
        outs.append(np.array(model.layers[0].feed_forward(x)))
    # fp32: the fused weight is rounded once to fp32; the unfused term adds in another order
    # (~1e-7 of the output's scale per sum; 1e-5 of it bounds the three matmuls).
    np.testing.assert_allclose(outs[0], outs[1], rtol=0, atol=1e-5 * np.abs(outs[1]).max())


# --- the pipeline, metadata and replay ----------------------------------------------------------


def test_pipeline_lora_metadata_scale_and_replay(tmp_path, tiny_checkpoint, shapes):
    path, _ = layout_file(tmp_path, shapes, "diffsynth")
    noise = np.random.default_rng(3).standard_normal((1, 256, 128)).astype(np.float32)
    settings = dict(width=256, height=256, num_steps=2, seed=None)
    plain = load(tiny_checkpoint, dtype="float32", keep_in_memory=True)
    base = plain.generate("a cat", noise=noise, **settings)
    pipe = load(tiny_checkpoint, dtype="float32", keep_in_memory=True, loras=[f"{path}:0.8"])
    with_lora = pipe.generate("a cat", noise=noise, **settings)
    assert np.abs(with_lora.latents - base.latents).max() > 1e-3
    record = with_lora.metadata["loras"][0]
    assert record["name"] == "diffsynth.safetensors" and record["scale"] == 0.8
    assert (record["target"], record["fused"]) == ("cond", False)
    pipe.set_lora_scale("diffsynth.safetensors", 0.0)  # in place, no reload
    np.testing.assert_array_equal(
        pipe.generate("a cat", noise=noise, **settings).latents, base.latents
    )
    with pytest.raises(LoRAError, match="no LoRA named other"):
        pipe.set_lora_scale("other", 1.0)

    stored = {**with_lora.metadata, "seed": 5}
    options, _ = replay(stored, {}, PipelineOptions(loras=[LoRASpec(path)]))
    assert options.loras == (LoRASpec(path, 0.8, "cond"),) and not options.fuse_lora
    assert replay(stored, {}, PipelineOptions(loras=[LoRASpec(path, 0.3)]))[0].loras[0].scale == 0.3
    with pytest.raises(LoRAError, match=r"the image used the LoRA diffsynth.safetensors .* --lora"):
        replay(stored)
    with pytest.raises(ValueError, match="metadata field 'loras'"):
        replay({**stored, "loras": [{"name": 1}]})


def test_replay_finds_a_lora_in_the_hub_cache_by_name_and_hash(tmp_path, shapes, monkeypatch):
    from ideogram4_mlx import hub

    path, _ = layout_file(tmp_path, shapes, "diffsynth")
    (tmp_path / "other").mkdir()
    other, _ = layout_file(tmp_path / "other", shapes, "diffsynth", seed=9)  # same name
    record = {"name": path.name, "sha256": read_lora(path).sha256, "target": "cond", "scale": 2.0}
    monkeypatch.setattr(hub, "cached_files", lambda name: [other, path])  # same name, one fits
    assert replay_loras([record], []) == [LoRASpec(path, 2.0, "cond")]
    monkeypatch.setattr(hub, "cached_files", lambda name: [other])
    with pytest.raises(LoRAError, match="no file with that SHA-256 was given or is in the"):
        replay_loras([record], [])


def test_uncond_target_and_load_errors(tmp_path, tiny_checkpoint, shapes, monkeypatch):
    path, _ = layout_file(tmp_path, shapes, "diffsynth")
    pipe = load(tiny_checkpoint, dtype="float32", loras=[LoRASpec(path, 1.0, "uncond")])
    cond, uncond = pipe.dits()
    assert type(uncond.layers[0].attention.qkv).__name__ == "LoRALinear"
    assert type(cond.layers[0].attention.qkv) is nn.Linear  # an uncond LoRA leaves cond alone
    with pytest.raises(LoRAError, match="--fuse-lora with --low-memory"):
        load(tiny_checkpoint, loras=[str(path)], fuse_lora=True, low_memory=True)
    tight = load(
        tiny_checkpoint, dtype="float32", loras=[str(path)], fuse_lora=True, memory_limit=1e-6
    )
    monkeypatch.setattr(Ideogram4Transformer, "from_pretrained", lambda *a, **k: 1 / 0)
    with pytest.raises(LoRAError, match=r"memory budget \(0\.0 GB\) streams 4 of them"):
        tight.dits()  # refused from the plan, before any weights load
    nan_alpha = write(
        tmp_path / "nan.safetensors", {**A_B, f"{QKV}.alpha": np.array(np.nan, np.float32)}
    )
    with pytest.raises(LoRAError, match=r"nan.safetensors: layers.0.attention.qkv.alpha is nan"):
        load(tiny_checkpoint, dtype="float32", loras=[str(nan_alpha)]).dits()  # no weights loaded
    with pytest.raises(LoRAError, match="is loaded already"):
        load(tiny_checkpoint, dtype="float32", loras=[str(path), str(path)])
    with pytest.raises(LoRAError, match="LoRA target 'both'"):
        LoRASpec(path, 1.0, "both")


def test_a_spec_has_one_scale_resolved_to_a_float():
    """``scale`` is the one name: None (not given: 1, or the stored one in a replay) until the
    pipeline or the converter resolves it."""
    assert LoRASpec("a.safetensors").resolved() == LoRASpec("a.safetensors", 1.0)
    assert type(LoRASpec("a.safetensors", 2).resolved().scale) is float
    assert not hasattr(LoRASpec("a.safetensors"), "weight")


def test_parse_lora_option():
    assert parse_lora_option("a.safetensors") == LoRASpec("a.safetensors", None)
    assert parse_lora_option("a.safetensors:0.5") == LoRASpec("a.safetensors", 0.5)
    assert parse_lora_option("owner/repo:-1", "uncond") == LoRASpec("owner/repo", -1.0, "uncond")
    assert parse_lora_option("dir:name/file") == LoRASpec("dir:name/file", None)
    for bad in ("a:nan", "a:inf", "a:1000"):
        with pytest.raises(LoRAError, match="use a finite number within"):
            parse_lora_option(bad)
    assert replay_loras(None, []) == []


# --- the command line ------------------------------------------------------------------------


def test_cli_generate_with_lora_and_lora_info(tmp_path, tiny_checkpoint, shapes):
    path, _ = layout_file(tmp_path, shapes, "kohya", alpha=8.0, dtype=mx.bfloat16)  # as trained
    out = tmp_path / "out.png"
    args = ["generate", "--model", str(tiny_checkpoint), "--dtype", "float32", "--prompt", "a"]
    args += ["--width", "256", "--height", "256", "--steps", "2", "--seed", "1"]
    result = CliRunner().invoke(main, [*args, "--lora", f"{path}:0.5", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert read_metadata(out)["loras"][0]["scale"] == 0.5
    again = tmp_path / "again.png"
    result = CliRunner().invoke(
        main, ["generate", "--from-metadata", str(out), "--lora", str(path), "-o", str(again)]
    )
    assert result.exit_code == 0 and "replay: identical" in result.output, result.output
    result = CliRunner().invoke(main, [*args, "--lora", f"{path}:nan", "-o", str(out)])
    assert result.exit_code == 2 and "use a finite number" in result.output

    result = CliRunner().invoke(main, ["lora-info", str(path), "--model", str(tiny_checkpoint)])
    assert result.exit_code == 0, result.output
    assert "layout    : ai-toolkit (kohya names)" in result.output
    assert "alpha / r : 2" in result.output and "names     : 2 of 2 modules" in result.output
    assert "shapes    : fits: 2 layers\n" in result.output
    result = CliRunner().invoke(main, ["lora-info", str(path)])  # the real shapes: no fit
    assert result.exit_code == 0 and "shapes    : do not fit" in result.output
    bad = write(tmp_path / "bad.safetensors", TO_Q, peft_header(alpha_pattern=["to_q"]))
    never = tmp_path / "never.png"
    for command in (["lora-info", str(bad)], [*args, "--lora", str(bad), "-o", str(never)]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 1, result.output
        assert result.output.count("\n") == 1 and "alpha_pattern is a list" in result.output
    assert not never.exists()


def test_convert_bakes_a_lora_and_records_it(tmp_path, tiny_checkpoint, shapes):
    from ideogram4_mlx.convert import convert
    from ideogram4_mlx.weights import conversion_record

    path, _ = layout_file(tmp_path, shapes, "diffsynth", dtype=mx.bfloat16)
    dst = convert(
        tiny_checkpoint,
        tmp_path / "baked",
        dtype="float32",
        components=("transformer",),
        loras=[f"{path}:0.5"],
        progress=False,
    )
    record = conversion_record(dst / "transformer")["loras"][0]
    assert (record["name"], record["scale"], record["layout"]) == (
        "diffsynth.safetensors",
        0.5,
        "DiffSynth-Studio",
    )
    x = mx.random.normal((1, 6, shapes["layers.0.attention.qkv"][1]), key=mx.random.key(2))
    baked = Ideogram4Transformer.from_pretrained(dst / "transformer", mx.float32)
    unfused = Ideogram4Transformer.from_pretrained(tiny_checkpoint / "transformer", mx.float32)
    apply_loras(unfused, [(read_lora(path), 0.5)])
    for module in ("attention.qkv", "feed_forward.w1"):
        a = getattr(getattr(baked.layers[0], module.split(".")[0]), module.split(".")[1])(x)
        b = getattr(getattr(unfused.layers[0], module.split(".")[0]), module.split(".")[1])(x)
        # fp32: one merged weight vs base + low-rank term; sums of 256 products round
        # differently, ~1e-7 of the output's scale each: 1e-5 of it bounds them
        a, b = np.array(a), np.array(b)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())
    bad = write(
        tmp_path / "bad.safetensors",
        {
            "layers.7.attention.o.lora_A.weight": np.ones((2, 4), np.float32),
            "layers.7.attention.o.lora_B.weight": np.ones((4, 2), np.float32),
        },
    )
    with pytest.raises(LoRAError, match="match no layer"):
        convert(tiny_checkpoint, tmp_path / "never", loras=[str(bad)], progress=False)
    assert not (tmp_path / "never").exists()  # refused before anything was written


def test_low_memory_streaming_with_an_unfused_lora_is_the_same(tmp_path, tiny_checkpoint, shapes):
    """Streamed blocks hold empty weights between passes: the LoRA must not size itself or
    take its dtype from them (split q/k/v thirds need the real output size)."""
    path, _ = layout_file(tmp_path, shapes, "diffusers", alpha=8.0)
    noise = np.random.default_rng(4).standard_normal((1, 256, 128)).astype(np.float32)
    settings = dict(width=256, height=256, num_steps=2)
    results = []
    for low_memory in (False, True):
        pipe = load(tiny_checkpoint, dtype="bfloat16", low_memory=low_memory, loras=[f"{path}:0.7"])
        results.append(pipe.generate("a cat", noise=noise, **settings).latents)
        qkv = pipe.dits()[0].layers[0].attention.qkv
        assert qkv.lora.out_features == shapes["layers.0.attention.qkv"][0]
        assert all(d.up.dtype == mx.bfloat16 for _, d, _ in qkv.lora.items)
    np.testing.assert_array_equal(results[0], results[1])


def test_peft_alpha_pattern_and_rslora(tmp_path, shapes):
    """peft's scaling: alpha / r, alpha_pattern keys match a suffix of the module path (with
    alternatives), use_rslora scales by alpha / sqrt(r)."""
    path, _ = layout_file(tmp_path, shapes, "diffusers")
    tensors = load_file(str(path))
    config = {"lora_alpha": 8, "r": RANK, "alpha_pattern": {"to_q|to_k": 2}}
    metadata = {"lora_adapter_metadata": json.dumps(config)}
    lora = read_lora(write(tmp_path / "pattern.safetensors", tensors, metadata))
    scales = {d.third: d.alpha_scale for d in lora.deltas["layers.0.attention.qkv"]}
    assert scales == {0: 2 / RANK, 1: 2 / RANK, 2: 8 / RANK}
    assert lora.deltas["layers.0.feed_forward.w1"][0].alpha_scale == 8 / RANK
    metadata = {"lora_adapter_metadata": json.dumps({"lora_alpha": 8, "use_rslora": True})}
    lora = read_lora(write(tmp_path / "rs.safetensors", tensors, metadata))
    assert lora.deltas["layers.0.feed_forward.w1"][0].alpha_scale == 8 / RANK**0.5


# Keys of an alpha_pattern that a substring match (re.search) or a prefix match (re.match
# without $) would apply to the wrong layers: peft's match is a dot-bounded suffix of the name.
SUFFIX_PATTERN = {"layers.1": 16, "1.feed_forward.w1": 2, "layers.11.feed_forward.w2": 4}
SUFFIX_ALPHAS = {  # lora_alpha 8 where no key matches
    "layers.1.feed_forward.w1": 2,
    "layers.11.feed_forward.w1": 8,
    "layers.1.feed_forward.w2": 8,
    "layers.11.feed_forward.w2": 4,
}


def suffix_pattern_file(path):
    """Layers 1 and 11 (names one substring apart) under :data:`SUFFIX_PATTERN`."""
    rng = np.random.default_rng(6)
    tensors = {}
    for module in SUFFIX_ALPHAS:
        down, up = pair(rng, 8, 8)
        tensors[f"transformer.{module}.lora_A.weight"] = down
        tensors[f"transformer.{module}.lora_B.weight"] = up
    return write(path, tensors, peft_header(alpha_pattern=SUFFIX_PATTERN))


def test_alpha_pattern_keys_match_a_dot_bounded_suffix(tmp_path):
    """``layers.1`` names no linear (the key must reach the end of the name) and
    ``1.feed_forward.w1`` is layer 1's w1 only, not layer 11's."""
    lora = read_lora(suffix_pattern_file(tmp_path / "suffix.safetensors"))
    got = {module: ds[0].alpha_scale * RANK for module, ds in lora.deltas.items()}
    assert got == SUFFIX_ALPHAS


def test_partial_lora_warns_with_the_count_and_runs(tmp_path, tiny_checkpoint, shapes):
    path, _ = layout_file(tmp_path, shapes, "diffsynth")
    tensors = load_file(str(path))
    d, u = pair(np.random.default_rng(5), *shapes["layers.0.attention.o"])
    tensors["layers.42.attention.o.lora_A.weight"] = d
    tensors["layers.42.attention.o.lora_B.weight"] = u
    partial = write(tmp_path / "partial.safetensors", tensors)
    with pytest.raises(LoRAError, match="match no layer"):
        load(tiny_checkpoint, dtype="float32", loras=[str(partial)])
    with pytest.warns(UserWarning, match=r"1 of 3 modules match no layer and are skipped"):
        pipe = load(tiny_checkpoint, dtype="float32", loras=[str(partial)], lora_allow_partial=True)
    result = pipe.generate("a cat", width=256, height=256, num_steps=1, seed=1)
    assert result.metadata["loras"][0]["name"] == "partial.safetensors"


# The sites of ostris/ideogram_4_turbotime_lora as described by third-party readers of the
# file (not by its card): ai-toolkit names, lora_A/lora_B in bf16, no .alpha, all six block
# linears of every layer. README "Faster and lighter" has the sources.
TURBOTIME_SITES = (
    "adaln_modulation",
    "attention.qkv",
    "attention.o",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
)


def test_a_turbotime_shaped_lora_reads_onto_every_block_linear(tmp_path, tiny_checkpoint, shapes):
    rng = np.random.default_rng(5)
    layers = sorted({int(m.split(".")[1]) for m in shapes if m.startswith("layers.")})
    tensors, expected = {}, {}
    for i in layers:
        for site in TURBOTIME_SITES:
            down, up = pair(rng, *shapes[f"layers.{i}.{site}"], dtype=mx.bfloat16)
            tensors[f"diffusion_model.layers.{i}.{site}.lora_A.weight"] = down
            tensors[f"diffusion_model.layers.{i}.{site}.lora_B.weight"] = up
            expected[f"layers.{i}.{site}"] = up @ down
    path = write(tmp_path / "turbotime_shaped.safetensors", tensors, None, mx.bfloat16)
    lora = read_lora(path)
    assert lora.layout == "ai-toolkit" and match(lora, shapes) == []
    assert set(lora.deltas) == set(expected)
    for module, delta in expected.items():
        (d,) = lora.deltas[module]
        assert d.alpha_scale == 1.0  # no .alpha: alpha = rank
        np.testing.assert_array_equal(np.array(d.up) @ np.array(d.down), delta)
    pipe = load(tiny_checkpoint, dtype=mx.float32, lora=str(path))  # the conditional DiT's
    assert [s.target for s, _ in pipe.loras] == ["cond"]
