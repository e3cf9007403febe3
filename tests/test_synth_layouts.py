"""`ideo4-mlx synth --layout / --dit-files`: the other releases' layouts and the single DiT
files, as the converter and `models` see them (tiny preset)."""

import json

import pytest
from click.testing import CliRunner

from ideogram4_mlx.catalog import inspect_checkpoint, list_models
from ideogram4_mlx.cli import main
from ideogram4_mlx.synth.layouts import DIT_FOLDER, dit_file_names
from ideogram4_mlx.weights import component_files, conversion_record, tensor_headers


def inspect_keys(folder):
    return set(tensor_headers(component_files(folder)))


def synth(dst, *options):
    result = CliRunner().invoke(main, ["synth", str(dst), *options])
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize(
    ("layout", "dit_files", "formats"),
    [
        ("nf4", "gguf-Q4_K", ("nf4", "gguf")),
        ("nf4-fused", None, ("nf4", None)),
        ("nf4-diffusers", "comfy-nvfp4", ("nf4", "comfy")),
        ("fp8", "comfy-fp8", ("fp8, per-row scales", "comfy")),
    ],
)
def test_layouts_and_dit_files(tmp_path, layout, dit_files, formats):
    dst = tmp_path / "ckpt"
    synth(dst, "--layout", layout, *(["--dit-files", dit_files] if dit_files else []))
    components = {c.name: c for c in inspect_checkpoint(dst).components}
    for name in ("transformer", "unconditional_transformer", "text_encoder"):
        assert components[name].quantization == formats[0], name
    config = json.loads((dst / "transformer" / "config.json").read_text())
    assert ("quantization_config" in config) == layout.startswith("nf4")
    keys = inspect_keys(dst / "transformer")
    fused = "layers.0.attention.qkv.weight" in keys
    assert fused == (layout in ("nf4-fused", "fp8")), sorted(keys)[:5]
    if dit_files is None:
        assert not (dst / DIT_FOLDER).exists()
        return
    files = list_models([dst / DIT_FOLDER], cache_dir=tmp_path / "none").files
    assert [f.path.name for f in files] == sorted(dit_file_names(dit_files))
    assert {f.format for f in files} == {formats[1]} and all(f.problem is None for f in files)


def test_dit_file_names_are_the_published_ones():
    assert dit_file_names("comfy-fp8") == (
        "ideogram4_fp8_scaled.safetensors",
        "ideogram4_unconditional_fp8_scaled.safetensors",
    )
    assert dit_file_names("gguf-Q8_0") == (
        "ideogram4-transformer-Q8_0.gguf",
        "ideogram4-unconditional_transformer-Q8_0.gguf",
    )


def test_synthetic_gguf_files_convert_with_keep(tmp_path):
    dst = tmp_path / "ckpt"
    synth(dst, "--dit-files", "gguf-Q4_0")
    cond, uncond = (dst / DIT_FOLDER / n for n in dit_file_names("gguf-Q4_0"))
    out = tmp_path / "out"
    args = ["convert", str(dst), str(out), "--quantize", "keep"]
    args += ["--transformer", str(cond), "--unconditional-transformer", str(uncond)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    for name in ("transformer", "unconditional_transformer"):
        record = conversion_record(out / name)
        assert record["format"] == "gguf" and record["source"] == str(
            cond if name == "transformer" else uncond
        )
        assert record["quantization"]["recipe"] == "keep" and record["dtype"] == "float16"
    assert conversion_record(out / "text_encoder")["dtype"] == "bfloat16"


def test_dit_files_need_both_dits(tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "synth",
            str(tmp_path / "x"),
            "--components",
            "transformer,text_encoder,vae,tokenizer,scheduler",
            "--dit-files",
            "comfy-fp8",
        ],
    )
    assert result.exit_code != 0 and "keep them in --components" in result.output
    assert not (tmp_path / "x").exists()
