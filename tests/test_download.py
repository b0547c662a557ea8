"""Tests of ``raywaste download`` against a real HTTP server on 127.0.0.1 that injects faults.

The server serves small copies of real TACO sample photos, encoded the ways TACO's sources
encode them: PNG originals under ``.jpg`` names (RGB with EXIF, RGBA, palette, LA) and JPEGs.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import email.utils
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from PIL import Image, ImageCms

from raywaste import download as taco_download
from raywaste.cli import main
from raywaste.download import DownloadSettings

# Tiny waits so that retries, backoff and timeouts cost little time.
FAST = DownloadSettings(
    workers=4,
    timeout_s=1.0,
    max_attempts=3,
    backoff_base_s=0.01,
    backoff_max_s=0.05,
    max_retry_after_s=5.0,
    small_long_side_px=48,
)
LONG_SIDE_PX = 96  # long side of the served "originals"
RETRY_AFTER_S = 1
EXIF_MAKE = "raywaste test camera"
TRANSPARENT_RGB = (255, 0, 0)  # color under fully transparent pixels, which must become white


# --- The HTTP server -------------------------------------------------------------------------


@dataclass
class Route:
    body: bytes
    content_type: str = "image/jpeg"
    # none, 500-once, 429-once, stall-once, truncate-once, hold-once, 404, 503-always
    fault: str = "none"


@dataclass
class RequestRecord:
    path: str
    time: float
    user_agent: str


@dataclass
class PhotoServer:
    """Routes by URL path, a log of requests, and events to release stalled requests."""

    base_url: str = ""
    routes: dict[str, Route] = field(default_factory=dict)
    log: list[RequestRecord] = field(default_factory=list)
    counts: collections.Counter = field(default_factory=collections.Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    release: threading.Event = field(default_factory=threading.Event)
    held: threading.Event = field(default_factory=threading.Event)

    def url(self, path: str) -> str:
        return self.base_url + path

    def requested(self, path: str) -> int:
        with self.lock:
            return self.counts[path]

    def clear_log(self) -> None:
        with self.lock:
            self.log.clear()
            self.counts.clear()


class _Handler(BaseHTTPRequestHandler):
    server: Any

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        photos: PhotoServer = self.server.photos
        with photos.lock:
            photos.counts[self.path] += 1
            count = photos.counts[self.path]
            photos.log.append(RequestRecord(self.path, time.monotonic(), self.headers.get("User-Agent", "")))

        route = photos.routes.get(self.path)
        fault = route.fault if route else "404"
        first = count == 1

        if fault == "404":
            self._send_status(404)
        elif fault == "503-always" or (fault == "500-once" and first):
            self._send_status(503 if fault == "503-always" else 500)
        elif fault == "429-once" and first:
            self._send_status(429, {"Retry-After": str(RETRY_AFTER_S)})
        elif fault == "stall-once" and first:
            photos.release.wait(30)  # the client times out long before; teardown releases it
        elif fault == "hold-once" and first:
            photos.held.set()
            photos.release.wait(30)
        elif fault == "truncate-once" and first:
            self._send_body(route, limit=len(route.body) // 2)
        else:
            self._send_body(route)

    def _send_status(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send_body(self, route: Route, limit: int | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", route.content_type)
        self.send_header("Content-Length", str(len(route.body)))
        self.end_headers()
        self.wfile.write(route.body[:limit])

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that time out or are killed close their sockets while handlers write.
        pass


@pytest.fixture(scope="module", autouse=True)
def no_proxy() -> Iterator[None]:
    """Keep requests to 127.0.0.1 off any proxy that the environment names."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        yield


@contextlib.contextmanager
def running_server() -> Iterator[PhotoServer]:
    """Serve on a free port of 127.0.0.1 in a thread, and stop the server on exit."""
    photos = PhotoServer()
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.photos = photos
    photos.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield photos
    finally:
        photos.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


@pytest.fixture
def server() -> Iterator[PhotoServer]:
    with running_server() as photos:
        yield photos


# --- Photos and annotations served -----------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """How one photo is served: its encoding and the fault on its URL."""

    encoding: str  # rgb-png-exif, rgba-png, palette-png, la-png, jpeg, garbage, wrong-size, no-url
    fault: str = "none"
    has_640: bool = True


