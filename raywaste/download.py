"""Download TACO's photos into a folder laid out as TACO lays itself out (``DEST/batch_N/...``).

- Reads TACO's ``annotations.json`` (a URL or a path) and selects a deterministic subset of its
  images: some batches, then the first N images in file order.
- Fetches each photo's ``flickr_url`` (or ``flickr_640_url``) with a few requests in parallel,
  retrying timeouts, dropped connections, 5xx and 429 responses with exponential backoff.
- Fully decodes every photo and compares its size with ``annotations.json`` before an atomic
  write. PNG originals, which TACO stores under ``.jpg`` names, are written as RGB JPEGs.

It leaves ``DEST/annotations.json`` listing exactly the photos present and
``DEST/download-report.json`` listing each failure with its reason. A re-run skips photos that
exist, decode and have the expected size, and downloads the others again.
"""

from __future__ import annotations

import dataclasses
import email.utils
import io
import json
import logging
import os
import random
import re
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from raywaste import __version__

if TYPE_CHECKING:
    import requests
    from PIL import Image

logger = logging.getLogger(__name__)

DEFAULT_ANNOTATIONS_URL = "https://raw.githubusercontent.com/pedropro/TACO/master/data/annotations.json"
ANNOTATIONS_NAME = "annotations.json"
REPORT_NAME = "download-report.json"
USER_AGENT = f"raywaste/{__version__} (TACO photo download)"

Size = Literal["original", "640"]
SIZES: tuple[Size, ...] = ("original", "640")

# Temporary files are named ".<file name>.<random>.part" in the photo's own folder.
_TEMP_PREFIX = "."
_TEMP_SUFFIX = ".part"

# Number of failures logged one by one. The report lists all of them.
_MAX_LOGGED_FAILURES = 10

T = TypeVar("T")


@dataclass(frozen=True)
class DownloadSettings:
    """Network and encoding settings of a download, with every default in one place."""

    # Parallel requests, kept low to be gentle on Flickr's servers.
    workers: int = 4
    # Seconds allowed to connect, and seconds without a byte once connected.
    timeout_s: float = 30.0
    # Tries per URL, the first one included.
    max_attempts: int = 5
    # Backoff before retry k is a random 50-100% of min(backoff_max_s, backoff_base_s * 2**(k-1)).
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    # Upper bound on a server's Retry-After, in seconds. A longer one waits this long.
    max_retry_after_s: float = 300.0
    # Quality of JPEGs written from PNG originals (Pillow's scale, 1-95). TACO's own script
    # writes Pillow's default of 75. At 90 a photo is about 1.4 times as large as at 75
    # (two TACO sample photos re-encoded with Pillow 13).
    jpeg_quality: int = 90
    # RGB color that transparent pixels become, because JPEG has no alpha channel.
    background: tuple[int, int, int] = (255, 255, 255)
    # Long side in pixels for --size 640 photos that have no flickr_640_url and are
    # downscaled here from the original. Flickr's own 640 version (size suffix z) has 640
    # pixels on its long side.
    small_long_side_px: int = 640
    # Bytes read from the network at a time.
    chunk_bytes: int = 1 << 16

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"jpeg_quality must be between 1 and 95, got {self.jpeg_quality}")


@dataclass(frozen=True)
class Photo:
    """One image of annotations.json to download, and what it must look like."""

    image_id: int
    file_name: str
    url: str | None
    width: int
    height: int
    # Long side in pixels to downscale to after download, or None to keep the downloaded size.
    downscale_to: int | None = None


@dataclass(frozen=True)
class PhotoResult:
    """Outcome for one photo: downloaded now, already present and valid, or failed."""

    photo: Photo
    status: Literal["downloaded", "present", "failed"]
    reason: str | None = None
    attempts: int = 0
    bytes_received: int = 0
    converted: bool = False


@dataclass
class DownloadPlan:
    """The parsed annotations, the selected photos and where they go."""

    dest: Path
    source: str
    size: Size
    coco: dict[str, Any]
    photos: list[Photo]


@dataclass
class DownloadReport:
    """Counts and failures of one download run, as written to download-report.json."""

    source: str
    size: Size
    selected: int
    downloaded: int = 0
    present: int = 0
    converted: int = 0
    bytes_received: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    started_at: str = ""
    finished_at: str = ""
    elapsed_s: float = 0.0

    @property
    def missing(self) -> int:
        return len(self.failures)


