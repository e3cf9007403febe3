"""The converter (fp8 snapshot -> MLX folder) and loading its output, on tiny synthetic checkpoints.

Quantized DiT bounds (relative L2 of the velocity vs the raw fp8 weights in bf16, tiny random
model): affine quantization with 64-wide groups has a weight step of (max - min) / (2^bits - 1),
about 5 sigma / 255 at 8 bits and 5 sigma / 15 at 4 bits, i.e. RMS weight errors of ~0.6% and
~10%. The blocks only add gated updates to the residual stream, which dilutes that, and bf16
rounding adds ~1%. Measured: 8-bit 0.020, mixed-4-8 0.040, 4-bit 0.051; bounds are ~2.5-3x.
The tiny text encoder has 36 layers, so its 8-bit error compounds to ~6%: bound 0.15.
"""

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import denoised, rel_l2
from mlx.utils import tree_flatten

from ideogram4_mlx.cli.convert import convert as convert_command
from ideogram4_mlx.config import CheckpointError
from ideogram4_mlx.convert import convert
from ideogram4_mlx.dit_sequence import sequence_ids
from ideogram4_mlx.files import locked
from ideogram4_mlx.pipeline import load
from ideogram4_mlx.quantization import RECORD_KEY, quantization_plan
from ideogram4_mlx.text_encoder import Qwen3VLTextEncoder, TextEncoderConfig
from ideogram4_mlx.transformer import Ideogram4Transformer, TransformerConfig
from ideogram4_mlx.vae import Flux2VAE
from ideogram4_mlx.weights import conversion_record, read_header

# the package exports the function `convert` under the module's name
convert_module = importlib.import_module("ideogram4_mlx.convert.convert")
BOUNDS = {8: 0.05, "mixed-4-8": 0.12, 4: 0.15}
TEXT_BOUND_8 = 0.15
CAPTION = (
    '{"high_level_description":"a red sign","compositional_deconstruction":'
    '{"background":"white","elements":[{"type":"text","text":"OPEN","desc":"bold"}]}}'
)


@pytest.fixture(scope="module")
def converted(tiny_checkpoint, tmp_path_factory):
    return convert(tiny_checkpoint, tmp_path_factory.mktemp("conv") / "bf16", progress=False)


