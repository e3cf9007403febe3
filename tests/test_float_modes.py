"""``convert --quantize mxfp4 | mxfp8 | nvfp4``: MLX's float quantization modes, written by the
converter, recorded, loaded and generating, on the tiny synthetic checkpoint.

The references: MLX's own ``mx.quantize`` (the converter must write exactly what it returns
for the float weight), and, for MLX's decoding of the formats, the OCP MX spec's E2M1 values and
E8M0 scales plus PyTorch's ``float8_e4m3fn`` (the ``reference`` extra): exact, both.

Every mode runs on MLX's CPU backend (0.32.4: quantize, dequantize, quantized_matmul), so
nothing here skips on CPU (MODEL_NOTES#mlx-quantization-modes).

Latent bounds (2-step 256^2 run, fp32, vs the raw fp8 snapshot in fp32; weight rel-L2 of the
modes on N(0, sigma^2) weights: mxfp8 0.027, mxfp4 0.115, nvfp4 0.095 at the tiny model's
sigma (~0.1), affine 8-bit 0.005 and 4-bit 0.091): measured mxfp8 0.0176, mxfp4 0.061, nvfp4
0.050 (affine, the same run: 8-bit 0.0041, 4-bit 0.051); bounds 2.5-3x, as ``test_convert``'s.
"""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import denoised, rel_l2

from ideogram4_mlx.catalog import inspect_checkpoint
from ideogram4_mlx.cli.convert import convert as convert_command
from ideogram4_mlx.config import CheckpointError
from ideogram4_mlx.convert import convert
from ideogram4_mlx.errors import InputError
from ideogram4_mlx.memory import held_bytes
from ideogram4_mlx.pipeline import load
from ideogram4_mlx.quantization import FLOAT_MODES, MODES, RECORD_KEY
from ideogram4_mlx.text_encoder import Qwen3VLTextEncoder
from ideogram4_mlx.transformer import Ideogram4Transformer
from ideogram4_mlx.weights import conversion_record, read_header

BOUNDS = {"mxfp8": 0.05, "mxfp4": 0.15, "nvfp4": 0.15}
CAPTION = (
    '{"high_level_description":"a red sign","compositional_deconstruction":'
    '{"background":"white","elements":[{"type":"text","text":"OPEN","desc":"bold"}]}}'
)
# OCP MX spec v1.0, E2M1: codes 0-7 are +0, 0.5, 1, 1.5, 2, 3, 4, 6; bit 3 is the sign.
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)
E2M1 = np.concatenate([E2M1, -E2M1])
SHARD = "model-00001-of-00001.safetensors"


