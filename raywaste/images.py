"""Decode a photo once and cut every example of it: orientation, crop, square, resize.

Pure functions with no Ray in them; the preprocessing stage runs them in Ray tasks.

For each photo, :func:`read_examples`:

1. rejects paths that escape the dataset root, missing, empty and oversized files;
2. reads the EXIF orientation and matches the displayed size to the annotated one,
   allowing one uniform scale factor (TACO's 640-pixel Flickr variants);
3. picks the coarsest JPEG DCT scale (1/1 to 1/8) at which every crop still has at least
   the output resolution, and decodes the photo once at that scale. simplejpeg decodes when
   it is installed, Pillow otherwise; both wrap libjpeg-turbo and give the same pixels;
4. cuts each crop's region from the stored pixels and turns only that region upright, so
   boxes (which TACO gives in the displayed orientation) line up with the pixels;
5. converts each region to RGB or grayscale and resizes it to a square.

A failure is returned as an :class:`ExampleError` with a reason code, never raised and
never turned into an array of zeros.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

COLOR_MODES = ("rgb", "grayscale")

# How a box becomes a square picture:
#   stretch  Scale width and height independently, so the aspect ratio changes.
#   pad      Keep the aspect ratio and fill the margins with PAD_COLOR (letterbox).
#   context  Keep the aspect ratio and fill the margins with the photo around the box.
#   crop     Keep the aspect ratio and cut the box's longer side down to its shorter one.
SQUARE_MODES = ("stretch", "pad", "context", "crop")

# Transparent pixels are composited onto white, the usual page background of PNGs.
ALPHA_BACKGROUND = (255, 255, 255)
# Fill for the margins of "pad" and for areas outside the photo.
PAD_COLOR = (0, 0, 0)

# A photo's displayed size may differ from annotations.json's by one uniform factor; the
# two axes' factors may differ by this fraction (rounding of downscaled variants).
SCALE_TOLERANCE = 0.01
# A box may extend beyond the photo by this many annotated pixels and still be clipped.
BOX_TOLERANCE_PX = 2.0

# Pillow's JPEG decoder can shrink by these factors while decoding (DCT scaling).
DRAFT_FACTORS = (8, 4, 2, 1)
# Pillow's names for JPEG files; MPO is a JPEG with extra frames, as some cameras write.
JPEG_FORMATS = ("JPEG", "MPO")

# "auto" (simplejpeg when importable, else Pillow), "pillow" or "simplejpeg". Both decode
# with libjpeg-turbo's default integer IDCT and smooth chroma upsampling, so they return the
# same pixels, as benchmarks/jpeg_decoders.py checks. simplejpeg decodes up to 15% faster.
JPEG_DECODER_ENV = "RAYWASTE_JPEG_DECODER"
JPEG_DECODERS = ("auto", "pillow", "simplejpeg")

# EXIF orientation value -> the transpose that shows the photo upright.
_EXIF_ORIENTATION_TAG = 0x0112
_TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclass(frozen=True)
class ImageSettings:
    """Settings for cutting and storing examples. Sizes are in pixels."""

    size: int = 128
    color_mode: str = "rgb"
    square: str = "stretch"
    padding: float = 0.0
    """Margin added on each side of a box, as a fraction of the box's width and height."""
    min_box_size: float = 0.0
    """Boxes whose shorter side is below this (annotated pixels) are skipped and counted."""
    max_pixels: int = 100_000_000
    """Photos with more pixels than this are rejected as possible decompression bombs.

    Pillow also rejects photos above twice its own ``Image.MAX_IMAGE_PIXELS`` (about 179
    million pixels in all), so a larger ``max_pixels`` needs that raised too."""
    draft: bool = True
    """Let the JPEG decoder shrink by 2, 4 or 8 when every crop keeps the output size."""

    def __post_init__(self) -> None:
        if not 8 <= self.size <= 4096:
            raise ValueError(f"invalid image size {self.size}; expected 8 to 4096 pixels")
        if self.color_mode not in COLOR_MODES:
            raise ValueError(f"invalid color mode {self.color_mode!r}; expected one of {', '.join(COLOR_MODES)}")
        if self.square not in SQUARE_MODES:
            raise ValueError(f"invalid square mode {self.square!r}; expected one of {', '.join(SQUARE_MODES)}")
        if not 0.0 <= self.padding <= 2.0:
            raise ValueError(f"invalid padding {self.padding}; expected a fraction of the box size from 0 to 2")
        if self.min_box_size < 0:
            raise ValueError(f"invalid minimum box size {self.min_box_size}; expected 0 or more pixels")
        if self.max_pixels < 1:
            raise ValueError(f"invalid max_pixels {self.max_pixels}; expected 1 or more")

    @property
    def channels(self) -> int:
        return 3 if self.color_mode == "rgb" else 1


