"""Synthetic checkpoints: the exact layout of ideogram-ai/ideogram-4-fp8 (MODEL_NOTES#checkpoint),
deterministic."""

import dataclasses
import errno
import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import require_reference
from safetensors import safe_open

from ideogram4_mlx.cli import main
from ideogram4_mlx.constants import LATENT_SCALE, LATENT_SHIFT
from ideogram4_mlx.files import locked
from ideogram4_mlx.synth import configs, writer
from ideogram4_mlx.synth.plan import (
    COMPONENTS,
    SYNTHETIC_PRESETS,
    dit_tensors,
    text_encoder_tensors,
)
from ideogram4_mlx.synth.tokenizer import text_vocab_size, tokenizer_files
from ideogram4_mlx.synth.writer import (
    decode_e4m3,
    encode_e4m3,
    safetensors_header,
    write_synthetic_checkpoint,
)

DIT_FILE = "diffusion_pytorch_model.safetensors"
EXPECTED_FILES = {
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/chat_template.jinja",
    "transformer/config.json",
    f"transformer/{DIT_FILE}",
    "unconditional_transformer/config.json",
    f"unconditional_transformer/{DIT_FILE}",
    "vae/config.json",
    f"vae/{DIT_FILE}",
}


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# Headers only, so numpy (which has no fp8) reads them: no torch needed.
def dtypes_of(path: Path) -> dict[str, str]:
    with safe_open(path, framework="numpy") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


