"""Preprocessing on a TACO folder that mixes real sample photos with every kind of bad file."""

import hashlib
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

from contextlib import contextmanager

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import raywaste
import raywaste.api
import raywaste.runtime
from raywaste.cli import main
from raywaste.dataset import load_dataset_info, read_split_table
from raywaste.export import export_npy
from raywaste.images import ImageSettings, read_examples
from raywaste.preprocessing import PreprocessError, PreprocessSettings, RunOptions
from raywaste.tasks import TaskError

pytestmark = pytest.mark.slow

GOOD_PHOTOS = ["batch_1/000004.jpg", "batch_1/000006.jpg", "batch_1/000007.jpg", "batch_1/000008.jpg",
               "batch_1/000021.jpg", "batch_1/000035.jpg", "batch_1/000054.jpg", "batch_1/000058.jpg"]
# file_name -> the reason its examples must be recorded with
BAD_PHOTOS = {
    "batch_9/missing.jpg": "missing_file",
    "batch_9/empty.jpg": "empty_file",
    "batch_9/truncated.jpg": "corrupt_image",
    "batch_9/notes.jpg": "not_an_image",
    "batch_9/bomb.png": "decompression_bomb",
    "../outside.jpg": "outside_root",
}


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that claims ``width`` x ``height`` pixels but contains almost no data: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def mixed_taco(root: Path, taco_sample: Path) -> Path:
    """Write a TACO folder under ``root``: eight real photos, then one photo of each bad kind."""
    sample = json.loads((taco_sample / "annotations.json").read_text())
    images = {image["file_name"]: image for image in sample["images"]}
    keep = [images[name] for name in GOOD_PHOTOS]
    keep_ids = {image["id"] for image in keep}
    annotations = [a for a in sample["annotations"] if a["image_id"] in keep_ids]

    for name in GOOD_PHOTOS:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(taco_sample / name, root / name)
    bad_dir = root / "batch_9"
    bad_dir.mkdir()
    (bad_dir / "empty.jpg").write_bytes(b"")
    real = (taco_sample / GOOD_PHOTOS[1]).read_bytes()
    (bad_dir / "truncated.jpg").write_bytes(real[: len(real) // 3])
    (bad_dir / "notes.jpg").write_text("photo list, not a photo\n")
    png_header_only(bad_dir / "bomb.png", 20_000, 20_000)
    shutil.copyfile(taco_sample / GOOD_PHOTOS[1], root.parent / "outside.jpg")

    template = keep[1]  # 1537x2049, one annotation
    template_annotation = next(a for a in annotations if a["image_id"] == template["id"])
    next_id = max(a["id"] for a in sample["annotations"]) + 1
    for offset, name in enumerate(BAD_PHOTOS):
        image_id = 10_000 + offset
        keep.append({**template, "id": image_id, "file_name": name})
        annotations.append({**template_annotation, "id": next_id + offset, "image_id": image_id})
    bomb = next(image for image in keep if image["file_name"] == "batch_9/bomb.png")
    bomb.update(width=20_000, height=20_000)

    (root / "annotations.json").write_text(json.dumps({**sample, "images": keep, "annotations": annotations}))
    return root


@pytest.fixture(scope="module")
def mixed_run(ray_local, taco_sample, tmp_path_factory):
    base = tmp_path_factory.mktemp("mixed")
    taco = base / "taco"
    taco.mkdir()
    mixed_taco(taco, taco_sample)
    out = base / "out"
    runner = CliRunner()
    args = ["preprocess", str(taco), str(out), "--task", "supercategory", "--image-size", "24",
            "--split", "0.5,0.25,0.25", "--photos-per-task", "3"]
    result = runner.invoke(main, [*args, "--max-error-fraction", "0.9"])
    return taco, out, args, result


def test_bad_files_recorded_and_skipped(mixed_run):
    taco, out, _, result = mixed_run
    assert result.exit_code == 0, result.output
    errors = [json.loads(line) for line in (out / "data" / "errors.jsonl").read_text().splitlines()]
    reasons = {error["file_name"]: error["reason"] for error in errors}
    assert reasons == BAD_PHOTOS
    for error in errors:
        assert error["file_name"].split("/")[-1] in error["message"]
    assert "6 of" in result.output
    for reason in BAD_PHOTOS.values():
        assert reason in result.output


def test_good_photos_all_present(mixed_run, taco_sample):
    taco, out, _, _ = mixed_run
    annotations = json.loads((taco / "annotations.json").read_text())
    good_ids = {image["id"] for image in annotations["images"] if image["file_name"] in GOOD_PHOTOS}
    expected = sorted((a["image_id"], a["id"]) for a in annotations["annotations"] if a["image_id"] in good_ids)
    rows = []
    for split in ("train", "val", "test"):
        table = read_split_table(out / "data", split, columns=["image_id", "annotation_id"])
        rows += list(zip(table.column("image_id").to_pylist(), table.column("annotation_id").to_pylist()))
    assert sorted(rows) == expected
    info = load_dataset_info(out / "data")
    assert info.raw["errors"]["failed"] == len(BAD_PHOTOS)


def test_rows_rebuild_with_plain_pyarrow(mixed_run):
    # Readable without Ray: each row's bytes are the crop that read_examples cuts from the photo.
    taco, out, _, _ = mixed_run
    annotations = json.loads((taco / "annotations.json").read_text())
    settings = ImageSettings(size=24)
    # All crops of a photo come from one decode, at the scale its smallest crop allows.
    expected = {}
    for photo in annotations["images"]:
        boxes = sorted((a["id"], tuple(a["bbox"])) for a in annotations["annotations"] if a["image_id"] == photo["id"])
        arrays, _ = read_examples(taco, photo["file_name"], (photo["width"], photo["height"]), [box for _, box in boxes], settings)
        expected.update({annotation_id: array for (annotation_id, _), array in zip(boxes, arrays)})
    checked = 0
    for path in sorted((out / "data").glob("*/part-*.parquet")):
        for row in pq.read_table(path).to_pylist():
            image = np.frombuffer(row["image"], dtype=np.uint8).reshape(24, 24, 3)
            np.testing.assert_array_equal(image, expected[row["annotation_id"]])
            checked += 1
    assert checked == sum(load_dataset_info(out / "data").counts.values())


def test_tasks_log_covers_every_photo(mixed_run):
    _, out, _, _ = mixed_run
    tasks = [json.loads(line) for line in (out / "data" / "tasks.jsonl").read_text().splitlines()]
    assert sum(task["photos"] for task in tasks) == len(GOOD_PHOTOS) + len(BAD_PHOTOS)
    assert all(task["photos"] <= 3 for task in tasks)
    assert all(task["node_id"] for task in tasks)


def test_too_many_errors_exit_nonzero(mixed_run, tmp_path):
    taco, _, args, _ = mixed_run
    args = [args[0], str(taco), str(tmp_path / "out"), *args[3:]]
    result = CliRunner().invoke(main, [*args, "--max-error-fraction", "0.1"])
    assert result.exit_code == 1
    assert "more than the allowed 10.0%" in result.output
    assert not (tmp_path / "out" / "data").exists()
    kept = list((tmp_path / "out").glob("data-failed-*"))
    assert len(kept) == 1
    assert (kept[0] / "errors.jsonl").read_text().count("\n") == len(BAD_PHOTOS)


def test_rerun_says_up_to_date(mixed_run):
    taco, out, args, _ = mixed_run
    manifest = (out / "data" / "manifest.json").read_text()
    result = CliRunner().invoke(main, [*args, "--max-error-fraction", "0.9"])
    assert result.exit_code == 0, result.output
    assert "up to date" in result.output
    assert (out / "data" / "manifest.json").read_text() == manifest

    changed = CliRunner().invoke(main, [*args, "--max-error-fraction", "0.9", "--padding", "0.2"])
    assert changed.exit_code == 1
    assert "changed: image" in changed.output
    assert "--overwrite" in changed.output
    assert (out / "data" / "manifest.json").read_text() == manifest


def test_manifest_without_class_map_checksum_reused(mixed_run, tmp_path):
    # Datasets made before class maps were checksummed stay reusable for other tasks.
    taco, out, args, _ = mixed_run
    target = tmp_path / "out"
    shutil.copytree(out, target)
    manifest = json.loads((target / "data" / "manifest.json").read_text())
    assert manifest.pop("class_map_sha256") is None
    (target / "data" / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, [args[0], str(taco), str(target), *args[3:], "--max-error-fraction", "0.9"])
    assert result.exit_code == 0, result.output
    assert "up to date" in result.output


@pytest.mark.parametrize("task, message", [
    ("supercat", "unknown task 'supercat'; use binary:<supercategory>"),
    ("map:", "task 'map' needs a CSV file"),
    ("map:/nonexistent/nope.csv", "cannot read class map /nonexistent/nope.csv"),
    ("binary:Bottel", "unknown supercategory 'Bottel'"),
])
def test_mistyped_task_not_reported_as_change(mixed_run, task, message):
    taco, out, args, _ = mixed_run
    manifest = (out / "data" / "manifest.json").read_text()
    result = CliRunner().invoke(main, [*args[:4], task, *args[5:], "--max-error-fraction", "0.9"])
    assert result.exit_code == 1
    assert message in result.output
    assert "changed:" not in result.output
    assert "--overwrite" not in result.output
    assert (out / "data" / "manifest.json").read_text() == manifest


def test_edited_class_map_not_reused(mixed_run, taco_maps, tmp_path, monkeypatch):
    taco, _, _, _ = mixed_run
    class_map = tmp_path / "maps" / "x.csv"
    class_map.parent.mkdir()
    official = (taco_maps / "map_10.csv").read_text()
    class_map.write_text(official)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    args = ["preprocess", str(taco), str(out), "--task", "map:maps/x.csv", "--image-size", "24",
            "--split", "0.5,0.25,0.25", "--max-error-fraction", "0.9"]

    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["settings"]["task"] == f"map:{class_map.resolve()}"
    assert manifest["class_map_sha256"] == hashlib.sha256(class_map.read_bytes()).hexdigest()
    assert "Glass" not in load_dataset_info(out / "data").class_names

    # The same map named by its absolute path is the same task.
    same = CliRunner().invoke(main, [*args[:4], f"map:{class_map.resolve()}", *args[5:]])
    assert same.exit_code == 0, same.output
    assert "up to date" in same.output

    class_map.write_text(official.replace("Glass bottle,Bottle", "Glass bottle,Glass"))
    edited = CliRunner().invoke(main, args)
    assert edited.exit_code == 1
    assert f"(changed: class map {class_map.resolve()}); pass --overwrite" in edited.output
    assert json.loads((out / "data" / "manifest.json").read_text()) == manifest

    rebuilt = CliRunner().invoke(main, [*args, "--overwrite"])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert "Glass" in load_dataset_info(out / "data").class_names
    labels = []
    for split in ("train", "val", "test"):
        labels += read_split_table(out / "data", split, columns=["label_name"]).column("label_name").to_pylist()
    assert labels.count("Glass") == 2  # the two glass bottles on the good photos


def test_manifest_checksums_match_files(mixed_run):
    import hashlib

    _, out, _, _ = mixed_run
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    on_disk = sorted(str(path.relative_to(out / "data")) for path in (out / "data").rglob("*") if path.is_file())
    assert sorted([*manifest["files"], "manifest.json"]) == on_disk
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((out / "data" / name).read_bytes()).hexdigest() == digest, name
    assert manifest["annotations_sha256"]
    assert manifest["settings"]["image"]["size"] == 24


def test_export_npy_streams_all_splits(mixed_run, tmp_path):
    from raywaste.dataset import load_split_arrays

    _, out, _, _ = mixed_run
    result = export_npy(out, tmp_path / "u8", batch_rows=2)
    floats = export_npy(out, tmp_path / "f32", dtype="float32", batch_rows=5)
    info = load_dataset_info(out / "data")
    for split in ("train", "val", "test"):
        images, labels = load_split_arrays(out / "data", split)
        exported = np.load(tmp_path / "u8" / f"{split}_images.npy")
        assert exported.dtype == np.uint8
        np.testing.assert_array_equal(exported, images)
        np.testing.assert_array_equal(np.load(tmp_path / "u8" / f"{split}_labels.npy"), labels)
        scaled = np.load(tmp_path / "f32" / f"{split}_images.npy")
        assert scaled.dtype == np.float32
        assert scaled.shape == (info.counts[split], 24, 24, 3)
        np.testing.assert_allclose(scaled, images / 255.0, rtol=0, atol=1e-7)
        assert result.counts[split] == floats.counts[split] == info.counts[split]
    assert json.loads((tmp_path / "u8" / "class_names.json").read_text()) == info.class_names
    assert not list((tmp_path / "u8").glob("*.tmp"))


def test_export_npy_cli(mixed_run, tmp_path):
    _, out, _, _ = mixed_run
    result = CliRunner().invoke(main, ["export-npy", str(out), "--dest", str(tmp_path), "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "train_images.npy").max() <= 1.0
    missing = CliRunner().invoke(main, ["export-npy", str(tmp_path)])
    assert missing.exit_code == 1
    assert "run 'raywaste preprocess' first" in missing.output


# --- Same bytes whatever the task size, and atomic output -------------------------------


def test_photos_per_task_gives_same_bytes(mixed_run, tmp_path):
    taco, out, _, _ = mixed_run
    for photos_per_task in (1, 14):
        target = tmp_path / f"ppt-{photos_per_task}"
        raywaste.preprocess(taco, target, task="supercategory", size=24, fractions="0.5,0.25,0.25",
                            options=RunOptions(photos_per_task=photos_per_task, max_error_fraction=0.9))
        for split in ("train", "val", "test"):
            first = read_split_table(out / "data", split, columns=["image_id", "annotation_id", "image"])
            second = read_split_table(target / "data", split, columns=["image_id", "annotation_id", "image"])
            assert first.equals(second), (photos_per_task, split)
        assert (target / "data" / "errors.jsonl").read_text() == (out / "data" / "errors.jsonl").read_text()


KILLED_RUN = """
import os, signal, sys
import raywaste.preprocessing as preprocessing

def killed(groups, taco_dir, image_settings, staging):
    (staging / "_staged").mkdir()
    (staging / "_staged" / "half.parquet").write_bytes(b"PAR1 half a file")
    os.kill(os.getpid(), signal.SIGKILL)

preprocessing._run_ray_pipeline = killed
preprocessing.preprocess(sys.argv[1], sys.argv[2], preprocessing.settings_with(
    preprocessing.PreprocessSettings(), task="supercategory", size=24),
    options=preprocessing.RunOptions(overwrite=True, max_error_fraction=0.9))
"""


def test_killed_run_leaves_old_dataset(mixed_run, tmp_path):
    taco, out, _, _ = mixed_run
    target = tmp_path / "out"
    shutil.copytree(out, target)
    before = (target / "data" / "manifest.json").read_text()

    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(taco), str(target)], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert (target / "data" / "manifest.json").read_text() == before
    leftovers = list(target.glob(".data-staging-*"))
    assert len(leftovers) == 1
    assert (leftovers[0] / "_staged" / "half.parquet").is_file()

    # A later run removes the dead run's folder, keeps a live one's, and builds the dataset.
    live = target / ".data-staging-live"
    live.mkdir()
    (live / ".owner.json").write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid()}))
    (target / ".data-staging-starting").mkdir()  # no owner file yet, but just created
    (target / ".data-old-12345678").mkdir()
    raywaste.preprocess(taco, target, task="supercategory", size=24, fractions="0.5,0.25,0.25",
                        options=RunOptions(overwrite=True, max_error_fraction=0.9))
    assert not leftovers[0].exists()
    assert not (target / ".data-old-12345678").exists()
    assert live.is_dir()
    assert sorted(path.name for path in target.iterdir()) == [".data-staging-live", ".data-staging-starting", "data"]
    assert read_split_table(target / "data", "train").equals(read_split_table(out / "data", "train"))


