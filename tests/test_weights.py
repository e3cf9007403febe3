"""Loading refuses bad checkpoints before building or reading anything: configs that do not
describe the weights, tensors with the wrong dtype, shard files outside the folder, damaged
JSON. Each case is a copy of the tiny snapshot with one thing broken."""

import json
import os
import shutil
import struct

import mlx.core as mx
import pytest

from ideogram4_mlx.config import CheckpointError
from ideogram4_mlx.convert import convert
from ideogram4_mlx.text_encoder import Qwen3VLTextEncoder
from ideogram4_mlx.transformer import Ideogram4Transformer
from ideogram4_mlx.vae import Flux2VAE
from ideogram4_mlx.weights import check_raw_dtypes, component_files, read_header

MODELS = {
    "transformer": Ideogram4Transformer,
    "text_encoder": Qwen3VLTextEncoder,
    "vae": Flux2VAE,
}
FILES = {
    "transformer": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
}


def copy_component(tiny_checkpoint, tmp_path, name):
    return shutil.copytree(tiny_checkpoint / name, tmp_path / name)


def rewrite_header(path, edit):
    """Rewrite a safetensors header in place: ``edit(header dict)``; the tensor bytes stay."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])


def retag(path, key, dtype):
    def edit(header):
        header[key]["dtype"] = dtype

    rewrite_header(path, edit)


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    target = config.get("text_config", config)
    target.update(changes)
    path.write_text(json.dumps(config))


def refuse_building(monkeypatch, name):
    """Building the model is a test failure: the checks must come first."""

    def fail(self, config):
        raise AssertionError("the model was built before its config was checked")

    monkeypatch.setattr(MODELS[name], "__init__", fail)


def load(folder, name):
    return MODELS[name].from_pretrained(folder, dtype=mx.float32)


def one_line(info):
    assert "\n" not in str(info.value)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# Configs against the weights (#14 item 6)


@pytest.mark.parametrize(
    "name, changes, match",
    [
        (
            "transformer",
            {"num_layers": 100000000},
            r"config\.json: num_layers is 100000000, expected an integer from 1 to 1000",
        ),
        (
            "transformer",
            {"intermediate_size": 100000000000},
            r"config\.json: intermediate_size is 100000000000, expected an integer from 1 to",
        ),
        (
            "transformer",
            {"num_layers": 3},
            r"config\.json: num_layers is 3, but the weight files hold 2 "
            r"\(layers\.0 to layers\.1\)",
        ),
        (
            "transformer",
            {"intermediate_size": 320},
            r"config\.json: intermediate_size is 320, but diffusion_pytorch_model\.safetensors "
            r"holds layers\.0\.feed_forward\.w1\.weight of shape \(256, 256\)",
        ),
        (
            "transformer",
            {"num_attention_heads": 3},
            r"num_attention_heads x attention_head_dim is 384, .* input_proj\.weight",
        ),
        (
            "text_encoder",
            {"num_hidden_layers": 37},
            r"config\.json: num_hidden_layers is 37, but the weight files hold 36",
        ),
        (
            "text_encoder",
            {"vocab_size": 1000000},
            r"vocab_size is 1000000, but model\.safetensors holds embed_tokens\.weight",
        ),
        (
            "vae",
            {"block_out_channels": [32, 32, 64, 128]},
            r"config\.json: block_out_channels\[3\] is 128, .* "
            r"encoder\.down_blocks\.3\.resnets\.0\.conv2\.weight",
        ),
        ("vae", {"layers_per_block": 2}, r"layers_per_block is 2, but the weight files hold 1"),
    ],
    ids=[
        "layers-absurd",
        "ffn-absurd",
        "layers",
        "ffn",
        "heads",
        "text-layers",
        "vocab",
        "vae-channels",
        "vae-resnets",
    ],
)
def test_config_is_checked_against_the_weights_before_the_model_is_built(
    tiny_checkpoint, tmp_path, monkeypatch, name, changes, match
):
    folder = copy_component(tiny_checkpoint, tmp_path, name)
    edit_config(folder, **changes)
    refuse_building(monkeypatch, name)
    with pytest.raises(CheckpointError, match=match) as info:
        load(folder, name)
    assert str(folder / "config.json") in one_line(info)


def test_repack_prefixes_are_stripped_before_the_config_check(tiny_checkpoint, tmp_path):
    folder = copy_component(tiny_checkpoint, tmp_path, "transformer")
    path = folder / FILES["transformer"]

    def add_prefix(header):
        for key in [k for k in header if k != "__metadata__"]:
            header[f"model.diffusion_model.{key}"] = header.pop(key)

    rewrite_header(path, add_prefix)
    plain = Ideogram4Transformer.from_pretrained(tiny_checkpoint / "transformer", mx.float32)
    loaded = Ideogram4Transformer.from_pretrained(folder, mx.float32)
    assert mx.array_equal(loaded.input_proj.weight, plain.input_proj.weight)


# ---------------------------------------------------------------------------------------------
# Dtypes (#14 item 7)


@pytest.mark.parametrize(
    "name, key, dtype, expected",
    [
        ("transformer", "layers.0.attention_norm1.weight", "F16", "F8_E4M3 or BF16"),
        ("transformer", "input_proj.bias", "I16", "BF16"),
        ("transformer", "layers.1.attention.qkv.weight_scale", "I32", "F32"),
        ("transformer", "layers.0.feed_forward.w1.weight", "U8", "F8_E4M3 or BF16"),
        ("text_encoder", "language_model.embed_tokens.weight", "F16", "F8_E4M3 or BF16"),
        ("text_encoder", "language_model.layers.3.self_attn.q_norm.weight", "I16", "F8_E4M3 or"),
        ("vae", "decoder.conv_in.bias", "I16", "BF16 or F32"),
        ("vae", "encoder.conv_in.weight", "F16", "BF16 or F32"),
    ],
)
def test_raw_tensor_with_a_wrong_dtype_is_an_error_naming_file_key_and_dtype(
    tiny_checkpoint, tmp_path, name, key, dtype, expected
):
    """Same-width retags: BF16 bits read as F16/I16, F32 scales as I32, fp8 codes as U8."""
    folder = copy_component(tiny_checkpoint, tmp_path, name)
    path = folder / FILES[name]
    retag(path, key, dtype)
    with pytest.raises(CheckpointError) as info:
        load(folder, name)
    assert one_line(info).startswith(f"{path}: {key} has dtype {dtype}, expected {expected}")


def test_vision_tower_dtypes_are_not_checked(tiny_checkpoint, tmp_path):
    """The vision tower is never read (its dtypes are [?], MODEL_NOTES#text-encoder-keys)."""
    folder = copy_component(tiny_checkpoint, tmp_path, "text_encoder")
    retag(folder / FILES["text_encoder"], "visual.patch_embed.proj.bias", "F16")
    load(folder, "text_encoder")


def test_raw_dtype_rule_is_one_function_convert_can_share(tiny_checkpoint):
    files = component_files(tiny_checkpoint / "vae")
    key_files = check_raw_dtypes(files, Flux2VAE.dtype_rule)
    assert key_files["bn.num_batches_tracked"] == files[0]  # I64, skipped: not a parameter


@pytest.fixture(scope="module")
def converted(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("weights") / "q4"
    return convert(tiny_checkpoint, out, quantize=4, components=("transformer",), progress=False)


def converted_copy(converted, tmp_path):
    folder = shutil.copytree(converted / "transformer", tmp_path / "transformer")
    (shard,) = folder.glob("*.safetensors")
    return folder, shard


@pytest.mark.parametrize(
    "key, dtype, expected",
    [
        ("layers.0.feed_forward.w1.weight", "I32", "U32"),
        ("layers.0.feed_forward.w1.scales", "F16", "BF16"),
        ("layers.1.attention_norm2.weight", "I16", "BF16"),
    ],
)
def test_converted_tensor_must_have_the_recorded_dtype(converted, tmp_path, key, dtype, expected):
    folder, shard = converted_copy(converted, tmp_path)
    retag(shard, key, dtype)
    with pytest.raises(CheckpointError) as info:
        load(folder, "transformer")
    assert one_line(info).startswith(f"{shard}: {key} has dtype {dtype}, expected {expected}")


def test_converted_floats_must_match_the_record_dtype(converted, tmp_path):
    folder, _ = converted_copy(converted, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["mlx_conversion"]["dtype"] = "float16"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"has dtype BF16, expected F16 \(the dtype"):
        load(folder, "transformer")


RECORD = {"version": 1, "dtype": "bfloat16"}
Q4 = {"mode": "affine", "bits": 4, "group_size": 64, "overrides": {}}


@pytest.mark.parametrize(
    "record",
    [
        [1],
        {"version": "1", "dtype": "bfloat16"},
        {"version": 1},
        {**RECORD, "quantization": {"mode": "affine", "group_size": 64}},  # no bits
        {**RECORD, "quantization": {**Q4, "bits": 3}},
        {**RECORD, "quantization": {**Q4, "group_size": True}},
        {**RECORD, "quantization": {**Q4, "mode": "int4"}},  # no MLX mode
        {**RECORD, "quantization": {**Q4, "mode": "mxfp4"}},  # mxfp4's groups are 32
        {**RECORD, "quantization": {**Q4, "overrides": {"layers.0.attention.qkv": {"bits": 4}}}},
        {**RECORD, "quantization": {**Q4, "overrides": [1]}},
        {**RECORD, "quantization": "4-bit"},
        # found by fuzzing the record: unhashable values and group sizes a layer's width refuses
        {"version": 1, "dtype": ["bfloat16"]},
        {**RECORD, "quantization": {**Q4, "mode": ["affine"]}},
        {**RECORD, "quantization": {**Q4, "overrides": {"adaln_proj": {"mode": {}}}}},
        {**RECORD, "quantization": {**Q4, "group_size": 128}},  # llm_cond_proj: 832 wide
        {**RECORD, "quantization": Q4},  # no float overrides: adaln_modulation is 32 wide
    ],
)
def test_damaged_conversion_record_is_one_line(converted, tmp_path, record):
    folder, _ = converted_copy(converted, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["mlx_conversion"] = record
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: mlx_conversion is damaged") as info:
        load(folder, "transformer")
    one_line(info)


# ---------------------------------------------------------------------------------------------
# Shard paths (#14 item 9)


def sharded(tiny_checkpoint, tmp_path, entry):
    """The tiny DiT with an index mapping every key to ``entry``; the one file moved to
    ``tmp_path/outside/x.safetensors``."""
    folder = copy_component(tiny_checkpoint, tmp_path / "ckpt", "transformer")
    outside = tmp_path / "outside"
    outside.mkdir()
    (folder / FILES["transformer"]).rename(outside / "x.safetensors")
    index = {"weight_map": dict.fromkeys(read_header(outside / "x.safetensors"), entry)}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("entry", ["../../outside/x.safetensors", "ABSOLUTE"])
def test_index_entry_outside_the_folder_is_refused(tiny_checkpoint, tmp_path, entry):
    entry = str(tmp_path / "outside" / "x.safetensors") if entry == "ABSOLUTE" else entry
    folder = sharded(tiny_checkpoint, tmp_path, entry)
    with pytest.raises(CheckpointError) as info:
        load(folder, "transformer")
    message = one_line(info)
    index = folder / "model.safetensors.index.json"
    assert message.startswith(f"{index}: weight_map entry {entry!r} resolves to ")
    assert "outside" in message and "must be inside their component folder" in message


@pytest.mark.parametrize("indexed", [True, False])
def test_link_pointing_outside_the_folder_is_refused(tiny_checkpoint, tmp_path, indexed):
    folder = sharded(tiny_checkpoint, tmp_path, "model-00001.safetensors")
    link = folder / ("model-00001.safetensors" if indexed else FILES["transformer"])
    if not indexed:
        (folder / "model.safetensors.index.json").unlink()
    link.symlink_to(tmp_path / "outside" / "x.safetensors")
    with pytest.raises(CheckpointError, match="must be inside their component folder") as info:
        load(folder, "transformer")
    assert str(tmp_path / "outside" / "x.safetensors") in one_line(info)


def test_links_inside_the_folder_and_into_a_hub_cache_blobs_folder_load(tiny_checkpoint, tmp_path):
    """A Hugging Face cache snapshot links every file into the repo's blobs/ folder."""
    repo = tmp_path / "models--ideogram-ai--ideogram-4-fp8"
    folder = copy_component(tiny_checkpoint, repo / "snapshots" / "abc123", "transformer")
    (repo / "blobs").mkdir()
    (folder / FILES["transformer"]).rename(repo / "blobs" / "0123abcd")
    (folder / FILES["transformer"]).symlink_to(os.path.join("..", "..", "..", "blobs", "0123abcd"))
    load(folder, "transformer")
    (folder / "other.safetensors").symlink_to(FILES["transformer"])  # inside: fine
    assert len(component_files(folder)) == 2


# ---------------------------------------------------------------------------------------------
# Damaged JSON (#14 item 10, loading)


@pytest.mark.parametrize("name", ["transformer", "text_encoder", "vae"])
def test_config_that_is_not_a_json_object_is_one_line(tiny_checkpoint, tmp_path, name):
    folder = copy_component(tiny_checkpoint, tmp_path, name)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError) as info:
        load(folder, name)
    assert one_line(info).startswith(
        f"{folder / 'config.json'}: expected a JSON object ({{...}}), found an array"
    )


@pytest.mark.parametrize(
    "index, match",
    [
        ({"weight_map": ["x.safetensors"]}, r"weight_map must be an object .* found an array"),
        ({"metadata": {}}, r"weight_map must be an object .* found null"),
        ({"weight_map": {"input_proj.weight": 1}}, r"weight_map\['input_proj\.weight'\] is 1"),
    ],
)
def test_damaged_index_is_one_line_naming_it(tiny_checkpoint, tmp_path, index, match):
    folder = copy_component(tiny_checkpoint, tmp_path, "transformer")
    path = folder / "model.safetensors.index.json"
    path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=match) as info:
        load(folder, "transformer")
    assert one_line(info).startswith(f"{path}: ")
