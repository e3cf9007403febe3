"""The converter's inputs (convert.inputs): DiTs given as single files, block-by-block
streaming from eager readers, --from, and what a repo id source downloads when the DiTs come
from files. Tiny synthetic checkpoints; outputs compared bit for bit with the folder route."""

import importlib
import json
import shutil
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from ideogram4_mlx.cli.convert import convert as convert_command
from ideogram4_mlx.config import CheckpointError
from ideogram4_mlx.convert import convert
from ideogram4_mlx.convert.inputs import ComponentInput
from ideogram4_mlx.errors import InputError
from ideogram4_mlx.sources import block_groups, tensor_groups
from ideogram4_mlx.transformer import Ideogram4Transformer
from ideogram4_mlx.weights import (
    conversion_record,
    dequantize_fp8_weights,
    load_safetensors,
    source_headers,
)

convert_module = importlib.import_module("ideogram4_mlx.convert.convert")


def shard_tensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of a converted folder's shards, as raw bytes (bf16 has no numpy dtype)."""
    out = {}
    for path in sorted(folder.glob("model-*.safetensors")):
        for k, v in mx.load(str(path)).items():
            out[k] = np.array(v.view(mx.uint8) if v.dtype != mx.uint32 else v)
    return out


def assert_same_folder(a: Path, b: Path) -> None:
    ta, tb = shard_tensors(a), shard_tensors(b)
    assert sorted(ta) == sorted(tb)
    for key in ta:
        assert ta[key].shape == tb[key].shape and np.array_equal(ta[key], tb[key]), key


@pytest.fixture(scope="module")
def dit_file(tiny_checkpoint, tmp_path_factory):
    """The tiny conditional DiT as a file outside any checkpoint folder."""
    path = tmp_path_factory.mktemp("files") / "ideogram4_dit.safetensors"
    shutil.copyfile(tiny_checkpoint / "transformer" / "diffusion_pytorch_model.safetensors", path)
    return path


@pytest.fixture(scope="module")
def folder_route(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("folder") / "out"
    return convert(tiny_checkpoint, out, components=["transformer"], progress=False)


def test_dit_file_converts_like_its_folder(tiny_checkpoint, dit_file, folder_route, tmp_path):
    out = convert(
        tiny_checkpoint,
        tmp_path / "out",
        components=["transformer"],
        files={"transformer": dit_file},
        progress=False,
    )
    assert_same_folder(folder_route / "transformer", out / "transformer")
    record = json.loads((out / "transformer" / "config.json").read_text())["mlx_conversion"]
    assert record["source"] == str(dit_file) and record["format"] == "fp8"


class EagerReader:
    """A reader that decodes eagerly, like a GGUF file's: it records how many tensors were
    handed out at once, so the test sees the converter stream block by block."""

    format = "eager-test"

    def __init__(self, path: Path):
        self.files = [path]
        self.live: list[int] = []

    def headers(self):
        """Float weights, as a GGUF reader hands them out (fp8 pairs dequantized here)."""
        raw = source_headers(self.files)
        return {
            k: ("BF16", shape, path) if dtype == "F8_E4M3" else (dtype, shape, path)
            for k, (dtype, shape, path) in raw.items()
            if not k.endswith(".weight_scale")
        }

    def load(self, keys):
        keys = list(keys)
        self.live.append(len(keys))
        lazy = dequantize_fp8_weights(load_safetensors(self.files))
        out = {k: lazy[k] for k in keys}
        mx.eval(list(out.values()))
        return out

    def exact(self, key, dtype):
        return None


def test_eager_reader_is_streamed_one_block_at_a_time(
    tiny_checkpoint, dit_file, folder_route, tmp_path
):
    reader = EagerReader(dit_file)
    inp = ComponentInput([dit_file], reader, single=True)
    groups = inp.groups()
    assert all(len(g) == 1 for g in groups)  # fused qkv: one tensor at a time
    assert [g[0] for g in groups] == sorted(
        inp.headers(), key=lambda k: (int(k.split(".")[1]) if k.startswith("layers.") else -1, k)
    )
    convert_module.convert_component(
        tiny_checkpoint / "transformer",
        tmp_path / "transformer",
        "transformer",
        dict(dtype="bfloat16", bits=None, group_size=64, recipe=None, source="x", files={}),
        False,
        1 << 30,
        inp,
    )
    assert_same_folder(folder_route / "transformer", tmp_path / "transformer")
    assert reader.live and max(reader.live) == 1  # never more than one tensor


def test_tensor_groups_keep_split_attention_together():
    keys = ["layers.0.attention.to_q.weight", "layers.0.attention.to_k.weight", "b"]
    keys += ["layers.0.attention.to_v.weight", "layers.0.attention.to_out.0.weight"]
    assert tensor_groups(keys) == [
        ["b"],
        ["layers.0.attention.to_k.weight", "layers.0.attention.to_q.weight",
         "layers.0.attention.to_v.weight"],
        ["layers.0.attention.to_out.0.weight"],
    ]  # fmt: skip


def test_block_groups_order():
    keys = ["layers.10.a", "x.b", "layers.2.c", "model.diffusion_model.layers.2.d", "a"]
    assert block_groups(keys) == [
        ["a", "x.b"],
        ["layers.2.c", "model.diffusion_model.layers.2.d"],
        ["layers.10.a"],
    ]


def test_from_names_a_format_the_files_do_not_hold(tiny_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="hold the fp8 format, not gguf; drop --from"):
        convert(tiny_checkpoint, tmp_path / "out", source_format="gguf", progress=False)
    assert not (tmp_path / "out").exists()


def test_dit_file_errors(tiny_checkpoint, tmp_path):
    with pytest.raises(InputError, match="no such file"):
        convert(tiny_checkpoint, tmp_path / "o", files={"transformer": tmp_path / "missing.gguf"})
    other = tmp_path / "dit.bin"
    other.write_bytes(b"x")
    with pytest.raises(InputError, match=r"expected \.safetensors or \.gguf"):
        convert(tiny_checkpoint, tmp_path / "o", files={"transformer": other})
    with pytest.raises(InputError, match="only transformer and unconditional_transformer"):
        convert(tiny_checkpoint, tmp_path / "o", files={"vae": other})


def test_dit_file_without_config_is_checked_against_the_real_config(
    tiny_checkpoint, dit_file, tmp_path
):
    """No SRC/transformer/config.json: the real model's config, which a tiny file does not
    match, fails naming the mismatch before anything is written."""
    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoint, src, ignore=shutil.ignore_patterns("transformer"))
    with pytest.raises(CheckpointError, match="num_layers is 34, but the weight files hold"):
        convert(
            src,
            tmp_path / "out",
            components=["transformer"],
            files={"transformer": dit_file},
            progress=False,
        )
    assert not (tmp_path / "out").exists()


