"""Comfy-Org single-file DiTs (fp8_scaled, nvfp4_mixed): decoding against ComfyUI's own
dequantization, the decoded keys against the model, loading through the format hook, the MLX
nvfp4 triple, and bad files (MODEL_NOTES#comfy-single-file-dits).

The reference is comfy-kitchen (the ``reference`` extra), the library ComfyUI dequantizes with,
called with ``output_type=float32``: our float32 decode must equal it bit for bit (same
products in the same order), so every comparison here is exact.
"""

import importlib
import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from helpers import require_modules
from mlx.utils import tree_flatten
from safetensors import safe_open

from ideogram4_mlx.config import CheckpointError
from ideogram4_mlx.convert import convert
from ideogram4_mlx.sources import detect
from ideogram4_mlx.sources.comfy import (
    FORMAT,
    dequantize_nvfp4,
    global_scale_for,
    mlx_nvfp4,
)
from ideogram4_mlx.synth import comfy as synth_comfy
from ideogram4_mlx.synth.comfy import (
    KINDS,
    NVFP4_LAYERS,
    marker,
    quantize_fp8,
    quantize_nvfp4,
    write_comfy_dit,
    write_safetensors,
)
from ideogram4_mlx.synth.writer import encode_e4m3
from ideogram4_mlx.transformer import Ideogram4Transformer, TransformerConfig
from ideogram4_mlx.weights import dequantize_fp8_weights, load_safetensors, tensor_headers

DIT = "transformer"


def require_kitchen():
    """torch + comfy-kitchen (the ``reference`` extra)."""
    require_modules("torch", "comfy_kitchen", extra="reference extra")
    return importlib.import_module("torch"), importlib.import_module("comfy_kitchen")


@pytest.fixture(scope="module")
def comfy_dirs(tiny_checkpoint, tmp_path_factory):
    """Each kind as a component folder: the Comfy file next to the snapshot's config.json."""
    root = tmp_path_factory.mktemp("comfy")
    out = {}
    for kind in KINDS:
        folder = root / kind
        folder.mkdir()
        shutil.copy(tiny_checkpoint / DIT / "config.json", folder / "config.json")
        write_comfy_dit(tiny_checkpoint / DIT, folder / f"ideogram4_{kind}.safetensors", kind)
        out[kind] = folder
    return out


def comfy_file(folder):
    return next(folder.glob("*.safetensors"))


def raw_tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("kind", KINDS)
def test_decode_equals_comfy_kitchen_exactly(comfy_dirs, kind):
    torch, ck = require_kitchen()
    path = comfy_file(comfy_dirs[kind])
    decoded = FORMAT.decode(mx.load(str(path)))
    raw = raw_tensors(path)
    formats = {}
    for key, value in raw.items():
        if key.endswith(".comfy_quant"):
            prefix = key[: -len("comfy_quant")]
            formats[prefix] = json.loads(bytes(value.numpy()))["format"]
            if formats[prefix] == "nvfp4":
                ref = ck.dequantize_nvfp4(
                    raw[prefix + "weight"],
                    raw[prefix + "weight_scale_2"],
                    raw[prefix + "weight_scale"],
                    output_type=torch.float32,
                )
            else:
                ref = ck.dequantize_per_tensor_fp8(
                    raw[prefix + "weight"], raw[prefix + "weight_scale"], torch.float32
                )
            got = decoded[prefix + "weight"]
            assert got.dtype == mx.float32
            np.testing.assert_array_equal(np.array(got), ref.numpy(), err_msg=prefix)
    want = {"fp8_scaled": {"float8_e4m3fn"}, "nvfp4_mixed": {"float8_e4m3fn", "nvfp4"}}[kind]
    assert set(formats.values()) == want
    for key, value in raw.items():  # unmarked tensors pass through as they are
        if not any(key.startswith(p) for p in formats) or key.endswith(".bias"):
            assert decoded[key].dtype == mx.bfloat16
            bits = np.array(decoded[key].view(mx.uint16))
            np.testing.assert_array_equal(bits, value.view(torch.int16).numpy().view(np.uint16))