# Photos that end up on disk in the run with faults, and those that end up missing.
GOOD_SPECS = [
    Spec("rgb-png-exif"),
    Spec("rgba-png"),
    Spec("palette-png"),
    Spec("la-png"),
    Spec("jpeg", has_640=False),
    Spec("jpeg", "500-once"),
    Spec("jpeg", "429-once"),
    Spec("jpeg", "stall-once"),
    Spec("rgb-png-exif", "truncate-once"),
]
BAD_SPECS = [
    Spec("jpeg", "404"),
    Spec("jpeg", "503-always"),
    Spec("garbage"),
    Spec("wrong-size"),
    Spec("no-url"),
]


@pytest.fixture(scope="session")
def sample_photos(taco_sample: Path) -> tuple[dict[str, Any], list[Image.Image]]:
    """Real TACO annotations for 15 sample images across batches 1-3, and the photos downscaled."""
    coco = json.loads((taco_sample / "annotations.json").read_text())
    images = coco["images"][::7][:15]
    photos = []
    for image in images:
        with Image.open(taco_sample / image["file_name"]) as photo:
            photo.draft("RGB", (LONG_SIDE_PX * 2, LONG_SIDE_PX * 2))  # fast JPEG decode at reduced scale
            small = photo.convert("RGB")
        small.thumbnail((LONG_SIDE_PX, LONG_SIDE_PX))
        photos.append(small)
    return coco, photos


