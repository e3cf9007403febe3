"""bitsandbytes 4-bit checkpoints (ideogram4_mlx.sources.nf4, ideogram4_mlx.synth.nf4).

Parity is exact, bit for bit: the decode must be the formula ``quant_map[code] * absmax[block]``
in float32 (one IEEE multiply per value, nothing to round differently), checked against an
independent numpy implementation here and against bitsandbytes' own dequantize_4bit (the
``reference`` extra). bitsandbytes rounds its float32 result once to the layer's dtype, so for
bf16/fp16 layers our float32 rounded once must equal its output. One known difference, by value
equal: its native fp4 kernel returns -0.0 for code 8, whose table entry is +0.0.
End to end: the synthetic nf4 layouts load, generate and convert; the converted DiT weights are
the decode rounded to bf16 once.
"""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import require_describe, require_modules
from mlx.utils import tree_flatten
from safetensors.numpy import save_file

from ideogram4_mlx.config import CheckpointError
from ideogram4_mlx.convert import convert
from ideogram4_mlx.pipeline import load
from ideogram4_mlx.sources import detect, nf4
from ideogram4_mlx.synth.nf4 import (
    NF4_TABLE,
    QUANTIZATION_CONFIG,
    quant_state_bytes,
    quantize_nf4,
    write_nf4_checkpoint,
)
from ideogram4_mlx.text_encoder import Qwen3VLTextEncoder
from ideogram4_mlx.transformer import Ideogram4Transformer
from ideogram4_mlx.weights import source_headers, tensor_headers

CAPTION = (
    '{"high_level_description":"a red sign","compositional_deconstruction":'
    '{"background":"white","elements":[{"type":"text","text":"OPEN","desc":"bold"}]}}'
)
FAST = {"width": 256, "height": 256, "num_steps": 2, "seed": 3}
SHAPES = [(64, 128), (33, 128), (7, 130), (3, 5), (1, 1), (300, 256)]


def require_bitsandbytes():
    """bitsandbytes (the ``reference`` extra)."""
    return require_modules("torch", "bitsandbytes.functional", extra="reference extra")


def formula(packed, absmax, quant_map, shape, blocksize):
    """The dequantization written out in numpy, independently of the library."""
    b = np.asarray(packed).reshape(-1)
    codes = np.empty(2 * b.size, np.uint8)
    codes[0::2], codes[1::2] = b >> 4, b & 0x0F
    n = shape[0] * shape[1]
    per_value = np.repeat(np.asarray(absmax, np.float32), blocksize)[:n]
    return (np.asarray(quant_map, np.float32)[codes[:n]] * per_value).reshape(shape)


def group(name, packed, absmax, state, quant_map=NF4_TABLE, kind="nf4"):
    """The four tensors of one bitsandbytes layer, as numpy arrays for save_file."""
    raw = state if isinstance(state, bytes) else json.dumps(state).encode()
    return {
        name: packed,
        name + ".absmax": absmax,
        name + ".quant_map": np.asarray(quant_map, np.float32),
        f"{name}.quant_state.bitsandbytes__{kind}": np.frombuffer(raw, np.uint8).copy(),
    }


def bits(a) -> np.ndarray:
    return np.asarray(a, np.float32).view(np.uint32)