@dataclass(frozen=True)
class ExampleError:
    """Failure to make an example: ``reason`` is a short code, ``message`` names the file and the fix."""

    reason: str
    message: str


@dataclass(frozen=True)
class PhotoInfo:
    """Facts about a photo found while reading it."""

    orientation: int = 1
    stored_size: tuple[int, int] = (0, 0)
    scale: float = 1.0
    """Displayed pixels per annotated pixel (1.0 unless the photo is a resized variant)."""
    draft_factor: int = 1
    """The DCT scale divisor the photo was decoded at: 1, 2, 4 or 8."""
    decoder: str = ""
    """``"simplejpeg"`` or ``"pillow"``; empty when the photo was not decoded."""


Box = tuple[float, float, float, float]


def resolve_photo(root: Path, file_name: str) -> Path | ExampleError:
    """Return the photo's path under ``root``, or an error if ``file_name`` escapes it.

    The check is on the name (absolute paths and ``..`` components), not on where symbolic
    links inside ``root`` point, so a dataset folder may link to photos stored elsewhere.
    """
    root = root.resolve()
    path = Path(os.path.normpath(root / file_name))
    if Path(file_name).is_absolute() or not path.is_relative_to(root):
        return ExampleError("outside_root", f"file_name {file_name!r} points outside the dataset folder {root}; fix annotations.json")
    return path


def read_examples(
    root: Path,
    file_name: str,
    annotated_size: tuple[int, int],
    boxes: list[Box | None],
    settings: ImageSettings,
) -> tuple[list[np.ndarray | ExampleError], PhotoInfo]:
    """Decode one photo and cut one array per entry of ``boxes`` (None: the whole photo).

    ``boxes`` are ``(x, y, width, height)`` in annotated pixels, displayed orientation.
    Each result is a ``(size, size, channels)`` uint8 array or an :class:`ExampleError`.
    """
    decoder = jpeg_decoder_name()  # raises on an invalid RAYWASTE_JPEG_DECODER, before any photo is blamed
    path = resolve_photo(root, file_name)
    if isinstance(path, ExampleError):
        return [path] * len(boxes), PhotoInfo()
    try:
        if not path.is_file():
            if path.exists():
                return [ExampleError("not_a_file", f"{path} is not a regular file; fix file_name in annotations.json")] * len(boxes), PhotoInfo()
            return [ExampleError("missing_file", f"{path} not found; download it or remove it from annotations.json")] * len(boxes), PhotoInfo()
        data = path.read_bytes()
    except OSError as error:
        return [ExampleError("unreadable_file", f"cannot read {path}: {error}")] * len(boxes), PhotoInfo()
    if not data:
        return [ExampleError("empty_file", f"{path} is empty (0 bytes); download or copy it again")] * len(boxes), PhotoInfo()

    try:
        with warnings.catch_warnings():
            # settings.max_pixels is the limit that counts; Pillow's warning at its own,
            # lower limit would otherwise be printed once per worker.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return _read_photo(path, data, annotated_size, boxes, settings, decoder)
    except Image.DecompressionBombError as error:
        return [ExampleError("decompression_bomb", f"{path}: {error}")] * len(boxes), PhotoInfo()
    except UnidentifiedImageError:
        return [ExampleError("not_an_image", f"{path} is not an image Pillow can read; replace or remove it")] * len(boxes), PhotoInfo()
    except (OSError, SyntaxError, ValueError) as error:
        # Pillow reports truncated and corrupt data as OSError (and a few decoders as SyntaxError).
        return [ExampleError("corrupt_image", f"{path} cannot be decoded ({error}); download or copy it again")] * len(boxes), PhotoInfo()