class DownloadError(Exception):
    """A URL that could not be fetched, with the reason and the number of attempts made."""

    def __init__(self, reason: str, attempts: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.attempts = attempts


class DownloadInterrupted(Exception):
    """Raised in workers once the run has been stopped."""


class InvalidBody(Exception):
    """A response body that does not decode. Fetcher retries it, because a dropped connection can leave one."""


# --- Selecting photos ------------------------------------------------------------------------


def parse_batches(text: str) -> list[int]:
    """Parse a comma-separated list of batch numbers such as ``1,2,10``."""
    batches = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise ValueError(f"invalid batch number {part!r} in {text!r}: expected positive integers such as 1,2,3")
        batches.append(int(part))
    return sorted(set(batches))


def batch_number(file_name: str) -> int | None:
    """Return N for a file name under ``batch_N/``, else None."""
    match = re.match(r"batch_(\d+)/", file_name)
    return int(match.group(1)) if match else None


def _validate_image(image: Any) -> None:
    """Raise ValueError, naming the image id, unless an images entry can be downloaded safely.

    The entry needs an integer id, a positive width and height, and a relative file_name
    that stays inside the dataset folder.
    """
    if not isinstance(image, dict):
        raise ValueError(f"annotations.json has an images entry that is not an object: {image!r:.80}")
    image_id = image.get("id")
    if not isinstance(image_id, int):
        raise ValueError(f"images entry {image!r:.80} in annotations.json has no integer id")
    for key in ("width", "height"):
        if not isinstance(image.get(key), int) or image[key] < 1:
            raise ValueError(f"image id {image_id} in annotations.json has invalid {key} {image.get(key)!r}")

    file_name = image.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        raise ValueError(f"image id {image_id} in annotations.json has no file_name")
    path = PurePosixPath(file_name)
    if path.is_absolute() or ".." in path.parts or "\\" in file_name:
        raise ValueError(
            f"image id {image_id} has file_name {file_name!r}, which is not a relative path inside the "
            "dataset folder; fix that entry in annotations.json"
        )


def select_images(
    coco: dict[str, Any], batches: list[int] | None = None, max_images: int | None = None
) -> list[dict[str, Any]]:
    """Select the images of the given batches, then the first ``max_images`` in file order.

    The order of ``coco["images"]`` decides which images come first, so the same
    annotations.json and options always select the same images.
    """
    images = coco.get("images") if isinstance(coco, dict) else None
    if not isinstance(images, list):
        raise ValueError("annotations.json has no 'images' list; is it a COCO-format TACO annotations file?")

    seen: dict[str, int] = {}
    for image in images:
        _validate_image(image)
        file_name = image["file_name"]
        if file_name in seen:
            raise ValueError(f"file_name {file_name!r} is used by image ids {seen[file_name]} and {image['id']}")
        seen[file_name] = image["id"]

    selected = images
    if batches:
        selected = [image for image in selected if batch_number(image["file_name"]) in batches]
        if not selected:
            found = sorted({n for n in (batch_number(image["file_name"]) for image in images) if n is not None})
            raise ValueError(f"no images in batches {batches}; annotations.json has batches {found}")

    if max_images is not None:
        selected = selected[:max_images]
    return selected


def photo_for_image(image: dict[str, Any], size: Size, settings: DownloadSettings) -> Photo:
    """Describe the download of one image entry at the requested size.

    For ``640``, an image without ``flickr_640_url`` (TACO's batches 11 to 15, hosted by
    OpenLitterMap) is fetched at its original size and downscaled here.
    """
    url = image.get("flickr_url")
    downscale_to = None
    if size == "640":
        if image.get("flickr_640_url"):
            url = image["flickr_640_url"]
        else:
            downscale_to = settings.small_long_side_px

    return Photo(
        image_id=image["id"],
        file_name=image["file_name"],
        url=url or None,
        width=image["width"],
        height=image["height"],
        downscale_to=downscale_to,
    )


def filter_annotations(coco: dict[str, Any], image_ids: set[int]) -> dict[str, Any]:
    """Return a copy of ``coco`` that keeps only the given images and their annotations.

    Every top-level key stays. ``images``, ``annotations`` and ``scene_annotations`` keep
    their order, and the images keep the official ``width`` and ``height`` even when the
    photos on disk were downloaded at 640 pixels.
    """
    filtered = dict(coco)
    filtered["images"] = [image for image in coco.get("images", []) if image["id"] in image_ids]
    for key in ("annotations", "scene_annotations"):
        if key in coco:
            filtered[key] = [entry for entry in coco[key] if entry.get("image_id") in image_ids]
    return filtered


# --- Checking and converting photos ----------------------------------------------------------


def check_size(actual: tuple[int, int], official: tuple[int, int], size: Size) -> str | None:
    """Return why a photo's pixel size does not fit annotations.json, or None if it fits.

    ``original`` needs the exact size. ``640`` needs a uniform downscale of the official
    size, within 1 pixel of rounding on the short side.
    """
    width, height = actual
    official_width, official_height = official
    expected = f"{official_width}x{official_height}"

    if size == "original":
        if actual == official:
            return None
        if actual == (official_height, official_width):
            return f"size {width}x{height} has width and height swapped against {expected} in annotations.json"
        return f"size {width}x{height} differs from {expected} in annotations.json"

    # Scale from the long side, where Flickr's rounding error is smallest.
    if official_width >= official_height:
        scale = width / official_width
        short_error = abs(height - official_height * scale)
    else:
        scale = height / official_height
        short_error = abs(width - official_width * scale)
    if scale > 1.0 or short_error > 1.0:
        return f"size {width}x{height} is not a uniform downscale of {expected} in annotations.json"
    return None


def decode_image(data: bytes) -> Image.Image:
    """Open and fully decode image bytes, raising InvalidBody if they are not a complete image."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except UnidentifiedImageError as error:
        raise InvalidBody(f"not an image ({len(data)} bytes starting {data[:16]!r})") from error
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        # Pillow raises OSError("image file is truncated") and others for incomplete data.
        raise InvalidBody(f"image does not decode: {error}") from error
    return image


def to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Convert an image to RGB, compositing any transparency onto ``background``."""
    from PIL import Image

    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")

    # NOTE: 16-bit grayscale PNGs (mode I;16) are clipped to 255, not scaled. TACO's
    # originals are 8-bit photos, so this path has not been needed.
    return image.convert("RGB") if image.mode != "RGB" else image


def encode_jpeg(
    data: bytes, image: Image.Image, settings: DownloadSettings, downscale_to: int | None = None
) -> tuple[bytes, bool]:
    """Return the bytes to write for a decoded photo and whether they were re-encoded.

    An RGB JPEG that needs no downscaling is kept byte for byte. Anything else (PNG
    originals, palette, grayscale or CMYK images) becomes an RGB JPEG at
    ``settings.jpeg_quality``, with the EXIF block kept and the ICC profile kept when the
    source is RGB.
    """
    is_jpeg = image.format in ("JPEG", "MPO")
    if is_jpeg and image.mode == "RGB" and downscale_to is None:
        return data, False

    exif = image.getexif()
    icc_profile = image.info.get("icc_profile") if image.mode in ("RGB", "RGBA", "P", "PA") else None
    rgb = to_rgb(image, settings.background)
    if downscale_to is not None:
        rgb = downscale(rgb, downscale_to)

    options: dict[str, Any] = {"quality": settings.jpeg_quality}
    if len(exif):
        options["exif"] = exif.tobytes()
    if icc_profile:
        options["icc_profile"] = icc_profile
    out = io.BytesIO()
    rgb.save(out, "JPEG", **options)
    return out.getvalue(), True


def downscale(image: Image.Image, long_side: int) -> Image.Image:
    """Shrink an image uniformly so that its long side is ``long_side`` pixels; never enlarge it."""
    from PIL import Image

    width, height = image.size
    scale = long_side / max(width, height)
    if scale >= 1.0:
        return image
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(new_size, Image.Resampling.LANCZOS)


def check_existing(path: Path, photo: Photo, size: Size) -> str | None:
    """Return why the file at ``path`` must be downloaded again, or None if it can stay.

    A file stays when it is an RGB JPEG that decodes completely and has the expected size.
    """
    if not path.is_file():
        return "missing"
    try:
        image = decode_image(path.read_bytes())
    except InvalidBody as error:
        return f"existing file is partial or corrupt ({error})"

    if image.format not in ("JPEG", "MPO") or image.mode != "RGB":
        return f"existing file is {image.format} {image.mode}, not an RGB JPEG"
    mismatch = check_size(image.size, (photo.width, photo.height), "640" if photo.downscale_to else size)
    if mismatch:
        return f"existing file {mismatch}"
    return None


# --- Writing files ---------------------------------------------------------------------------


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    A reader, or a run killed halfway, sees either the old file or the whole new one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f"{_TEMP_PREFIX}{path.name}.", suffix=_TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def remove_stale_temp_files(folders: set[Path]) -> int:
    """Delete temporary files that a killed run left in ``folders`` and return how many.

    Two downloads into the same folder at once would delete each other's temporary files,
    so run one at a time per folder.
    """
    removed = 0
    for folder in sorted(folders):
        if not folder.is_dir():
            continue
        for path in folder.glob(f"{_TEMP_PREFIX}*{_TEMP_SUFFIX}"):
            logger.info("removing temporary file %s left by an interrupted run", path)
            path.unlink(missing_ok=True)
            removed += 1
    return removed


# --- HTTP ------------------------------------------------------------------------------------


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Return the delay in seconds that a ``Retry-After`` header requests, or None if it is invalid.

    The header is either a number of seconds or an HTTP-date (RFC 9110, section 10.2.3).
    A date in the past gives 0.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now = now or datetime.now(timezone.utc)
    return max(0.0, (when - now).total_seconds())


def backoff_delay(attempt: int, settings: DownloadSettings, rng: random.Random) -> float:
    """Return the wait in seconds before retry number ``attempt`` (1 for the first retry)."""
    ceiling = min(settings.backoff_max_s, settings.backoff_base_s * 2 ** (attempt - 1))
    # Jitter spreads the retries of parallel workers so they do not hit the server together.
    return ceiling * rng.uniform(0.5, 1.0)


class _HTTPStatusError(Exception):
    def __init__(self, status: int, reason: str, retry_after: str | None) -> None:
        super().__init__(f"HTTP {status} {reason}".strip())
        self.status = status
        self.retry_after = retry_after


class _TruncatedBody(Exception):
    pass


def _is_retryable_status(status: int) -> bool:
    return status in (408, 429) or 500 <= status <= 599


class Fetcher:
    """Fetch URLs with retries, backoff and a pause shared by all threads after a 429.

    Each thread gets its own ``requests.Session``, so connections to a host are reused.
    """

    def __init__(
        self, settings: DownloadSettings, stop: threading.Event | None = None, seed: int | None = None
    ) -> None:
        self.settings = settings
        self.stop = stop or threading.Event()
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        self._resume_at = 0.0  # time.monotonic() before which no request starts
        self._rng = random.Random(seed)

    def close(self) -> None:
        with self._lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()

    def fetch(self, url: str, decode: Callable[[bytes], T]) -> tuple[bytes, T, int]:
        """Fetch ``url`` and decode its body, retrying what may succeed on a later try.

        Retries timeouts, connection errors, truncated bodies, bodies that ``decode``
        rejects with InvalidBody, and 408, 429 and 5xx responses. Honors Retry-After on
        429 and 503. Returns the body, the decoded value and the number of attempts, or
        raises DownloadError with the last reason.
        """
        import requests

        attempt = 0
        while True:
            attempt += 1
            self._wait_for_pause()
            retry_after = None
            rate_limited = False
            try:
                data = self._get(url)
                return data, decode(data), attempt
            except _HTTPStatusError as error:
                if not _is_retryable_status(error.status):
                    raise DownloadError(str(error), attempt) from error
                reason = str(error)
                rate_limited = error.status == 429
                if error.status in (429, 503):
                    retry_after = parse_retry_after(error.retry_after)
            except requests.Timeout as error:
                reason = f"timed out after {self.settings.timeout_s:g} s ({type(error).__name__})"
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as error:
                # requests reports a read timeout during the body as a ConnectionError.
                reason = f"connection failed: {error}"
            except (_TruncatedBody, InvalidBody) as error:
                reason = str(error)
            except requests.RequestException as error:
                # An invalid URL, too many redirects and the like: another try gives the same.
                raise DownloadError(f"request failed: {error}", attempt) from error

            if attempt >= self.settings.max_attempts:
                raise DownloadError(f"{reason} (gave up after {attempt} attempts)", attempt)

            if retry_after is not None:
                delay = min(retry_after, self.settings.max_retry_after_s)
            else:
                delay = backoff_delay(attempt, self.settings, self._rng)
            if rate_limited:
                self._pause_all(delay)
            logger.info(
                "retrying %s in %.2f s (attempt %d of %d failed: %s)",
                url,
                delay,
                attempt,
                self.settings.max_attempts,
                reason,
            )
            if self.stop.wait(delay):
                raise DownloadInterrupted(url)

    def _session(self) -> requests.Session:
        import requests

        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers["User-Agent"] = USER_AGENT
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def _get(self, url: str) -> bytes:
        timeout = (self.settings.timeout_s, self.settings.timeout_s)
        with self._session().get(url, stream=True, timeout=timeout) as response:
            if response.status_code != 200:
                raise _HTTPStatusError(response.status_code, response.reason or "", response.headers.get("Retry-After"))

            body = bytearray()
            for chunk in response.iter_content(self.settings.chunk_bytes):
                if self.stop.is_set():
                    raise DownloadInterrupted(url)
                body += chunk

            # urllib3 2 raises on a short body too; this also covers servers it lets through.
            expected = response.headers.get("Content-Length")
            if (
                expected
                and expected.isdigit()
                and "Content-Encoding" not in response.headers
                and len(body) != int(expected)
            ):
                raise _TruncatedBody(f"body truncated: {len(body)} of {expected} bytes")
            return bytes(body)

    def _wait_for_pause(self) -> None:
        while True:
            with self._lock:
                remaining = self._resume_at - time.monotonic()
            if remaining <= 0:
                return
            if self.stop.wait(remaining):
                raise DownloadInterrupted("stopped while paused")

    def _pause_all(self, delay: float) -> None:
        """Hold every thread's next request for ``delay`` seconds, since a 429 limits the whole client."""
        with self._lock:
            self._resume_at = max(self._resume_at, time.monotonic() + delay)


# --- Running a download ----------------------------------------------------------------------


def load_annotations(source: str, settings: DownloadSettings) -> dict[str, Any]:
    """Read a COCO annotations file from an http(s) URL or a local path."""
    if source.startswith(("http://", "https://")):
        logger.info("fetching annotations from %s", source)
        fetcher = Fetcher(settings)
        try:
            _, coco, _ = fetcher.fetch(source, _decode_json)
        except DownloadError as error:
            raise ValueError(
                f"failed to fetch annotations from {source}: {error.reason}; pass a local copy with --annotations PATH"
            ) from error
        finally:
            fetcher.close()
        return coco

    path = Path(source)
    if not path.is_file():
        raise ValueError(f"annotations file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"annotations file {path} is not valid JSON: {error}") from error


def _decode_json(data: bytes) -> dict[str, Any]:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidBody(f"not valid JSON: {error}") from error


def plan_download(
    dest: Path,
    source: str = DEFAULT_ANNOTATIONS_URL,
    size: Size = "original",
    batches: list[int] | None = None,
    max_images: int | None = None,
    settings: DownloadSettings | None = None,
) -> DownloadPlan:
    """Load the annotations and select the photos to download, without downloading any."""
    settings = settings or DownloadSettings()
    if size not in SIZES:
        raise ValueError(f"invalid size {size!r}: expected one of {', '.join(SIZES)}")
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be at least 1, got {max_images}")

    coco = load_annotations(source, settings)
    images = select_images(coco, batches, max_images)
    photos = [photo_for_image(image, size, settings) for image in images]
    return DownloadPlan(dest=Path(dest), source=source, size=size, coco=coco, photos=photos)


def download_photo(photo: Photo, dest: Path, size: Size, fetcher: Fetcher, settings: DownloadSettings) -> PhotoResult:
    """Download, check, convert and write one photo, unless a valid copy is already there."""
    target = dest / photo.file_name
    refetch_reason = check_existing(target, photo, size)
    if refetch_reason is None:
        return PhotoResult(photo, "present")
    if refetch_reason != "missing":
        logger.info("%s: %s, downloading it again", photo.file_name, refetch_reason)

    if photo.url is None:
        return PhotoResult(photo, "failed", reason=f"annotations.json has no URL for image id {photo.image_id}")

    try:
        data, image, attempts = fetcher.fetch(photo.url, decode_image)
    except DownloadError as error:
        return PhotoResult(photo, "failed", reason=error.reason, attempts=error.attempts)

    # A downscaled photo must first match the original size that annotations.json gives.
    mismatch = check_size(image.size, (photo.width, photo.height), "original" if photo.downscale_to else size)
    if mismatch:
        return PhotoResult(photo, "failed", reason=mismatch, attempts=attempts, bytes_received=len(data))

    jpeg, converted = encode_jpeg(data, image, settings, photo.downscale_to)
    write_atomic(target, jpeg)
    return PhotoResult(photo, "downloaded", attempts=attempts, bytes_received=len(data), converted=converted)


def run_download(
    plan: DownloadPlan,
    settings: DownloadSettings | None = None,
    on_result: Callable[[PhotoResult], None] | None = None,
) -> DownloadReport:
    """Download the planned photos in parallel, then write annotations.json and the report.

    ``on_result`` is called in the calling thread after each photo, for progress display.
    On an exception or KeyboardInterrupt the workers stop at their next chunk or retry,
    and neither annotations.json nor the report is written.
    """
    settings = settings or DownloadSettings()
    started = time.monotonic()
    report = DownloadReport(
        source=plan.source,
        size=plan.size,
        selected=len(plan.photos),
        started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    folders = {plan.dest} | {(plan.dest / photo.file_name).parent for photo in plan.photos}
    remove_stale_temp_files(folders)
    logger.info("downloading %d photos to %s with %d workers", len(plan.photos), plan.dest, settings.workers)

    stop = threading.Event()
    fetcher = Fetcher(settings, stop)
    present_ids: set[int] = set()
    try:
        with ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="raywaste-download") as pool:
            futures = [
                pool.submit(download_photo, photo, plan.dest, plan.size, fetcher, settings) for photo in plan.photos
            ]
            try:
                for future in as_completed(futures):
                    result = future.result()
                    _count(report, result)
                    if result.status != "failed":
                        present_ids.add(result.photo.image_id)
                    if on_result is not None:
                        on_result(result)
            except BaseException:
                logger.warning("stopping: waiting up to %g s for requests in progress", settings.timeout_s)
                stop.set()
                for future in futures:
                    future.cancel()
                raise
    finally:
        fetcher.close()

    report.failures.sort(key=lambda failure: failure["file_name"])
    report.finished_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    report.elapsed_s = round(time.monotonic() - started, 3)

    write_atomic(plan.dest / ANNOTATIONS_NAME, json.dumps(filter_annotations(plan.coco, present_ids)).encode())
    write_report(plan.dest / REPORT_NAME, report, settings)
    return report


def _count(report: DownloadReport, result: PhotoResult) -> None:
    report.bytes_received += result.bytes_received
    if result.status == "present":
        report.present += 1
        return
    if result.status == "downloaded":
        report.downloaded += 1
        report.converted += int(result.converted)
        return

    report.failures.append(
        {
            "image_id": result.photo.image_id,
            "file_name": result.photo.file_name,
            "url": result.photo.url,
            "reason": result.reason,
            "attempts": result.attempts,
        }
    )
    if len(report.failures) <= _MAX_LOGGED_FAILURES:
        logger.warning("failed: %s (image id %d): %s", result.photo.file_name, result.photo.image_id, result.reason)
    elif len(report.failures) == _MAX_LOGGED_FAILURES + 1:
        logger.warning("more failures: see %s when the run ends", REPORT_NAME)


def write_report(path: Path, report: DownloadReport, settings: DownloadSettings) -> None:
    """Write the report as JSON, with the settings of the run."""
    content = dataclasses.asdict(report)
    content["missing"] = report.missing
    content["settings"] = dataclasses.asdict(settings)
    write_atomic(path, (json.dumps(content, indent=2) + "\n").encode())


def format_summary(report: DownloadReport, dest: Path) -> str:
    """Return a few lines for the terminal that sum up a finished run."""
    lines = [
        f"{report.downloaded} downloaded ({report.converted} converted from PNG or other formats), "
        f"{report.present} already present, {report.missing} missing, of {report.selected} selected",
        f"{report.bytes_received / 1e6:.1f} MB in {report.elapsed_s:.1f} s",
        f"annotations of the {report.selected - report.missing} photos present: {dest / ANNOTATIONS_NAME}",
        f"report: {dest / REPORT_NAME}",
    ]
    if report.missing:
        lines.append(f"{report.missing} photos are missing; run the same command again to retry them")
    return "\n".join(lines)


class ProgressRate:
    """Photo and byte rates since the start, for a progress bar's text."""

    def __init__(self) -> None:
        self._start = time.monotonic()
        self._photos = 0
        self._bytes = 0

    def add(self, result: PhotoResult) -> str:
        self._photos += 1
        self._bytes += result.bytes_received
        elapsed = max(time.monotonic() - self._start, 1e-6)
        return f"{self._photos / elapsed:.1f} photos/s, {self._bytes / elapsed / 1e6:.1f} MB/s"
