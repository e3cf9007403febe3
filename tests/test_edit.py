"""Edit inputs without any model (edit.py): loading images as Pillow users expect, sizes,
masks on the token grid, the outpainting canvas, and the checks that run before any load."""

import re

import numpy as np
import pytest
from PIL import Image

from ideogram4_mlx.edit import (
    DEFAULT_STRENGTH,
    MAX_INPUT_PIXELS,
    check_edit_settings,
    dilate,
    edit_size,
    fingerprint,
    load_image,
    masked_tokens,
    natural_size,
    prepare_edit,
    to_rgb,
    token_weights,
)

EXIF_ORIENTATION = 0x0112


def gradient(width: int, height: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack(
        [xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), xx * 0 + 90], -1
    ).astype(np.uint8)


def save(tmp_path, name, array, **kwargs):
    path = tmp_path / name
    Image.fromarray(array).save(path, **kwargs)
    return path


# --- loading ------------------------------------------------------------------------------


def test_exif_rotation_is_applied(tmp_path):
    pixels = gradient(64, 32)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # the camera was turned: display rotated 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.size == (32, 64)  # width and height swapped, as any viewer shows it
    expected = np.rot90(pixels, k=-1)  # clockwise
    got = np.asarray(to_rgb(loaded.image)).astype(int)
    assert np.abs(got - expected).mean() < 3  # JPEG noise only


def test_transparency_is_composited_on_white_and_grey_becomes_rgb(tmp_path):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, 8:, 3] = 255  # left half transparent
    rgb = np.asarray(to_rgb(load_image(save(tmp_path, "a.png", rgba)).image))
    assert (rgb[:, :8] == 255).all() and (rgb[:, 8:] == [200, 0, 0]).all()
    grey = np.full((16, 16), 77, np.uint8)
    assert (np.asarray(to_rgb(load_image(grey).image)) == 77).all()
    palette = Image.fromarray(gradient(16, 16)).convert("P")
    assert to_rgb(load_image(palette).image).mode == "RGB"


def test_fingerprint_is_of_the_pixels_not_the_file(tmp_path):
    pixels = gradient(40, 24)
    a = load_image(save(tmp_path, "a.png", pixels))
    b = load_image(save(tmp_path, "b.png", pixels, compress_level=0))  # other bytes
    assert a.sha256 == b.sha256 == load_image(pixels).sha256 == fingerprint(Image.fromarray(pixels))
    pixels[0, 0, 0] ^= 1
    assert load_image(pixels).sha256 != a.sha256


def test_bad_images_fail_with_the_file_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="image .*missing.png does not exist"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(FileNotFoundError, match="is a folder"):
        load_image(tmp_path)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="notes.png cannot be read as an image"):
        load_image(tmp_path / "notes.png", "mask")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    good = save(tmp_path, "good.png", noise)
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:200])  # truncated
    with pytest.raises(ValueError, match="cut.png cannot be read as an image"):
        load_image(tmp_path / "cut.png")
    with pytest.raises(ValueError, match="dtype float32"):
        load_image(np.zeros((8, 8, 3), np.float32))


def broken_png(tmp_path, name: str, damage: str):
    """A valid PNG (signature and IHDR intact) whose IDAT chunk is damaged: its data bytes
    (zlib fails: OSError) or its length field (a chunk boundary inside the data: SyntaxError)."""
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = bytearray(save(tmp_path, name, noise).read_bytes())
    idat = data.index(b"IDAT")
    if damage == "data":
        data[idat + 40 : idat + 80] = bytes(40)
    else:
        length = int.from_bytes(data[idat - 4 : idat], "big")
        data[idat - 4 : idat] = (length - 100).to_bytes(4, "big")
    path = tmp_path / name
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("damage", ["data", "length"])
@pytest.mark.parametrize("opened", [False, True], ids=["path", "pil-lazy"])
@pytest.mark.parametrize("what", ["image", "mask"])
def test_broken_png_data_is_a_value_error_naming_the_file(tmp_path, damage, opened, what):
    path = broken_png(tmp_path, "broken.png", damage)
    source = Image.open(path) if opened else path  # Pillow decodes lazily: both must be caught
    message = f"{what} {path} cannot be read as an image (broken PNG data: "
    with pytest.raises(ValueError, match=re.escape(message)) as raised:
        load_image(source, what)
    assert "\n" not in str(raised.value)