def _read_photo(
    path: Path, data: bytes, annotated_size: tuple[int, int], boxes: list[Box | None], settings: ImageSettings, decoder: str
) -> tuple[list[np.ndarray | ExampleError], PhotoInfo]:
    with Image.open(io.BytesIO(data)) as image:
        stored_width, stored_height = image.size
        if stored_width * stored_height > settings.max_pixels:
            error = ExampleError(
                "decompression_bomb",
                f"{path} has {stored_width}x{stored_height} pixels, more than the limit of {settings.max_pixels}; "
                "raise max_pixels if the photo is genuine",
            )
            return [error] * len(boxes), PhotoInfo(stored_size=(stored_width, stored_height))
        orientation = _orientation(image)
        displayed = (stored_height, stored_width) if orientation in (5, 6, 7, 8) else (stored_width, stored_height)

        scale = _annotation_scale(displayed, annotated_size)
        if scale is None:
            error = ExampleError(
                "size_mismatch",
                f"{path} shows {displayed[0]}x{displayed[1]} pixels (EXIF orientation {orientation}) but annotations.json "
                f"says {annotated_size[0]}x{annotated_size[1]}; neither the orientation nor one uniform scale explains it",
            )
            return [error] * len(boxes), PhotoInfo(orientation, (stored_width, stored_height))

        # Plan every crop in displayed, full-resolution pixels before decoding.
        plans: list[_CropPlan | ExampleError] = [_plan_crop(box, scale, displayed, settings) for box in boxes]
        if not any(isinstance(plan, _CropPlan) for plan in plans):
            return plans, PhotoInfo(orientation, (stored_width, stored_height), scale)
        is_jpeg = image.format in JPEG_FORMATS
        factor = _draft_factor(plans, settings) if is_jpeg and settings.draft else 1
        pixels = _decode(image, data, factor, settings.color_mode, decoder) if is_jpeg else _PillowPixels(image, "pillow")
        pixels.load()

        # The decoder rounds a reduced side up, so the factors are measured per axis.
        decoded_upright = pixels.size[::-1] if orientation in (5, 6, 7, 8) else pixels.size
        to_decoded = (decoded_upright[0] / displayed[0], decoded_upright[1] / displayed[1])
        actual_factor = round(stored_width / pixels.size[0]) if is_jpeg else 1
        info = PhotoInfo(orientation, (stored_width, stored_height), scale, actual_factor, pixels.decoder)
        results = [plan if isinstance(plan, ExampleError) else _render(pixels, orientation, plan, to_decoded, settings) for plan in plans]
        return results, info


def jpeg_decoder_name() -> str:
    """Return the JPEG decoder that this process uses: ``"simplejpeg"`` or ``"pillow"``.

    The environment variable named by :data:`JPEG_DECODER_ENV` selects one; by default
    simplejpeg is used when it can be imported.
    """
    requested = os.environ.get(JPEG_DECODER_ENV, "auto").strip().lower() or "auto"
    if requested not in JPEG_DECODERS:
        raise ValueError(f"invalid {JPEG_DECODER_ENV}={requested!r}; expected one of {', '.join(JPEG_DECODERS)}")
    if requested == "pillow":
        return "pillow"
    try:
        import simplejpeg  # noqa: F401
    except ImportError:
        if requested == "simplejpeg":
            raise ValueError(f"{JPEG_DECODER_ENV}=simplejpeg but simplejpeg is not installed; pip install simplejpeg") from None
        return "pillow"
    return "simplejpeg"


class _PillowPixels:
    """Decoded stored pixels held by Pillow."""

    def __init__(self, image: Image.Image, decoder: str):
        self.image = image
        self.decoder = decoder
        self.size = image.size

    def load(self) -> None:
        self.image.load()
        self.size = self.image.size

    def region(self, box: tuple[int, int, int, int]) -> Image.Image:
        return self.image.crop(box)


class _ArrayPixels:
    """Decoded stored pixels held in a NumPy array of shape (height, width, channels)."""

    decoder = "simplejpeg"

    def __init__(self, array: np.ndarray):
        self.array = array[:, :, 0] if array.shape[2] == 1 else array
        self.size = (array.shape[1], array.shape[0])

    def load(self) -> None:
        """Nothing to do: simplejpeg has already decoded the whole photo."""

    def region(self, box: tuple[int, int, int, int]) -> Image.Image:
        x0, y0, x1, y1 = box
        return Image.fromarray(np.ascontiguousarray(self.array[y0:y1, x0:x1]))


