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


# --- Real photos: EXIF orientation with JPEG and DCT scaling --------------------------

# batch_1/000006.jpg cut to 1536x2048, so that 1/2, 1/4 and 1/8 divide it exactly.
REAL_SIZE = (1536, 2048)
REAL_BOX = (517.0, 127.0, 447.0, 1322.0)  # its annotated bottle, in displayed pixels
LARGE_BOXES = [REAL_BOX, (100.0, 1400.0, 1200.0, 600.0), None]
# A 40x30 box cannot keep 64 output pixels at any reduction, so the photo decodes at 1/1.
SMALL_BOXES = [REAL_BOX, (900.0, 1700.0, 40.0, 30.0)]


@pytest.fixture(scope="module")
def real_upright(taco_sample):
    with Image.open(taco_sample / "batch_1" / "000006.jpg") as photo:
        return photo.convert("RGB").crop((0, 0, *REAL_SIZE))


def save_tagged_jpeg(upright: Image.Image, path: Path, orientation: int) -> Path:
    """Store ``upright`` turned so that EXIF ``orientation`` shows it upright again."""
    transpose = STORE_AS[orientation]
    stored = upright.transpose(transpose) if transpose is not None else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, quality=90, exif=exif)
    return path


def decoded_upright(jpeg: Path, factor: int, mode: str, target: Path) -> Path:
    """Decode ``jpeg`` at 1/``factor`` with Pillow, turn it upright, and store it losslessly (TIFF)."""
    from PIL import ImageOps

    with Image.open(jpeg) as image:
        image.draft(mode, (image.width // factor, image.height // factor))
        ImageOps.exif_transpose(image).save(target)
    return target


@pytest.mark.parametrize("decoder", ["pillow", "simplejpeg"])
@pytest.mark.parametrize("boxes, factor", [(LARGE_BOXES, 8), (SMALL_BOXES, 1)], ids=["scale-1/8", "scale-1/1"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_orientation_exact(tmp_path, monkeypatch, real_upright, orientation, boxes, factor, decoder):
    # The crops of a tagged JPEG equal, bit for bit, the crops of the upright view of the
    # same decoded pixels: the orientation step adds no error, also with DCT scaling.
    if decoder == "simplejpeg":
        pytest.importorskip("simplejpeg")
    monkeypatch.setenv("RAYWASTE_JPEG_DECODER", decoder)
    settings = ImageSettings(size=64, padding=0.1, square="context")
    tagged = save_tagged_jpeg(real_upright, tmp_path / "tagged.jpg", orientation)
    actual, info = read_examples(tmp_path, "tagged.jpg", REAL_SIZE, boxes, settings)
    assert info.orientation == orientation
    assert info.draft_factor == factor
    assert info.decoder == decoder

    decoded_upright(tagged, factor, "RGB", tmp_path / "upright.tiff")
    expected, reference = read_examples(tmp_path, "upright.tiff", REAL_SIZE, boxes, settings)
    assert reference.scale == 1 / factor
    for index, (got, want) in enumerate(zip(actual, expected)):
        assert isinstance(got, np.ndarray), got
        np.testing.assert_array_equal(got, want, err_msg=f"box {index}")


@pytest.mark.parametrize("orientation", [3, 6, 7])
def test_jpeg_orientation_exact_grayscale(tmp_path, real_upright, orientation):
    settings = ImageSettings(size=32, color_mode="grayscale")
    tagged = save_tagged_jpeg(real_upright, tmp_path / "tagged.jpg", orientation)
    actual, info = read_examples(tmp_path, "tagged.jpg", REAL_SIZE, LARGE_BOXES, settings)
    decoded_upright(tagged, info.draft_factor, "L", tmp_path / "upright.tiff")
    expected, _ = read_examples(tmp_path, "upright.tiff", REAL_SIZE, LARGE_BOXES, settings)
    assert info.draft_factor == 8
    for got, want in zip(actual, expected):
        assert got.shape == (32, 32, 1)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("boxes", [LARGE_BOXES, SMALL_BOXES], ids=["scale-1/8", "scale-1/1"])
@pytest.mark.parametrize("orientation", range(2, 9))
def test_jpeg_orientation_matches_upright_file(tmp_path, real_upright, orientation, boxes):
    # Two JPEG files of the same photo in different orientations are different files: the
    # encoder and the decoder's integer IDCT and chroma upsampling round differently along
    # rows and columns. Measured on this photo at quality 90: at most 3 levels apart in a
    # pixel and 0.2 on average. The bounds below leave room for other libjpeg builds, and a
    # misplaced or mirrored crop (tens of levels on average) still fails them.
    settings = ImageSettings(size=64, padding=0.1, square="context")
    save_tagged_jpeg(real_upright, tmp_path / "upright.jpg", 1)
    save_tagged_jpeg(real_upright, tmp_path / "tagged.jpg", orientation)
    expected, _ = read_examples(tmp_path, "upright.jpg", REAL_SIZE, boxes, settings)
    actual, _ = read_examples(tmp_path, "tagged.jpg", REAL_SIZE, boxes, settings)
    for got, want in zip(actual, expected):
        difference = np.abs(got.astype(np.int16) - want.astype(np.int16))
        assert difference.max() <= 8
        assert difference.mean() <= 1.0


@pytest.mark.parametrize("orientation", range(1, 9))
def test_stored_box_matches_transposed_crop(orientation):
    stored = Image.fromarray(np.arange(7 * 5 * 3, dtype=np.uint8).reshape(5, 7, 3))
    transpose = {v: k for k, v in STORE_AS.items()}  # noqa: F841 - documents the inverse relation
    from raywaste.images import _TRANSPOSE_FOR_ORIENTATION, stored_box

    upright_transpose = _TRANSPOSE_FOR_ORIENTATION.get(orientation)
    upright = stored.transpose(upright_transpose) if upright_transpose is not None else stored
    for box in [(0, 0, 1, 1), (1, 2, 4, 3), (0, 0, *upright.size), (2, 1, upright.width, upright.height)]:
        region = stored.crop(stored_box(box, orientation, stored.size))
        if upright_transpose is not None:
            region = region.transpose(upright_transpose)
        np.testing.assert_array_equal(np.asarray(region), np.asarray(upright.crop(box)), err_msg=str(box))


# --- Real photos: 640-pixel variants and size mismatches ------------------------------


def test_640_variant_scales_boxes(tmp_path, taco_sample, real_upright):
    # TACO's flickr_640_url variant of a 1537x2049 photo is 480x640; annotations keep the original size.
    original = (1537, 2049)
    with Image.open(taco_sample / "batch_1" / "000006.jpg") as photo:
        photo.resize((480, 640), Image.Resampling.LANCZOS).save(tmp_path / "small.jpg", quality=95)
    settings = ImageSettings(size=48)
    (small,), info = read_examples(tmp_path, "small.jpg", original, [REAL_BOX], settings)
    (full,), _ = read_examples(taco_sample, "batch_1/000006.jpg", original, [REAL_BOX], settings)
    assert info.scale == pytest.approx(640 / 2049, rel=1e-3)
    # Same object, resampled twice: close, and far closer than a shifted box would be.
    assert np.abs(small.astype(np.int16) - full).mean() < 6
    (shifted,), _ = read_examples(tmp_path, "small.jpg", original, [(817.0, 427.0, 447.0, 1322.0)], settings)
    assert np.abs(shifted.astype(np.int16) - full).mean() > 15


def test_640_variant_rotated_scales_boxes(tmp_path, real_upright):
    small = real_upright.resize((480, 640), Image.Resampling.LANCZOS)
    save_tagged_jpeg(small, tmp_path / "upright.jpg", 1)
    save_tagged_jpeg(small, tmp_path / "rotated.jpg", 6)
    settings = ImageSettings(size=48)
    (expected,), _ = read_examples(tmp_path, "upright.jpg", REAL_SIZE, [REAL_BOX], settings)
    (actual,), info = read_examples(tmp_path, "rotated.jpg", REAL_SIZE, [REAL_BOX], settings)
    assert info.orientation == 6
    assert info.scale == pytest.approx(0.3125)
    assert np.abs(actual.astype(np.int16) - expected).mean() < 1.0


@pytest.mark.parametrize("stored_size", [(1536, 1900), (1400, 2048), (640, 640)])
def test_real_photo_size_mismatch_names_file(tmp_path, real_upright, stored_size):
    real_upright.resize(stored_size).save(tmp_path / "odd.jpg")
    results, _ = read_examples(tmp_path, "odd.jpg", REAL_SIZE, [REAL_BOX, None], ImageSettings(size=32))
    for error in results:
        assert isinstance(error, ExampleError)
        assert error.reason == "size_mismatch"
        assert "odd.jpg" in error.message
        assert "1536x2048" in error.message


# --- Color modes of real files, through read_examples ---------------------------------


def write_png16(path: Path, rgb16: np.ndarray) -> None:
    """Write a 16-bit-per-channel RGB PNG, which Pillow cannot save itself."""
    import struct
    import zlib

    height, width, _ = rgb16.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb16)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def small_real(taco_sample) -> Image.Image:
    with Image.open(taco_sample / "batch_1" / "000004.jpg") as photo:
        return photo.convert("RGB").reduce(4)  # 311x188


def color_mode_inputs(folder: Path, rgb: Image.Image) -> dict[str, tuple[str, Image.Image]]:
    """Write one file per input kind; return kind -> (file name, its expected RGB pixels)."""
    width, height = rgb.size
    pixels = np.asarray(rgb)
    gray = rgb.convert("L")
    opaque_right = np.zeros((height, width), np.uint8)
    opaque_right[:, width // 2:] = 255
    white = np.full_like(pixels, 255)
    over_white = Image.fromarray(np.where(opaque_right[:, :, None] == 255, pixels, white))
    gray_over_white = Image.fromarray(np.where(opaque_right == 255, np.asarray(gray), 255).astype(np.uint8))

    inputs = {}
    palette = rgb.quantize(64)
    palette.save(folder / "palette.png")
    inputs["palette"] = ("palette.png", palette.convert("RGB"))
    Image.fromarray(np.dstack([pixels, opaque_right])).save(folder / "rgba.png")
    inputs["RGBA"] = ("rgba.png", over_white)
    Image.fromarray(np.dstack([np.asarray(gray), opaque_right]), mode="LA").save(folder / "la.png")
    inputs["LA"] = ("la.png", gray_over_white.convert("RGB"))
    gray.save(folder / "gray.png")
    inputs["grayscale PNG"] = ("gray.png", gray.convert("RGB"))
    gray.save(folder / "gray.jpg", quality=100)
    with Image.open(folder / "gray.jpg") as decoded:
        inputs["grayscale JPEG"] = ("gray.jpg", decoded.convert("RGB"))
    Image.fromarray(np.asarray(gray).astype(np.uint16) * 257).save(folder / "gray16.png")
    inputs["16-bit grayscale"] = ("gray16.png", gray.convert("RGB"))
    write_png16(folder / "rgb16.png", pixels.astype(np.uint16) * 257)
    inputs["16-bit RGB"] = ("rgb16.png", rgb)
    rgb.convert("CMYK").save(folder / "cmyk.tif")
    inputs["CMYK TIFF"] = ("cmyk.tif", rgb)
    return inputs


COLOR_KINDS = ["palette", "RGBA", "LA", "grayscale PNG", "grayscale JPEG", "16-bit grayscale", "16-bit RGB", "CMYK TIFF"]


@pytest.fixture(scope="module")
def input_kinds(tmp_path_factory, small_real):
    folder = tmp_path_factory.mktemp("kinds")
    inputs = color_mode_inputs(folder, small_real)
    for kind, (name, expected_rgb) in inputs.items():
        expected_rgb.save(folder / f"expected-{name}.png")
    return folder, inputs


@pytest.mark.parametrize("color_mode", ["rgb", "grayscale"])
@pytest.mark.parametrize("kind", COLOR_KINDS)
def test_input_kinds_give_requested_mode(input_kinds, small_real, kind, color_mode):
    folder, inputs = input_kinds
    name, _ = inputs[kind]
    boxes = [(20.0, 20.0, 80.0, 60.0), (200.0, 100.0, 90.0, 70.0), None]
    # The expected pixels of the JPEG kind come from a full decode, so no DCT scaling here.
    settings = ImageSettings(size=24, color_mode=color_mode, draft=False)
    actual, _ = read_examples(folder, name, small_real.size, boxes, settings)
    expected, _ = read_examples(folder, f"expected-{name}.png", small_real.size, boxes, settings)
    for got, want in zip(actual, expected):
        assert isinstance(got, np.ndarray), got
        assert got.dtype == np.uint8
        assert got.shape == (24, 24, settings.channels)
        np.testing.assert_array_equal(got, want)


def test_transparent_half_is_white(input_kinds, small_real):
    folder, inputs = input_kinds
    name, _ = inputs["RGBA"]
    (left, right), _ = read_examples(folder, name, small_real.size, [(10.0, 10.0, 100.0, 100.0), (200.0, 50.0, 80.0, 80.0)], ImageSettings(size=16))
    assert (left == 255).all()
    assert left.shape == (16, 16, 3)
    assert right.std() > 5


def test_cmyk_jpeg_close_to_rgb(tmp_path, small_real):
    small_real.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    small_real.save(tmp_path / "rgb.png")
    boxes = [(20.0, 20.0, 120.0, 100.0), None]
    actual, _ = read_examples(tmp_path, "cmyk.jpg", small_real.size, boxes, ImageSettings(size=32))
    expected, _ = read_examples(tmp_path, "rgb.png", small_real.size, boxes, ImageSettings(size=32))
    for got, want in zip(actual, expected):
        assert got.shape == (32, 32, 3)
        # Lossy CMYK JPEG: a few levels of error on average, not an inverted or shifted picture.
        assert np.abs(got.astype(np.int16) - want).mean() < 4


# --- Decoders ---------------------------------------------------------------------------


def test_decoders_give_same_pixels(monkeypatch, taco_sample):
    pytest.importorskip("simplejpeg")
    from raywaste.annotations import load_annotations

    taco = load_annotations(taco_sample / "annotations.json")
    images = sorted(taco.images.values(), key=lambda image: image.id)[::17]
    for color_mode in ("rgb", "grayscale"):
        settings = ImageSettings(size=48, color_mode=color_mode, padding=0.1)
        results = {}
        for decoder in ("pillow", "simplejpeg"):
            monkeypatch.setenv("RAYWASTE_JPEG_DECODER", decoder)
            results[decoder] = []
            for image in images:
                boxes = [a.bbox for a in taco.annotations_of(image.id)] + [None]
                arrays, info = read_examples(taco_sample, image.file_name, (image.width, image.height), boxes, settings)
                assert info.decoder == decoder
                results[decoder].append(arrays)
        for image, pillow, simple in zip(images, results["pillow"], results["simplejpeg"]):
            for got, want in zip(simple, pillow):
                np.testing.assert_array_equal(got, want, err_msg=f"{image.file_name} {color_mode}")


def test_unknown_decoder_rejected(monkeypatch, taco_sample):
    monkeypatch.setenv("RAYWASTE_JPEG_DECODER", "libjpeg9")
    with pytest.raises(ValueError, match="RAYWASTE_JPEG_DECODER"):
        read_examples(taco_sample, "batch_1/000004.jpg", (1241, 751), [None], ImageSettings(size=16))


def test_draft_factor_follows_smallest_crop(taco_sample):
    # 000004.jpg is 1241x751: its annotated 93x88 box allows 1/1 only at 128 pixels, 1/2 at 32.
    box = (649.0, 55.0, 93.0, 88.0)
    factors = {}
    for size in (128, 64, 32, 16, 8):
        _, info = read_examples(taco_sample, "batch_1/000004.jpg", (1241, 751), [box, None], ImageSettings(size=size))
        factors[size] = info.draft_factor
    assert factors == {128: 1, 64: 1, 32: 2, 16: 4, 8: 8}
