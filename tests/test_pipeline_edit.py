"""Image-to-image, inpainting and outpainting through the MLX pipeline on the tiny synthetic
checkpoint: the exact limiting cases, metadata and replay, and bad input on the command line.
Parity with the PyTorch reference is in test_pipeline_parity.py."""

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import ideogram4_mlx.request as request_module
from ideogram4_mlx.cli import main
from ideogram4_mlx.edit import fingerprint
from ideogram4_mlx.metadata import read_metadata, replay
from ideogram4_mlx.pipeline import load
from ideogram4_mlx.sampler import T_MIN
from ideogram4_mlx.vae import decode, encode

PROMPT = '{"high_level_description":"a test","compositional_deconstruction":{"background":"plain"}}'
SIZE = 256
STEPS = dict(preset="V4_TURBO_12", num_steps=3)
GENERATE_MODULE = "ideogram4_mlx.cli.generate"

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def smooth_image(width: int = SIZE, height: int = SIZE) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width] / 40.0
    channels = [np.sin(xx) * np.cos(yy), np.cos(xx + yy), np.sin(0.5 * xx - yy)]
    return np.round(127.5 + 100 * np.stack(channels, -1)).astype(np.uint8)


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return load(tiny_checkpoint, dtype=mx.float32, keep_in_memory=True)


