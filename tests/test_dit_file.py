"""A DiT given as one file, no conversion (``dit_file``): a GGUF file's exact layers load as
they are, so the image is the one of ``convert --quantize keep`` of the same file, bit for bit;
a Comfy or fp8 safetensors file gives the image of its converted folder; the file replays from
the metadata; a file that does not fit is one line.

References: the converter (``convert --quantize keep --dtype float32``, and its plain
``--dtype float32`` for safetensors files) reads the same files with the same ``gguf`` package
dequantization (tests/test_gguf.py checks that against gguf itself); the images must be equal
bit for bit, as both routes load the same numbers in the same dtype.
"""

import json
import shutil
from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from ideogram4_mlx.cli import main
from ideogram4_mlx.config import CheckpointError
from ideogram4_mlx.convert import convert
from ideogram4_mlx.dit_file import DiTFile, load_file
from ideogram4_mlx.errors import InputError
from ideogram4_mlx.memory import dit_sizes
from ideogram4_mlx.metadata import read_metadata, replay
from ideogram4_mlx.pipeline import load
from ideogram4_mlx.sources.gguf_file import GGUFSource
from ideogram4_mlx.synth import COMPONENTS, write_synthetic_checkpoint
from ideogram4_mlx.synth.comfy import write_comfy_dit
from ideogram4_mlx.synth.gguf import write_gguf_dit
from ideogram4_mlx.synth.lora import write_synthetic_lora
from ideogram4_mlx.synth.plan import resolve_spec
from ideogram4_mlx.weights import fingerprint

CAPTION = (
    '{"high_level_description":"a red sign","compositional_deconstruction":'
    '{"background":"white","elements":[{"type":"text","text":"OPEN","desc":"bold"}]}}'
)
FAST = {"width": 256, "height": 256, "num_steps": 2, "seed": 3}
UNCOND = "unconditional_transformer"

pytestmark = pytest.mark.filterwarnings("ignore:MLX runs on its CPU backend")


@pytest.fixture(scope="module")
def files(tiny_checkpoint, tmp_path_factory):
    """GGUF files of the tiny checkpoint's DiT, each with its `convert --quantize keep --dtype
    float32` folder: ``{qtype: (file, converted checkpoint folder)}``."""
    root = tmp_path_factory.mktemp("dit_files")
    made = {}
    for qtype in ("Q8_0", "Q4_0", "Q4_K"):
        path = write_gguf_dit(tiny_checkpoint / "transformer", root / f"{qtype}.gguf", qtype)
        out = convert(
            tiny_checkpoint,
            root / f"keep-{qtype}",
            components=["transformer"],
            files={"transformer": path},
            quantize="keep",
            dtype="float32",
            progress=False,
        )
        made[qtype] = (path, out)
    return made


def image(pipe, **settings):
    return np.asarray(pipe.generate(CAPTION, **{**FAST, **settings}).image)


def quantized_layers(model) -> set[tuple[int, int]]:
    return {
        (m.bits, m.group_size)
        for _, m in model.named_modules()
        if isinstance(m, nn.QuantizedLinear)
    }


@pytest.mark.parametrize("qtype, bits", [("Q8_0", 8), ("Q4_0", 4)])
def test_gguf_file_gives_the_image_of_its_keep_conversion(tiny_checkpoint, files, qtype, bits):
    path, converted = files[qtype]
    direct = load(tiny_checkpoint, dtype=mx.float32, transformer=path)
    folder = load(tiny_checkpoint, dtype=mx.float32, transformer=converted)
    np.testing.assert_array_equal(image(direct), image(folder))
    cond = direct.dits()[0]
    assert quantized_layers(cond) == {(bits, 32)}  # the file's blocks, as they are
    want = dict(tree_flatten(folder.dits()[0].parameters()))
    for key, value in tree_flatten(cond.parameters()):
        assert value.dtype == want[key].dtype and mx.array_equal(value, want[key]).item(), key
    assert direct.quantization() == folder.quantization()  # the record convert writes
    assert direct.settings()["quantization"]["recipe"] == "keep"


def test_q4_k_keeps_float32_scales_and_dequantizes_in_other_dtypes(tiny_checkpoint, files):
    path, converted = files["Q4_K"]
    direct = load(tiny_checkpoint, dtype=mx.float32, transformer=path)
    folder = load(tiny_checkpoint, dtype=mx.float32, transformer=converted)
    np.testing.assert_array_equal(image(direct), image(folder))
    assert quantized_layers(direct.dits()[0]) == {(4, 32)}
    # float16 cannot hold Q4_K's scales (d * sc), bfloat16 no GGUF scale: dequantized, cast
    source = GGUFSource(path)
    for dtype in (mx.float16, mx.bfloat16):
        dit = DiTFile(path, tiny_checkpoint / "transformer")
        model = load_file(dit, dtype)
        reference = model.sanitize(source.load(source.headers()))
        params = dict(tree_flatten(model.parameters()))
        for key, value in reference.items():
            if key in params and params[key].dtype != mx.uint32:
                assert mx.array_equal(params[key], value.astype(dtype)).item(), key
        if dtype == mx.bfloat16:
            assert not quantized_layers(model)
    with pytest.warns(UserWarning, match="load dequantized in bfloat16.*--dtype float16"):
        pipe = load(tiny_checkpoint, dtype=mx.bfloat16, transformer=files["Q8_0"][0])
    assert pipe.quantization() is None