@pytest.mark.parametrize("kind", KINDS)
def test_decoded_keys_are_the_model_parameters(comfy_dirs, kind):
    folder = comfy_dirs[kind]
    headers = tensor_headers([comfy_file(folder)])
    assert detect(headers) is FORMAT
    decoded_headers = FORMAT.decoded_headers(headers)
    decoded = FORMAT.decode(mx.load(str(comfy_file(folder))))
    assert {k: tuple(v.shape) for k, v in decoded.items()} == {
        k: tuple(shape) for k, (_, shape, _) in decoded_headers.items()
    }
    model = Ideogram4Transformer(TransformerConfig.from_file(folder / "config.json"))
    params = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    assert {k: tuple(v.shape) for k, v in model.sanitize(decoded).items()} == params


@pytest.mark.parametrize("kind", KINDS)
def test_dit_loads_from_a_comfy_file_through_the_format_hook(tiny_checkpoint, comfy_dirs, kind):
    """``from_pretrained`` on the Comfy folder: the decoded weights in bf16, and within the
    format's quantization error of the snapshot it was made from."""
    model = Ideogram4Transformer.from_pretrained(comfy_dirs[kind])
    decoded = FORMAT.decode(mx.load(str(comfy_file(comfy_dirs[kind]))))
    official = dequantize_fp8_weights(
        load_safetensors([tiny_checkpoint / DIT / "diffusion_pytorch_model.safetensors"])
    )
    bound = {"fp8_scaled": 0.05, "nvfp4_mixed": 0.15}[kind]  # e4m3 ~2.6%, nvfp4 ~10% (rel L2)
    for key, value in tree_flatten(model.parameters()):
        want = decoded[key].astype(mx.bfloat16)
        assert mx.array_equal(value, want), key
        ref = np.array(official[key].astype(mx.float32))
        err = np.linalg.norm(np.array(value.astype(mx.float32)) - ref) / np.linalg.norm(ref)
        assert err < bound, (key, err)


def test_prefixed_keys_bf16_layers_and_input_scales_load_the_same(
    tiny_checkpoint, comfy_dirs, tmp_path
):
    shutil.copy(tiny_checkpoint / DIT / "config.json", tmp_path / "config.json")
    write_comfy_dit(
        tiny_checkpoint / DIT,
        tmp_path / "dit.safetensors",
        "nvfp4_mixed",
        prefix="model.diffusion_model.",
        bf16=("layers.1.feed_forward.w2", "input_proj"),
        input_scales=True,
    )
    headers = tensor_headers([tmp_path / "dit.safetensors"])
    assert "model.diffusion_model.layers.0.attention.qkv.input_scale" in headers
    assert headers["model.diffusion_model.input_proj.weight"][0] == "BF16"
    got = dict(tree_flatten(Ideogram4Transformer.from_pretrained(tmp_path).parameters()))
    plain = Ideogram4Transformer.from_pretrained(comfy_dirs["nvfp4_mixed"])
    for key, value in tree_flatten(plain.parameters()):
        if key.startswith(("layers.1.feed_forward.w2", "input_proj.weight")):
            continue  # kept bf16 here, quantized there
        assert mx.array_equal(got[key], value), key


def test_convert_reads_a_comfy_dit_folder(tiny_checkpoint, comfy_dirs, tmp_path):
    """convert through the format hook: a bf16 conversion holds the decoded weights, rounded
    once, so it loads to the same parameters as the Comfy folder itself."""
    src = tmp_path / "src"
    (src / DIT).mkdir(parents=True)
    shutil.copy(tiny_checkpoint / "model_index.json", src / "model_index.json")
    for path in comfy_dirs["nvfp4_mixed"].iterdir():
        shutil.copy(path, src / DIT / path.name)
    convert(src, tmp_path / "out", components=(DIT,), progress=False)
    want = Ideogram4Transformer.from_pretrained(comfy_dirs["nvfp4_mixed"])
    got = dict(
        tree_flatten(Ideogram4Transformer.from_pretrained(tmp_path / "out" / DIT).parameters())
    )
    for key, value in tree_flatten(want.parameters()):
        assert mx.array_equal(got[key], value), key


