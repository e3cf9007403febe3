"""train-lora's data: the folder scan (every problem at once, before any model), the size
buckets and batches, and the cache of text features and latents on the tiny checkpoint."""

import json
import math
import warnings

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from train_helpers import CAPTION, caption, write_dataset

import ideogram4_mlx.train.cache as cache_module
from ideogram4_mlx import load
from ideogram4_mlx.caption import verify
from ideogram4_mlx.cli import main
from ideogram4_mlx.metadata import read_metadata
from ideogram4_mlx.request import MAX_ASPECT, check_size
from ideogram4_mlx.train.cache import default_cache_dir, prepare_dataset
from ideogram4_mlx.train.data import (
    DatasetError,
    assign_buckets,
    bucket_pixels,
    bucket_sizes,
    closest_bucket,
    epoch_batches,
    preflight,
    scan_dataset,
)
from ideogram4_mlx.vae import encode

SIZES = [(64, 64), (320, 160), (96, 288), (128, 128)]


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return load(tiny_checkpoint, dtype=mx.float32, keep_in_memory=True)


def spy(monkeypatch, owner, name: str) -> list:
    """Records each call of ``owner.name`` (and still makes it)."""
    calls, real = [], getattr(owner, name)

    def recorded(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, recorded)
    return calls


# -- the scan -----------------------------------------------------------------------------------


def test_caption_helper_is_verifier_clean():
    assert verify(CAPTION) == []


def test_scan_reads_samples_in_name_order(tmp_path):
    data = write_dataset(tmp_path / "data", SIZES)
    (data / "notes.md").write_text("ignored")
    (data / ".DS_Store").write_bytes(b"\0")
    (data / "sub").mkdir()
    samples = scan_dataset(data)
    assert [s.image.name for s in samples] == [f"img{i}.png" for i in range(len(SIZES))]
    assert [s.size for s in samples] == SIZES
    assert json.loads(samples[1].caption) == json.loads(caption("Image number 1."))
    assert samples[0].idea is None and len(samples[0].sha256) == 64