def _decode(image: Image.Image, data: bytes, factor: int, color_mode: str, decoder: str) -> _PillowPixels | _ArrayPixels:
    """Decode a JPEG at 1/``factor`` of its size, straight to luma when grayscale is requested.

    Grayscale comes from the JPEG's own Y channel at every scale, so the result does not
    depend on the factor that the crops allow.
    """
    width, height = image.size
    gray = color_mode == "grayscale"
    # YCbCr and grayscale JPEGs; CMYK and YCCK go through Pillow's conversion instead.
    if image.mode in ("RGB", "L") and decoder == "simplejpeg":
        import simplejpeg

        try:
            array = simplejpeg.decode_jpeg(
                data, "GRAY" if gray else "RGB",
                min_width=math.ceil(width / factor), min_height=math.ceil(height / factor), min_factor=factor,
            )
        except ValueError:
            # simplejpeg also rejects damage that Pillow decodes (extra bytes between
            # markers, for example); Pillow decides, so both decoders accept the same files.
            pass
        else:
            if array.shape[:2] == (math.ceil(height / factor), math.ceil(width / factor)):
                return _ArrayPixels(array)
    # Pillow picks the largest factor that keeps at least the requested size, so ask for
    # the floor: a side of 1537 at 1/8 requests 192, which Pillow reduces by exactly 8.
    image.draft("L" if gray and image.mode == "RGB" else image.mode, (max(width // factor, 1), max(height // factor, 1)))
    return _PillowPixels(image, "pillow")


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except (OSError, SyntaxError, ValueError):
        # A damaged EXIF block should not cost the photo: treat it as upright.
        return 1
    return value if value in range(1, 9) else 1


def _annotation_scale(displayed: tuple[int, int], annotated: tuple[int, int]) -> float | None:
    """Return displayed pixels per annotated pixel, or None if the sizes do not match.

    The annotated width and height may be given in stored order for a rotated photo,
    so both orders are tried. Either way the factor is uniform, so it applies to boxes
    in the displayed orientation unchanged.
    """
    for width, height in (annotated, annotated[::-1]):
        scale_x, scale_y = displayed[0] / width, displayed[1] / height
        # Downscaled variants round each side to whole pixels, so allow a pixel of slack.
        rounding_slack = 1.0 / min(width, height)
        if abs(scale_x - scale_y) <= max(SCALE_TOLERANCE * max(scale_x, scale_y), rounding_slack):
            return (scale_x + scale_y) / 2
    return None


@dataclass(frozen=True)
class _CropPlan:
    """A crop in displayed full-resolution pixels.

    ``frame`` is the region that maps onto the whole output square; ``content`` is the
    part of it filled from the photo (the rest gets PAD_COLOR). Both are (x0, y0, x1, y1).
    """

    frame: tuple[float, float, float, float]
    content: tuple[float, float, float, float]


def _plan_crop(box: Box | None, scale: float, displayed: tuple[int, int], settings: ImageSettings) -> _CropPlan | ExampleError:
    width, height = displayed
    if box is None:
        whole = (0.0, 0.0, float(width), float(height))
        return _square_plan(whole, displayed, settings.square)

    x, y, box_width, box_height = box
    if min(box_width, box_height) < settings.min_box_size:
        return ExampleError("box_too_small", f"box {list(box)} is smaller than the minimum of {settings.min_box_size} px")
    x0, y0, x1, y1 = x * scale, y * scale, (x + box_width) * scale, (y + box_height) * scale
    tolerance = BOX_TOLERANCE_PX * scale
    if x0 < -tolerance or y0 < -tolerance or x1 > width + tolerance or y1 > height + tolerance:
        return ExampleError(
            "box_outside_image",
            f"box {list(box)} lies outside the {width}x{height} displayed photo (annotated scale {scale:.4g}); fix the annotation",
        )
    x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        return ExampleError("box_outside_image", f"box {list(box)} has no area inside the {width}x{height} photo")

    margin_x, margin_y = settings.padding * (x1 - x0), settings.padding * (y1 - y0)
    region = (x0 - margin_x, y0 - margin_y, x1 + margin_x, y1 + margin_y)
    return _square_plan(region, displayed, settings.square)


def _square_plan(region: tuple[float, float, float, float], displayed: tuple[int, int], square: str) -> _CropPlan:
    x0, y0, x1, y1 = region
    center_x, center_y = (x0 + x1) / 2, (y0 + y1) / 2
    photo = (0.0, 0.0, float(displayed[0]), float(displayed[1]))
    if square == "stretch":
        frame = region
        content = _intersect(region, photo)
    else:
        side = max(x1 - x0, y1 - y0) if square in ("pad", "context") else min(x1 - x0, y1 - y0)
        frame = (center_x - side / 2, center_y - side / 2, center_x + side / 2, center_y + side / 2)
        content = _intersect(region if square == "pad" else frame, photo)
    return _CropPlan(frame, content)


def _intersect(a: tuple[float, ...], b: tuple[float, ...]) -> tuple[float, float, float, float]:
    return (max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))


def _draft_factor(plans: list[_CropPlan | ExampleError], settings: ImageSettings) -> int:
    """Return the largest DCT reduction at which every crop's frame keeps ``size`` pixels a side."""
    sides = [min(plan.frame[2] - plan.frame[0], plan.frame[3] - plan.frame[1]) for plan in plans if isinstance(plan, _CropPlan)]
    if not sides:
        return 1
    smallest = min(sides)
    for factor in DRAFT_FACTORS:
        if smallest / factor >= settings.size:
            return factor
    return 1


def _render(pixels: _PillowPixels | _ArrayPixels, orientation: int, plan: _CropPlan, to_decoded: tuple[float, float], settings: ImageSettings) -> np.ndarray:
    size = settings.size
    fx0, fy0, fx1, fy1 = plan.frame
    cx0, cy0, cx1, cy1 = plan.content
    # Where the content lands in the output square.
    out_x = size / (fx1 - fx0)
    out_y = size / (fy1 - fy0)
    left, top = round((cx0 - fx0) * out_x), round((cy0 - fy0) * out_y)
    right, bottom = round((cx1 - fx0) * out_x), round((cy1 - fy0) * out_y)
    source = (cx0 * to_decoded[0], cy0 * to_decoded[1], cx1 * to_decoded[0], cy1 * to_decoded[1])

    target_mode = "RGB" if settings.color_mode == "rgb" else "L"
    fill = PAD_COLOR if target_mode == "RGB" else _luma(PAD_COLOR)
    if right - left <= 0 or bottom - top <= 0:
        return _as_array(Image.new(target_mode, (size, size), fill), settings)

    # Cut the whole-pixel region around the source rectangle from the stored pixels and
    # turn only that region upright: the same pixels as turning the whole photo first.
    upright_size = pixels.size[::-1] if orientation in (5, 6, 7, 8) else pixels.size
    outer = _outer_pixels(source, upright_size)
    region = pixels.region(stored_box(outer, orientation, pixels.size))
    transpose = _TRANSPOSE_FOR_ORIENTATION.get(orientation)
    if transpose is not None:
        region = region.transpose(transpose)
    region = to_color_mode(region, target_mode)

    # Coordinates of the exact source rectangle inside the whole-pixel region.
    exact = (source[0] - outer[0], source[1] - outer[1], source[2] - outer[0], source[3] - outer[1])
    content = region.resize((right - left, bottom - top), Image.Resampling.BILINEAR, box=exact, reducing_gap=3.0)
    if (left, top, right, bottom) == (0, 0, size, size):
        return _as_array(content, settings)
    canvas = Image.new(target_mode, (size, size), fill)
    canvas.paste(content, (left, top))
    return _as_array(canvas, settings)


def stored_box(box: tuple[int, int, int, int], orientation: int, stored_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Map a pixel box of the upright photo onto the stored (not yet transposed) pixels.

    ``stored.crop(stored_box(box, ...)).transpose(t)`` equals ``stored.transpose(t).crop(box)``
    for the transpose ``t`` that shows the photo upright.
    """
    x0, y0, x1, y1 = box
    width, height = stored_size
    if orientation == 2:
        return (width - x1, y0, width - x0, y1)
    if orientation == 3:
        return (width - x1, height - y1, width - x0, height - y0)
    if orientation == 4:
        return (x0, height - y1, x1, height - y0)
    if orientation == 5:
        return (y0, x0, y1, x1)
    if orientation == 6:
        return (y0, height - x1, y1, height - x0)
    if orientation == 7:
        return (width - y1, height - x1, width - y0, height - x0)
    if orientation == 8:
        return (width - y1, x0, width - y0, x1)
    return box


def _outer_pixels(box: tuple[float, float, float, float], limit: tuple[int, int]) -> tuple[int, int, int, int]:
    return (
        max(math.floor(box[0]), 0),
        max(math.floor(box[1]), 0),
        min(math.ceil(box[2]), limit[0]),
        min(math.ceil(box[3]), limit[1]),
    )


def to_color_mode(image: Image.Image, mode: str) -> Image.Image:
    """Convert any Pillow image to ``"RGB"`` or ``"L"``.

    Alpha (RGBA, LA, PA and palettes with transparency) is composited onto
    :data:`ALPHA_BACKGROUND`; 16- and 32-bit grayscale is scaled to 8 bits; CMYK goes
    through Pillow's conversion.
    """
    if image.mode == mode:
        return image
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode == "PA":
        image = image.convert("RGBA")
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = _to_8bit_gray(image)
    if image.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        image = Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert(mode)


def _to_8bit_gray(image: Image.Image) -> Image.Image:
    values = np.asarray(image)
    if image.mode == "F":
        scaled = np.clip(values, 0.0, 255.0)
    else:
        # 16-bit data: map 0..65535 onto 0..255 with rounding.
        scaled = np.clip(values.astype(np.float64), 0, 65535) / 257.0
    return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")


def _luma(color: tuple[int, int, int]) -> int:
    return round(0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2])


def _as_array(image: Image.Image, settings: ImageSettings) -> np.ndarray:
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, np.newaxis]
    return np.ascontiguousarray(array)