def test_huge_images_are_refused_before_decoding(tmp_path, monkeypatch):
    import ideogram4_mlx.edit as edit

    monkeypatch.setattr(edit, "MAX_INPUT_PIXELS", 32 * 32 - 1)
    path = save(tmp_path, "big.png", gradient(32, 32))
    with pytest.raises(ValueError, match=r"big.png is 32x32 .* limit: downscale it first"):
        edit.load_image(path)
    assert MAX_INPUT_PIXELS == 64 * 2**20  # the real bound: 8192 x 8192


# --- sizes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, expected",
    [
        ((400, 300), (400, 304)),  # rounded to a multiple of 16
        ((4000, 3000), (2048, 1536)),  # scaled down into 2048, aspect kept
        ((100, 50), (512, 256)),  # scaled up to 256 on the short side
        ((1024, 1024), (1024, 1024)),
    ],
)
def test_natural_size(size, expected):
    assert natural_size(*size, 256, 2048) == expected


def test_edit_size_with_and_without_expand():
    image = load_image(gradient(400, 300))
    assert edit_size(image, None, None, None, 256, 2048) == (400, 304, 400, 304)
    assert edit_size(image, 512, 512, None, 256, 2048) == (512, 512, 512, 512)
    # outpainting: the natural size plus the border, or the given size minus it
    assert edit_size(image, None, None, (16, 0, 32, 48), 256, 2048) == (448, 352, 400, 304)
    assert edit_size(image, 512, 512, (0, 0, 256, 0), 256, 2048) == (512, 512, 256, 512)
    with pytest.raises(ValueError, match="leaves 0x512 pixels"):
        edit_size(image, 512, 512, (256, 0, 256, 0), 256, 2048)


# --- masks --------------------------------------------------------------------------------


def test_a_token_is_regenerated_if_any_of_its_pixels_is():
    pixels = np.zeros((32, 48), bool)
    pixels[17, 47] = True  # one pixel of token (1, 2)
    tokens = masked_tokens(pixels)
    assert tokens.shape == (2, 3) and tokens.sum() == 1 and tokens[1, 2]


def test_dilate_is_a_square_grow():
    mask = np.zeros((7, 7), bool)
    mask[3, 3] = True
    assert dilate(mask, 0).sum() == 1
    assert dilate(mask, 1).sum() == 9 and dilate(mask, 2).sum() == 25
    assert dilate(mask, 5).all()


def test_token_weights_grow_then_feather():
    pixels = np.zeros((16 * 9, 16 * 9), bool)
    pixels[16 * 4 : 16 * 5, 16 * 4 : 16 * 5] = True  # the centre token
    w = token_weights(pixels, grow=1, feather=2)
    assert w.dtype == np.float32
    assert (w[3:6, 3:6] == 1).all()  # grown by one token
    np.testing.assert_allclose(w[2, 4], 2 / 3)  # first feather ring
    np.testing.assert_allclose(w[1, 4], 1 / 3)  # second ring
    assert w[0, 4] == 0 and w.max() == 1 and w.min() == 0


# --- the prepared edit --------------------------------------------------------------------


def test_img2img_canvas_is_the_fitted_image():
    pixels = gradient(320, 256)
    edit = prepare_edit(load_image(pixels), None, (320, 256), None)
    assert edit.canvas.shape == (256, 320, 3) and edit.canvas.dtype == np.uint8
    np.testing.assert_array_equal(edit.canvas, pixels)  # same size: untouched
    assert edit.token_mask is None and edit.paste_mask is None
    assert edit.strength == DEFAULT_STRENGTH and edit.mask_sha256 is None
    cropped = prepare_edit(load_image(gradient(640, 256)), None, (256, 256), 0.5)
    assert cropped.canvas.shape == (256, 256, 3) and cropped.strength == 0.5
    # centre crop: the middle column of the wide image stays in the middle
    assert abs(int(cropped.canvas[0, 128, 0]) - 127) <= 2