def test_convert_reads_a_single_comfy_file(tiny_checkpoint, comfy_dirs, tmp_path):
    """``convert SRC --transformer FILE --from comfy``: the file converts like its folder and the
    record names the format; ``--from gguf`` on it is refused."""
    path = comfy_file(comfy_dirs["fp8_scaled"])
    out = convert(
        tiny_checkpoint,
        tmp_path / "out",
        components=[DIT],
        files={DIT: path},
        source_format="comfy",
        progress=False,
    )
    record = json.loads((out / DIT / "config.json").read_text())["mlx_conversion"]
    assert record["format"] == "comfy"
    want = Ideogram4Transformer.from_pretrained(comfy_dirs["fp8_scaled"])
    got = dict(tree_flatten(Ideogram4Transformer.from_pretrained(out / DIT).parameters()))
    for key, value in tree_flatten(want.parameters()):
        assert mx.array_equal(got[key], value), key
    with pytest.raises(CheckpointError, match="the files hold the comfy format, not gguf"):
        convert(
            tiny_checkpoint,
            tmp_path / "other",
            components=[DIT],
            files={DIT: path},
            source_format="gguf",
            progress=False,
        )


def test_synthetic_layout_is_comfy_kitchens_quantization():
    """The writer's nvfp4 bytes and blocked scales are what ``comfy_kitchen.quantize_nvfp4``
    writes (rows padded to 128, block columns to 4); its fp8 is ComfyUI's per-tensor layout."""
    torch, ck = require_kitchen()
    w = np.random.default_rng(3).standard_normal((144, 48)).astype(np.float32)
    ours = quantize_nvfp4("x.", w)
    qdata, block = ck.quantize_nvfp4(torch.from_numpy(w), torch.tensor(ours["x.weight_scale_2"][1]))
    np.testing.assert_array_equal(ours["x.weight"][1], qdata.numpy())
    assert ours["x.weight_scale"][1].shape == (256, 4) == tuple(block.shape)
    np.testing.assert_array_equal(ours["x.weight_scale"][1], block.view(torch.uint8).numpy())
    fp8 = quantize_fp8("x.", w)
    assert fp8["x.weight_scale"][1].shape == () and fp8["x.weight"][0] == "F8_E4M3"


def test_the_writer_quantizes_in_row_chunks_to_the_same_bytes(monkeypatch):
    """Chunks of whole rows (bounded memory for full-width weights) change no byte: still
    comfy-kitchen's nvfp4, and the fp8 codes of one whole-tensor encoding."""
    torch, ck = require_kitchen()
    w = np.random.default_rng(5).standard_normal((144, 48)).astype(np.float32)
    whole = {**quantize_nvfp4("x.", w), **quantize_fp8("y.", w)}
    monkeypatch.setattr(synth_comfy, "CHUNK_VALUES", 48 * 10)  # 15 chunks, the last short
    assert len(synth_comfy.row_chunks(w)) == 15
    chunked = {**quantize_nvfp4("x.", w), **quantize_fp8("y.", w)}
    for key, (dtype, value) in whole.items():
        assert chunked[key][0] == dtype and np.array_equal(chunked[key][1], value), key
    qdata, block = ck.quantize_nvfp4(
        torch.from_numpy(w), torch.tensor(whole["x.weight_scale_2"][1])
    )
    np.testing.assert_array_equal(chunked["x.weight"][1], qdata.numpy())
    np.testing.assert_array_equal(chunked["x.weight_scale"][1], block.view(torch.uint8).numpy())
    codes = encode_e4m3(np.clip(w * (np.float32(1) / whole["y.weight_scale"][1]), -448, 448))
    np.testing.assert_array_equal(chunked["y.weight"][1], codes)
    # values on the midpoints between E2M1 magnitudes round as comfy-kitchen's do (to the even
    # code; the writer's first nearest-value search took the smaller magnitude)
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0]
    w = np.tile(np.array(ties + [-t for t in ties], np.float32), (16, 2))
    ours = quantize_nvfp4("x.", w)
    qdata, _ = ck.quantize_nvfp4(torch.from_numpy(w), torch.tensor(ours["x.weight_scale_2"][1]))
    np.testing.assert_array_equal(ours["x.weight"][1], qdata.numpy())