def test_failed_pipeline_leaves_nothing(mixed_run, tmp_path, monkeypatch):
    import raywaste.preprocessing as preprocessing

    taco, _, _, _ = mixed_run

    def failing(groups, taco_dir, image_settings, staging):
        (staging / "_staged").mkdir()
        raise RuntimeError("worker node lost")

    monkeypatch.setattr(preprocessing, "_run_ray_pipeline", failing)
    with pytest.raises(RuntimeError, match="worker node lost"):
        raywaste.preprocess(taco, tmp_path, task="supercategory", size=24)
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_without_manifest_refused(mixed_run, tmp_path):
    taco, _, _, _ = mixed_run
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("mine")
    with pytest.raises(PreprocessError, match="has no manifest.json"):
        raywaste.preprocess(taco, tmp_path, task="supercategory", size=24)
    assert (tmp_path / "data" / "notes.txt").read_text() == "mine"


# --- Checks before Ray starts ------------------------------------------------------------


@pytest.fixture
def ray_not_started(monkeypatch):
    """Fail a test whose stage opens a Ray session before the inputs are checked."""

    @contextmanager
    def opened_too_early(*args, **kwargs):
        raise AssertionError("a Ray session was opened before the task was checked")
        yield

    monkeypatch.setattr(raywaste.api, "ray_session", opened_too_early)
    monkeypatch.setattr(raywaste.runtime, "ray_session", opened_too_early)


