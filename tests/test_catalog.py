"""`ideo4-mlx models` (`catalog.py`): Ideogram 4 snapshots in a Hugging Face cache and
named folders.

The cache is built by hand in huggingface_hub's layout (``models--owner--name/blobs``,
``snapshots/<commit>/`` links into the blobs, ``refs/main``); nothing touches the network.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from ideogram4_mlx.catalog import FP8_TEXT, inspect_checkpoint, list_models
from ideogram4_mlx.cli import main
from ideogram4_mlx.config import CheckpointError
from ideogram4_mlx.convert import convert

REPO = "ideogram-ai/ideogram-4-fp8"
OLD, NEW = "a" * 40, "ee79a7237b519f1402ceacf952f30c8a31ec5073"


def add_snapshot(cache, repo_id: str, commit: str, source, ref: str | None = None):
    """Copy ``source``'s files into the cache as blobs, linked from the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        rel = path.relative_to(source)
        blob = repo / "blobs" / f"{commit[:8]}-{str(rel).replace('/', '_')}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, blob)
        link = repo / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return repo / "snapshots" / commit


@pytest.fixture(scope="module")
def converted(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "vae-q"
    return convert(tiny_checkpoint, out, components=("vae", "tokenizer"), progress=False)


@pytest.fixture(scope="module")
def cache(tiny_checkpoint, tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf") / "hub"
    add_snapshot(cache, REPO, NEW, tiny_checkpoint, ref="main")
    partial = tmp_path_factory.mktemp("partial")
    shutil.copytree(tiny_checkpoint / "transformer", partial / "transformer")
    (partial / "transformer" / "diffusion_pytorch_model.safetensors").unlink()  # still downloading
    add_snapshot(cache, REPO, OLD, partial)
    # Another diffusers model with the same folder names: not listed.
    other = tmp_path_factory.mktemp("other")
    (other / "transformer").mkdir()
    (other / "transformer" / "config.json").write_text('{"_class_name": "SD3Transformer2DModel"}')
    add_snapshot(cache, "someone/sd3", "b" * 40, other, ref="main")
    return cache


def test_original_snapshot_components(tiny_checkpoint):
    found = inspect_checkpoint(tiny_checkpoint)
    assert not found.converted and found.missing == () and found.problem is None
    parts = {c.name: c for c in found.components}
    assert list(parts) == [
        "transformer", "unconditional_transformer", "text_encoder", "vae", "tokenizer", "scheduler"
    ]  # fmt: skip
    assert parts["transformer"].dtype.startswith("F8_E4M3")
    assert parts["transformer"].quantization == FP8_TEXT
    assert parts["vae"].quantization == "none" and "F8_E4M3" not in parts["vae"].dtype
    weights = tiny_checkpoint / "transformer" / "diffusion_pytorch_model.safetensors"
    assert parts["transformer"].size >= weights.stat().st_size
    assert found.size == sum(p.stat().st_size for p in tiny_checkpoint.rglob("*") if p.is_file())


def test_converted_folder_records(converted, tiny_checkpoint):
    found = inspect_checkpoint(converted)
    assert found.converted and found.source == str(tiny_checkpoint)
    assert [c.name for c in found.components] == ["vae", "tokenizer"]
    vae = found.components[0]
    assert (vae.dtype, vae.quantization) == ("bfloat16", "none")
    assert "transformer/config.json" in found.missing  # a partial conversion cannot generate


def test_quantization_text_names_bits_group_and_the_layers_that_differ(tmp_path):
    folder = tmp_path / "q" / "transformer"
    folder.mkdir(parents=True)
    record = {
        "version": 1, "dtype": "bfloat16", "source": REPO,
        "quantization": {
            "mode": "affine", "bits": 4, "group_size": 64, "recipe": "mixed-4-8",
            "overrides": {"a": False, "b": {"bits": 8, "group_size": 64},
                          "c": {"bits": 8, "group_size": 64}},
        },
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps({"mlx_conversion": record}))
    (component,) = inspect_checkpoint(tmp_path / "q").components
    assert component.quantization == "mixed-4-8: 4-bit g64; 8-bit: 2 layers, float: 1 layer"


def test_named_paths_that_are_not_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="nope: no such folder"):
        inspect_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not an Ideogram 4 checkpoint folder: it has none"):
        inspect_checkpoint(tmp_path)


def test_cache_lists_ideogram_snapshots_only(cache):
    found = list_models(cache_dir=cache)
    assert found.cache_dir == cache
    assert sorted((c.repo_id, c.revision) for c in found.cached) == [(REPO, OLD), (REPO, NEW)]
    by_rev = {c.revision: c for c in found.cached}
    complete = by_rev[NEW]
    assert complete.refs == ("main",) and complete.checkpoint.missing == ()
    assert complete.checkpoint.path == cache / f"models--{REPO.replace('/', '--')}/snapshots/{NEW}"
    assert complete.checkpoint.size > 7_000_000  # the blobs behind the links
    partial = by_rev[OLD]
    assert partial.refs == () and "vae/config.json" in partial.checkpoint.missing
    assert partial.checkpoint.components[0].dtype == "no weights"


def test_missing_cache_is_an_empty_list(tmp_path):
    assert list_models(cache_dir=tmp_path / "absent").cached == ()


def test_damaged_cached_snapshot_is_listed_with_its_problem(tmp_path, tiny_checkpoint):
    cache = tmp_path / "hub"
    snapshot = add_snapshot(cache, REPO, NEW, tiny_checkpoint)
    vae_config = snapshot / "vae" / "config.json"
    vae_config.unlink()
    vae_config.write_text('{"mlx_conversion": "broken"}')
    (cached,) = list_models(cache_dir=cache).cached
    assert "mlx_conversion is damaged" in cached.checkpoint.problem


def run_cli(env_updates: dict, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(env_updates, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "ideogram4_mlx", "models", *args],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip


def test_cli_reads_the_cache_from_hf_hub_cache_and_hf_home(cache, converted):
    # huggingface_hub reads these variables at import: a fresh process sees them.
    for env in ({"HF_HUB_CACHE": str(cache)}, {"HF_HOME": str(cache.parent)}):
        result = run_cli(env, str(converted))
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0] == f"Hugging Face cache ({cache}):"
        assert f"{REPO}  {NEW[:12]} (main)" in result.stdout and "someone/sd3" not in result.stdout
        assert f"{converted}: " in result.stdout and ", converted from " in result.stdout
        assert any(line.split()[:3] == ["vae", "bfloat16", "none"] for line in lines)


def test_cli_errors_in_one_line(tmp_path):
    result = CliRunner().invoke(main, ["models", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {tmp_path / 'nope'}: no such folder"


def test_dit_files_and_folders_of_them_are_listed(tmp_path, tiny_checkpoint):
    """A DiT file named directly, and a ComfyUI-like models folder holding one (other
    safetensors files, such as a VAE, are not DiTs and are left out)."""
    comfy = tmp_path / "ComfyUI" / "models"
    (comfy / "diffusion_models").mkdir(parents=True)
    (comfy / "vae").mkdir()
    dit = comfy / "diffusion_models" / "ideogram4_dit.safetensors"
    shutil.copyfile(tiny_checkpoint / "transformer" / "diffusion_pytorch_model.safetensors", dit)
    shutil.copyfile(
        tiny_checkpoint / "vae" / "diffusion_pytorch_model.safetensors",
        comfy / "vae" / "v.safetensors",
    )
    found = list_models([dit, comfy], cache_dir=tmp_path / "no-cache")
    assert [f.path for f in found.files] == [dit, dit] and not found.folders
    assert found.files[0].format == "fp8" and found.files[0].quantization.startswith("F8_E4M3")
    result = CliRunner().invoke(main, ["models", str(comfy)], env={"HF_HUB_CACHE": str(tmp_path)})
    assert result.exit_code == 0, result.output
    assert "DiT files" in result.output and "ideogram4_dit.safetensors  fp8" in result.output
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    (listed,) = list_models([broken], cache_dir=tmp_path / "no-cache").files
    assert listed.problem is not None and "not a readable safetensors file" in listed.problem