def test_repo_source_downloads_only_the_config_of_file_dits(
    tiny_checkpoint, dit_file, tmp_path, monkeypatch
):
    asked = []

    def download(repo, revision, patterns=None):
        asked.append(patterns)
        return tiny_checkpoint

    monkeypatch.setattr(convert_module, "download", download)
    convert(
        "ideogram-ai/ideogram-4-nf4",
        tmp_path / "out",
        components=["transformer"],
        files={"transformer": dit_file},
        progress=False,
    )
    (patterns,) = asked
    assert "transformer/config.json" in patterns and "transformer/*" not in patterns
    assert "unconditional_transformer/*" in patterns and "text_encoder/*" in patterns


def test_cli_dit_file_options(tiny_checkpoint, dit_file, tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        convert_command,
        [
            str(tiny_checkpoint),
            str(tmp_path / "out"),
            "--components",
            "transformer,unconditional_transformer",
            "--transformer",
            str(dit_file),
            "--unconditional-transformer",
            str(dit_file),
            "--from",
            "fp8",
        ],
    )
    assert result.exit_code == 0, result.output
    a = shard_tensors(tmp_path / "out" / "transformer")
    b = shard_tensors(tmp_path / "out" / "unconditional_transformer")
    assert all(np.array_equal(a[k], b[k]) for k in a)  # both read from the one file
    result = runner.invoke(
        convert_command, [str(tiny_checkpoint), str(tmp_path / "o2"), "--from", "nf4"]
    )
    assert result.exit_code != 0
    assert result.output.strip().splitlines()[-1].startswith("Error: ")
    assert "not nf4" in result.output


class ExactReader(EagerReader):
    """Like a GGUF Q8_0 file: every block linear stored as MLX's affine 8-bit, 32-wide groups
    (made here with mx.quantize of the float weight, float16 scales as GGUF stores them)."""

    format = "exact-test"

    def exact_spec(self, key, scales_dtype):
        shape = self.headers()[key][1]
        linear = ".layers." in f".{key}" and key.endswith(".weight") and len(shape) == 2
        return (8, 32) if linear and "norm" not in key else None

    def exact(self, key, dtype):
        (w,) = self.load([key]).values()
        wq, scales, biases = mx.quantize(w.astype(mx.float16), 32, 8)
        return {"weight": wq, "scales": scales, "biases": biases}