@pytest.fixture(scope="module")
def converted(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("float-modes")
    return {
        mode: convert(tiny_checkpoint, root / mode, quantize=mode, progress=False)
        for mode in FLOAT_MODES
    }


def e4m3(codes: np.ndarray) -> np.ndarray:
    return torch.from_numpy(codes.copy()).view(torch.float8_e4m3fn).float().numpy()


def e8m0(codes: np.ndarray) -> np.ndarray:
    """E8M0 scales: 2^(code - 127) (code 255, NaN, never comes out of a finite weight)."""
    return np.ldexp(np.float32(1), codes.astype(np.int32) - 127).astype(np.float32)


def spec_dequantize(wq: mx.array, scales: mx.array, mode: str) -> np.ndarray:
    """The OCP MX / NVFP4 decoding, by hand: elements packed low bits first in each uint32."""
    packed = np.array(wq).view(np.uint8)  # little-endian bytes, in element order
    if mode == "mxfp8":
        elements = e4m3(packed)
    else:
        nibbles = np.stack([packed & 15, packed >> 4], axis=-1).reshape(packed.shape[0], -1)
        elements = E2M1[nibbles]
    codes = np.array(scales)
    scale = e8m0(codes) if mode.startswith("mx") else e4m3(codes)
    return elements * np.repeat(scale, MODES[mode].group_size, axis=-1)


@pytest.mark.parametrize("std", [0.02, 1.0])
@pytest.mark.parametrize("mode", FLOAT_MODES)
def test_mlx_decodes_each_format_as_its_spec_says(mode, std):
    w = mx.random.normal((64, 256), key=mx.random.key(1)) * std
    spec = MODES[mode]
    bits = spec.bits[0]
    wq, scales = mx.quantize(w, spec.group_size, bits, mode=mode)
    mine = mx.dequantize(wq, scales, None, spec.group_size, bits, mode=mode, dtype=mx.float32)
    np.testing.assert_array_equal(np.array(mine), spec_dequantize(wq, scales, mode))


def dequantized(parts, layer) -> mx.array:
    """``mx.dequantize`` of (weight, scales[, biases]) in ``layer``'s setting."""
    biases = parts[2] if len(parts) == 3 else None
    return mx.dequantize(parts[0], parts[1], biases, layer.group_size, layer.bits, layer.mode)


def quantized_layers(model):
    return {p: m for p, m in model.named_modules() if hasattr(m, "scales")}


@pytest.mark.parametrize("mode", FLOAT_MODES)
def test_converted_weights_are_mx_quantize_of_the_float_weights(tiny_checkpoint, converted, mode):
    """Each quantized layer holds exactly what mx.quantize returns for its bf16 weight (the fp8
    weight dequantized, as the bf16 conversion writes it), in its own mode."""
    for model_class, name in (
        (Ideogram4Transformer, "transformer"),
        (Qwen3VLTextEncoder, "text_encoder"),
    ):
        raw = dict(model_class.from_pretrained(tiny_checkpoint / name).named_modules())
        layers = quantized_layers(model_class.from_pretrained(converted[mode] / name))
        assert len(layers) > 2
        for path, layer in layers.items():
            expected = mx.quantize(raw[path].weight, layer.group_size, layer.bits, layer.mode)
            stored = [layer.weight, layer.scales, *([layer.biases] if "biases" in layer else [])]
            assert len(stored) == len(expected), path
            for got, want in zip(stored, expected, strict=True):
                assert got.dtype == want.dtype and mx.array_equal(got, want).item(), path
            assert mx.array_equal(dequantized(stored, layer), dequantized(expected, layer)).item()


@pytest.mark.parametrize("mode", FLOAT_MODES)
def test_the_record_and_the_stored_tensors(converted, mode):
    folder = converted[mode] / "transformer"
    record = conversion_record(folder)
    spec = MODES[mode]
    q = record["quantization"]
    assert record["version"] == 2
    assert (q["mode"], q["bits"], q["group_size"]) == (mode, spec.bits[0], spec.group_size)
    header = read_header(folder / SHARD)
    assert header["layers.0.feed_forward.w1.weight"][0] == "U32"
    assert header["layers.0.feed_forward.w1.scales"][0] == "U8"
    assert "layers.0.feed_forward.w1.biases" not in header
    if spec.bits[0] < 8:  # the >= 8-bit text projection: affine 8-bit g64
        assert q["overrides"]["llm_cond_proj"] == {"mode": "affine", "bits": 8, "group_size": 64}
        assert header["llm_cond_proj.scales"][0] == header["llm_cond_proj.biases"][0] == "BF16"
    else:
        assert "llm_cond_proj" not in q["overrides"]
        assert header["llm_cond_proj.scales"][0] == "U8"
    model = Ideogram4Transformer.from_pretrained(folder)
    assert (model.layers[1].attention.qkv.mode, model.llm_cond_proj.bits) == (mode, 8)


def test_scales_of_another_dtype_are_refused_naming_the_key(converted, tmp_path):
    folder = tmp_path / "transformer"
    shutil.copytree(converted["mxfp4"] / "transformer", folder)
    weights = mx.load(str(folder / SHARD))
    key = "layers.0.attention.o.scales"
    weights[key] = weights[key].astype(mx.bfloat16)
    mx.save_safetensors(str(folder / SHARD), weights, metadata={"format": "mlx"})
    with pytest.raises(CheckpointError, match=f"{key} has dtype BF16, expected U8") as info:
        Ideogram4Transformer.from_pretrained(folder)
    assert "\n" not in str(info.value)


def test_a_damaged_float_mode_record_is_refused(converted, tmp_path):
    folder = tmp_path / "transformer"
    shutil.copytree(converted["nvfp4"] / "transformer", folder)
    config = json.loads((folder / "config.json").read_text())
    config[RECORD_KEY]["quantization"]["group_size"] = 32
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"damaged \(quantization group_size is 32, expected"):
        Ideogram4Transformer.from_pretrained(folder)