def test_streaming_blocks_from_a_gguf_file_is_the_same_image(tiny_checkpoint, files):
    path, _ = files["Q4_0"]
    want = image(load(tiny_checkpoint, dtype=mx.float32, transformer=path))
    low = load(tiny_checkpoint, dtype=mx.float32, transformer=path, low_memory=True)
    np.testing.assert_array_equal(image(low), want)
    assert low.dits()[0].streamed_blocks == resolve_spec("tiny").dit_num_layers
    model = load_file(DiTFile(path, tiny_checkpoint / "transformer"), mx.float32, resident_blocks=1)
    assert model.streamed_blocks == 1


def test_comfy_and_fp8_files_give_the_image_of_their_converted_folder(tiny_checkpoint, tmp_path):
    comfy = write_comfy_dit(tiny_checkpoint / "transformer", tmp_path / "comfy.safetensors")
    out = convert(
        tiny_checkpoint,
        tmp_path / "converted",
        components=["transformer"],
        files={"transformer": comfy},
        dtype="float32",
        progress=False,
    )
    want = image(load(tiny_checkpoint, dtype=mx.float32, transformer=out))
    np.testing.assert_array_equal(
        image(load(tiny_checkpoint, dtype=mx.float32, transformer=comfy)), want
    )
    fp8 = tiny_checkpoint / "transformer" / "diffusion_pytorch_model.safetensors"
    np.testing.assert_array_equal(  # the official file alone: the checkpoint's own image
        image(load(tiny_checkpoint, dtype=mx.float32, transformer=fp8)),
        image(load(tiny_checkpoint, dtype=mx.float32)),
    )


def test_memory_plan_counts_a_file_as_it_loads(tiny_checkpoint, files):
    path, converted = files["Q4_0"]
    pipe = load(tiny_checkpoint, dtype=mx.float32, transformer=path)
    sizes = pipe.budget.sizes[0]
    want = dit_sizes(converted / "transformer", mx.float32)
    assert (sizes.resident, sizes.blocks) == (want.resident, want.blocks)
    held = sum(v.nbytes for _, v in tree_flatten(pipe.dits()[0].parameters()))
    assert sizes.total == held


def test_cli_generate_with_a_gguf_file_and_replay(tiny_checkpoint, files, tmp_path):
    path, _ = files["Q8_0"]
    out, again = tmp_path / "a.png", tmp_path / "b.png"
    args = ["--model", tiny_checkpoint, "--dtype", "float32", "--steps", "2", "--seed", "3"]
    sizes = ["--width", "256", "--height", "256"]
    first = ["generate", *args, *sizes, "--prompt", CAPTION, "--transformer", path, "-o", out]
    result = CliRunner().invoke(main, [str(a) for a in first])
    assert result.exit_code == 0, result.output
    record = read_metadata(out)["transformer"]
    assert record == {"source": str(path.resolve()), "fingerprint": fingerprint(path)}
    result = CliRunner().invoke(main, ["generate", "--from-metadata", str(out), "-o", str(again)])
    assert result.exit_code == 0, result.output
    with open(out, "rb") as a, open(again, "rb") as b:
        assert a.read() == b.read()
    other = files["Q4_0"][0]  # another file in its place: refused
    with pytest.raises(InputError, match="not the conditional DiT the image was made with"):
        replay(read_metadata(out), {"transformer": str(other)})