def test_every_problem_is_one_line_and_reported_at_once(tmp_path):
    data = write_dataset(tmp_path / "data", [(64, 64)] * 7)
    (data / "img0.json").unlink()  # an image without a caption
    (data / "lonely.json").write_text(caption("No image."))  # a caption without an image
    (data / "img1.json").write_text('{"high_level_description": ')  # invalid JSON
    (data / "img2.json").write_text("[1, 2]")  # JSON, not a caption object
    raw = (data / "img3.png").read_bytes()
    (data / "img3.png").write_bytes(raw[: len(raw) // 2])  # truncated
    (data / "img4.json").unlink()
    (data / "img4.txt").write_text("a red square")  # plain text without allow_txt
    (data / "img5.jpg").write_bytes(b"not an image")  # two images, one name
    with pytest.raises(DatasetError) as e:
        scan_dataset(data)
    problems = e.value.problems
    assert len(problems) == 7 and str(e.value).splitlines() == problems
    for name, words in [
        ("img0.png", "has no caption"),
        ("lonely", "has no image"),
        ("img1.json", "is not valid JSON"),
        ("img2.json", "not a caption object"),
        ("img3.png", "cannot be read as an image"),
        ("img4.txt", "--allow-txt"),
        ("img5", "share one name"),
    ]:
        assert any(name in p and words in p for p in problems), (name, problems)
    assert not any("img6" in p for p in problems)


def test_two_images_of_one_name_are_a_problem(tmp_path):
    data = write_dataset(tmp_path / "data", [(64, 64)])
    Image.new("RGB", (64, 64)).save(data / "img0.jpg")
    with pytest.raises(DatasetError, match="img0.jpg, img0.json, img0.png share one name"):
        scan_dataset(data)


def test_an_empty_folder_is_one_line(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(DatasetError, match="holds no samples") as e:
        scan_dataset(tmp_path / "data")
    assert len(str(e.value).splitlines()) == 1


def test_verifier_findings_warn_but_train(tmp_path):
    data = write_dataset(
        tmp_path / "data", [(64, 64)], [json.dumps({"high_level_description": "x"})]
    )
    with pytest.warns(UserWarning, match="img0.json: root: compositional_deconstruction"):
        assert len(scan_dataset(data)) == 1


def test_txt_captions_need_allow_txt(tmp_path):
    data = write_dataset(tmp_path / "data", [(64, 64)])
    (data / "img0.json").unlink()
    (data / "img0.txt").write_text("  a red square \n")
    [sample] = scan_dataset(data, allow_txt=True)
    assert sample.caption is None and sample.idea == "a red square"
    (data / "img0.txt").write_text(" \n")
    with pytest.raises(DatasetError, match="img0.txt is empty"):
        scan_dataset(data, allow_txt=True)


def test_exif_orientation_is_applied(tmp_path):
    data = write_dataset(tmp_path / "data", [(64, 32)])
    image = Image.open(data / "img0.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 64x32, shown 32x64
    image.save(data / "img0.png", exif=exif)
    assert scan_dataset(data)[0].size == (32, 64)


def test_preflight_adds_the_output_problems(tmp_path):
    data = write_dataset(tmp_path / "data", [(64, 64)])
    (data / "img0.json").unlink()
    with pytest.raises(DatasetError) as e:
        preflight(data, tmp_path / "lora.pt", resolution=250)
    assert len(e.value.problems) == 3
    assert "must end in .safetensors" in e.value.problems[0]
    assert "resolution 250" in e.value.problems[1]
    with pytest.raises(DatasetError, match="is not a folder"):
        preflight(tmp_path / "missing", tmp_path / "lora.safetensors")
    (data / "img0.json").write_text(caption("x"))
    out = tmp_path / "lora.safetensors"
    out.write_bytes(b"")
    with pytest.raises(DatasetError, match="already exists; pass --force"):
        preflight(data, out, resolution=256)
    assert len(preflight(data, out, resolution=256, force=True)) == 1
    assert len(preflight(data, out, resolution=256, resume=True)) == 1  # continues that run
    link = tmp_path / "link.safetensors"
    link.symlink_to(out)
    with pytest.raises(DatasetError, match="symbolic link"):
        preflight(data, link, resolution=256, force=True)


# -- buckets and batches ------------------------------------------------------------------------


@pytest.mark.parametrize("resolution", [256, 512, 1024, 2048])
def test_buckets_are_supported_sizes_near_the_area(resolution):
    sizes = bucket_sizes(resolution)
    assert (resolution, resolution) in sizes and len(set(sizes)) == len(sizes)
    for w, h in sizes:
        check_size(w, h)
        assert max(w, h) / min(w, h) <= MAX_ASPECT
        assert (h, w) in sizes  # landscape and portrait alike
    if resolution == 1024:  # where no side is clamped, the area stays within a few percent
        assert all(abs(w * h / 1024**2 - 1) < 0.01 for w, h in sizes if max(w, h) < 2048)
        assert (2048, 416) in sizes  # 6:1 clamped to the widest side: 4.9:1
        assert closest_bucket((1920, 1080), sizes) == (1360, 768)  # 16:9
        assert closest_bucket((600, 3000), sizes)[1] > 2000  # 1:5 goes to a tall bucket


def test_mixed_sizes_go_to_buckets_and_batches_never_mix_them():
    sizes = [(64, 64), (320, 160), (96, 288), (128, 128), (600, 300), (100, 100), (80, 80)]
    buckets = assign_buckets(sizes, 256)
    assert sorted(i for b in buckets.values() for i in b) == list(range(len(sizes)))
    assert buckets[(256, 256)] == [0, 3, 5, 6] and buckets[(512, 256)] == [1, 4]
    for epoch in range(3):
        batches = epoch_batches(buckets, 3, seed=7, epoch=epoch)
        assert sorted(i for b in batches for i in b) == list(range(len(sizes)))
        assert all(len(b) <= 3 for b in batches)
        bucket_of = {i: size for size, ids in buckets.items() for i in ids}
        assert all(len({bucket_of[i] for i in b}) == 1 for b in batches)
        assert batches == epoch_batches(buckets, 3, seed=7, epoch=epoch)  # deterministic
    many = {(256, 256): list(range(40))}
    assert epoch_batches(many, 4, 0, 0) != epoch_batches(many, 4, 0, 1)
    assert epoch_batches(many, 4, 0, 0) != epoch_batches(many, 4, 1, 0)


def test_bucket_pixels_fit_flip_and_composite_alpha(tmp_path):
    data = write_dataset(tmp_path / "data", [(320, 160)])
    rgba = np.zeros((160, 320, 4), np.uint8)
    rgba[:, :160] = (255, 0, 0, 255)  # left half opaque red, right half transparent
    Image.fromarray(rgba).save(data / "img0.png")
    [sample] = scan_dataset(data)
    pixels = bucket_pixels(sample, (512, 256))
    assert pixels.shape == (256, 512, 3) and pixels.dtype == np.uint8
    assert tuple(pixels[10, 10]) == (255, 0, 0) and tuple(pixels[10, -10]) == (255, 255, 255)
    np.testing.assert_array_equal(bucket_pixels(sample, (512, 256), flip=True), pixels[:, ::-1])


# -- the cache ----------------------------------------------------------------------------------


def test_cache_encodes_once_and_a_second_run_encodes_nothing(pipe, tmp_path, monkeypatch):
    same = caption("Shared caption.")
    data = write_dataset(tmp_path / "data", SIZES, [same, caption("b"), caption("c"), same])
    samples = scan_dataset(data)
    texts = spy(monkeypatch, pipe, "encode")
    images = spy(monkeypatch, cache_module, "encode")
    cache = tmp_path / "cache"
    first = prepare_dataset(pipe, samples, 256, cache, flip=False, verbose=False)
    assert len(texts) == 3 and len(images) == 4  # the shared caption once
    assert len(first.items) == 4 and first.items[0].features == first.items[3].features
    assert (
        sorted(p.parent.name for p in cache.rglob("*.safetensors"))
        == ["latents"] * 4 + ["text"] * 3
    )
    again = prepare_dataset(pipe, samples, 256, cache, flip=False, verbose=False)
    assert len(texts) == 3 and len(images) == 4  # all cached
    assert again == first
    fresh = load(pipe.checkpoint_dir, dtype=mx.float32)  # a new process, in effect
    vaes = spy(monkeypatch, fresh, "vae")
    assert prepare_dataset(fresh, samples, 256, cache, verbose=False) == first
    assert fresh.prompt_encoder().loads == 0 and vaes == []  # no model loaded at all
    # What is cached is what the pipeline computes.
    item = first.items[1]
    want = encode(pipe.vae(), bucket_pixels(samples[1], item.bucket)[None])[0]
    got = mx.load(str(item.latents))["latents"]
    assert got.shape == (item.bucket[0] * item.bucket[1] // 256, 128)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-6)
    features = mx.load(str(item.features))["features"]
    np.testing.assert_allclose(
        np.array(features), np.array(pipe.encode(item.caption)[0]), atol=1e-6
    )
    # Another resolution is another bucket: new latents, the same text features.
    prepare_dataset(pipe, samples, 512, cache, verbose=False)
    assert len(texts) == 4 and len(images) == 8  # 1 above: the check's own pipe.encode


def test_flip_adds_a_mirrored_copy_in_the_same_bucket(pipe, tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "data", SIZES[:2])
    samples = scan_dataset(data)
    cache = tmp_path / "cache"
    plain = prepare_dataset(pipe, samples, 256, cache, verbose=False)
    images = spy(monkeypatch, cache_module, "encode")
    flipped = prepare_dataset(pipe, samples, 256, cache, flip=True, verbose=False)
    assert len(images) == 2  # only the mirrored copies are new
    assert [(i.image.name, i.flipped) for i in flipped.items] == [
        ("img0.png", False),
        ("img0.png", True),
        ("img1.png", False),
        ("img1.png", True),
    ]
    assert flipped.buckets == {(256, 256): [0, 1], (512, 256): [2, 3]}
    assert flipped.items[0].latents == plain.items[0].latents
    item = flipped.items[3]
    want = encode(pipe.vae(), bucket_pixels(samples[1], item.bucket, flip=True)[None])[0]
    np.testing.assert_allclose(
        np.array(mx.load(str(item.latents))["latents"]), np.array(want), atol=1e-6
    )
    assert item.latents != flipped.items[2].latents


def test_a_damaged_entry_is_encoded_again(pipe, tmp_path, monkeypatch):
    samples = scan_dataset(write_dataset(tmp_path / "data", SIZES[:1]))
    cache = tmp_path / "cache"
    first = prepare_dataset(pipe, samples, 256, cache, verbose=False)
    first.items[0].latents.write_bytes(b"garbage")
    bad = mx.load(str(first.items[0].features))["features"]
    mx.save_safetensors(str(first.items[0].features), {"features": bad * math.nan})
    texts, images = spy(monkeypatch, pipe, "encode"), spy(monkeypatch, cache_module, "encode")
    with pytest.warns(UserWarning, match="encoding it again") as caught:
        again = prepare_dataset(pipe, samples, 256, cache, verbose=False)
    assert len(caught) == 2 and len(texts) == 1 and len(images) == 1
    assert again == first and bool(mx.all(mx.isfinite(again.load_batch([0])[1])))


def test_too_long_captions_stop_before_any_encoding(pipe, tmp_path, monkeypatch):
    long = caption("word " * 3000)
    data = write_dataset(tmp_path / "data", [(64, 64)] * 3, [long, caption("fine"), long])
    texts, images = spy(monkeypatch, pipe, "encode"), spy(monkeypatch, cache_module, "encode")
    with pytest.raises(DatasetError) as e:
        prepare_dataset(pipe, scan_dataset(data), 256, tmp_path / "cache", verbose=False)
    assert len(e.value.problems) == 1  # one caption, two images: named once
    assert "img0.json: prompt is" in str(e.value) and "the limit is 2048 tokens" in str(e.value)
    assert texts == [] and images == [] and not (tmp_path / "cache").exists()


def test_load_batch_pads_features_on_the_left(pipe, tmp_path):
    data = write_dataset(
        tmp_path / "data", [(64, 64), (64, 64)], [caption("x"), caption("a b c d e f g")]
    )
    prepared = prepare_dataset(pipe, scan_dataset(data), 256, tmp_path / "cache", verbose=False)
    latents, features, lengths = prepared.load_batch([0, 1])
    assert latents.shape == (2, 256, 128) and latents.dtype == mx.float32
    assert features.dtype == mx.float32 and features.shape[:2] == (2, max(lengths))
    assert lengths[0] < lengths[1]
    short = np.array(features[0])
    assert not short[: lengths[1] - lengths[0]].any()
    np.testing.assert_array_equal(
        short[lengths[1] - lengths[0] :], np.array(pipe.encode(prepared.items[0].caption)[0])
    )


def test_txt_ideas_are_expanded_once_into_the_cache(pipe, tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "data", [(64, 64)])
    (data / "img0.json").unlink()
    (data / "img0.txt").write_text("a red square")
    expanded = caption("A red square, expanded.")
    calls = []
    monkeypatch.setattr(pipe, "expand", lambda *a: calls.append(a) or expanded)
    samples = scan_dataset(data, allow_txt=True)
    cache = tmp_path / "cache"
    first = prepare_dataset(pipe, samples, 256, cache, seed=3, verbose=False)
    assert calls == [("a red square", 256, 256, 3)] and first.items[0].caption == expanded
    assert sorted(p.name for p in data.iterdir()) == ["img0.png", "img0.txt"]  # nothing written
    assert [p.read_text() for p in (cache / "captions").iterdir()] == [expanded]
    assert prepare_dataset(pipe, samples, 256, cache, seed=3, verbose=False) == first
    assert len(calls) == 1


# -- the command --------------------------------------------------------------------------------


def test_cli_reports_every_problem_before_loading(tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "data", [(64, 64)] * 2)
    (data / "img0.json").write_text("{")
    (data / "img1.json").unlink()
    loads = []
    monkeypatch.setattr("ideogram4_mlx.cli.train.load", lambda *a, **k: loads.append(a))
    result = CliRunner().invoke(main, ["train-lora", str(data), str(tmp_path / "out.bin")])
    assert result.exit_code == 1 and loads == []
    lines = result.output.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("Error: ")
    assert "out.bin must end in .safetensors" in result.output
    assert (
        "img0.json is not valid JSON" in result.output
        and "img1.png has no caption" in result.output
    )


def test_the_command_caches_the_data_trains_and_writes_a_lora_generate_applies(
    tiny_checkpoint, tmp_path
):
    """train-lora end to end on the tiny synthetic checkpoint: the dataset cached (4 examples
    with --flip), 2 steps, a LoRA file our loader reads and `generate --lora` applies."""
    data = write_dataset(tmp_path / "data", SIZES[:2])
    out = tmp_path / "style.safetensors"
    args = ["train-lora", str(data), str(out), "--model", str(tiny_checkpoint)]
    args += ["--dtype", "float32", "--resolution", "256", "--flip", "--steps", "2", "--rank", "4"]
    args += ["--learning-rate", "0.01"]  # big enough to move 8-bit pixels in 2 steps
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean caption and dataset warn nothing
        result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "4 examples in" in result.output and "256x256 (2), 512x256 (2)" in result.output
    assert len(list(default_cache_dir(out).rglob("*.safetensors"))) == 6
    assert result.stdout.strip().splitlines()[-1] == str(out)
    images = []
    for lora in ([], ["--lora", str(out)]):
        images.append(tmp_path / f"image{len(images)}.png")
        generated = CliRunner().invoke(main, [
            "generate", "--model", str(tiny_checkpoint), "--dtype", "float32", "--prompt",
            "a cat", "--width", "256", "--height", "256", "--steps", "1", "--seed", "1", *lora,
            "--output", str(images[-1]),
        ])  # fmt: skip
        assert generated.exit_code == 0, generated.output
    assert read_metadata(images[1])["loras"][0]["name"] == out.name
    pixels = [np.asarray(Image.open(p), dtype=np.int16) for p in images]
    assert np.abs(pixels[1] - pixels[0]).max() > 0  # the trained LoRA changes the image


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--low-memory"], "training needs every DiT block in memory: not --low-memory"),
        (["--sample-prompt", "a sun"], "give --sample-prompt and --sample-every together"),
        (["--sample-every", "5"], "give --sample-prompt and --sample-every together"),
    ],
)
def test_command_option_conflicts_are_usage_errors_before_loading(
    tmp_path, monkeypatch, extra, message
):
    data = write_dataset(tmp_path / "data", SIZES[:1])
    loads = []
    monkeypatch.setattr("ideogram4_mlx.cli.train.load", lambda *a, **k: loads.append(a))
    out = str(tmp_path / "out.safetensors")
    result = CliRunner().invoke(main, ["train-lora", str(data), out, *extra])
    assert result.exit_code == 2 and message in result.output and loads == []