def _png(image: Image.Image, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG", **options)
    return out.getvalue()


def _jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return out.getvalue()


def _encode(spec: Spec, photo: Image.Image) -> tuple[bytes, str]:
    width, height = photo.size
    left_half = (0, 0, width // 2, height)

    if spec.encoding == "rgb-png-exif":
        exif = Image.Exif()
        exif[0x010F] = EXIF_MAKE  # Make
        return _png(photo, exif=exif.tobytes()), "image/png"

    if spec.encoding == "rgba-png":
        rgba = photo.convert("RGBA")
        rgba.paste((*TRANSPARENT_RGB, 0), left_half)
        srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
        return _png(rgba, icc_profile=srgb), "image/png"

    if spec.encoding == "palette-png":
        palette = photo.quantize(colors=63)
        palette.putpalette(palette.getpalette()[: 63 * 3] + list(TRANSPARENT_RGB))
        palette.paste(63, left_half)
        return _png(palette, transparency=63), "image/png"

    if spec.encoding == "la-png":
        alpha = Image.new("L", photo.size, 255)
        alpha.paste(0, left_half)
        return _png(Image.merge("LA", (photo.convert("L"), alpha))), "image/png"

    if spec.encoding == "garbage":
        return b"<html><body>Too many requests</body></html>", "text/html"

    if spec.encoding == "wrong-size":
        return _jpeg(photo.resize((width + 8, height))), "image/jpeg"

    return _jpeg(photo), "image/jpeg"


def serve_catalog(
    server: PhotoServer, sample_photos: tuple[dict[str, Any], list[Image.Image]], specs: list[Spec]
) -> tuple[dict[str, Any], dict[int, Spec]]:
    """Add routes for ``specs`` to the server, and return annotations.json and each image id's spec."""
    coco, photos = sample_photos
    if len(specs) > len(photos):
        raise ValueError(f"{len(specs)} specs but only {len(photos)} sample photos")

    images = []
    spec_by_id = {}
    for spec, image, photo in zip(specs, coco["images"][::7], photos, strict=False):
        body, content_type = _encode(spec, photo)
        extension = "png" if content_type == "image/png" else "jpg"
        original_path = f"/o/{image['id']}_o.{extension}"
        small_path = f"/z/{image['id']}_z.jpg"
        server.routes[original_path] = Route(body, content_type, spec.fault)
        server.routes[small_path] = Route(_jpeg(photo.resize((photo.width // 2, photo.height // 2))))

        entry = dict(image, width=photo.width, height=photo.height)
        entry["flickr_url"] = None if spec.encoding == "no-url" else server.url(original_path)
        entry["flickr_640_url"] = server.url(small_path) if spec.has_640 else None
        images.append(entry)
        spec_by_id[image["id"]] = spec

    ids = set(spec_by_id)
    catalog = dict(coco)
    catalog["images"] = images
    catalog["annotations"] = [a for a in coco["annotations"] if a["image_id"] in ids]
    catalog["scene_annotations"] = [a for a in coco["scene_annotations"] if a["image_id"] in ids]
    server.routes["/annotations.json"] = Route(json.dumps(catalog).encode(), "application/json")
    return catalog, spec_by_id


def _original_path(image: dict[str, Any]) -> str:
    return urllib.parse.urlsplit(image["flickr_url"]).path


def _temp_files(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.name.endswith(".part")]


def _wait_for(condition: Callable[[], bool], timeout_s: float, description: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {description}")
        time.sleep(0.05)


def _download(server: PhotoServer, dest: Path, size: str = "original", **options: Any) -> taco_download.DownloadReport:
    plan = taco_download.plan_download(dest, server.url("/annotations.json"), size, settings=FAST, **options)
    return taco_download.run_download(plan, FAST)


# --- One run with every fault ----------------------------------------------------------------


@dataclass
class FaultRun:
    dest: Path
    catalog: dict[str, Any]
    spec_by_id: dict[int, Spec]
    report: dict[str, Any]
    server: PhotoServer

    def images(self, good: bool) -> list[dict[str, Any]]:
        specs = GOOD_SPECS if good else BAD_SPECS
        return [image for image in self.catalog["images"] if self.spec_by_id[image["id"]] in specs]

    def image_with(self, spec: Spec) -> dict[str, Any]:
        return next(image for image in self.catalog["images"] if self.spec_by_id[image["id"]] == spec)


@pytest.fixture(scope="module")
def fault_run(sample_photos: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultRun]:
    """One download of every photo in GOOD_SPECS and BAD_SPECS, shared by the tests that inspect it."""
    with running_server() as server:
        catalog, spec_by_id = serve_catalog(server, sample_photos, GOOD_SPECS + BAD_SPECS)
        dest = tmp_path_factory.mktemp("fault-run") / "taco"
        _download(server, dest)
        report = json.loads((dest / "download-report.json").read_text())
        yield FaultRun(dest, catalog, spec_by_id, report, server)


def test_fault_run_writes_rgb_jpegs_of_official_size(fault_run: FaultRun) -> None:
    for image in fault_run.images(good=True):
        path = fault_run.dest / image["file_name"]
        with Image.open(path) as photo:
            photo.load()
            assert photo.format == "JPEG", image["file_name"]
            assert photo.mode == "RGB", image["file_name"]
            assert photo.size == (image["width"], image["height"]), image["file_name"]

    for image in fault_run.images(good=False):
        assert not (fault_run.dest / image["file_name"]).exists(), image["file_name"]


def test_fault_run_report_lists_each_failure(fault_run: FaultRun) -> None:
    report = fault_run.report
    reasons = {failure["image_id"]: failure["reason"] for failure in report["failures"]}
    attempts = {failure["image_id"]: failure["attempts"] for failure in report["failures"]}

    assert report["selected"] == len(GOOD_SPECS) + len(BAD_SPECS)
    assert report["downloaded"] == len(GOOD_SPECS)
    assert report["present"] == 0
    assert report["missing"] == len(BAD_SPECS)
    assert report["converted"] == 5
    assert report["settings"]["max_attempts"] == FAST.max_attempts
    assert sorted(reasons) == sorted(image["id"] for image in fault_run.images(good=False))

    not_found = fault_run.image_with(Spec("jpeg", "404"))["id"]
    assert reasons[not_found] == "HTTP 404 Not Found"
    assert attempts[not_found] == 1

    unavailable = fault_run.image_with(Spec("jpeg", "503-always"))["id"]
    assert reasons[unavailable].startswith("HTTP 503")
    assert "gave up after 3 attempts" in reasons[unavailable]
    assert attempts[unavailable] == 3

    garbage = fault_run.image_with(Spec("garbage"))["id"]
    assert reasons[garbage].startswith("not an image")
    assert attempts[garbage] == 3

    wrong_size = fault_run.image_with(Spec("wrong-size"))
    expected = f"{wrong_size['width']}x{wrong_size['height']}"
    assert (
        reasons[wrong_size["id"]]
        == f"size {wrong_size['width'] + 8}x{wrong_size['height']} differs from {expected} in annotations.json"
    )

    no_url = fault_run.image_with(Spec("no-url"))["id"]
    assert "no URL" in reasons[no_url]


def test_fault_run_retries_transient_faults(fault_run: FaultRun) -> None:
    server = fault_run.server
    for fault in ("500-once", "429-once", "stall-once"):
        assert server.requested(_original_path(fault_run.image_with(Spec("jpeg", fault)))) == 2, fault
    assert server.requested(_original_path(fault_run.image_with(Spec("rgb-png-exif", "truncate-once")))) == 2
    assert server.requested(_original_path(fault_run.image_with(Spec("jpeg", "404")))) == 1
    assert server.requested(_original_path(fault_run.image_with(Spec("jpeg", "503-always")))) == 3


def test_fault_run_waits_retry_after(fault_run: FaultRun) -> None:
    path = _original_path(fault_run.image_with(Spec("jpeg", "429-once")))
    times = [record.time for record in fault_run.server.log if record.path == path]

    assert len(times) == 2
    assert times[1] - times[0] >= RETRY_AFTER_S - 0.05


def test_fault_run_sends_user_agent(fault_run: FaultRun) -> None:
    agents = {record.user_agent for record in fault_run.server.log}
    assert agents == {taco_download.USER_AGENT}
    assert taco_download.USER_AGENT.startswith("raywaste/0.")


def test_fault_run_leaves_no_temp_files(fault_run: FaultRun) -> None:
    assert _temp_files(fault_run.dest) == []


def test_fault_run_keeps_jpeg_bytes(fault_run: FaultRun) -> None:
    image = fault_run.image_with(Spec("jpeg", has_640=False))
    served = fault_run.server.routes[_original_path(image)].body
    assert (fault_run.dest / image["file_name"]).read_bytes() == served


def test_png_conversion_keeps_exif(fault_run: FaultRun) -> None:
    for spec in (Spec("rgb-png-exif"), Spec("rgb-png-exif", "truncate-once")):
        image = fault_run.image_with(spec)
        with Image.open(fault_run.dest / image["file_name"]) as photo:
            assert photo.getexif().get(0x010F) == EXIF_MAKE


def test_png_conversion_keeps_icc_profile(fault_run: FaultRun) -> None:
    image = fault_run.image_with(Spec("rgba-png"))
    with Image.open(fault_run.dest / image["file_name"]) as photo:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(photo.info["icc_profile"]))
    assert "sRGB" in ImageCms.getProfileDescription(profile)


@pytest.mark.parametrize("encoding", ["rgba-png", "palette-png", "la-png"])
def test_transparency_becomes_white(fault_run: FaultRun, sample_photos: Any, encoding: str) -> None:
    image = fault_run.image_with(Spec(encoding))
    with Image.open(fault_run.dest / image["file_name"]) as photo:
        width, height = photo.size
        transparent = photo.getpixel((width // 4, height // 2))
        opaque = photo.getpixel((width * 3 // 4, height // 2))

    # JPEG changes colors by a few levels, so compare with a tolerance.
    assert min(transparent) >= 245, transparent
    assert opaque != (255, 255, 255)


@pytest.mark.parametrize("encoding", ["rgba-png", "la-png"])
def test_opaque_pixels_keep_color(fault_run: FaultRun, sample_photos: Any, encoding: str) -> None:
    image = fault_run.image_with(Spec(encoding))
    _, originals = sample_photos
    index = [entry["id"] for entry in fault_run.catalog["images"]].index(image["id"])
    source = originals[index] if encoding == "rgba-png" else originals[index].convert("L").convert("RGB")

    with Image.open(fault_run.dest / image["file_name"]) as photo:
        point = (photo.width * 3 // 4, photo.height // 2)
        written = photo.getpixel(point)
    expected = source.getpixel(point)

    assert max(abs(a - b) for a, b in zip(written, expected, strict=True)) <= 24, (written, expected)


def test_fault_run_writes_annotations_of_present_photos(fault_run: FaultRun) -> None:
    written = json.loads((fault_run.dest / "annotations.json").read_text())
    present_ids = [image["id"] for image in fault_run.images(good=True)]

    assert set(written) == set(fault_run.catalog)
    assert [image["id"] for image in written["images"]] == [
        i["id"] for i in fault_run.catalog["images"] if i["id"] in present_ids
    ]
    assert written["images"] == [i for i in fault_run.catalog["images"] if i["id"] in present_ids]
    assert written["annotations"] == [a for a in fault_run.catalog["annotations"] if a["image_id"] in present_ids]
    assert written["scene_annotations"] == [
        a for a in fault_run.catalog["scene_annotations"] if a["image_id"] in present_ids
    ]
    assert len(written["annotations"]) > 0
    assert written["categories"] == fault_run.catalog["categories"]
    assert written["info"] == fault_run.catalog["info"]


# --- Resuming --------------------------------------------------------------------------------

CLEAN_SPECS = [Spec("jpeg"), Spec("rgb-png-exif"), Spec("rgba-png"), Spec("jpeg"), Spec("palette-png"), Spec("jpeg")]


def test_rerun_skips_complete_and_refetches_damaged(server: PhotoServer, sample_photos: Any, tmp_path: Path) -> None:
    catalog, _ = serve_catalog(server, sample_photos, CLEAN_SPECS)
    dest = tmp_path / "taco"
    first = _download(server, dest)
    assert first.downloaded == len(CLEAN_SPECS)

    partial, corrupt, wrong_size = catalog["images"][0], catalog["images"][1], catalog["images"][3]
    partial_path = dest / partial["file_name"]
    partial_path.write_bytes(partial_path.read_bytes()[:500])  # as a non-atomic writer leaves it
    (dest / corrupt["file_name"]).write_bytes(b"\x00" * 2000)
    Image.new("RGB", (10, 10)).save(dest / wrong_size["file_name"], "JPEG")  # a photo of another size
    stale = partial_path.parent / f".{partial_path.name}.k3j2x9.part"
    stale.write_bytes(b"left by a killed run")
    server.clear_log()

    second = _download(server, dest)

    refetched = {record.path for record in server.log} - {"/annotations.json"}
    assert refetched == {_original_path(image) for image in (partial, corrupt, wrong_size)}
    assert second.downloaded == 3
    assert second.present == len(CLEAN_SPECS) - 3
    assert second.missing == 0
    assert not stale.exists()
    assert _temp_files(dest) == []
    for image in catalog["images"]:
        with Image.open(dest / image["file_name"]) as photo:
            photo.load()
            assert photo.size == (image["width"], image["height"])


def test_interrupted_run_resumes(server: PhotoServer, sample_photos: Any, tmp_path: Path) -> None:
    catalog, _ = serve_catalog(server, sample_photos, CLEAN_SPECS)
    dest = tmp_path / "taco"
    plan = taco_download.plan_download(dest, server.url("/annotations.json"), settings=FAST)
    settings = dataclasses.replace(FAST, workers=1)
    finished: list[str] = []

    def stop_after_two(result: taco_download.PhotoResult) -> None:
        finished.append(result.photo.file_name)
        if len(finished) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        taco_download.run_download(plan, settings, on_result=stop_after_two)

    # The photo in progress when the run stopped may or may not have been written.
    on_disk = {image["file_name"] for image in catalog["images"] if (dest / image["file_name"]).exists()}
    assert set(finished) <= on_disk
    assert len(on_disk) < len(CLEAN_SPECS)
    assert not (dest / "annotations.json").exists()
    assert _temp_files(dest) == []
    server.clear_log()

    report = _download(server, dest)

    refetched = {record.path for record in server.log} - {"/annotations.json"}
    assert refetched == {_original_path(image) for image in catalog["images"] if image["file_name"] not in on_disk}
    assert report.present == len(on_disk)
    assert report.downloaded == len(CLEAN_SPECS) - len(on_disk)
    assert report.missing == 0
    assert (dest / "annotations.json").exists()


def test_killed_process_resumes(server: PhotoServer, sample_photos: Any, tmp_path: Path) -> None:
    specs = [Spec("jpeg"), Spec("jpeg", "hold-once"), Spec("rgba-png"), Spec("jpeg"), Spec("palette-png")]
    catalog, spec_by_id = serve_catalog(server, sample_photos, specs)
    held_image = next(image for image in catalog["images"] if spec_by_id[image["id"]].fault == "hold-once")
    others = [image for image in catalog["images"] if image is not held_image]
    dest = tmp_path / "taco"
    env = {key: value for key, value in os.environ.items() if "proxy" not in key.lower()}
    command = [
        sys.executable,
        "-m",
        "raywaste",
        "download",
        str(dest),
        "--annotations",
        server.url("/annotations.json"),
        "--workers",
        "2",
    ]

    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(
            lambda: server.held.is_set() and all((dest / i["file_name"]).exists() for i in others),
            60,
            "all photos but the held one",
        )
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    assert not (dest / held_image["file_name"]).exists()
    assert not (dest / "annotations.json").exists()
    server.clear_log()

    report = _download(server, dest)

    assert {record.path for record in server.log} == {"/annotations.json", _original_path(held_image)}
    assert report.present == len(others)
    assert report.downloaded == 1
    assert _temp_files(dest) == []


# --- Sizes and subsets -----------------------------------------------------------------------


def test_size_640_keeps_uniform_scale(server: PhotoServer, sample_photos: Any, tmp_path: Path) -> None:
    specs = [Spec("jpeg"), Spec("rgb-png-exif"), Spec("jpeg", has_640=False), Spec("rgba-png", has_640=False)]
    catalog, spec_by_id = serve_catalog(server, sample_photos, specs)
    dest = tmp_path / "taco"

    report = _download(server, dest, size="640")

    assert report.downloaded == len(specs)
    requested = {record.path for record in server.log}
    written = json.loads((dest / "annotations.json").read_text())
    assert written["images"] == catalog["images"]  # official width and height stay
    for image in catalog["images"]:
        with Image.open(dest / image["file_name"]) as photo:
            photo.load()
            size = photo.size
            assert photo.mode == "RGB"
        official = (image["width"], image["height"])
        assert taco_download.check_size(size, official, "640") is None, (size, official)
        if spec_by_id[image["id"]].has_640:
            assert size == (image["width"] // 2, image["height"] // 2)
            assert _original_path(image) not in requested
        else:
            assert max(size) == FAST.small_long_side_px
            assert _original_path(image) in requested


def test_batches_and_max_images_select_subset(server: PhotoServer, sample_photos: Any, tmp_path: Path) -> None:
    catalog, _ = serve_catalog(server, sample_photos, [Spec("jpeg")] * 15)
    dest = tmp_path / "taco"

    report = _download(server, dest, batches=[2, 3], max_images=4)

    expected = [image for image in catalog["images"] if image["file_name"].startswith(("batch_2/", "batch_3/"))][:4]
    written = json.loads((dest / "annotations.json").read_text())
    on_disk = sorted(str(path.relative_to(dest)) for path in dest.rglob("*.*") if path.parent != dest)
    assert report.selected == 4
    assert [image["id"] for image in written["images"]] == [image["id"] for image in expected]
    assert on_disk == sorted(image["file_name"] for image in expected)


def test_select_images_on_official_file(taco_official: Path) -> None:
    coco = json.loads(taco_official.read_text())

    batch_3 = taco_download.select_images(coco, batches=[3])
    assert len(batch_3) == 97
    assert all(image["file_name"].startswith("batch_3/") for image in batch_3)

    first = taco_download.select_images(coco, max_images=100)
    assert first == coco["images"][:100]

    subset = taco_download.select_images(coco, batches=[1, 10], max_images=150)
    expected = [image for image in coco["images"] if image["file_name"].split("/")[0] in ("batch_1", "batch_10")][:150]
    assert subset == expected
    assert taco_download.select_images(coco, batches=[1, 10], max_images=150) == subset

    with pytest.raises(ValueError, match="no images in batches \\[16\\]"):
        taco_download.select_images(coco, batches=[16])


def test_official_images_without_640_url_downscale() -> None:
    image = {
        "id": 220,
        "width": 6000,
        "height": 4000,
        "file_name": "batch_11/000019.jpg",
        "flickr_url": "https://x/a.jpeg",
        "flickr_640_url": None,
    }
    photo = taco_download.photo_for_image(image, "640", DownloadSettings())
    assert photo.url == "https://x/a.jpeg"
    assert photo.downscale_to == 640

    image["flickr_640_url"] = "https://x/a_z.jpg"
    photo = taco_download.photo_for_image(image, "640", DownloadSettings())
    assert photo.url == "https://x/a_z.jpg"
    assert photo.downscale_to is None


@pytest.mark.parametrize(
    "file_name", ["../outside.jpg", "/etc/outside.jpg", "batch_1/../../outside.jpg", "batch_1\\..\\x.jpg"]
)
def test_select_images_rejects_escaping_file_name(file_name: str) -> None:
    coco = {"images": [{"id": 7, "width": 10, "height": 10, "file_name": file_name}]}
    with pytest.raises(ValueError, match="image id 7 has file_name .* not a relative path inside"):
        taco_download.select_images(coco)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"id": 7, "width": 0, "height": 10, "file_name": "a.jpg"},
            "image id 7 in annotations.json has invalid width 0",
        ),
        ({"id": 7, "width": 10, "file_name": "a.jpg"}, "image id 7 in annotations.json has invalid height None"),
        ({"id": "7", "width": 10, "height": 10, "file_name": "a.jpg"}, "has no integer id"),
        ({"id": 7, "width": 10, "height": 10}, "image id 7 in annotations.json has no file_name"),
    ],
)
def test_select_images_rejects_invalid_entry(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        taco_download.select_images({"images": [entry]})


def test_select_images_rejects_non_coco_json() -> None:
    with pytest.raises(ValueError, match="no 'images' list"):
        taco_download.select_images([1, 2])  # type: ignore[arg-type]


def test_select_images_rejects_duplicate_file_name() -> None:
    entry = {"width": 10, "height": 10, "file_name": "batch_1/a.jpg"}
    coco = {"images": [{"id": 1, **entry}, {"id": 2, **entry}]}
    with pytest.raises(ValueError, match="image ids 1 and 2"):
        taco_download.select_images(coco)


@pytest.mark.parametrize(("text", "expected"), [("1", [1]), ("3, 1,2", [1, 2, 3]), ("2,2", [2])])
def test_parse_batches(text: str, expected: list[int]) -> None:
    assert taco_download.parse_batches(text) == expected


@pytest.mark.parametrize("text", ["", "a", "1,,2", "0", "-1", "1.5"])
def test_parse_batches_rejects_invalid(text: str) -> None:
    with pytest.raises(ValueError, match="invalid batch number"):
        taco_download.parse_batches(text)


# --- Pure helpers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("actual", "official", "size", "fits"),
    [
        ((1537, 2049), (1537, 2049), "original", True),
        ((2049, 1537), (1537, 2049), "original", False),
        ((1536, 2049), (1537, 2049), "original", False),
        ((480, 640), (1537, 2049), "640", True),
        ((481, 640), (1537, 2049), "640", True),
        ((483, 640), (1537, 2049), "640", False),
        ((640, 427), (6000, 4000), "640", True),
        ((640, 480), (6000, 4000), "640", False),
        ((2000, 1500), (1000, 750), "640", False),
    ],
)
def test_check_size(actual: tuple[int, int], official: tuple[int, int], size: str, fits: bool) -> None:
    assert (taco_download.check_size(actual, official, size) is None) == fits


def test_check_size_names_swap() -> None:
    reason = taco_download.check_size((2049, 1537), (1537, 2049), "original")
    assert reason == "size 2049x1537 has width and height swapped against 1537x2049 in annotations.json"


def test_parse_retry_after() -> None:
    now = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
    in_30_s = email.utils.format_datetime(now + timedelta(seconds=30), usegmt=True)
    past = email.utils.format_datetime(now - timedelta(hours=1), usegmt=True)

    assert taco_download.parse_retry_after("120", now) == 120.0
    assert taco_download.parse_retry_after(" 7 ", now) == 7.0
    assert taco_download.parse_retry_after(in_30_s, now) == 30.0
    assert taco_download.parse_retry_after(past, now) == 0.0
    assert taco_download.parse_retry_after("soon", now) is None
    assert taco_download.parse_retry_after(None, now) is None


def test_backoff_delay_doubles_within_cap() -> None:
    settings = DownloadSettings(backoff_base_s=1.0, backoff_max_s=8.0)
    rng = random.Random(0)
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 8.0), (9, 8.0)]:
        delays = [taco_download.backoff_delay(attempt, settings, rng) for _ in range(50)]
        assert min(delays) >= ceiling / 2, attempt
        assert max(delays) <= ceiling, attempt
        assert len(set(delays)) > 1, attempt


def test_encode_jpeg_quality_setting() -> None:
    photo = Image.effect_noise((64, 48), 40).convert("RGB")
    data = _png(photo)
    image = taco_download.decode_image(data)

    low, converted = taco_download.encode_jpeg(data, image, DownloadSettings(jpeg_quality=30))
    high, _ = taco_download.encode_jpeg(data, taco_download.decode_image(data), DownloadSettings(jpeg_quality=95))
    default, _ = taco_download.encode_jpeg(data, taco_download.decode_image(data), DownloadSettings())

    assert converted
    assert len(low) < len(default) < len(high)
    with Image.open(io.BytesIO(default)) as written:
        assert written.format == "JPEG"
        # libjpeg scales its standard luminance table (DC entry 16) by 200 - 2 * quality percent.
        assert written.quantization[0][0] == round(16 * (200 - 2 * DownloadSettings().jpeg_quality) / 100)


def test_decode_image_rejects_truncated_jpeg() -> None:
    data = _jpeg(Image.effect_noise((64, 48), 40).convert("RGB"))
    with pytest.raises(taco_download.InvalidBody, match="does not decode"):
        taco_download.decode_image(data[: len(data) // 2])


def test_settings_reject_invalid_values() -> None:
    with pytest.raises(ValueError, match="workers"):
        DownloadSettings(workers=0)
    with pytest.raises(ValueError, match="jpeg_quality"):
        DownloadSettings(jpeg_quality=100)


# --- Command line ----------------------------------------------------------------------------


def test_cli_exit_status_reports_missing(server: PhotoServer, sample_photos: Any, tmp_path: Path) -> None:
    serve_catalog(server, sample_photos, [Spec("jpeg"), Spec("rgba-png"), Spec("jpeg", "404")])
    dest = tmp_path / "taco"
    arguments = ["download", str(dest), "--annotations", server.url("/annotations.json"), "--max-attempts", "1"]

    result = CliRunner().invoke(main, arguments)

    assert result.exit_code == 1, result.output
    assert (
        "2 downloaded (1 converted from PNG or other formats), 0 already present, 1 missing, of 3 selected"
        in result.output
    )
    assert "download-report.json" in result.output

    result = CliRunner().invoke(main, [*arguments, "--max-images", "2"])

    assert result.exit_code == 0, result.output
    assert "0 downloaded" in result.output
    assert "2 already present, 0 missing, of 2 selected" in result.output


def test_cli_reads_local_annotations(server: PhotoServer, sample_photos: Any, tmp_path: Path) -> None:
    catalog, _ = serve_catalog(server, sample_photos, [Spec("jpeg"), Spec("la-png")])
    source = tmp_path / "official.json"
    source.write_text(json.dumps(catalog))
    dest = tmp_path / "taco"

    result = CliRunner().invoke(main, ["download", str(dest), "--annotations", str(source), "--batches", "1"])

    assert result.exit_code == 0, result.output
    assert "2 downloaded" in result.output
    assert "/annotations.json" not in {record.path for record in server.log}


def test_cli_rejects_invalid_batches(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["download", str(tmp_path / "taco"), "--annotations", str(tmp_path / "x.json"), "--batches", "1,b"]
    )
    assert result.exit_code == 1
    assert "invalid batch number 'b'" in result.output


def test_cli_reports_missing_annotations_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["download", str(tmp_path / "taco"), "--annotations", str(tmp_path / "missing.json")]
    )
    assert result.exit_code == 1
    assert f"annotations file not found: {tmp_path / 'missing.json'}" in result.output