@pytest.mark.parametrize("task, message", [
    ("supercat", "unknown task 'supercat'"),
    ("map:", "task 'map' needs a CSV file"),
    ("map:/nonexistent/nope.csv", "cannot read class map /nonexistent/nope.csv"),
    ("binary:Bottel", "unknown supercategory 'Bottel'"),
])
def test_api_checks_task_before_ray(ray_not_started, taco_sample, tmp_path, task, message):
    with pytest.raises(TaskError, match=message):
        raywaste.preprocess(taco_sample, tmp_path, task=task)
    with pytest.raises(TaskError, match=message):
        raywaste.run(taco_sample, tmp_path, PreprocessSettings(task=task))
    assert list(tmp_path.iterdir()) == []


def test_api_checks_class_map_before_ray(ray_not_started, taco_sample, tmp_path):
    utf16 = tmp_path / "utf16.csv"
    utf16.write_bytes(bytes.fromhex("fffe00626164"))
    with pytest.raises(TaskError, match="not UTF-8 text"):
        raywaste.preprocess(taco_sample, tmp_path / "out", task=f"map:{utf16}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("task, message", [
    ("supercat", "Error: unknown task 'supercat'; use binary:<supercategory>"),
    ("map:", "Error: task 'map' needs a CSV file"),
])
def test_cli_rejects_task_syntax_before_ray(ray_not_started, taco_sample, tmp_path, task, message):
    for command in ("preprocess", "run"):
        result = CliRunner().invoke(main, [command, str(taco_sample), str(tmp_path), "--task", task])
        assert result.exit_code == 1, result.output
        assert message in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output


