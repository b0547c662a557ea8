"""End to end on the real TACO sample: preprocess, tune and evaluate on the session's Ray."""

import json
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import raywaste
from raywaste.annotations import load_annotations
from raywaste.cli import main
from raywaste.dataset import load_dataset_info, read_split_table

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def binary_run(ray_local, taco_sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("binary")
    prepared = raywaste.preprocess(taco_sample, out, task="binary:Bottle", size=32)
    tuned = raywaste.tune(out, num_samples=2, max_epochs=2, grace_period=1)
    evaluated = raywaste.evaluate(out)
    return out, prepared, tuned, evaluated


def bottle_labels(taco):
    bottle = {c.id for c in taco.categories.values() if c.supercategory == "Bottle"}
    return {image_id: int(any(a.category_id in bottle for a in taco.annotations_of(image_id))) for image_id in taco.images}


def test_binary_rows_match_annotations(binary_run, taco_sample):
    out, prepared, _, _ = binary_run
    taco = load_annotations(taco_sample / "annotations.json")
    expected = bottle_labels(taco)
    seen = {}
    for split in ("train", "val", "test"):
        table = read_split_table(out / "data", split)
        for image_id, label, label_name in zip(*(table.column(c).to_pylist() for c in ("image_id", "label", "label_name"))):
            assert image_id not in seen, f"image {image_id} in {seen.get(image_id)} and {split}"
            seen[image_id] = split
            assert label == expected[image_id]
            assert label_name == ["no Bottle", "Bottle"][label]
    assert len(seen) == len(taco.images) == 102
    assert prepared.error_count == 0
    assert sum(prepared.info.counts.values()) == 102


def test_dataset_json_describes_the_data(binary_run):
    out, _, _, _ = binary_run
    info = json.loads((out / "data" / "dataset.json").read_text())
    assert info["class_names"] == ["no Bottle", "Bottle"]
    assert info["image_size"] == 32
    assert info["color_mode"] == "rgb"
    assert info["task"] == "binary:Bottle"
    assert info["split_fractions"] == {"train": 0.8, "val": 0.1, "test": 0.1}
    assert info["seed"] == 0
    assert info["counts"]["train"]["total"] == 82
    assert (out / "data" / "split_summary.csv").read_text().startswith("class,train,val,test")
    assert (out / "data" / "errors.jsonl").read_text() == ""


def test_parquet_readable_without_ray(binary_run, taco_sample):
    out, _, _, _ = binary_run
    first = sorted((out / "data" / "train").glob("*.parquet"))[0]
    row = pq.read_table(first).slice(0, 1).to_pylist()[0]
    image = np.frombuffer(row["image"], dtype=np.uint8).reshape(32, 32, 3)
    assert image.std() > 1
    assert row["file_name"].startswith("batch_")
    assert row["annotation_id"] is None
    assert row["bbox"] is None


def test_same_seed_same_dataset(binary_run, taco_sample, tmp_path):
    out, _, _, _ = binary_run
    raywaste.preprocess(taco_sample, tmp_path, task="binary:Bottle", size=32)
    for split in ("train", "val", "test"):
        first = read_split_table(out / "data", split, columns=["image_id", "image"])
        second = read_split_table(tmp_path / "data", split, columns=["image_id", "image"])
        assert first.equals(second), split


def test_rerun_reuses_and_other_settings_refused(binary_run, taco_sample):
    out, _, _, _ = binary_run
    again = raywaste.preprocess(taco_sample, out, task="binary:Bottle", size=32)
    assert again.reused
    with pytest.raises(raywaste.preprocessing.PreprocessError, match="--overwrite"):
        raywaste.preprocess(taco_sample, out, task="binary:Bottle", size=48)


def test_tuning_results(binary_run):
    out, _, tuned, _ = binary_run
    assert tuned.metric == "val_average_precision"
    assert len(tuned.trials) == 2
    assert 0.0 <= tuned.best_metric <= 1.0
    assert (out / "tune" / "results.csv").read_text().count("\n") == 3
    model_info = json.loads((out / "best_model.json").read_text())
    assert model_info["class_names"] == ["no Bottle", "Bottle"]
    assert model_info["image_size"] == 32


def test_metrics_come_from_test_rows(binary_run):
    out, _, _, evaluated = binary_run
    report = json.loads((out / "metrics.json").read_text())
    test_ids = sorted(read_split_table(out / "data", "test", columns=["image_id"]).column("image_id").to_pylist())
    assert report["image_ids"] == test_ids
    assert report["num_examples"] == len(test_ids) == 10
    for key in ("accuracy", "macro_f1", "average_precision"):
        assert 0.0 <= report[key] <= 1.0
    for scores in report["per_class"].values():
        assert 0.0 <= scores["precision"] <= 1.0
        assert 0.0 <= scores["recall"] <= 1.0
    assert np.asarray(report["confusion_matrix"]).sum() == 10
    assert evaluated.confusion_png.stat().st_size > 1000


def test_best_model_loads_and_predicts(binary_run):
    import keras

    out, _, _, _ = binary_run
    model = keras.models.load_model(out / "best_model.keras")
    images = np.zeros((3, 32, 32, 3), dtype=np.uint8)
    predictions = model.predict(images, verbose=0)
    assert predictions.shape == (3, 1)
    assert np.all((predictions >= 0) & (predictions <= 1))


def test_supercategory_crops_match_annotations(ray_local, taco_sample, tmp_path):
    result = raywaste.preprocess(taco_sample, tmp_path, task="supercategory", size=24, color_mode="grayscale")
    taco = load_annotations(taco_sample / "annotations.json")
    expected = {(a.image_id, a.id): taco.categories[a.category_id].supercategory for a in taco.annotations}
    info = load_dataset_info(tmp_path / "data")
    rows = Counter()
    for split in ("train", "val", "test"):
        table = read_split_table(tmp_path / "data", split)
        for row in table.select(["image_id", "annotation_id", "label", "label_name", "image"]).to_pylist():
            key = (row["image_id"], row["annotation_id"])
            rows[key] += 1
            assert row["label_name"] == expected[key]
            assert info.class_names[row["label"]] == row["label_name"]
            assert len(row["image"]) == 24 * 24
    assert sum(rows.values()) == len(expected) == 397
    assert max(rows.values()) == 1
    assert result.info.input_shape == (24, 24, 1)


def test_cli_preprocess_and_errors(ray_local, taco_sample, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["preprocess", str(taco_sample), str(tmp_path), "--task", "binary:Nonexistent"])
    assert result.exit_code == 1
    assert "unknown supercategory 'Nonexistent'" in result.output
    result = runner.invoke(main, ["preprocess", str(taco_sample), str(tmp_path), "--split", "0.5,0.5"])
    assert result.exit_code == 2
    assert "expected three numbers" in result.output
    result = runner.invoke(main, ["evaluate", str(tmp_path)])
    assert result.exit_code == 1
    assert "run 'raywaste tune' first" in result.output