@pytest.fixture(scope="module")
def raw_fp32_latents(tiny_checkpoint):
    return denoised(load(tiny_checkpoint, dtype=mx.float32), CAPTION)


@pytest.mark.parametrize("mode", FLOAT_MODES)
def test_each_mode_generates_within_bound_of_the_raw_snapshot(converted, raw_fp32_latents, mode):
    pipe = load(converted[mode], dtype=mx.float32)
    assert 0 < rel_l2(denoised(pipe, CAPTION), raw_fp32_latents) < BOUNDS[mode]
    assert pipe.settings()["quantization"]["mode"] == mode  # what each image's metadata records


def test_models_shows_the_mode(converted):
    by_name = {c.name: c for c in inspect_checkpoint(converted["mxfp4"]).components}
    assert by_name["transformer"].quantization == (
        "mxfp4 (4-bit g32); affine 8-bit g64: 1 layer, float: 9 layers"
    )
    assert by_name["text_encoder"].quantization == "mxfp4 (4-bit g32); float: 1 layer"
    by_name = {c.name: c for c in inspect_checkpoint(converted["mxfp8"]).components}
    assert by_name["transformer"].quantization == "mxfp8 (8-bit g32); float: 9 layers"


def test_cli_takes_a_float_mode_and_refuses_another_group_size(tiny_checkpoint, tmp_path):
    runner = CliRunner()
    args = [str(tiny_checkpoint), str(tmp_path / "out"), "--components", "transformer"]
    result = runner.invoke(convert_command, [*args, "--quantize", "nvfp4"])
    assert result.exit_code == 0, result.output
    q = conversion_record(tmp_path / "out" / "transformer")["quantization"]
    assert (q["mode"], q["bits"], q["group_size"]) == ("nvfp4", 4, 16)
    bad = runner.invoke(
        convert_command, [*args, "--force", "--quantize", "mxfp4", "--group-size", "64"]
    )
    assert bad.exit_code != 0
    assert bad.output == (
        "Error: group size 64 does not apply to mxfp4: its groups are fixed at 32; "
        "leave the group size out\n"
    )
    unknown = runner.invoke(convert_command, [*args, "--force", "--quantize", "fp4"])
    assert unknown.exit_code != 0 and "'fp4' is not one of" in unknown.output
    # the fixed size itself may be given; affine keeps its default of 64
    same = runner.invoke(
        convert_command, [*args, "--force", "--quantize", "mxfp8", "--group-size", "32"]
    )
    assert same.exit_code == 0, same.output
    affine = runner.invoke(convert_command, [*args, "--force", "--quantize", "4"])
    assert affine.exit_code == 0, affine.output
    record = conversion_record(tmp_path / "out" / "transformer")
    assert (record["version"], record["quantization"]["group_size"]) == (1, 64)


def test_python_convert_refuses_another_group_size_before_writing(tiny_checkpoint, tmp_path):
    with pytest.raises(InputError, match="its groups are fixed at 16"):
        convert(tiny_checkpoint, tmp_path / "out", quantize="nvfp4", group_size=64, progress=False)
    with pytest.raises(InputError, match="give either a bit width or a recipe, not both"):
        convert(tiny_checkpoint, tmp_path / "out", quantize="mxfp4", recipe="mixed-4-6")
    assert list(tmp_path.iterdir()) == []


def test_memory_counts_float_mode_scales_as_stored():
    assert held_bytes("layers.0.attention.o.scales", "U8", (64, 4), mx.float32) == 256