def test_checked_inputs_must_match(taco_sample, tmp_path):
    from raywaste.preprocessing import check_inputs, preprocess

    inputs = check_inputs(taco_sample, PreprocessSettings(task="supercategory"))
    assert inputs.fingerprint["class_map_sha256"] is None
    assert len(inputs.task.examples) == 397
    with pytest.raises(ValueError, match="belong to another TACO folder, annotations file or settings"):
        preprocess(taco_sample, tmp_path, PreprocessSettings(task="category"), inputs=inputs)
    with pytest.raises(ValueError, match="belong to another TACO folder"):
        preprocess(tmp_path, tmp_path, PreprocessSettings(task="supercategory"), inputs=inputs)
    assert list(tmp_path.iterdir()) == []


def test_failed_photos_logged_once_each(caplog, tmp_path):
    from raywaste.preprocessing import FAILED_PHOTOS_LOGGED, _log_failed_photos

    # Two crops of one photo fail once in the log; photos beyond the limit are counted.
    failed = [{"file_name": "batch_1/000001.jpg", "reason": "corrupt_image", "message": "cannot be decoded"}] * 2
    failed += [{"file_name": f"batch_2/{n:06d}.jpg", "reason": "missing_file", "message": "not found"}
               for n in range(FAILED_PHOTOS_LOGGED + 3)]
    with caplog.at_level(logging.WARNING, logger="raywaste.preprocessing"):
        _log_failed_photos(failed, tmp_path / "errors.jsonl")
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == FAILED_PHOTOS_LOGGED + 1
    assert messages[0] == "failed batch_1/000001.jpg (corrupt_image): cannot be decoded"
    assert messages[-1] == f"... and 4 more failed photo(s), all listed in {tmp_path / 'errors.jsonl'}"


