from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raywaste.images import ExampleError, ImageSettings, read_examples, to_color_mode

# Inverse of the transpose that shows each EXIF orientation upright.
STORE_AS = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def two_color_photo(path: Path, size=(200, 100), box=(50, 20, 60, 40), color=(255, 0, 0)) -> Path:
    """A blue photo with one colored rectangle at ``box`` (x, y, width, height)."""
    image = Image.new("RGB", size, (0, 0, 255))
    x, y, width, height = box
    image.paste(color, (x, y, x + width, y + height))
    image.save(path)
    return path


def read_one(root, name, annotated, box, **settings):
    results, info = read_examples(root, name, annotated, [box], ImageSettings(**settings))
    return results[0], info


def test_crop_shows_the_box(tmp_path):
    two_color_photo(tmp_path / "p.png")
    array, _ = read_one(tmp_path, "p.png", (200, 100), (50, 20, 60, 40), size=16)
    assert array.shape == (16, 16, 3)
    assert array.dtype == np.uint8
    assert (array[2:-2, 2:-2] == [255, 0, 0]).all()


def test_whole_image_is_stretched(tmp_path):
    two_color_photo(tmp_path / "p.png", box=(0, 0, 100, 100))
    array, _ = read_one(tmp_path, "p.png", (200, 100), None, size=20)
    assert (array[:, :9] == [255, 0, 0]).all()
    assert (array[:, 11:] == [0, 0, 255]).all()


def test_pad_mode_letterboxes(tmp_path):
    two_color_photo(tmp_path / "p.png")
    array, _ = read_one(tmp_path, "p.png", (200, 100), (50, 20, 60, 40), size=30, square="pad")
    # A 60x40 box in a 30x30 square: 20 rows of content, 5 rows of padding above and below.
    assert (array[:4] == 0).all()
    assert (array[-4:] == 0).all()
    assert (array[6:-6, 1:-1] == [255, 0, 0]).all()


def test_context_mode_shows_surroundings(tmp_path):
    two_color_photo(tmp_path / "p.png")
    array, _ = read_one(tmp_path, "p.png", (200, 100), (50, 20, 60, 40), size=30, square="context")
    assert (array[0, 15] == [0, 0, 255]).all()
    assert (array[15, 15] == [255, 0, 0]).all()


def test_grayscale_has_one_channel(tmp_path):
    two_color_photo(tmp_path / "p.png", color=(255, 255, 255))
    array, _ = read_one(tmp_path, "p.png", (200, 100), (50, 20, 60, 40), size=16, color_mode="grayscale")
    assert array.shape == (16, 16, 1)
    assert (array[3:-3, 3:-3] == 255).all()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_upright_crop(tmp_path, taco_sample, orientation):
    upright = Image.open(taco_sample / "batch_1" / "000004.jpg").convert("RGB").reduce(4)
    upright.save(tmp_path / "upright.png")
    transpose = STORE_AS[orientation]
    stored = upright.transpose(transpose) if transpose is not None else upright.copy()
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(tmp_path / "tagged.png", exif=exif)
    box = (40.0, 30.0, 120.0, 90.0)
    expected, _ = read_one(tmp_path, "upright.png", upright.size, box, size=32)
    actual, info = read_one(tmp_path, "tagged.png", upright.size, box, size=32)
    assert info.orientation == orientation
    np.testing.assert_array_equal(actual, expected)


def test_uniform_scale_scales_boxes(tmp_path):
    two_color_photo(tmp_path / "small.png", size=(100, 50), box=(25, 10, 30, 20))
    array, info = read_one(tmp_path, "small.png", (200, 100), (50, 20, 60, 40), size=16)
    assert info.scale == pytest.approx(0.5)
    assert (array[2:-2, 2:-2] == [255, 0, 0]).all()


def test_size_mismatch_names_file(tmp_path):
    two_color_photo(tmp_path / "p.png")
    error, _ = read_one(tmp_path, "p.png", (300, 100), (1, 1, 5, 5), size=16)
    assert isinstance(error, ExampleError)
    assert error.reason == "size_mismatch"
    assert "p.png" in error.message


def test_box_outside_photo(tmp_path):
    two_color_photo(tmp_path / "p.png")
    error, _ = read_one(tmp_path, "p.png", (200, 100), (180, 50, 60, 40), size=16)
    assert error.reason == "box_outside_image"


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("missing.jpg", None, "missing_file"),
        ("empty.jpg", b"", "empty_file"),
        ("text.jpg", b"this is not an image at all", "not_an_image"),
    ],
)
def test_unreadable_files(tmp_path, name, content, reason):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    error, _ = read_one(tmp_path, name, (10, 10), None, size=16)
    assert isinstance(error, ExampleError)
    assert error.reason == reason
    assert name in error.message


def test_truncated_jpeg(tmp_path, taco_sample):
    data = (taco_sample / "batch_1" / "000004.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    error, _ = read_one(tmp_path, "cut.jpg", (1241, 751), None, size=16)
    assert isinstance(error, ExampleError)
    assert error.reason == "corrupt_image"


def test_path_escaping_root(tmp_path):
    two_color_photo(tmp_path / "outside.png")
    root = tmp_path / "dataset"
    root.mkdir()
    error, _ = read_one(root, "../outside.png", (200, 100), None, size=16)
    assert error.reason == "outside_root"


def test_decompression_bomb(tmp_path):
    Image.new("L", (3000, 3000)).save(tmp_path / "big.png")
    error, _ = read_one(tmp_path, "big.png", (3000, 3000), None, size=16, max_pixels=1_000_000)
    assert error.reason == "decompression_bomb"


def test_small_box_skipped(tmp_path):
    two_color_photo(tmp_path / "p.png")
    error, _ = read_one(tmp_path, "p.png", (200, 100), (50, 20, 6, 4), size=16, min_box_size=5)
    assert error.reason == "box_too_small"


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "CMYK", "I;16", "I", "1"])
def test_color_modes_convert(mode):
    source = Image.new("RGB", (4, 4), (200, 100, 50)).convert(mode)
    for target in ("RGB", "L"):
        converted = to_color_mode(source, target)
        assert converted.mode == target


def test_transparent_pixels_become_white():
    source = Image.new("RGBA", (2, 2), (255, 0, 0, 0))
    assert to_color_mode(source, "RGB").getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_gray_scales_to_eight():
    source = Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16))
    assert to_color_mode(source, "L").getpixel((0, 0)) == 255


def test_draft_decode_of_real_photo(taco_sample):
    # 1537x2049 photo, whole image at 64 px: the decoder may shrink by 8.
    array, info = read_one(taco_sample, "batch_1/000006.jpg", (1537, 2049), None, size=64)
    assert array.shape == (64, 64, 3)
    assert info.draft_factor == 8
    assert array.std() > 5