# ---------------------------------------------------------------------------------------------
# The decode against the formula and against bitsandbytes


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", [32, 64, 128])
def test_decode_is_the_formula_bit_for_bit(shape, blocksize):
    rng = np.random.default_rng(sum(shape) + blocksize)
    n = shape[0] * shape[1]
    packed = rng.integers(0, 256, (-(-n // 2), 1), dtype=np.uint8)
    absmax = rng.uniform(0, 3, -(-n // blocksize)).astype(np.float32)
    state = {"quant_type": "nf4", "blocksize": blocksize, "dtype": "bfloat16", "shape": [*shape]}
    arrays = {k: mx.array(v) for k, v in group("w.weight", packed, absmax, state).items()}
    arrays["b.bias"] = mx.zeros(3)
    out = nf4.decode(arrays)
    assert sorted(out) == ["b.bias", "w.weight"] and out["w.weight"].dtype == mx.float32
    expected = formula(packed, absmax, NF4_TABLE, shape, blocksize)
    np.testing.assert_array_equal(bits(out["w.weight"]), bits(expected))


def save_bnb(path, bnb, w, quant_type, nested):
    q, state = bnb.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=nested)
    tensors = {"l.weight": q.numpy()}
    tensors.update({"l.weight." + k: v.numpy() for k, v in state.as_dict(packed=True).items()})
    save_file(tensors, str(path))
    return q, state


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double-quant"])
def test_decode_equals_bitsandbytes_dequantize_4bit(tmp_path, quant_type, nested):
    bnb = require_bitsandbytes()
    import torch

    torch.manual_seed(0)
    for shape in SHAPES:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            path = tmp_path / "layer.safetensors"
            q, state = save_bnb(path, bnb, torch.randn(*shape).to(dtype), quant_type, nested)
            headers = nf4.decoded_headers(tensor_headers([path]))
            assert {k: v[:2] for k, v in headers.items()} == {"l.weight": ("F32", shape)}
            ours = nf4.decode(mx.load(str(path)))["l.weight"]
            theirs = bnb.dequantize_4bit(q, state)
            rounded = np.array(ours.astype(getattr(mx, str(dtype)[6:])).astype(mx.float32))
            np.testing.assert_array_equal(rounded, theirs.float().numpy())  # by value
            if quant_type == "nf4" and dtype == torch.float32:
                np.testing.assert_array_equal(bits(ours), bits(theirs.numpy()))


def test_synthetic_quantizer_is_bitsandbytes_quantize_4bit():
    bnb = require_bitsandbytes()
    import torch

    torch.manual_seed(1)
    for shape in [*SHAPES, (2, 63)]:
        w = torch.randn(*shape).to(torch.bfloat16)
        w[0, :] = 0  # an all-zero block
        q, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
        packed, absmax = quantize_nf4(w.float().numpy())
        np.testing.assert_array_equal(packed, q.numpy())
        np.testing.assert_array_equal(bits(absmax), bits(state.absmax.numpy()))
        assert quant_state_bytes(shape) == bytes(
            state.as_dict(packed=True)["quant_state.bitsandbytes__nf4"].tolist()
        ).replace(b'"float32"', b'"bfloat16"')
        np.testing.assert_array_equal(bits(NF4_TABLE), bits(state.code.numpy()))


def test_quantization_config_is_what_diffusers_and_transformers_write():
    require_bitsandbytes()
    import diffusers
    import torch
    import transformers

    for library in (diffusers, transformers):
        config = library.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
        assert json.loads(json.dumps(config.to_dict())) == QUANTIZATION_CONFIG


# ---------------------------------------------------------------------------------------------
# Bad files: one line naming the file, the key and the fix


def valid_group(shape=(4, 64)):
    packed, absmax = quantize_nf4(np.random.default_rng(0).standard_normal(shape))
    state = {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": list(shape)}
    return packed, absmax, state


def corrupt(suffix: str, value):
    """A valid layer ``x.weight`` with the tensor ``x.weight{suffix}`` replaced (None: gone)."""
    packed, absmax, state = valid_group()
    tensors = group("x.weight", packed, absmax, state)
    if value is None:
        tensors.pop("x.weight" + suffix)
    else:
        tensors["x.weight" + suffix] = value
    return tensors


BAD = {
    "truncated JSON": (
        corrupt(
            ".quant_state.bitsandbytes__nf4", np.frombuffer(b'{"quant_type": "nf4", "bl', "u1")
        ),
        "not JSON",
    ),
    "huge JSON": (
        corrupt(".quant_state.bitsandbytes__nf4", np.zeros(70000, "u1")),
        "at most 65536",
    ),
    "wrong absmax length": (
        corrupt(".absmax", np.ones(3, np.float32)),
        "x.weight.absmax is F32 (3,)",
    ),
    "non-finite absmax": (
        corrupt(".absmax", np.array([1, np.inf, 1, 1], np.float32)),
        "non-finite scales",
    ),
    "unknown quant_type": (
        {
            k.replace("__nf4", "__int4"): v
            for k, v in group(
                "x.weight", *valid_group()[:2], {**valid_group()[2], "quant_type": "int4"}
            ).items()
        },
        "quant_type 'int4'",
    ),
    "packed bytes of another size": (corrupt("", np.zeros((100, 1), np.uint8)), "x.weight is U8"),
    "quant_map not the nf4 table": (
        corrupt(".quant_map", np.linspace(-1, 1, 16, dtype=np.float32)),
        "not bitsandbytes' nf4 table",
    ),
    "missing quant_map": (corrupt(".quant_map", None), "x.weight.quant_map is missing"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_files_are_one_line_errors_naming_file_and_key(tmp_path, case):
    tensors, expected = BAD[case]
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError) as e:
        nf4.decoded_headers(tensor_headers([path]))
    message = str(e.value)
    assert "\n" not in message and expected in message, message
    assert str(path) in message and "x.weight" in message, message


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("shape", [256], "not a 2-D"),
        ("shape", [4, True], "not a 2-D"),
        ("blocksize", 48, "blocksize 48"),
        ("dtype", "int8", "dtype 'int8'"),
        ("nested_offset", 1.0, "no 'nested_blocksize' field"),
        ("extra", 1, "unknown field 'extra'"),
    ],
)
def test_bad_quant_state_fields(tmp_path, field, value, expected):
    packed, absmax, state = valid_group()
    path = tmp_path / "bad.safetensors"
    save_file(group("x.weight", packed, absmax, {**state, field: value}), str(path))
    with pytest.raises(CheckpointError, match=expected) as e:
        nf4.decoded_headers(tensor_headers([path]))
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_an_absmax_without_its_quant_state_is_an_error(tmp_path):
    packed, absmax, state = valid_group()
    tensors = group("x.weight", packed, absmax, state)
    tensors["y.weight.absmax"] = absmax
    path = tmp_path / "orphan.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match="y.weight.absmax belongs to no quantized weight"):
        nf4.decoded_headers(tensor_headers([path]))


# ---------------------------------------------------------------------------------------------
# The synthetic layouts, end to end

VARIANTS = {
    "split": ("split", "nf4"),
    "fused": ("fused", "nf4"),
    "diffusers": ("split", "nf4-diffusers"),
}


@pytest.fixture(scope="module")
def nf4_snapshots(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("nf4")
    return {
        name: write_nf4_checkpoint(tiny_checkpoint, root / name, naming=naming, layout=layout)
        for name, (naming, layout) in VARIANTS.items()
    }


def params(model) -> dict[str, mx.array]:
    return dict(tree_flatten(model.parameters()))


def numpy_decode(folder: Path, name: str) -> np.ndarray:
    """One layer of a folder, decoded by :func:`formula` from the raw tensors."""
    raw = {}
    for path in folder.glob("*.safetensors"):
        raw.update({k: np.array(v) for k, v in mx.load(str(path)).items() if k.startswith(name)})
    state = json.loads(raw[name + ".quant_state.bitsandbytes__nf4"].tobytes())
    return formula(raw[name], raw[name + ".absmax"], raw[name + ".quant_map"], state["shape"], 64)


def test_layouts_hold_what_the_repos_hold(nf4_snapshots):
    split, fused, diffusers = (nf4_snapshots[k] for k in VARIANTS)
    keys = set(tensor_headers([split / "transformer" / "diffusion_pytorch_model.safetensors"]))
    assert "layers.0.attention.to_q.weight.quant_state.bitsandbytes__nf4" in keys
    assert "layers.0.attention.to_out.0.weight.absmax" in keys and "input_proj.bias" in keys
    assert not any(".qkv." in k or k.endswith("weight_scale") for k in keys)
    fused_keys = tensor_headers([fused / "transformer" / "diffusion_pytorch_model.safetensors"])
    assert fused_keys["layers.0.attention.qkv.weight"][:2] == ("U8", (768 * 256 // 2, 1))
    te = json.loads((split / "text_encoder" / "config.json").read_text())
    assert te["quantization_config"] == QUANTIZATION_CONFIG and "ideogram_fp8_weight_only" not in te
    assert "quantization_config" in json.loads((split / "transformer" / "config.json").read_text())
    visual = tensor_headers([split / "text_encoder" / "model.safetensors"])
    assert "visual.blocks.0.attn.qkv.weight.quant_state.bitsandbytes__nf4" in visual
    assert (diffusers / "text_encoder" / "model.safetensors.index.json").is_file()
    assert len(list((diffusers / "transformer").glob("*-of-00002.safetensors"))) == 2
    assert (split / "vae" / "diffusion_pytorch_model.safetensors").is_file()


def test_every_naming_and_layout_loads_as_its_decode(nf4_snapshots):
    models = {
        name: params(Ideogram4Transformer.from_pretrained(folder / "transformer", mx.float32))
        for name, folder in nf4_snapshots.items()
    }
    for name in ("fused", "diffusers"):
        assert sorted(models[name]) == sorted(models["split"])
        for key, value in models["split"].items():
            assert mx.array_equal(models[name][key], value).item(), (name, key)
    dit = nf4_snapshots["split"] / "transformer"
    parts = [numpy_decode(dit, f"layers.1.attention.to_{p}.weight") for p in "qkv"]
    qkv = np.array(models["split"]["layers.1.attention.qkv.weight"])
    np.testing.assert_array_equal(bits(qkv), bits(np.concatenate(parts)))
    fused = numpy_decode(nf4_snapshots["fused"] / "transformer", "layers.1.attention.qkv.weight")
    np.testing.assert_array_equal(bits(qkv), bits(fused))


def test_text_encoder_single_file_and_shards_load_the_same(nf4_snapshots):
    a = params(Qwen3VLTextEncoder.from_pretrained(nf4_snapshots["split"] / "text_encoder"))
    b = params(Qwen3VLTextEncoder.from_pretrained(nf4_snapshots["diffusers"] / "text_encoder"))
    assert sorted(a) == sorted(b)
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)
    folder = nf4_snapshots["split"] / "text_encoder"
    expected = numpy_decode(folder, "language_model.layers.3.mlp.up_proj.weight")
    got = Qwen3VLTextEncoder.from_pretrained(folder, mx.float32)
    np.testing.assert_array_equal(bits(params(got)["layers.3.mlp.up_proj.weight"]), bits(expected))


def test_vision_tower_loads_from_nf4(nf4_snapshots):
    require_describe()
    from ideogram4_mlx.describe.model import load_vision
    from ideogram4_mlx.describe.vision import VisionConfig

    folder = nf4_snapshots["diffusers"] / "text_encoder"
    config = VisionConfig.from_dict(json.loads((folder / "config.json").read_text()))
    vision = params(load_vision(folder, config, mx.float32))
    key = "blocks.0.attn.qkv.weight"
    found = [k for k in vision if k.endswith(key)]
    assert found, sorted(vision)[:5]
    expected = numpy_decode(folder, "visual." + key)
    np.testing.assert_array_equal(bits(vision[found[0]]), bits(expected))


def test_nf4_snapshot_generates(nf4_snapshots):
    result = load(nf4_snapshots["fused"], dtype=mx.float32).generate(CAPTION, **FAST)
    image = np.array(result.image)
    assert image.shape == (256, 256, 3) and image.std() > 1


@pytest.fixture(scope="module")
def converted(nf4_snapshots, tmp_path_factory):
    return convert(
        nf4_snapshots["split"], tmp_path_factory.mktemp("nf4conv") / "out", progress=False
    )


def test_converted_dit_is_the_decode_rounded_to_bf16_once(nf4_snapshots, converted):
    raw = nf4_snapshots["split"] / "transformer"
    got = params(Ideogram4Transformer.from_pretrained(converted / "transformer"))
    for layer in ("layers.0.feed_forward.w2", "llm_cond_proj", "layers.1.adaln_modulation"):
        expected = mx.array(numpy_decode(raw, layer + ".weight")).astype(mx.bfloat16)
        assert got[layer + ".weight"].dtype == mx.bfloat16
        assert mx.array_equal(got[layer + ".weight"], expected).item(), layer
    qkv = np.concatenate([numpy_decode(raw, f"layers.0.attention.to_{p}.weight") for p in "qkv"])
    expected = mx.array(qkv).astype(mx.bfloat16)
    assert mx.array_equal(got["layers.0.attention.qkv.weight"], expected).item()
    record = json.loads((converted / "transformer" / "config.json").read_text())["mlx_conversion"]
    assert record["format"] == "nf4"


def test_converted_nf4_folder_generates_as_the_snapshot_does(nf4_snapshots, converted):
    mine = load(converted, dtype=mx.bfloat16).generate(CAPTION, **FAST)
    raw = load(nf4_snapshots["split"], dtype=mx.bfloat16).generate(CAPTION, **FAST)
    np.testing.assert_array_equal(np.array(mine.image), np.array(raw.image))


def test_nf4_folders_are_detected_and_decoded_headers_are_float(nf4_snapshots):
    files = sorted((nf4_snapshots["diffusers"] / "transformer").glob("*.safetensors"))
    assert detect(tensor_headers(files)) is nf4.FORMAT
    headers = source_headers(files)
    assert headers["layers.0.attention.to_q.weight"][:2] == ("F32", (256, 256))
    assert not any("quant_state" in k or k.endswith(".absmax") for k in headers)


def test_writer_refuses_unknown_naming(tiny_checkpoint, tmp_path):
    from ideogram4_mlx.errors import InputError

    with pytest.raises(InputError, match="naming 'joined'"):
        write_nf4_checkpoint(tiny_checkpoint, tmp_path / "x", naming="joined")
    assert not (tmp_path / "x").exists()


def test_from_nf4_converts_and_from_another_format_is_refused(nf4_snapshots, tmp_path):
    src = nf4_snapshots["fused"]
    out = convert(src, tmp_path / "ok", source_format="nf4", progress=False)  # the VAE is bf16
    assert (out / "transformer" / "config.json").is_file()
    with pytest.raises(CheckpointError, match="hold the nf4 format, not fp8") as e:
        convert(
            src, tmp_path / "no", components=["transformer"], source_format="fp8", progress=False
        )
    assert "\n" not in str(e.value) and not (tmp_path / "no").exists()


def test_decode_checks_the_arrays_it_is_given():
    packed, absmax, state = valid_group()
    arrays = {k: mx.array(v) for k, v in group("x.weight", packed, absmax, state).items()}
    key = "x.weight.quant_state.bitsandbytes__nf4"
    with pytest.raises(CheckpointError, match="x.weight.absmax is mlx.core.float32 \\(3,\\)"):
        nf4.decode({**arrays, "x.weight.absmax": mx.ones(3)})
    with pytest.raises(CheckpointError, match="at most 65536"):
        nf4.decode({**arrays, key: mx.zeros(70000, dtype=mx.uint8)})