def test_mlx_nvfp4_triple_dequantizes_to_comfys_weights_exactly(comfy_dirs):
    weights = mx.load(str(comfy_file(comfy_dirs["nvfp4_mixed"])))
    layers = [k[: -len("weight_scale_2")] for k in weights if k.endswith(".weight_scale_2")]
    assert len(layers) == 2 * len(NVFP4_LAYERS)
    for p in layers:
        parts = weights[p + "weight"], weights[p + "weight_scale"], weights[p + "weight_scale_2"]
        w_q, scales, g = mlx_nvfp4(*parts)
        assert w_q.dtype == mx.uint32 and scales.dtype == mx.uint8
        got = mx.dequantize(
            w_q, scales, group_size=16, bits=4, mode="nvfp4", global_scale=g, dtype=mx.float32
        )
        assert mx.array_equal(got, dequantize_nvfp4(*parts)), p


def test_global_scale_exists_for_comfy_scales_and_is_none_otherwise():
    """comfy-kitchen's scale is ``fl32(amax / 2688)``, so ``g = amax`` always divides back; an
    arbitrary float32 scale may fall between two quotients and has no exact ``g``."""
    rng = np.random.default_rng(4)
    for amax in np.float32(np.exp(rng.uniform(-10, 5, 2000))):
        scale = np.float32(amax / np.float32(2688.0))
        g = global_scale_for(float(scale))
        assert g is not None and np.float32(np.float32(g) / np.float32(2688.0)) == scale
    scales = np.float32(np.exp(rng.uniform(-10, 5, 2000)))
    missing = [s for s in scales if global_scale_for(float(s)) is None]
    assert 0 < len(missing) < len(scales) // 4
    layer = quantize_nvfp4("x.", rng.standard_normal((16, 16)).astype(np.float32))
    parts = [mx.array(layer[k][1]) for k in ("x.weight", "x.weight_scale")]
    assert mlx_nvfp4(*parts, mx.array(missing[0])) is None


def fp8_layer(name="layers.0.attention.o", shape=(16, 32)):
    w = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    return quantize_fp8(name + ".", w)


def nvfp4_layer(name="layers.0.attention.qkv", shape=(16, 32)):
    w = np.random.default_rng(6).standard_normal(shape).astype(np.float32)
    return quantize_nvfp4(name + ".", w)


def edit(tensors, key, value=None):
    out = dict(tensors)
    if value is None:
        out.pop(key)
    else:
        out[key] = value
    return out