@pytest.fixture(scope="module")
def quantized(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    out = {}
    for setting in BOUNDS:
        kwargs = {"recipe": setting} if isinstance(setting, str) else {"quantize": setting}
        parts = ("transformer", "text_encoder")
        out[setting] = convert(
            tiny_checkpoint, root / str(setting), components=parts, progress=False, **kwargs
        )
    return out


def params(model):
    return dict(tree_flatten(model.parameters()))


def assert_same_params(a, b):
    a, b = params(a), params(b)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert mx.array_equal(a[key], b[key]).item(), key


def dit_velocity(model, seed=0):
    rng = np.random.default_rng(seed)
    pos, seg, ind = sequence_ids([6], 4, 5)
    length = ind.shape[1]
    x = mx.array(rng.standard_normal((1, length, 128)).astype(np.float32))
    feats = mx.array(
        rng.standard_normal((1, length, model.config.llm_features_dim)).astype(np.float32)
    )
    return np.array(model(x, np.array([0.4], np.float32), feats, pos, seg, ind))


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("name", ["transformer", "unconditional_transformer"])
def test_bf16_dit_round_trip_is_bit_identical(tiny_checkpoint, converted, name):
    raw = Ideogram4Transformer.from_pretrained(tiny_checkpoint / name)
    assert_same_params(raw, Ideogram4Transformer.from_pretrained(converted / name))


def test_bf16_text_encoder_and_vae_round_trip(tiny_checkpoint, converted):
    assert_same_params(
        Qwen3VLTextEncoder.from_pretrained(tiny_checkpoint / "text_encoder"),
        Qwen3VLTextEncoder.from_pretrained(converted / "text_encoder"),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the bn buffers travel along and still match
        vae = Flux2VAE.from_pretrained(converted / "vae")
    assert_same_params(Flux2VAE.from_pretrained(tiny_checkpoint / "vae"), vae)


def test_converted_text_encoder_config_drops_the_fp8_flag(tiny_checkpoint, converted):
    raw = json.loads((tiny_checkpoint / "text_encoder" / "config.json").read_text())
    assert raw["ideogram_fp8_weight_only"] is True
    config = json.loads((converted / "text_encoder" / "config.json").read_text())
    assert "ideogram_fp8_weight_only" not in config and RECORD_KEY in config


def test_output_is_mlx_native_sharded_and_recorded(tiny_checkpoint, converted):
    for name in ("transformer", "text_encoder", "vae"):
        index = json.loads((converted / name / "model.safetensors.index.json").read_text())
        shards = set(index["weight_map"].values())
        assert shards == {"model-00001-of-00001.safetensors"}
        header = read_header(converted / name / shards.pop())
        assert set(header) == set(index["weight_map"])
        assert not [k for k in header if k.endswith("weight_scale")]
        record = conversion_record(converted / name)
        assert record["dtype"] == "bfloat16" and record["quantization"] is None
        assert record["source"] == str(tiny_checkpoint)
    header = read_header(converted / "vae" / "model-00001-of-00001.safetensors")
    assert header["decoder.conv_out.weight"] == ("BF16", (3, 3, 3, 32))  # (O, kh, kw, I)
    assert header["bn.running_mean"][0] == "F32"
    header = read_header(converted / "transformer" / "model-00001-of-00001.safetensors")
    assert header["layers.0.attention.qkv.weight"][0] == "BF16"
    # The vision tower travels for describe: fp8 dequantized, the patch kernel (O, T, P, P, C).
    header = read_header(converted / "text_encoder" / "model-00001-of-00001.safetensors")
    assert header["visual.patch_embed.proj.weight"] == ("BF16", (32, 2, 16, 16, 3))
    assert header["visual.blocks.0.attn.qkv.weight"] == ("BF16", (96, 32))
    for name in ("tokenizer/tokenizer.json", "scheduler/scheduler_config.json", "model_index.json"):
        assert (converted / name).read_bytes() == (tiny_checkpoint / name).read_bytes()


def test_small_shards_split_with_an_index(tiny_checkpoint, tmp_path):
    dst = convert(
        tiny_checkpoint,
        tmp_path / "out",
        components=("transformer",),
        progress=False,
        shard_bytes=200_000,
    )
    index = json.loads((dst / "transformer" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[-1].endswith(f"-of-{len(shards):05d}.safetensors")
    raw = Ideogram4Transformer.from_pretrained(tiny_checkpoint / "transformer")
    assert_same_params(raw, Ideogram4Transformer.from_pretrained(dst / "transformer"))


def test_converted_pipeline_generates_the_same_image(tiny_checkpoint, converted):
    fast = {"width": 256, "height": 256, "num_steps": 2, "seed": 3}
    raw = load(tiny_checkpoint, dtype=mx.bfloat16).generate(CAPTION, **fast)
    mine = load(converted, dtype=mx.bfloat16).generate(CAPTION, **fast)  # the default: fp32 on CPU
    np.testing.assert_array_equal(np.array(mine.image), np.array(raw.image))
    np.testing.assert_array_equal(mine.latents, raw.latents)


@pytest.fixture(scope="module")
def raw_fp32_latents(tiny_checkpoint):
    return denoised(load(tiny_checkpoint, dtype=mx.float32), CAPTION)


@pytest.mark.parametrize("bits, bound", [(8, 0.015), (4, 0.15)])
def test_quantized_pipeline_stays_within_bound_of_the_raw_snapshot(
    tiny_checkpoint, raw_fp32_latents, tmp_path, bits, bound
):
    """convert -> load -> denoise vs the raw fp8 snapshot, same seed, both in fp32: the
    difference is the quantization alone (and fast: MLX's CPU quantized matmuls are ~10x slower
    in bf16). Measured latent rel-L2: 8-bit 0.0041, 4-bit 0.051 (in bf16, whose rounding adds
    to it: 0.011, 0.052); the bounds are ~3-4x, in line with the per-DiT bounds above (the text
    encoder's error adds to the DiTs')."""
    converted = convert(tiny_checkpoint, tmp_path / f"q{bits}", quantize=bits, progress=False)
    pipe = load(converted, dtype=mx.float32)
    assert 0 < rel_l2(denoised(pipe, CAPTION), raw_fp32_latents) < bound
    assert pipe.settings()["quantization"]["bits"] == bits  # what each image's metadata records


# ---------------------------------------------------------------------------------------------
# Quantization


@pytest.mark.parametrize("setting", list(BOUNDS))
def test_quantized_dit_is_within_bound_of_bf16(tiny_checkpoint, quantized, setting):
    reference = dit_velocity(Ideogram4Transformer.from_pretrained(tiny_checkpoint / "transformer"))
    model = Ideogram4Transformer.from_pretrained(quantized[setting] / "transformer")
    err = rel_l2(dit_velocity(model), reference)
    assert 0 < err < BOUNDS[setting], err
    bits = 4 if setting == "mixed-4-8" else setting
    assert model.layers[0].feed_forward.w1.bits == bits
    assert model.layers[1].attention.qkv.bits == (8 if setting == "mixed-4-8" else bits)
    assert model.llm_cond_proj.bits == 8  # never below 8 bits
    for keep in (model.input_proj, model.adaln_proj, model.final_layer.linear):
        assert type(keep).__name__ == "Linear"
    assert type(model.layers[0].adaln_modulation).__name__ == "Linear"
    assert type(model.embed_image_indicator).__name__ == "Embedding"


def test_quantized_text_encoder_loads_and_stays_close(tiny_checkpoint, quantized):
    ids = np.array([[5, 17, 300, 42, 7, 99]])
    reference = np.array(Qwen3VLTextEncoder.from_pretrained(tiny_checkpoint / "text_encoder")(ids))
    model = Qwen3VLTextEncoder.from_pretrained(quantized[8] / "text_encoder")
    assert model.layers[0].mlp.down_proj.bits == 8
    assert type(model.embed_tokens).__name__ == "Embedding"
    assert rel_l2(np.array(model(ids)), reference) < TEXT_BOUND_8
    q4 = Qwen3VLTextEncoder.from_pretrained(quantized[4] / "text_encoder")
    assert np.isfinite(np.array(q4(ids))).all()


def test_quantization_is_recorded_with_overrides(quantized):
    q = conversion_record(quantized["mixed-4-8"] / "transformer")["quantization"]
    assert (q["mode"], q["bits"], q["group_size"], q["recipe"]) == ("affine", 4, 64, "mixed-4-8")
    assert q["overrides"]["input_proj"] is False
    assert q["overrides"]["llm_cond_proj"] == {"bits": 8, "group_size": 64}
    assert q["overrides"]["layers.0.attention.qkv"] == {"bits": 8, "group_size": 64}
    assert "layers.0.feed_forward.w1" not in q["overrides"]


def test_vae_is_never_quantized(tiny_checkpoint, tmp_path):
    dst = convert(tiny_checkpoint, tmp_path / "q", quantize=4, components=("vae",), progress=False)
    assert conversion_record(dst / "vae")["quantization"] is None
    assert_same_params(
        Flux2VAE.from_pretrained(tiny_checkpoint / "vae"), Flux2VAE.from_pretrained(dst / "vae")
    )


# ---------------------------------------------------------------------------------------------
# Safety and failure paths


def files_of(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_existing_dst_is_refused_without_force(tiny_checkpoint, tmp_path):
    dst = convert(tiny_checkpoint, tmp_path / "out", components=("vae",), progress=False)
    with pytest.raises(FileExistsError, match="--force"):
        convert(tiny_checkpoint, dst, components=("scheduler",), progress=False)
    convert(tiny_checkpoint, dst, components=("scheduler",), progress=False, force=True)
    assert set(files_of(dst)) == {"model_index.json", "scheduler/scheduler_config.json"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_force_replaces_only_an_empty_folder_or_an_earlier_conversion(tiny_checkpoint, tmp_path):
    (tmp_path / "empty").mkdir()
    convert(tiny_checkpoint, tmp_path / "empty", components=("vae",), progress=False, force=True)
    dst = tmp_path / "notes"
    dst.mkdir()
    (dst / "precious.txt").write_text("x")
    raw = copy_checkpoint(tiny_checkpoint, tmp_path / "raw", parts=("vae", "tokenizer"))
    for folder, match in [
        (dst, r"not an ideo4-mlx conversion \(e\.g\. precious\.txt\); choose another folder"),
        (raw, r"not an ideo4-mlx conversion \(e\.g\. vae/config\.json has no mlx_conversion"),
    ]:
        before = files_of(folder)
        with pytest.raises(FileExistsError, match=match):
            convert(tiny_checkpoint, folder, components=("vae",), progress=False, force=True)
        assert files_of(folder) == before
    dst = convert(tiny_checkpoint, tmp_path / "conv", components=("vae",), progress=False)
    (dst / "precious.txt").write_text("x")  # a conversion plus a file of the user's
    with pytest.raises(FileExistsError, match=r"\(e\.g\. precious\.txt\)"):
        convert(tiny_checkpoint, dst, components=("vae",), progress=False, force=True)


def test_source_inside_dst_is_refused_even_with_force(tiny_checkpoint, tmp_path):
    nest = tmp_path / "nest"
    copy_checkpoint(tiny_checkpoint, nest / "src", parts=("vae",))
    (nest / "precious.txt").write_text("x")
    before = files_of(nest)
    for src, dst in [(nest / "src", nest), (nest / "src", nest / "src")]:
        with pytest.raises(ValueError, match="must not be the same or inside each other"):
            convert(src, dst, components=("vae",), progress=False, force=True)
    result = CliRunner().invoke(convert_command, [str(nest / "src"), str(nest), "--force"])
    assert result.exit_code == 1 and "inside" in result.output
    assert files_of(nest) == before and sorted(p.name for p in tmp_path.iterdir()) == ["nest"]


def test_dst_that_is_a_link_or_a_file_is_refused(tiny_checkpoint, tmp_path):
    target = convert(tiny_checkpoint, tmp_path / "target", components=("vae",), progress=False)
    before = files_of(target)
    (tmp_path / "link").symlink_to(target, target_is_directory=True)
    with pytest.raises(FileExistsError, match="symbolic link"):
        convert(tiny_checkpoint, tmp_path / "link", components=("vae",), progress=False, force=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        convert(tiny_checkpoint, tmp_path / "file", components=("vae",), progress=False, force=True)
    assert files_of(target) == before and (tmp_path / "file").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "link", "target"]


def test_a_second_convert_to_a_locked_dst_fails_naming_the_owner(tiny_checkpoint, tmp_path):
    lock = tmp_path / ".out.lock"
    with locked(tmp_path / "out"):  # held (by this process, through another open file)
        with pytest.raises(
            FileExistsError, match=f"being written by another process \\(pid {os.getpid()}"
        ):
            convert(tiny_checkpoint, tmp_path / "out", components=("vae",), progress=False)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock"]
    lock.write_text(str(dead_pid()))  # left by a killed run
    with pytest.warns(UserWarning, match="stale lock"):
        convert(tiny_checkpoint, tmp_path / "out", components=("vae",), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_dst_appearing_during_the_conversion_is_not_replaced(
    tiny_checkpoint, tmp_path, monkeypatch
):
    dst = tmp_path / "out"
    real = convert_module.convert_component

    def racing(src_dir, out_dir, *args, **kwargs):
        real(src_dir, out_dir, *args, **kwargs)
        dst.mkdir(exist_ok=True)  # another program (not holding our lock) got there first
        (dst / "theirs.txt").write_text("x")

    monkeypatch.setattr(convert_module, "convert_component", racing)
    with pytest.raises(FileExistsError, match="appeared while"):
        convert(tiny_checkpoint, dst, components=("vae",), progress=False)
    assert files_of(dst) == {"theirs.txt": b"x"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(FileExistsError, match=r"e\.g\. theirs\.txt"):
        convert(tiny_checkpoint, dst, components=("vae",), progress=False, force=True)
    assert files_of(dst) == {"theirs.txt": b"x"}


def test_interrupted_forced_conversion_leaves_the_old_dst_intact(
    tiny_checkpoint, tmp_path, monkeypatch
):
    dst = convert(
        tiny_checkpoint, tmp_path / "out", components=("vae", "transformer"), progress=False
    )
    before = files_of(dst)
    real = convert_module.convert_component

    def second_fails(src_dir, out_dir, name, *args, **kwargs):
        if name == "vae":
            raise RuntimeError("boom")
        real(src_dir, out_dir, name, *args, **kwargs)

    monkeypatch.setattr(convert_module, "convert_component", second_fails)
    with pytest.raises(RuntimeError, match="boom"):
        convert(
            tiny_checkpoint,
            dst,
            components=("vae", "transformer"),
            quantize=4,
            progress=False,
            force=True,
        )
    assert files_of(dst) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_full_disk_mid_convert_names_the_file_and_the_fix(tiny_checkpoint, tmp_path, monkeypatch):
    def full(path, *args, **kwargs):
        raise RuntimeError("[write] Unable to write 1048576 bytes to file.")

    monkeypatch.setattr(mx, "save_safetensors", full)
    with pytest.raises(
        OSError,
        match=r"no space left writing \S*out/vae/model-00001\.safetensors; "
        r"the output needs \d+\.\d MB, .* are free",
    ) as info:
        convert(tiny_checkpoint, tmp_path / "out", components=("vae",), progress=False)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []
    result = CliRunner().invoke(convert_command, [str(tiny_checkpoint), str(tmp_path / "out")])
    assert result.exit_code == 1 and "no space left writing" in result.output
    assert "Traceback" not in result.output and list(tmp_path.iterdir()) == []


def test_free_space_is_checked_once_for_the_whole_output(tiny_checkpoint, tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=2048))
    with pytest.raises(OSError, match=r"needs \d+\.\d MB, 2\.0 KB are free; free \d+\.\d MB or"):
        convert(tiny_checkpoint, tmp_path / "out", components=("vae", "scheduler"), progress=False)
    assert list(tmp_path.iterdir()) == []


def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_partial_folders_are_reported_and_removed_when_their_owner_is_gone(
    tiny_checkpoint, tmp_path
):
    stale = tmp_path / f".out.{dead_pid()}.abcd1234.partial"
    live = tmp_path / f".out.{os.getpid()}.abcd1234.partial"
    other = tmp_path / f".other.{dead_pid()}.abcd1234.partial"  # another DST's: not ours
    for folder in (stale, live, other):
        (folder / "vae").mkdir(parents=True)
    with pytest.warns(UserWarning) as warned:
        convert(tiny_checkpoint, tmp_path / "out", components=("vae",), progress=False)
    messages = " | ".join(str(w.message) for w in warned)
    assert f"removed {stale}" in messages and f"{live} is being written by pid" in messages
    assert not stale.exists() and live.exists() and other.exists()
    stale.mkdir()
    args = [str(tiny_checkpoint), str(tmp_path / "out"), "--components", "vae", "--force"]
    result = CliRunner().invoke(convert_command, args)
    assert result.exit_code == 0 and f"warning: removed {stale}" in result.output


SIGTERM_CHILD = """
import sys, time
from pathlib import Path
import importlib
c = importlib.import_module("ideogram4_mlx.convert.convert")

def slow_flush(self):
    print("writing", flush=True)
    time.sleep(60)

c.ShardWriter.flush = slow_flush
c.convert(sys.argv[1], sys.argv[2], components=("vae",), progress=False)
"""


def test_sigterm_mid_convert_removes_the_partial_folder(tiny_checkpoint, tmp_path):
    child = subprocess.Popen(
        [sys.executable, "-c", SIGTERM_CHILD, str(tiny_checkpoint), str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline() == "writing\n", child.stderr.read()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=30) == 128 + signal.SIGTERM, child.stderr.read()
    assert list(tmp_path.iterdir()) == []


def test_the_copied_tokenizer_is_validated_first(tiny_checkpoint, tmp_path):
    for name, text, match in [
        ("tokenizer.json", "{not json", r"tokenizer/tokenizer\.json: invalid JSON"),
        ("tokenizer.json", '{"model": 3}', r"src/tokenizer: the tokenizer cannot be loaded"),
        ("tokenizer_config.json", "[1, 2]", r"tokenizer_config\.json: expected a JSON object"),
    ]:
        src = copy_checkpoint(tiny_checkpoint, tmp_path / "src", parts=("tokenizer",))
        (src / "tokenizer" / name).write_text(text)
        with pytest.raises(CheckpointError, match=match) as info:
            convert(src, tmp_path / "out", components=("tokenizer",), progress=False)
        assert "\n" not in str(info.value)
        shutil.rmtree(src)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_run_leaves_no_dst_and_no_temp(tiny_checkpoint, tmp_path, monkeypatch):
    calls = []
    save = mx.save_safetensors

    def failing_save(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return save(path, *args, **kwargs)

    monkeypatch.setattr(mx, "save_safetensors", failing_save)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_checkpoint, tmp_path / "out", progress=False)
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []


def copy_checkpoint(src, dst, parts=("transformer", "vae")):
    for part in parts:
        shutil.copytree(src / part, dst / part)
    return dst


def rewrite_vae(folder, key, value):
    path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = mx.load(str(path))
    tensors[key] = value
    mx.save_safetensors(str(path), tensors)


@pytest.mark.parametrize(
    "damage, match",
    [
        (
            lambda d: (d / "vae" / "diffusion_pytorch_model.safetensors").unlink(),
            r"vae: no \.safetensors file found",
        ),
        (
            lambda d: (d / "transformer" / "config.json").unlink(),
            r"transformer/config\.json: file not found",
        ),
        (
            lambda d: (d / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(
                (d / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()[:-1000]
            ),
            r"diffusion_pytorch_model\.safetensors: not a readable safetensors file",
        ),
        (
            lambda d: rewrite_vae(d, "decoder.conv_in.bias", mx.zeros((64,), mx.int32)),
            r"diffusion_pytorch_model\.safetensors: decoder\.conv_in\.bias has dtype I32, "
            r"expected BF16 or F32",
        ),
        (
            lambda d: rewrite_vae(d, "decoder.conv_in.bias", mx.zeros((65,), mx.bfloat16)),
            r"diffusion_pytorch_model\.safetensors: decoder\.conv_in\.bias has shape \(65,\), "
            r"config\.json expects \(64,\)",
        ),
        (
            lambda d: (d / "transformer" / "config.json").write_text(
                (d / "transformer" / "config.json")
                .read_text()
                .replace('"num_layers": 2', '"num_layers": 3')
            ),
            r"transformer/config\.json: num_layers is 3, but the weight files hold 2",
        ),
        (
            lambda d: (d / "transformer" / "config.json").write_text(
                (d / "transformer" / "config.json")
                .read_text()
                .replace('"intermediate_size": 256', '"intermediate_size": 320')
            ),
            r"config\.json: intermediate_size is 320, but diffusion_pytorch_model\.safetensors "
            r"holds layers\.0\.feed_forward\.w1\.weight of shape \(256, 256\)",
        ),
    ],
    ids=["missing-file", "missing-config", "truncated", "dtype", "shape", "missing-key", "size"],
)
def test_damaged_source_fails_with_file_key_and_expectation(
    tiny_checkpoint, tmp_path, damage, match
):
    src = copy_checkpoint(tiny_checkpoint, tmp_path / "src")
    damage(src)
    with pytest.raises(CheckpointError, match=match) as info:
        convert(src, tmp_path / "out", components=("transformer", "vae"), progress=False)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def poison_fp8(folder, key, code=0x7F):
    """Set the first fp8 code of ``key`` to ``code`` (0x7F: NaN in E4M3), bytes in place."""
    path = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    raw = bytearray(path.read_bytes())
    size = int.from_bytes(raw[:8], "little")
    start = json.loads(raw[8 : 8 + size])[key]["data_offsets"][0]
    raw[8 + size + start] = code
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "damage, settings, match",
    [
        (  # a quantized layer: mx.quantize turned the NaN into finite codes without a word
            lambda d: poison_fp8(d, "layers.0.feed_forward.w1.weight"),
            {"quantize": 4},
            r"diffusion_pytorch_model\.safetensors.*: layers\.0\.feed_forward\.w1\.weight "
            r"holds NaN or infinite values; the source is damaged",
        ),
        (
            lambda d: poison_fp8(d, "adaln_proj.weight"),
            {},
            r": adaln_proj\.weight holds NaN or infinite values; the source is damaged",
        ),
        (
            lambda d: rewrite_vae(
                d, "decoder.conv_in.bias", mx.full((64,), float("inf"), mx.bfloat16)
            ),
            {},
            r": decoder\.conv_in\.bias holds NaN or infinite values",
        ),
        (
            lambda d: rewrite_vae(d, "decoder.conv_in.bias", mx.full((64,), 1e5, mx.bfloat16)),
            {"dtype": "float16"},
            r": decoder\.conv_in\.bias holds NaN or infinite values or values beyond float16's "
            r"range \(\+-65504: --dtype bfloat16 keeps them\)",
        ),
    ],
    ids=["nan-quantized", "nan-bf16", "inf-vae", "float16-overflow"],
)
def test_non_finite_weights_are_refused_not_written(
    tiny_checkpoint, tmp_path, damage, settings, match
):
    src = copy_checkpoint(tiny_checkpoint, tmp_path / "src")
    damage(src)
    with pytest.raises(CheckpointError, match=match) as info:
        convert(
            src, tmp_path / "out", components=("transformer", "vae"), progress=False, **settings
        )
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_converted_folder_is_not_a_source_and_settings_are_checked(converted, tmp_path):
    with pytest.raises(CheckpointError, match=f"already converted \\({RECORD_KEY}"):
        convert(converted, tmp_path / "again", components=("vae",), progress=False)
    with pytest.raises(ValueError, match="valid recipes: mixed-4-8"):
        convert(converted, tmp_path / "x", recipe="q3", progress=False)
    with pytest.raises(ValueError, match="bits 5 is not supported"):
        convert(converted, tmp_path / "x", quantize=5, progress=False)
    with pytest.raises(ValueError, match="not both"):
        convert(converted, tmp_path / "x", quantize=4, recipe="mixed-4-8", progress=False)
    with pytest.raises(ValueError, match="must not be the same or inside each other"):
        convert(converted, converted / "inside", components=("vae",), progress=False)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Command line


def test_cli_converts_and_reports_errors_in_one_line(tiny_checkpoint, tmp_path):
    runner = CliRunner()
    args = [str(tiny_checkpoint), str(tmp_path / "out"), "--components", "transformer"]
    result = runner.invoke(convert_command, [*args, "--quantize", "8", "--group-size", "32"])
    assert result.exit_code == 0, result.output
    q = conversion_record(tmp_path / "out" / "transformer")["quantization"]
    assert (q["bits"], q["group_size"]) == (8, 32)
    again = runner.invoke(convert_command, args)
    assert again.exit_code != 0 and "already exists; pass --force to replace it" in again.output
    assert "Traceback" not in again.output
    forced = runner.invoke(convert_command, [*args, "--force", "--recipe", "mixed-4-8"])
    assert forced.exit_code == 0, forced.output
    bad = runner.invoke(convert_command, [str(tmp_path / "nope"), str(tmp_path / "o2")])
    assert bad.exit_code != 0 and "not a Hugging Face repo id" in bad.output


def test_record_from_a_newer_converter_is_refused(converted, tmp_path):
    folder = tmp_path / "transformer"
    shutil.copytree(converted / "transformer", folder)
    config = json.loads((folder / "config.json").read_text())
    config[RECORD_KEY]["version"] = 99
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="format version 99.*upgrade ideogram4_mlx"):
        Ideogram4Transformer.from_pretrained(folder)


def test_mixed_4_6_keeps_down_and_attention_projections_at_6_bits(tiny_checkpoint):
    config = TransformerConfig.from_file(tiny_checkpoint / "transformer" / "config.json")
    overrides = quantization_plan(Ideogram4Transformer(config), None, 64, "mixed-4-6")["overrides"]
    assert overrides["layers.0.feed_forward.w2"] == {"bits": 6, "group_size": 64}
    assert overrides["layers.1.attention.o"] == {"bits": 6, "group_size": 64}
    assert (
        "layers.0.feed_forward.w1" not in overrides and "layers.0.feed_forward.w3" not in overrides
    )
    text = TextEncoderConfig.from_file(tiny_checkpoint / "text_encoder" / "config.json")
    overrides = quantization_plan(Qwen3VLTextEncoder(text), None, 64, "mixed-4-6")["overrides"]
    assert (
        overrides["layers.3.mlp.down_proj"]["bits"] == 6 and "layers.3.mlp.up_proj" not in overrides
    )


def override(bits, group_size=64):
    return {"bits": bits, "group_size": group_size}


def expected_dit_overrides(setting):
    """The tiny DiT (2 blocks): the timestep/AdaLN path, input and output layers stay float,
    the text projection is never below 8 bits; recipes raise attention (and w2)."""
    float_layers = [
        "adaln_proj",
        "embed_image_indicator",
        "final_layer.adaln_modulation",
        "final_layer.linear",
        "input_proj",
        "layers.0.adaln_modulation",
        "layers.1.adaln_modulation",
        "t_embedding.mlp_in",
        "t_embedding.mlp_out",
    ]
    overrides = {**dict.fromkeys(float_layers, False), "llm_cond_proj": override(8)}
    raised = {
        "mixed-4-8": ("attention.qkv", "attention.o"),
        "mixed-4-6": ("attention.qkv", "attention.o", "feed_forward.w2"),
    }.get(setting, ())
    bits = 8 if setting == "mixed-4-8" else 6
    for i in (0, 1):
        overrides |= {f"layers.{i}.{name}": override(bits) for name in raised}
    return overrides


def expected_text_overrides(setting):
    """The tiny text encoder (36 layers): the embedding stays float; recipes raise the
    attention projections (and down_proj)."""
    names = {
        "mixed-4-8": ("q_proj", "k_proj", "v_proj", "o_proj"),
        "mixed-4-6": ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"),
    }.get(setting, ())
    bits = 8 if setting == "mixed-4-8" else 6
    overrides = {"embed_tokens": False}
    for i in range(36):
        for name in names:
            block = "mlp" if name == "down_proj" else "self_attn"
            overrides[f"layers.{i}.{block}.{name}"] = override(bits)
    return overrides


@pytest.mark.parametrize("setting", [4, "mixed-4-8", "mixed-4-6"])
def test_quantization_plans_of_the_tiny_models_are_pinned(tiny_checkpoint, setting):
    bits, recipe = (None, setting) if isinstance(setting, str) else (setting, None)
    dit = TransformerConfig.from_file(tiny_checkpoint / "transformer" / "config.json")
    text = TextEncoderConfig.from_file(tiny_checkpoint / "text_encoder" / "config.json")
    for model, expected in (
        (Ideogram4Transformer(dit), expected_dit_overrides(setting)),
        (Qwen3VLTextEncoder(text), expected_text_overrides(setting)),
    ):
        plan = quantization_plan(model, bits, 64, recipe)
        assert plan == {
            "mode": "affine",
            "bits": 4,
            "group_size": 64,
            "recipe": recipe,
            "overrides": expected,
        }
        assert list(plan["overrides"]) == sorted(expected)


def test_quantization_plan_keeps_float_what_the_group_size_does_not_divide(tiny_checkpoint):
    """Group size 128: the DiT's 832-wide text projection and the text encoder's 64-wide inputs
    stay float; of the text encoder only the 128-wide down projections are quantized."""
    dit = TransformerConfig.from_file(tiny_checkpoint / "transformer" / "config.json")
    plan = quantization_plan(Ideogram4Transformer(dit), 6, 128)
    assert plan["overrides"] == dict.fromkeys(expected_dit_overrides(6), False)
    text = TextEncoderConfig.from_file(tiny_checkpoint / "text_encoder" / "config.json")
    plan = quantization_plan(Qwen3VLTextEncoder(text), 6, 128)
    names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    names += ("mlp.gate_proj", "mlp.up_proj")
    expected = {f"layers.{i}.{name}": False for i in range(36) for name in names}
    assert plan["overrides"] == {"embed_tokens": False, **expected}