def test_missing_classes_warned(caplog):
    from raywaste.preprocessing import _warn_missing_classes
    from raywaste.tasks import TaskExamples

    def counts(train, val):
        return {"train": {"per_class": train}, "val": {"per_class": val}, "test": {"per_class": {}}}

    binary = TaskExamples(task="binary:Bottle", class_names=["no Bottle", "Bottle"], examples=[], is_crop_task=False)
    crops = TaskExamples(task="supercategory", class_names=["Bottle", "Can", "Lid"], examples=[], is_crop_task=True)
    with caplog.at_level(logging.WARNING, logger="raywaste.preprocessing"):
        _warn_missing_classes(counts({"no Bottle": 80, "Bottle": 20}, {"no Bottle": 10, "Bottle": 0}), binary)
        _warn_missing_classes(counts({"Bottle": 5, "Can": 0, "Lid": 3}, {"Bottle": 1, "Can": 0, "Lid": 0}), crops)
        _warn_missing_classes(counts({"no Bottle": 80, "Bottle": 20}, {"no Bottle": 10, "Bottle": 2}), binary)
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 3
    assert messages[0].startswith("the val split has no 'Bottle' example")
    assert messages[1].startswith("1 class(es) have no train example and cannot be learned: Can;")
    assert messages[2] == "1 class(es) have no val example, so tuning cannot measure them: Lid"


def test_settings_names_unknown_keyword():
    from raywaste.preprocessing import settings_with

    assert settings_with(PreprocessSettings(), image_size=32).image.size == 32
    with pytest.raises(TypeError, match="unknown setting.s. num_sample; expected some of .*min_class_examples"):
        settings_with(PreprocessSettings(), num_sample=3)