def shapes_of(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(path, framework="numpy") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def dequantized(path: Path, torch) -> dict:
    """fp8 weights dequantized as the reference does, scales dropped
    (MODEL_NOTES#fp8-dequantization)."""
    with safe_open(path, framework="pt") as f:
        raw = {k: f.get_tensor(k) for k in f.keys()}
    out = {}
    for k, v in raw.items():
        if k.endswith(".weight_scale"):
            continue
        if v.dtype == torch.float8_e4m3fn:
            v = v.to(torch.bfloat16) * raw[k + "_scale"].to(torch.bfloat16)[:, None]
        out[k] = v.float()
    return out


def to_diffusers_names(weights: dict) -> dict:
    """Fused qkv/o -> diffusers' to_q/to_k/to_v (row thirds) and to_out.0."""
    out = {}
    for k, v in weights.items():
        if ".attention.qkv." in k:
            for name, part in zip(("to_q", "to_k", "to_v"), v.chunk(3), strict=True):
                out[k.replace("qkv", name)] = part
        else:
            out[k.replace(".attention.o.", ".attention.to_out.0.")] = v
    return out


def split_shapes(shapes: dict) -> dict:
    """Shapes of a fused-name file under diffusers' names, weight scales dropped."""
    out = {}
    for k, shape in shapes.items():
        if k.endswith(".weight_scale"):
            continue
        if ".attention.qkv." in k:
            out.update(
                {k.replace("qkv", n): (shape[0] // 3, *shape[1:]) for n in ("to_q", "to_k", "to_v")}
            )
        else:
            out[k.replace(".attention.o.", ".attention.to_out.0.")] = shape
    return out


def fp8_rows(path: Path, key: str, rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decoded fp8 weight rows and their scales, read through MLX (F8_E4M3 arrives as uint8)."""
    weights = mx.load(str(path))
    codes, scale = weights[key][:rows], weights[key + "_scale"][:rows]
    return decode_e4m3(np.array(codes)), np.array(scale)


# --- layout and dtypes -------------------------------------------------------------------------


def test_layout_has_exactly_the_snapshot_files(tiny_checkpoint):
    assert set(files_of(tiny_checkpoint)) == EXPECTED_FILES
    index = json.loads((tiny_checkpoint / "model_index.json").read_text())
    assert index["_class_name"] == "Ideogram4Pipeline"
    assert set(index) - {"_class_name", "_diffusers_version"} == set(COMPONENTS)
    assert index["transformer"] == index["unconditional_transformer"]


@pytest.mark.parametrize("folder", ["transformer", "unconditional_transformer"])
def test_dit_dtypes_and_key_list(tiny_checkpoint, folder):
    dtypes = dtypes_of(tiny_checkpoint / folder / DIT_FILE)
    shapes = shapes_of(tiny_checkpoint / folder / DIT_FILE)
    for key, dtype in dtypes.items():
        if key.endswith(".weight_scale"):
            assert dtype == "F32" and shapes[key] == shapes[key[: -len("_scale")]][:1], key
        elif key + "_scale" in dtypes:
            assert dtype == "F8_E4M3" and len(shapes[key]) == 2, key
        else:
            assert dtype == "BF16", key
    spec = SYNTHETIC_PRESETS["tiny"]
    assert len(dtypes) == 23 + 19 * spec.dit_num_layers
    d = spec.dit_hidden_size
    assert shapes["layers.1.attention.qkv.weight"] == (3 * d, d)
    assert shapes["layers.1.adaln_modulation.bias"] == (4 * d,)
    assert "layers.0.attention.qkv.bias" not in dtypes


def test_text_encoder_and_vae_dtypes(tiny_checkpoint):
    te = dtypes_of(tiny_checkpoint / "text_encoder" / "model.safetensors")
    assert te["language_model.embed_tokens.weight"] == "BF16"
    assert te["language_model.layers.35.mlp.down_proj.weight"] == "F8_E4M3"
    assert te["language_model.layers.35.mlp.down_proj.weight_scale"] == "F32"
    assert te["language_model.layers.0.self_attn.q_norm.weight"] == "BF16"
    assert te["visual.blocks.0.attn.qkv.weight"] == "F8_E4M3"
    assert te["visual.patch_embed.proj.weight"] == "BF16"
    assert not any(k.startswith("lm_head") for k in te)
    vae = dtypes_of(tiny_checkpoint / "vae" / DIT_FILE)
    bn = {"bn.running_mean": "F32", "bn.running_var": "F32", "bn.num_batches_tracked": "I64"}
    assert {k: v for k, v in vae.items() if k.startswith("bn.")} == bn
    assert {v for k, v in vae.items() if not k.startswith("bn.")} == {"BF16"}


def test_files_are_what_safetensors_itself_writes(tiny_checkpoint, tmp_path):
    torch = require_reference()
    from safetensors.torch import load_file, save_file

    for rel in (f"transformer/{DIT_FILE}", "text_encoder/model.safetensors", f"vae/{DIT_FILE}"):
        tensors = load_file(tiny_checkpoint / rel)
        save_file(tensors, tmp_path / "resaved.safetensors", metadata={"format": "pt"})
        assert (tmp_path / "resaved.safetensors").read_bytes() == (
            tiny_checkpoint / rel
        ).read_bytes()
    assert tensors["bn.running_mean"].dtype == torch.float32


def test_mlx_reads_fp8_as_uint8(tiny_checkpoint):
    weights = mx.load(str(tiny_checkpoint / "transformer" / DIT_FILE))
    assert weights["input_proj.weight"].dtype == mx.uint8
    assert weights["input_proj.weight_scale"].dtype == mx.float32
    assert weights["input_proj.bias"].dtype == mx.bfloat16
    rows = mx.from_fp8(weights["input_proj.weight"], dtype=mx.float32)
    assert np.all(np.abs(np.array(rows)).max(axis=1) == 448.0)  # each row's peak is 448


def test_full_preset_dit_file_size_matches_the_real_snapshot():
    tensors = dit_tensors(SYNTHETIC_PRESETS["full"])
    payload = sum(t.nbytes for t in tensors)
    assert len(tensors) == 669
    assert payload == 9_289_722_624
    assert len(safetensors_header(tensors)) + payload == 9_289_792_888


# --- fp8 codec and value statistics -------------------------------------------------------------


def test_fp8_codec_matches_torch():
    torch = require_reference()
    codes = np.array([c for c in range(256) if c & 0x7F != 0x7F], dtype=np.uint8)
    values = torch.from_numpy(codes).view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(decode_e4m3(codes), values)
    positive = np.sort(values[values > 0])
    ties = (positive[:-1] + positive[1:]) / 2
    x = np.concatenate([np.random.default_rng(0).normal(0, 80, 20000), ties, -ties, [0.0, -0.0]])
    x = np.clip(x, -448, 448).astype(np.float32)
    expected = torch.from_numpy(x).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    np.testing.assert_array_equal(encode_e4m3(x), expected)
    assert list(encode_e4m3([1.0, 0.001953125, 448.0, 1e6, -1e6])) == [0x38, 0x01, 0x7E, 0x7E, 0xFE]


def test_fp8_rows_have_peak_448_and_weight_std_one_over_sqrt_fan_in(tiny_checkpoint):
    path = tiny_checkpoint / "text_encoder" / "model.safetensors"
    q, scale = fp8_rows(path, "language_model.layers.3.mlp.gate_proj.weight")
    assert np.all(np.abs(q).max(axis=1) == 448.0)
    w = q * scale[:, None]
    assert w.std() * np.sqrt(q.shape[1]) == pytest.approx(1.0, rel=0.1)
    assert abs(w.mean()) < 0.01


def test_dit_forward_neither_explodes_nor_vanishes(tiny_checkpoint):
    torch = require_reference()
    from diffusers import Ideogram4Transformer2DModel

    config = json.loads((tiny_checkpoint / "transformer" / "config.json").read_text())
    model = Ideogram4Transformer2DModel.from_config(config)
    model.load_state_dict(
        to_diffusers_names(dequantized(tiny_checkpoint / "transformer" / DIT_FILE, torch))
    )
    text, grid = 5, 4
    feats = torch.zeros(1, text + grid * grid, config["llm_features_dim"])
    feats[:, :text] = torch.randn(1, text, config["llm_features_dim"])
    x = torch.zeros(1, text + grid * grid, 128)
    x[:, text:] = torch.randn(1, grid * grid, 128)
    pos = torch.zeros(1, text + grid * grid, 3, dtype=torch.long)
    pos[0, :text] = torch.arange(text)[:, None]
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    pos[0, text:] = (
        torch.stack(
            [torch.zeros(grid * grid, dtype=torch.long), rows.flatten(), cols.flatten()], -1
        )
        + 65536
    )
    indicator = torch.tensor([[3] * text + [2] * grid * grid])
    with torch.no_grad():
        out = model(
            x, torch.tensor([0.3]), feats, pos, torch.ones_like(indicator), indicator
        ).sample
    assert torch.isfinite(out).all()
    assert 0.3 < out[:, text:].std().item() < 3.0


# --- agreement with diffusers / transformers ------------------------------------------------------


def test_dit_config_and_keys_match_diffusers(tiny_checkpoint):
    torch = require_reference()
    from diffusers import Ideogram4Transformer2DModel

    config = json.loads((tiny_checkpoint / "transformer" / "config.json").read_text())
    params = set(inspect.signature(Ideogram4Transformer2DModel.__init__).parameters) - {"self"}
    assert set(config) - {"_class_name", "_diffusers_version"} == params
    assert config["in_channels"] == 128 and config["rope_theta"] == 5000000
    with torch.device("meta"):
        model = Ideogram4Transformer2DModel.from_config(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert split_shapes(shapes_of(tiny_checkpoint / "transformer" / DIT_FILE)) == expected


def test_full_width_dit_keys_match_diffusers():
    torch = require_reference()
    from diffusers import Ideogram4Transformer2DModel

    spec = dataclasses.replace(SYNTHETIC_PRESETS["full-width"], dit_num_layers=1)
    with torch.device("meta"):
        model = Ideogram4Transformer2DModel.from_config(configs.dit_config(spec))
    plan = split_shapes({t.name: t.shape for t in dit_tensors(spec)})
    assert plan == {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_text_encoder_config_loads_and_matches_the_tokenizer(tiny_checkpoint):
    from transformers import AutoConfig, AutoTokenizer, Qwen3VLConfig

    config = Qwen3VLConfig.from_pretrained(tiny_checkpoint / "text_encoder")
    assert type(AutoConfig.from_pretrained(tiny_checkpoint / "text_encoder")) is Qwen3VLConfig
    raw = json.loads((tiny_checkpoint / "text_encoder" / "config.json").read_text())
    assert raw["ideogram_fp8_weight_only"] is True and raw["architectures"] == ["Qwen3VLModel"]
    rope = raw["text_config"]["rope_parameters"]
    assert sum(rope["mrope_section"]) == config.text_config.head_dim // 2
    assert rope["mrope_interleaved"] and rope["rope_theta"] == 5000000
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint / "tokenizer")
    ids = tokenizer.convert_tokens_to_ids
    assert raw["image_token_id"] == ids("<|image_pad|>")
    assert raw["video_token_id"] == ids("<|video_pad|>")
    assert raw["vision_start_token_id"] == ids("<|vision_start|>")
    assert raw["vision_end_token_id"] == ids("<|vision_end|>")
    assert config.text_config.bos_token_id == ids("<|endoftext|>")
    assert config.text_config.eos_token_id == ids("<|im_end|>")
    assert len(tokenizer) <= config.text_config.vocab_size


@pytest.mark.parametrize("preset", ["tiny", "full"])
def test_text_encoder_keys_match_transformers(tiny_checkpoint, preset):
    torch = require_reference()
    from transformers import Qwen3VLConfig, Qwen3VLModel

    spec = SYNTHETIC_PRESETS[preset]
    vocab = text_vocab_size(spec)
    text = configs.text_encoder_json(spec, vocab, tokenizer_files()["special_ids"])
    config = Qwen3VLConfig.from_dict(json.loads(text))
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Qwen3VLModel(config).state_dict().items()}
    plan = {t.name: t.shape for t in text_encoder_tensors(spec, vocab)}
    ours = {k: v for k, v in plan.items() if not k.endswith(".weight_scale")}
    assert ours == expected
    if preset == "tiny":
        assert shapes_of(tiny_checkpoint / "text_encoder" / "model.safetensors") == plan


def test_vae_loads_in_diffusers_with_no_missing_keys(tiny_checkpoint):
    require_reference()
    from diffusers import AutoencoderKLFlux2

    vae, info = AutoencoderKLFlux2.from_pretrained(
        tiny_checkpoint / "vae", output_loading_info=True
    )
    assert not any(info.values()), info
    assert set(shapes_of(tiny_checkpoint / "vae" / DIT_FILE)) == set(vae.state_dict())
    np.testing.assert_allclose(vae.bn.running_mean.numpy(), LATENT_SHIFT, atol=1e-6)
    np.testing.assert_allclose(np.sqrt(vae.bn.running_var.numpy() + 1e-4), LATENT_SCALE, atol=1e-6)
    assert vae.config.latent_channels == 32 and tuple(vae.config.patch_size) == (2, 2)


def test_prompt_enhancer_head_is_optional_and_in_the_diffusers_layout(tiny_checkpoint, tmp_path):
    head_folder = "prompt_enhancer_head"
    assert not (tiny_checkpoint / head_folder).exists()  # the default output is unchanged
    path = write_synthetic_checkpoint(tmp_path / "head", components=[head_folder])
    head_file = f"{head_folder}/{DIT_FILE}"
    assert set(files_of(path)) == {"model_index.json", f"{head_folder}/config.json", head_file}
    vocab = text_vocab_size(SYNTHETIC_PRESETS["tiny"])
    hidden = SYNTHETIC_PRESETS["tiny"].text_hidden_size
    assert shapes_of(path / head_file) == {"lm_head.weight": (vocab, hidden)}
    with safe_open(path / head_file, framework="numpy") as f:
        assert f.get_slice("lm_head.weight").get_dtype() == "BF16"
    config = json.loads((path / head_folder / "config.json").read_text())
    assert config["_class_name"] == "Ideogram4PromptEnhancerHead"
    assert (config["hidden_size"], config["vocab_size"]) == (hidden, vocab)

    require_reference()
    from diffusers.pipelines.ideogram4.prompt_enhancer import Ideogram4PromptEnhancerHead

    head, info = Ideogram4PromptEnhancerHead.from_pretrained(
        path / head_folder, output_loading_info=True
    )
    assert not any(info.values()), info
    assert tuple(head.lm_head.weight.shape) == (vocab, hidden)
    # What diffusers' own save writes, key for key (it adds only where it was loaded from).
    head.save_pretrained(tmp_path / "resaved")
    resaved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    resaved.pop("_name_or_path", None)
    assert resaved == config


def test_scheduler_config_loads(tiny_checkpoint):
    require_reference()
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_checkpoint / "scheduler")
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.shift == 1.0
    assert not scheduler.config.use_dynamic_shifting
    raw = json.loads((tiny_checkpoint / "scheduler" / "scheduler_config.json").read_text())
    params = set(inspect.signature(FlowMatchEulerDiscreteScheduler.__init__).parameters) - {"self"}
    assert set(raw) - {"_class_name", "_diffusers_version"} == params


# --- tokenizer ---------------------------------------------------------------------------------


PROMPTS = [
    "a red fox in fresh snow",
    '{"high_level_description":"Café sign, 東京 night 🌸","compositional_deconstruction":{}}',
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_chat_template_gives_the_reference_prompt_text(tiny_checkpoint, prompt):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint / "tokenizer")
    messages = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8"))  # merges were learned, including non-ASCII


def test_tokenizer_is_a_byte_level_qwen2_bpe(tiny_checkpoint):
    folder = tiny_checkpoint / "tokenizer"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "Qwen2Tokenizer" and config["eos_token"] == "<|im_end|>"
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    assert tokenizer["model"]["type"] == "BPE"
    assert tokenizer["pre_tokenizer"]["pretokenizers"][1]["type"] == "ByteLevel"
    specials = [t["content"] for t in tokenizer["added_tokens"]]
    assert specials[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert "<|image_pad|>" in specials and "<|vision_start|>" in specials
    assert 1000 <= len(tokenizer["model"]["vocab"]) + len(specials) <= 4096
    assert (folder / "merges.txt").read_text().startswith("#version: 0.2\n")


# --- determinism, seeds, writing --------------------------------------------------------------


def test_same_seed_is_byte_identical(tiny_checkpoint, tmp_path):
    again = write_synthetic_checkpoint(tmp_path / "again", "tiny", seed=0)
    assert files_of(again) == files_of(tiny_checkpoint)


def test_seed_and_folder_change_the_weights(tiny_checkpoint, tmp_path):
    other = write_synthetic_checkpoint(tmp_path / "s1", "tiny", seed=1, components=("transformer",))
    a = (tiny_checkpoint / "transformer" / DIT_FILE).read_bytes()
    b = (other / "transformer" / DIT_FILE).read_bytes()
    uncond = (tiny_checkpoint / "unconditional_transformer" / DIT_FILE).read_bytes()
    header = len(safetensors_header(dit_tensors(SYNTHETIC_PRESETS["tiny"])))
    assert a[:header] == b[:header] == uncond[:header]
    assert a[header:] != b[header:]
    assert a[header:] != uncond[header:]
    key = "layers.0.attention.qkv.weight"
    cond_qkv, _ = fp8_rows(tiny_checkpoint / "transformer" / DIT_FILE, key)
    uncond_qkv, _ = fp8_rows(tiny_checkpoint / "unconditional_transformer" / DIT_FILE, key)
    assert (cond_qkv != uncond_qkv).mean() > 0.5


def test_components_subset_and_dit_layer_override(tmp_path):
    spec = dataclasses.replace(SYNTHETIC_PRESETS["tiny"], dit_num_layers=3)
    path = write_synthetic_checkpoint(tmp_path / "sub", spec, components=["vae", "transformer"])
    assert set(files_of(path)) == {
        "model_index.json",
        "transformer/config.json",
        f"transformer/{DIT_FILE}",
        "vae/config.json",
        f"vae/{DIT_FILE}",
    }
    assert json.loads((path / "transformer" / "config.json").read_text())["num_layers"] == 3


def test_force_replaces_only_an_earlier_checkpoint_never_a_link(tmp_path):
    dst = tmp_path / "ckpt"
    write_synthetic_checkpoint(dst, components=("vae",))
    with pytest.raises(FileExistsError, match="--force"):
        write_synthetic_checkpoint(dst, components=())
    write_synthetic_checkpoint(dst, components=("scheduler",), force=True)
    assert set(files_of(dst)) == {"model_index.json", "scheduler/scheduler_config.json"}
    (dst / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match=r"not a synthetic checkpoint \(e\.g\. keep\.txt\)"):
        write_synthetic_checkpoint(dst, components=(), force=True)
    (tmp_path / "link").symlink_to(dst, target_is_directory=True)
    with pytest.raises(FileExistsError, match="symbolic link"):
        write_synthetic_checkpoint(tmp_path / "link", components=(), force=True)
    assert (dst / "keep.txt").exists() and (dst / "scheduler").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "link"]


def test_failed_write_leaves_no_destination_and_no_temp_folder(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk broke")

    monkeypatch.setattr(writer, "_write_safetensors", boom)
    with pytest.raises(OSError, match="disk broke"):
        write_synthetic_checkpoint(tmp_path / "ckpt", "tiny")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_names_the_file_and_the_fix(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")  # as os.pwrite raises it

    monkeypatch.setattr(writer, "_pwrite_all", full)
    with pytest.raises(
        OSError,
        match=r"no space left writing \S*ckpt/vae/diffusion_pytorch_"
        r"model\.safetensors; the output needs \d+\.\d [KM]B",
    ):
        write_synthetic_checkpoint(tmp_path / "ckpt", components=("vae",))
    assert list(tmp_path.iterdir()) == []


def test_a_stale_partial_folder_is_removed_and_a_held_lock_refuses(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    stale = tmp_path / f".ckpt.{child.pid}.abcd1234.partial"
    stale.mkdir()
    with pytest.warns(UserWarning, match=f"removed {stale}"):
        write_synthetic_checkpoint(tmp_path / "ckpt", components=())
    with locked(tmp_path / "again"):  # held (by this process, through another open file)
        with pytest.raises(
            FileExistsError, match=f"being written by another process \\(pid {os.getpid()}"
        ):
            write_synthetic_checkpoint(tmp_path / "again", components=())
        assert sorted(p.name for p in tmp_path.iterdir()) == [".again.lock", "ckpt"]


def test_bad_names_are_rejected_with_the_valid_ones():
    with pytest.raises(ValueError, match="tiny, full-width, full"):
        write_synthetic_checkpoint("/nonexistent/x", "huge")
    with pytest.raises(ValueError, match="unconditional_transformer"):
        write_synthetic_checkpoint("/nonexistent/x", components=("unet",))
    with pytest.raises(ValueError, match="text_num_layers"):
        dataclasses.replace(SYNTHETIC_PRESETS["tiny"], text_num_layers=12)


# --- command line ------------------------------------------------------------------------------


def test_cli_writes_a_checkpoint_and_reports_bad_options(tmp_path):
    runner = CliRunner()
    dst = tmp_path / "cli"
    args = ["synth", str(dst), "--components", "transformer,scheduler", "--dit-layers", "1"]
    result = runner.invoke(main, [*args, "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert json.loads((dst / "transformer" / "config.json").read_text())["num_layers"] == 1
    assert not (dst / "vae").exists()

    result = runner.invoke(main, args)
    assert result.exit_code != 0 and "already exists; pass --force to replace it" in result.output
    assert runner.invoke(main, [*args, "--force"]).exit_code == 0

    result = runner.invoke(main, ["synth", str(dst), "--preset", "huge"])
    assert result.exit_code == 2 and "full-width" in result.output
    result = runner.invoke(main, ["synth", str(dst), "--components", "unet"])
    assert result.exit_code == 2 and "text_encoder" in result.output


def test_cli_writes_a_lora_that_fits_and_generate_takes(tmp_path, tiny_checkpoint):
    runner = CliRunner()
    lora = tmp_path / "style.safetensors"
    # The tiny preset and seed 0 are the fixture's: the LoRA fits tiny_checkpoint's DiT.
    args = ["synth", str(tmp_path / "ckpt"), "--components", "scheduler", "--lora", str(lora)]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert str(lora) in result.output.splitlines()
    layers = json.loads((tiny_checkpoint / "transformer" / "config.json").read_text())
    result = runner.invoke(main, ["lora-info", str(lora), "--model", str(tiny_checkpoint)])
    assert result.exit_code == 0, result.output
    assert "layout    : diffusers" in result.output
    assert f"shapes    : fits: {5 * layers['num_layers']} layers" in result.output
    out = tmp_path / "styled.png"
    generate = ["generate", "--model", str(tiny_checkpoint), "--dtype", "float32", "--prompt", "a"]
    generate += ["--width", "256", "--height", "256", "--steps", "1", "--seed", "1", "-o", str(out)]
    result = runner.invoke(main, [*generate, "--lora", f"{lora}:0.8"])
    assert result.exit_code == 0, result.output
    assert out.is_file()

    # An existing file is refused before the checkpoint is written; --force replaces both.
    again = [*args[:1], str(tmp_path / "again"), *args[2:]]
    result = runner.invoke(main, again)
    assert result.exit_code == 1 and "already exists; pass --force" in result.output
    assert not (tmp_path / "again").exists()
    kohya = [*again, "--lora-layout", "kohya", "--force"]
    assert runner.invoke(main, kohya).exit_code == 0
    result = runner.invoke(main, ["lora-info", str(lora), "--model", str(tiny_checkpoint)])
    assert "(kohya names)" in result.output and "shapes    : fits:" in result.output


# --- slow: a real-width file written to disk ---------------------------------------------------


@pytest.mark.slow
def test_full_width_dit_file_is_written_as_planned(tmp_path):
    spec = SYNTHETIC_PRESETS["full-width"]
    path = write_synthetic_checkpoint(tmp_path / "fw", spec, components=("transformer",))
    tensors = dit_tensors(spec)
    size = (path / "transformer" / DIT_FILE).stat().st_size
    assert size == len(safetensors_header(tensors)) + sum(t.nbytes for t in tensors)
    shapes = shapes_of(path / "transformer" / DIT_FILE)
    assert shapes["llm_cond_proj.weight"] == (4608, 53248)
    rows, scale = fp8_rows(path / "transformer" / DIT_FILE, "llm_cond_proj.weight", rows=4)
    assert np.all(np.abs(rows).max(axis=1) == 448.0)
    assert (rows * scale[:, None]).std() * np.sqrt(53248) == pytest.approx(1.0, rel=0.15)
    shutil.rmtree(path)  # 0.8 GB; pytest keeps old tmp folders


def test_latent_constants_are_the_spec_values():
    assert LATENT_SHIFT.shape == LATENT_SCALE.shape == (128,)
    assert LATENT_SHIFT.dtype == LATENT_SCALE.dtype == np.float32
    assert (
        LATENT_SHIFT[[0, 14, 127]].tolist()
        == np.float32([0.01984364, 0.3758261, -0.01760592]).tolist()
    )
    assert (
        LATENT_SCALE[[0, 99, 127]].tolist()
        == np.float32([1.63933691, 1.94067348, 1.68533454]).tolist()
    )
    assert 1.53 < LATENT_SCALE.min() and LATENT_SCALE.max() < 1.95