def test_keep_copies_exactly_stored_weights(tiny_checkpoint, dit_file, tmp_path):
    reader = ExactReader(dit_file)
    inp = ComponentInput([dit_file], reader, single=True)
    settings = dict(dtype="float16", bits="keep", group_size=64, recipe=None, source="x", files={})
    convert_module.convert_component(
        tiny_checkpoint / "transformer", tmp_path / "transformer", "transformer", settings,
        False, 1 << 30, inp,
    )  # fmt: skip
    config = json.loads((tmp_path / "transformer" / "config.json").read_text())
    plan = config["mlx_conversion"]["quantization"]
    assert (plan["bits"], plan["group_size"], plan["recipe"]) == (8, 32, "keep")
    # every non-block linear stays float; every block linear is kept at 8-bit g32
    assert all(v is False for v in plan["overrides"].values())
    assert "layers.0.attention.qkv" not in plan["overrides"]
    out = {}
    for path in (tmp_path / "transformer").glob("model-*.safetensors"):
        out.update(mx.load(str(path)))
    w = dequantize_fp8_weights(load_safetensors([dit_file]))["layers.0.feed_forward.w1.weight"]
    wq, scales, biases = mx.quantize(w.astype(mx.float16), 32, 8)
    assert mx.array_equal(out["layers.0.feed_forward.w1.weight"], wq).item()
    assert mx.array_equal(out["layers.0.feed_forward.w1.scales"], scales).item()
    assert mx.array_equal(out["layers.0.feed_forward.w1.biases"], biases).item()
    assert out["layers.0.feed_forward.w1.scales"].dtype == mx.float16

    model = Ideogram4Transformer.from_pretrained(tmp_path / "transformer", dtype=mx.float32)
    assert (
        model.layers[0].feed_forward.w1.bits == 8
        and model.layers[0].feed_forward.w1.group_size == 32
    )


def test_keep_refuses_recipes_and_loras(tiny_checkpoint, tmp_path):
    with pytest.raises(InputError, match="drop --recipe"):
        convert(tiny_checkpoint, tmp_path / "o", quantize="keep", recipe="mixed-4-8")
    with pytest.raises(InputError, match="drop --lora"):
        convert(tiny_checkpoint, tmp_path / "o", quantize="keep", loras=["x.safetensors"])
    with pytest.raises(InputError, match="keep and --uncond-as-lora: give one of them"):
        convert(tiny_checkpoint, tmp_path / "o", quantize="keep", uncond_as_lora=8)
    assert not (tmp_path / "o").exists()


def test_keep_on_a_source_with_nothing_to_keep_writes_float(tiny_checkpoint, tmp_path):
    out = convert(
        tiny_checkpoint, tmp_path / "o", quantize="keep", components=["transformer"], progress=False
    )
    record = json.loads((out / "transformer" / "config.json").read_text())["mlx_conversion"]
    assert record["quantization"] is None and record["dtype"] == "bfloat16"


@pytest.mark.parametrize(
    ("qtype", "dtype", "kept_bits"),
    [("Q4_0", None, 4), ("Q5_0", None, 5), ("Q4_K", "float32", 4), ("Q4_K", None, None)],
)
def test_keep_from_gguf_generates(tiny_checkpoint, tmp_path, qtype, dtype, kept_bits):
    """GGUF DiTs converted with --quantize keep load and generate: the layers the model keeps
    in float (input_proj, AdaLN, final layer, the indicator) are float, block linears are the
    file's own blocks (Q5_0: 5-bit, a version-2 record; Q4_K: kept only with float32
    scales)."""
    from ideogram4_mlx.pipeline import load
    from ideogram4_mlx.synth.gguf import write_gguf_dit

    files = {
        name: write_gguf_dit(tiny_checkpoint / name, tmp_path / f"{name}.gguf", qtype)
        for name in ("transformer", "unconditional_transformer")
    }
    out = convert(
        tiny_checkpoint, tmp_path / "out", quantize="keep", dtype=dtype, files=files, progress=False
    )
    record = json.loads((out / "transformer" / "config.json").read_text())["mlx_conversion"]
    plan = record["quantization"]
    if kept_bits is None:
        assert plan is None
    else:
        assert (plan["bits"], plan["group_size"], plan["recipe"]) == (kept_bits, 32, "keep")
        assert plan["overrides"]["input_proj"] is False
        assert record["version"] == (2 if kept_bits == 5 else 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = load(out, dtype=mx.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CPU backend's quantized-matmul speed note
        image = pipe.generate("a cat", width=256, height=256, num_steps=2, seed=1).image
    assert image.size == (256, 256)
    assert np.isfinite(np.array(image, dtype=np.float32)).all() and np.array(image).std() > 0


def test_from_names_the_dits_format_the_rest_is_read_as_it_is(tiny_checkpoint, tmp_path):
    """--from comfy with Comfy DiT files and an fp8 SRC: the text encoder (fp8) and the VAE
    (bf16) are read as they are; only the DiTs must be Comfy files."""
    from ideogram4_mlx.synth.comfy import write_comfy_dit

    files = {
        name: write_comfy_dit(tiny_checkpoint / name, tmp_path / f"{name}.safetensors")
        for name in ("transformer", "unconditional_transformer")
    }
    out = convert(
        tiny_checkpoint, tmp_path / "out", files=files, source_format="comfy", progress=False
    )
    assert conversion_record(out / "transformer")["format"] == "comfy"
    assert conversion_record(out / "text_encoder")["format"] == "fp8"
    with pytest.raises(CheckpointError, match="hold the comfy format, not nf4"):
        convert(tiny_checkpoint, tmp_path / "o2", files=files, source_format="nf4")