def test_uncond_file_runs_the_unconditional_pass(tiny_checkpoint, tmp_path):
    """``--uncond FILE``: a GGUF of the unconditional DiT gives the image of a checkpoint whose
    unconditional_transformer/ is that file converted (--quantize keep); it replays, checked."""
    path = write_gguf_dit(tiny_checkpoint / UNCOND, tmp_path / "uncond.gguf", "Q8_0")
    out = convert(
        tiny_checkpoint,
        tmp_path / "keep",
        components=[UNCOND],
        files={UNCOND: path},
        quantize="keep",
        dtype="float32",
        progress=False,
    )
    built = tmp_path / "built"
    built.mkdir()
    shutil.copy(tiny_checkpoint / "model_index.json", built)
    for name in COMPONENTS:
        (built / name).symlink_to((out if name == UNCOND else tiny_checkpoint) / name)
    pipe = load(tiny_checkpoint, dtype=mx.float32, uncond=str(path))
    assert pipe.options.uncond_delta is None and pipe.dit_components()[1] == (UNCOND, False)
    result = pipe.generate(CAPTION, **FAST)
    np.testing.assert_array_equal(np.asarray(result.image), image(load(built, dtype=mx.float32)))
    assert quantized_layers(pipe.dits()[1]) == {(8, 32)}
    half = tmp_path / "half"  # a checkpoint without unconditional_transformer/: the file runs it
    half.mkdir()
    shutil.copy(tiny_checkpoint / "model_index.json", half)
    for name in COMPONENTS:
        if name != UNCOND:
            (half / name).symlink_to(tiny_checkpoint / name)
    np.testing.assert_array_equal(
        image(load(half, dtype=mx.float32, uncond=str(path))), np.asarray(result.image)
    )
    lora = write_synthetic_lora(tmp_path / "u.safetensors", tiny_checkpoint / UNCOND, "kohya")
    with_lora = load(half, dtype=mx.float32, uncond=str(path), lora_uncond=str(lora))
    assert with_lora.lora_names() == ["u.safetensors"]  # for the file's DiT: not refused
    assert result.metadata["uncond"] == str(path.resolve())
    options, request = replay(result.metadata)
    np.testing.assert_array_equal(
        np.asarray(load(options).generate(request).image), np.asarray(result.image)
    )
    moved = tmp_path / "moved.gguf"
    path.rename(moved)
    with pytest.raises(InputError, match="give --uncond with where it is now"):
        replay(result.metadata)
    assert replay(result.metadata, {"uncond": str(moved)})[0].uncond == str(moved)


def test_a_gguf_of_another_width_is_refused_by_the_config_check(tiny_checkpoint, tmp_path):
    spec = resolve_spec("tiny")
    wide = replace(spec, dit_num_attention_heads=spec.dit_num_attention_heads * 2)
    root = write_synthetic_checkpoint(tmp_path / "wide", wide, components=("transformer",))
    path = write_gguf_dit(root / "transformer", tmp_path / "wide.gguf", "Q8_0")
    with pytest.raises(CheckpointError, match="config.json: num_attention_heads") as error:
        load(tiny_checkpoint, dtype=mx.float32, transformer=path)
    assert "\n" not in str(error.value) and "wide.gguf" in str(error.value)


def test_a_file_that_is_no_dit_is_refused(tiny_checkpoint, files, tmp_path):
    vae = tiny_checkpoint / "vae" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(CheckpointError, match="holds no embed_image_indicator") as error:
        load(tiny_checkpoint, dtype=mx.float32, transformer=vae)
    assert "\n" not in str(error.value)
    text = tmp_path / "notes.txt"
    text.write_text("no weights")
    with pytest.raises(InputError, match="not a DiT file"):
        load(tiny_checkpoint, dtype=mx.float32, transformer=text)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load(tiny_checkpoint, dtype=mx.float32, transformer=fake)
    # a GGUF of the unconditional DiT given as the conditional one: its text projection is
    # there too, so it loads (the checkpoint's config fits both); a file missing a tensor does
    # not: the key is named
    with pytest.raises(CheckpointError, match="is missing"):
        dit = DiTFile(files["Q8_0"][0], tiny_checkpoint / "transformer")
        headers = dict(dit.headers)
        headers.pop("final_layer.linear.weight")
        dit.__dict__["headers"] = headers
        load_file(dit, mx.float32)


def test_uncond_delta_files_stay_deltas(tiny_checkpoint, tmp_path):
    """A delta or LoRA file (``lora_A``/``lora_B`` pairs) stays a delta; a file holding the
    DiT's own tensors is a whole unconditional DiT."""
    from ideogram4_mlx.pipeline_options import PipelineOptions

    lora = write_synthetic_lora(tmp_path / "d.safetensors", tiny_checkpoint / UNCOND, "kohya")
    as_delta = PipelineOptions(uncond=str(lora))
    assert as_delta.uncond_file is None and as_delta.uncond_delta == str(lora)

    assert PipelineOptions(uncond="self").uncond_file is None
    delta = PipelineOptions(uncond="owner/some_delta")
    assert delta.uncond_file is None and delta.uncond_delta == "owner/some_delta"
    fp8 = str(tiny_checkpoint / UNCOND / "diffusion_pytorch_model.safetensors")
    whole = PipelineOptions(uncond=fp8)
    assert whole.uncond_file == fp8 and whole.uncond_delta is None
    assert json.loads(json.dumps(whole.to_metadata()))["uncond"] == str(
        (tiny_checkpoint / UNCOND / "diffusion_pytorch_model.safetensors").resolve()
    )