F32 = np.float32
BAD = {
    "marker not JSON": (
        edit(fp8_layer(), "layers.0.attention.o.comfy_quant", ("U8", np.array([255, 254], "u1"))),
        "layers.0.attention.o.comfy_quant is not UTF-8 JSON",
    ),
    "unknown format": (
        edit(fp8_layer(), "layers.0.attention.o.comfy_quant", marker("mxfp8")),
        "has format 'mxfp8'; this reader knows float8_e4m3fn, nvfp4",
    ),
    "marker too long": (
        edit(fp8_layer(), "layers.0.attention.o.comfy_quant", ("U8", np.zeros(5000, "u1"))),
        "comfy_quant is U8 [5000], expected U8 bytes of a JSON object (1 to 4096)",
    ),
    "per-row fp8 scale": (
        edit(fp8_layer(), "layers.0.attention.o.weight_scale", ("F32", np.ones(16, F32))),
        "weight_scale is F32 [16], expected one F32 value per tensor",
    ),
    "nan scale": (
        edit(fp8_layer(), "layers.0.attention.o.weight_scale", ("F32", np.array(np.nan, F32))),
        "weight_scale is nan, expected a finite scale > 0",
    ),
    "zero tensor scale": (
        edit(nvfp4_layer(), "layers.0.attention.qkv.weight_scale_2", ("F32", np.array(0, F32))),
        "weight_scale_2 is 0.0, expected a finite scale > 0",
    ),
    "missing fp8 scale": (
        edit(fp8_layer(), "layers.0.attention.o.weight_scale"),
        "has no layers.0.attention.o.weight_scale",
    ),
    "missing tensor scale": (
        edit(nvfp4_layer(), "layers.0.attention.qkv.weight_scale_2"),
        "has no layers.0.attention.qkv.weight_scale_2",
    ),
    "bf16 weight marked fp8": (
        edit(fp8_layer(), "layers.0.attention.o.weight", ("BF16", np.zeros((16, 32), "u2"))),
        "weight is BF16 [16, 32], expected a 2-D F8_E4M3 float8_e4m3fn weight",
    ),
    "unblocked block scales": (
        edit(nvfp4_layer(), "layers.0.attention.qkv.weight_scale", ("U8", np.ones((16, 2), "u1"))),
        "weight_scale is U8 [16, 2], expected F8_E4M3 [128, 4]",
    ),
    "nan block scale": (
        edit(
            nvfp4_layer(),
            "layers.0.attention.qkv.weight_scale",
            ("F8_E4M3", np.full((128, 4), 0x7F, "u1")),
        ),
        "weight_scale holds 512 NaN block scale(s)",
    ),
    "unpadded nvfp4 rows": (
        edit(nvfp4_layer(), "layers.0.attention.qkv.weight", ("U8", np.zeros((20, 16), "u1"))),
        "holds a 20x32 nvfp4 weight; Comfy pads both to multiples of 16",
    ),
    "marker without weight": (
        edit(fp8_layer(), "layers.0.attention.o.weight"),
        "layers.0.attention.o.comfy_quant marks no layers.0.attention.o.weight",
    ),
    "stray scale": (
        {**nvfp4_layer(), "input_proj.weight_scale": ("F32", np.array(1, F32))},
        "input_proj.weight_scale has no input_proj.comfy_quant marker next to it",
    ),
    "unmarked fp8 weight": (
        {**nvfp4_layer(), "input_proj.weight": ("F8_E4M3", np.zeros((4, 4), "u1"))},
        "input_proj.weight is F8_E4M3 but has no comfy_quant marker",
    ),
    "input smoothing": (
        {**fp8_layer(), "layers.0.attention.o.pre_quant_scale": ("F32", np.ones(32, F32))},
        "pre_quant_scale scales the layer's input",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_files_are_one_line_errors(tmp_path, case):
    tensors, message = BAD[case]
    path = write_safetensors(tmp_path / "dit.safetensors", tensors, {})
    headers = tensor_headers([path])
    assert FORMAT.claims(headers)
    with pytest.raises(CheckpointError) as e:
        FORMAT.decoded_headers(headers)
    assert message in str(e.value) and str(path) in str(e.value)
    assert "\n" not in str(e.value)


def test_a_file_without_markers_is_not_claimed(tiny_checkpoint):
    headers = tensor_headers([tiny_checkpoint / DIT / "diffusion_pytorch_model.safetensors"])
    assert not FORMAT.claims(headers) and detect(headers) is None