def test_inpainting_mask_and_paste_back():
    pixels = gradient(64, 64)
    mask = np.zeros((64, 64), np.uint8)
    mask[20:30, 40:44] = 255
    edit = prepare_edit(load_image(pixels), load_image(mask), (64, 64), None, paste_back=True)
    assert edit.strength == 1.0  # inpainting regenerates its region from noise by default
    assert edit.token_mask.shape == (4, 4)
    assert np.argwhere(edit.token_mask).tolist() == [[1, 2]]  # rows 20-29, columns 40-43
    np.testing.assert_array_equal(edit.paste_mask, mask >= 128)  # pixel-exact paste region
    decoded = np.zeros_like(pixels)
    pasted = edit.paste(decoded)
    np.testing.assert_array_equal(pasted[mask < 128], pixels[mask < 128])
    assert (pasted[mask >= 128] == 0).all()
    grown = prepare_edit(load_image(pixels), load_image(mask), (64, 64), None, 1, 0, True)
    assert grown.token_mask.sum() == 9
    assert grown.paste_mask.sum() == 9 * 256 - 256 + (mask >= 128).sum()  # + the grown tokens


def test_mask_of_another_size_is_an_error():
    with pytest.raises(
        ValueError, match=r"mask \(in memory\) is 32x32 but image \(in memory\) is 64x64"
    ):
        prepare_edit(
            load_image(gradient(64, 64)), load_image(np.zeros((32, 32), np.uint8)), (64, 64), 1
        )


def test_outpainting_canvas_places_the_image_and_masks_the_border():
    pixels = gradient(64, 48)
    edit = prepare_edit(load_image(pixels), None, (64, 48), None, expand=(16, 32, 0, 16))
    assert edit.canvas.shape == (48 + 48, 64 + 16, 3) and edit.strength == 1.0
    np.testing.assert_array_equal(edit.canvas[32:80, 16:80], pixels)
    np.testing.assert_array_equal(edit.canvas[0, 16:], pixels[0])  # edge pixels repeated
    expected = np.ones((6, 5), np.float32)
    expected[2:5, 1:5] = 0  # the image's tokens are kept
    np.testing.assert_array_equal(edit.token_mask, expected)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"has_image": False, "has_mask": True}, "mask edit"),
        ({"has_image": False, "strength": 0.5}, "strength edit"),
        ({"has_image": False, "expand": (16, 0, 0, 0)}, "expand edit"),
        ({"strength": 0.0}, r"strength 0.0 is out of range: use a number in \(0, 1\]"),
        ({"strength": 1.5}, "strength 1.5 is out of range"),
        ({"strength": float("nan")}, "strength nan is out of range"),
        ({"has_mask": True, "mask_grow": 65}, "mask_grow 65 is out of range: use 0..64"),
        ({"has_mask": True, "mask_feather": -1}, "mask_feather -1 is out of range"),
        ({"mask_grow": 2}, "give --mask or --expand too"),
        ({"paste_back": True}, "paste_back keeps the unmasked pixels"),
        ({"expand": (8, 0, 0, 0)}, "each side must be a multiple of 16"),
        ({"expand": (0, 0, 0, 0)}, "at least one side > 0"),
        ({"expand": (16, -16, 0, 0)}, "multiple of 16"),
        ({"expand": (16, 16)}, "give 4 whole numbers"),
    ],
)
def test_settings_checks(kwargs, message):
    args = {
        "has_image": True,
        "has_mask": False,
        "strength": None,
        "mask_grow": 0,
        "mask_feather": 0,
        "paste_back": False,
        "expand": None,
    }
    with pytest.raises(ValueError, match=message):
        check_edit_settings(**{**args, **kwargs})