@pytest.fixture(scope="module")
def noise():
    return np.random.default_rng(5).standard_normal((1, (SIZE // 16) ** 2, 128), np.float32)


@pytest.fixture(scope="module")
def x0(pipe):
    """The input's packed latents (the VAE encoder's output)."""
    return np.array(encode(pipe.vae(), smooth_image()[None]))


def run(pipe, noise, **settings):
    return pipe.generate(PROMPT, noise=noise, **STEPS, **settings)


# --- limiting cases -------------------------------------------------------------------------


def test_strength_one_is_text_to_image_up_to_the_start(pipe, noise, x0):
    """S = 1 starts from ``t_min * x0 + (1 - t_min) * noise``, text-to-image from ``noise``.

    Exact: img2img at S = 1 IS text-to-image started from that point (same code path, equal
    bits). Bounded: against text-to-image from the noise itself, the start differs by
    ``t_min * (x0 - noise)`` (~1.3e-4 relative here); the final latents may differ by at most
    twice that (the tiny model's flow map contracts it: measured 0.6x with 3, 12, 20 and 48
    steps), and the image by at most 1 level."""
    img2img = run(pipe, noise, image=smooth_image(), strength=1.0)
    start = np.array(T_MIN * mx.array(x0) + (1 - mx.array(T_MIN, mx.float32)) * mx.array(noise))
    shifted = run(pipe, start, width=SIZE, height=SIZE)
    np.testing.assert_array_equal(img2img.latents, shifted.latents)
    np.testing.assert_array_equal(np.array(img2img.image), np.array(shifted.image))

    plain = run(pipe, noise, width=SIZE, height=SIZE)
    start_diff = np.linalg.norm(T_MIN * (x0 - noise)) / np.linalg.norm(noise)
    final_diff = np.linalg.norm(img2img.latents - plain.latents) / np.linalg.norm(plain.latents)
    assert 0 < final_diff <= 2 * start_diff
    pixels = np.abs(np.array(img2img.image, int) - np.array(plain.image, int))
    assert pixels.max() <= 1


def test_lower_strength_starts_later_and_stays_closer_to_the_input(pipe, noise):
    image = smooth_image()
    distances = []
    for strength in (0.2, 0.6, 1.0):
        result = run(pipe, noise, image=image, strength=strength)
        assert result.metadata["strength"] == strength
        distances.append(np.abs(np.array(result.image, int) - image).mean())
    assert distances[0] < distances[1] < distances[2]


def test_black_mask_returns_the_vae_round_trip(pipe, noise, x0):
    """Keep everything: every token ends as the input's latent, bit for bit, so the image is
    the VAE round trip of the input exactly."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    result = run(pipe, noise, image=smooth_image(), mask=mask)
    np.testing.assert_array_equal(result.latents, x0)
    round_trip = decode(pipe.vae(), mx.array(x0), SIZE // 16, SIZE // 16)[0]
    np.testing.assert_array_equal(np.array(result.image), round_trip)


def test_white_mask_at_strength_one_is_img2img(pipe, noise):
    white = np.full((SIZE, SIZE), 255, np.uint8)
    inpaint = run(pipe, noise, image=smooth_image(), mask=white)
    assert inpaint.metadata["strength"] == 1.0  # the default with a mask
    img2img = run(pipe, noise, image=smooth_image(), strength=1.0)
    np.testing.assert_array_equal(inpaint.latents, img2img.latents)
    np.testing.assert_array_equal(np.array(inpaint.image), np.array(img2img.image))


def test_inpainting_keeps_the_unmasked_tokens_and_paste_back_the_pixels(pipe, noise, x0):
    image = smooth_image()
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[40:100, 130:200] = 255
    result = run(pipe, noise, image=image, mask=mask, paste_back=True, strength=0.8)
    kept = ~np.asarray(Image.fromarray(mask).reduce(16), bool).reshape(-1)  # any-pixel rule
    regenerated = ~kept
    np.testing.assert_array_equal(result.latents[0, kept], x0[0, kept])
    assert np.abs(result.latents[0, regenerated] - x0[0, regenerated]).max() > 1e-2
    out = np.array(result.image)
    np.testing.assert_array_equal(out[mask < 128], image[mask < 128])  # paste-back: exact
    assert (out[mask >= 128] != image[mask >= 128]).any()
    without = run(pipe, noise, image=image, mask=mask, strength=0.8)
    np.testing.assert_array_equal(without.latents, result.latents)  # paste-back is pixels only
    assert (np.array(without.image)[mask < 128] != image[mask < 128]).any()  # the VAE's


def test_outpainting_grows_the_canvas_and_keeps_the_inside(pipe):
    image = smooth_image(SIZE, SIZE)
    expand = (32, 16, 64, 0)
    noise = np.random.default_rng(2).standard_normal((1, 17 * 22, 128), np.float32)
    result = run(pipe, noise, image=image, expand=expand, paste_back=True)
    assert result.image.size == (SIZE + 96, SIZE + 16)
    assert result.metadata["expand"] == list(expand) and result.metadata["strength"] == 1.0
    out = np.array(result.image)
    np.testing.assert_array_equal(out[16:, 32 : 32 + SIZE], image)  # pasted back exactly
    inside = np.zeros((17, 22), bool)
    inside[1:, 2:18] = True
    x0 = np.array(encode(pipe.vae(), np.pad(image, [(16, 0), (32, 64), (0, 0)], "edge")[None]))
    np.testing.assert_array_equal(result.latents[0, inside.reshape(-1)], x0[0, inside.reshape(-1)])
    assert "encode_image" in result.stats


# --- metadata and replay ----------------------------------------------------------------------


def test_metadata_records_the_edit_and_replay_checks_the_inputs(pipe, tmp_path):
    image, mask = smooth_image(), np.zeros((SIZE, SIZE), np.uint8)
    mask[:64] = 255
    Image.fromarray(image).save(tmp_path / "in.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    result = pipe.generate(
        PROMPT,
        image=tmp_path / "in.png",
        mask=tmp_path / "mask.png",
        mask_grow=1,
        mask_feather=1,
        seed=3,
        **STEPS,
    )
    m = result.metadata
    assert m["image_sha256"] == fingerprint(Image.fromarray(image))
    assert m["mask_sha256"] == fingerprint(Image.fromarray(mask))
    assert (m["strength"], m["mask_grow"], m["mask_feather"], m["paste_back"]) == (1.0, 1, 1, False)
    assert (m["width"], m["height"]) == (SIZE, SIZE)
    assert "pixels" not in json.dumps(m) and len(json.dumps(m)) < 4000  # no pixels stored
    path = result.save(tmp_path / "out.png")

    stored = read_metadata(path)
    _, request = replay(stored, {"image": tmp_path / "in.png", "mask": tmp_path / "mask.png"})
    again = pipe.generate(request)
    np.testing.assert_array_equal(np.array(again.image), np.array(result.image))

    with pytest.raises(ValueError, match="give that image with --image"):
        pipe.generate(replay(stored)[1])
    other = image.copy()
    other[0, 0] ^= 1
    Image.fromarray(other).save(tmp_path / "other.png")
    with pytest.raises(ValueError, match=r"the image differs .* give the same file with --image"):
        pipe.generate(
            replay(stored, {"image": tmp_path / "other.png", "mask": tmp_path / "mask.png"})[1]
        )
    with pytest.raises(ValueError, match=r"the mask differs .*none was given"):
        pipe.generate(replay(stored, {"image": tmp_path / "in.png"})[1])


def test_cli_edit_and_replay(tiny_checkpoint, tmp_path):
    Image.fromarray(smooth_image(300, 200)).save(tmp_path / "in.png")
    mask = np.zeros((200, 300), np.uint8)
    mask[50:120, 100:180] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    base = ["generate", "--model", str(tiny_checkpoint), "--dtype", "float32", "--prompt", PROMPT]
    steps = ["--preset", "V4_TURBO_12", "--steps", "2", "--seed", "4"]
    out = tmp_path / "out.png"
    args = [*base, *steps, "--image", tmp_path / "in.png", "--mask", tmp_path / "m.png"]
    result = CliRunner().invoke(main, [*args, "--paste-back", "-o", out])
    assert result.exit_code == 0, result.output
    with Image.open(out) as written:
        assert written.size == (384, 256)  # the image's own size, scaled up to 256 and rounded
    replayed = tmp_path / "replay.png"
    inputs = ["--image", tmp_path / "in.png", "--mask", tmp_path / "m.png"]
    result = CliRunner().invoke(main, ["generate", "--from-metadata", out, *inputs, "-o", replayed])
    assert result.exit_code == 0, result.output
    assert "replay: identical" in result.output
    swapped = ["--image", tmp_path / "m.png", "--mask", tmp_path / "m.png"]
    result = CliRunner().invoke(
        main, ["generate", "--from-metadata", out, *swapped, "-o", tmp_path / "x.png"]
    )
    assert result.exit_code == 1 and "the image differs" in result.output


def test_cli_reads_an_edits_inputs_once_for_one_or_several_seeds(
    tiny_checkpoint, tmp_path, monkeypatch
):
    """The preflight's resolved request is what runs (no second validation), and --seeds
    re-seeds one resolved request: each input file is decoded once per command."""
    Image.fromarray(smooth_image(256, 256)).save(tmp_path / "in.png")
    reads = []
    original = request_module.load_image

    def counted(source, what="image"):
        reads.append(what)
        return original(source, what)

    monkeypatch.setattr(request_module, "load_image", counted)
    base = ["generate", "--model", str(tiny_checkpoint), "--dtype", "float32", "--prompt", PROMPT]
    args = [*base, "--preset", "V4_TURBO_12", "--steps", "2", "--image", tmp_path / "in.png"]
    result = CliRunner().invoke(main, [*args, "--seed", "7", "-o", tmp_path / "one.png"])
    assert result.exit_code == 0, result.output
    assert reads == ["image"]
    reads.clear()
    result = CliRunner().invoke(main, [*args, "--seeds", "7,8", "-o", tmp_path / "many.png"])
    assert result.exit_code == 0, result.output
    assert reads == ["image"]
    with Image.open(tmp_path / "one.png") as a, Image.open(tmp_path / "many-7.png") as b:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    one, many = read_metadata(tmp_path / "one.png"), read_metadata(tmp_path / "many-7.png")
    assert many["image_sha256"] == one["image_sha256"] and len(one["image_sha256"]) == 64


# --- bad input: one line each, before any model loads -----------------------------------------


@pytest.fixture
def no_load(monkeypatch):
    import sys

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(sys.modules[GENERATE_MODULE], "load", refuse)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "{tmp}/missing.png"], "missing.png does not exist"),
        (["--image", "{tmp}/corrupt.png"], "corrupt.png cannot be read as an image"),
        (["--image", "{tmp}/in.png", "--mask", "{tmp}/broken.png"], "broken PNG data: "),
        (["--image", "{tmp}/in.png", "--mask", "{tmp}/small.png"], "the mask must have the image"),
        (["--image", "{tmp}/in.png", "--strength", "0"], "strength 0.0 is out of range"),
        (["--image", "{tmp}/in.png", "--strength", "1.5"], "strength 1.5 is out of range"),
        (["--mask", "{tmp}/small.png"], "give one with --image"),
        (["--image", "{tmp}/in.png", "--expand", "8"], "multiple of 16"),
        (["--image", "{tmp}/in.png", "--expand", "0,0,1536,0"], "wider than 6:1"),
        (["--image", "{tmp}/in.png", "--expand", "0,0,0,1904"], "between 256 and 2048"),
        (
            ["--image", "{tmp}/in.png", "--expand", "1,2"],
            "expand (1, 2) must be 4 integers (LEFT, TOP, RIGHT, BOTTOM pixels)",
        ),
    ],
)
def test_bad_edit_input_is_one_line_before_any_load(tmp_path, no_load, args, message):
    Image.fromarray(smooth_image()).save(tmp_path / "in.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "small.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    png = bytearray((tmp_path / "in.png").read_bytes())
    idat = png.index(b"IDAT")
    png[idat + 40 : idat + 80] = bytes(40)  # the header is intact, the pixel data is not
    (tmp_path / "broken.png").write_bytes(bytes(png))
    args = [str(a).format(tmp=tmp_path) for a in args]
    result = CliRunner().invoke(
        main, ["generate", "--prompt", PROMPT, *args, "-o", str(tmp_path / "o.png")]
    )
    assert result.exit_code in (1, 2), result.output
    assert message in result.output
    error = [line for line in result.output.splitlines() if "rror" in line]
    assert len(error) == 1, result.output
