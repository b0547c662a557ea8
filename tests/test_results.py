"""Reading results on the real sample: evaluation figures and baselines, predict, and the run report.

Two small runs serve the whole module. The binary task goes through ``raywaste run``
(preprocess, tune 2 trials x 2 epochs, evaluate, report). The crop task has non-default
image settings and an untrained model, since prediction only has to reproduce its inputs.
"""

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import raywaste
from raywaste.cli import main
from raywaste.dataset import load_dataset_info, read_split_table, table_to_arrays
from raywaste.evaluation import EvaluationError, EvaluationSettings, evaluate
from raywaste.metrics import classification_report
from raywaste.prediction import PredictionError, predict
from raywaste.preprocessing import RunOptions
from raywaste.reporting import build_report

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def binary_out(ray_local, taco_sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("binary")
    arguments = ["run", str(taco_sample), str(out), "--task", "binary:Bottle", "--image-size", "32",
                 "--num-samples", "2", "--max-epochs", "2", "--grace-period", "1", "--cpus-per-trial", "1"]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.fixture(scope="module")
def crop_out(ray_local, taco_sample, tmp_path_factory):
    """A supercategory dataset (24 px grayscale, padded squares with 20% margin) and an untrained model."""
    import keras

    from raywaste.model import ModelConfig, make_model

    out = tmp_path_factory.mktemp("crop")
    raywaste.preprocess(taco_sample, out, task="supercategory", size=24, color_mode="grayscale",
                        square="pad", padding=0.2, min_class_examples=8)
    info = load_dataset_info(out / "data")
    keras.utils.set_random_seed(0)
    model = make_model(ModelConfig(conv_blocks=2, filters=4, dense_units=8), info.input_shape, info.num_classes)
    # Built but untrained, so that the saved optimizer state matches what loading expects.
    model.optimizer.build(model.trainable_variables)
    model.save(out / "best_model.keras")
    # The keys that tuning writes into best_model.json.
    metadata = {"task": info.task, "class_names": info.class_names, "image_size": info.image_size,
                "color_mode": info.color_mode, "dataset": info.raw["settings"], "config": {}}
    (out / "best_model.json").write_text(json.dumps(metadata))
    result = evaluate(out, settings=EvaluationSettings(misclassified_examples=6))
    return out, info, result


def png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def split_probabilities(out, split):
    """Return the split's rows and the saved model's probabilities for them."""
    import keras

    from raywaste.model import class_probabilities

    info = load_dataset_info(out / "data")
    table = read_split_table(out / "data", split)
    images, labels = table_to_arrays(table, info.input_shape)
    model = keras.models.load_model(out / "best_model.keras")
    return table, labels, class_probabilities(model, images)


def f1_of_positive(labels, predicted):
    true_positives = int(np.sum((predicted == 1) & (labels == 1)))
    predicted_positives, positives = int(np.sum(predicted == 1)), int(np.sum(labels == 1))
    if true_positives == 0:
        return 0.0
    precision, recall = true_positives / predicted_positives, true_positives / positives
    return 2 * precision * recall / (precision + recall)


# Evaluation


def test_evaluate_rejects_model_of_other_dataset(binary_out, taco_sample, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(binary_out[0], out)
    # The same task preprocessed again with another seed puts other photos in the test split.
    raywaste.preprocess(taco_sample, out, task="binary:Bottle", size=32, seed=1,
                        options=RunOptions(overwrite=True))
    with pytest.raises(EvaluationError, match=r"changed: settings\.seed.*raywaste tune .* --overwrite"):
        evaluate(out)
    page = build_report(out).read_text()
    assert "come from a model tuned on another dataset" in page
    assert "settings.seed" in page


def test_export_default_folder_per_dataset(binary_out, tmp_path):
    from raywaste.export import export_npy

    (tmp_path / "data-32-copy").symlink_to(binary_out[0] / "data", target_is_directory=True)
    result = export_npy(tmp_path, dataset_name="data-32-copy")
    assert result.dest == tmp_path / "npy-32-copy"
    assert (tmp_path / "npy-32-copy" / "train_images.npy").is_file()
    assert not (tmp_path / "npy").exists()


def test_api_evaluate_without_dense_baseline(binary_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(binary_out[0], out)
    result = raywaste.evaluate(out, baseline_epochs=0)
    assert "dense_network" not in result.report["baselines"]
    assert "majority_class" in result.report["baselines"]


def test_threshold_chosen_on_validation(binary_out):
    out, _ = binary_out
    metrics = json.loads((out / "metrics.json").read_text())
    chosen = metrics["chosen_threshold"]
    assert chosen["chosen_on"] == "val"
    _, val_labels, val_probabilities = split_probabilities(out, "val")
    val_scores = val_probabilities[:, 1]
    # The threshold is one of the val scores, and no val score gives a higher F1.
    assert np.isclose(val_scores, chosen["value"], rtol=0, atol=1e-9).any()
    best = max(f1_of_positive(val_labels, (val_scores >= candidate).astype(int)) for candidate in val_scores)
    assert chosen["val_f1"] == pytest.approx(best)
    assert chosen["val_examples"] == len(val_labels) == 10


def test_threshold_applied_to_test(binary_out):
    out, _ = binary_out
    metrics = json.loads((out / "metrics.json").read_text())
    _, labels, probabilities = split_probabilities(out, "test")
    chosen = metrics["chosen_threshold"]
    expected = classification_report(labels, (probabilities[:, 1] >= chosen["value"]).astype(int), metrics["class_names"])
    assert chosen["test"]["confusion_matrix"] == expected["confusion_matrix"]
    assert chosen["test"]["accuracy"] == pytest.approx(expected["accuracy"])
    at_default = classification_report(labels, probabilities.argmax(axis=1), metrics["class_names"])
    assert metrics["accuracy"] == pytest.approx(at_default["accuracy"])
    assert metrics["decision_threshold"] == 0.5


def test_baselines_beside_model(binary_out):
    out, output = binary_out
    metrics = json.loads((out / "metrics.json").read_text())
    _, labels, _ = split_probabilities(out, "test")
    majority = metrics["baselines"]["majority_class"]
    # The sample's train split has more photos without bottles, so the baseline always predicts "no Bottle".
    assert "'no Bottle'" in majority["description"]
    assert majority["accuracy"] == pytest.approx(np.mean(labels == 0))
    assert majority["average_precision"] == pytest.approx(np.mean(labels == 1))
    dense = metrics["baselines"]["dense_network"]
    assert "32x32 grayscale" in dense["description"]
    assert 0.0 <= dense["accuracy"] <= 1.0
    assert "majority class" in output
    assert "dense network" in output


def test_binary_figures(binary_out):
    out, _ = binary_out
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["figures"]) >= {"confusion_matrix", "class_scores", "precision_recall"}
    assert png_size(out / "confusion_matrix.png") == (600, 480)
    assert png_size(out / "class_scores.png") == (900, 110 + 48 * 2)
    assert png_size(out / "precision_recall.png") == (640, 560)
    wrong = metrics["num_examples"] - int(np.trace(np.asarray(metrics["confusion_matrix"])))
    if wrong:
        rows = -(-min(wrong, 16) // 4)
        assert png_size(out / "misclassified.png") == (672, 36 + rows * (160 + 3 * 13 + 8))
    else:
        assert not (out / "misclassified.png").exists()


def test_crop_figures_and_no_threshold(crop_out):
    out, info, result = crop_out
    metrics = result.report
    assert "chosen_threshold" not in metrics
    assert "precision_recall" not in metrics["figures"]
    assert not (out / "precision_recall.png").exists()
    assert info.num_classes == 13
    assert png_size(out / "class_scores.png") == (900, 110 + 48 * 13)
    assert png_size(out / "confusion_matrix.png") == (1122, 1002)
    wrong = metrics["num_examples"] - int(np.trace(np.asarray(metrics["confusion_matrix"])))
    assert wrong >= 6
    assert png_size(out / "misclassified.png") == (672, 36 + 2 * (160 + 3 * 13 + 8))
    assert "dense_network" in metrics["baselines"]


# Prediction


def test_predict_matches_dataset_pixels(binary_out, taco_sample):
    out, _ = binary_out
    table, _, expected = split_probabilities(out, "test")
    paths = [taco_sample / name for name in table.column("file_name").to_pylist()]
    result = predict(out, paths)
    assert result.errors == []
    assert [Path(p.file) for p in result.predictions] == paths
    np.testing.assert_allclose([p.probabilities for p in result.predictions], expected, rtol=0, atol=1e-6)


def test_predict_crops_match_dataset_pixels(crop_out, taco_sample):
    out, _, _ = crop_out
    table, _, expected = split_probabilities(out, "test")
    expected_by_key = {key: row for key, row in zip(zip(table.column("image_id").to_pylist(),
                                                        table.column("annotation_id").to_pylist()), expected)}
    files = sorted(set(table.column("file_name").to_pylist()))
    result = predict(out / "best_model.keras", [taco_sample / name for name in files],
                     annotations=taco_sample / "annotations.json", top_k=2)
    assert result.errors == []
    assert len(result.predictions) == table.num_rows
    for prediction in result.predictions:
        key = (prediction.image_id, prediction.annotation_id)
        np.testing.assert_allclose(prediction.probabilities, expected_by_key[key], rtol=0, atol=1e-6)
        assert len(prediction.top) == 2
        assert prediction.top[0][1] >= prediction.top[1][1]


def test_predict_crop_needs_boxes(crop_out, taco_sample, tmp_path):
    out, info, _ = crop_out
    photo = taco_sample / "batch_1" / "000006.jpg"
    with pytest.raises(PredictionError, match="--whole-image"):
        predict(out, [photo])
    whole = predict(out, [photo], whole_image=True)
    assert len(whole.predictions) == 1
    assert whole.predictions[0].annotation_id is None
    # A copy outside the annotated folder matches nothing; batch_1/000006.jpg matches by its trailing parts.
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "batch_1").mkdir()
    shutil.copy(photo, tmp_path / "elsewhere" / "photo.jpg")
    shutil.copy(photo, tmp_path / "batch_1" / "000006.jpg")
    result = predict(out, [tmp_path / "elsewhere", tmp_path / "batch_1"], annotations=taco_sample / "annotations.json")
    assert len(result.errors) == 1
    assert "is not listed in" in result.errors[0].message
    assert [p.annotation_id for p in result.predictions] == [1]


def test_cli_predict_folder_with_bad_files(binary_out, taco_sample, tmp_path):
    out, _ = binary_out
    shutil.copy(taco_sample / "batch_1" / "000006.jpg", tmp_path / "a.jpg")
    shutil.copy(taco_sample / "batch_2" / "000003.JPG", tmp_path / "b.JPG")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "notes.txt").write_text("not a photo, and not picked from a folder")
    result = CliRunner().invoke(main, ["predict", str(out / "best_model.keras"), str(tmp_path), str(tmp_path / "missing.jpg"),
                                       "--json", "--top-k", "1"])
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    assert [Path(p["file"]).name for p in document["predictions"]] == ["a.jpg", "b.JPG"]
    assert all(len(p["top"]) == 1 for p in document["predictions"])
    assert all(p["label"] in ("Bottle", "no Bottle") for p in document["predictions"])
    errors = {Path(e["file"]).name: e["message"] for e in document["errors"]}
    assert set(errors) == {"broken.jpg", "missing.jpg"}
    assert "cannot be decoded" in errors["broken.jpg"] or "not an image" in errors["broken.jpg"]
    assert "not found" in errors["missing.jpg"]


def test_cli_predict_text_output(binary_out, taco_sample):
    out, _ = binary_out
    result = CliRunner().invoke(main, ["predict", str(out), str(taco_sample / "batch_1" / "000006.jpg")])
    assert result.exit_code == 0, result.output
    line = result.stdout.strip()
    assert line.startswith(str(taco_sample / "batch_1" / "000006.jpg") + ": ")
    assert "Bottle" in line
    assert "no Bottle" in line


def test_predict_threshold_sets_binary_label(binary_out, taco_sample):
    out, _ = binary_out
    photos = [taco_sample / "batch_1"]
    chosen = json.loads((out / "metrics.json").read_text())["chosen_threshold"]["value"]
    for threshold, expected in ((None, 0.5), ("chosen", chosen), (0.01, 0.01), ("0.99", 0.99)):
        result = predict(out, photos, threshold=threshold)
        assert result.threshold == pytest.approx(expected)
        for prediction in result.predictions:
            assert prediction.label == ("Bottle" if prediction.probabilities[1] >= expected else "no Bottle")
    with pytest.raises(PredictionError, match="invalid threshold 'high'"):
        predict(out, photos, threshold="high")
    with pytest.raises(PredictionError, match="invalid threshold 1.5"):
        predict(out, photos, threshold=1.5)


def test_predict_threshold_needs_binary_task(crop_out, taco_sample):
    out, _, _ = crop_out
    with pytest.raises(PredictionError, match="binary tasks only"):
        predict(out, [taco_sample / "batch_1"], whole_image=True, threshold=0.5)


def test_predict_needs_metadata(binary_out, tmp_path):
    out, _ = binary_out
    shutil.copy(out / "best_model.keras", tmp_path / "model.keras")
    result = CliRunner().invoke(main, ["predict", str(tmp_path / "model.keras"), str(tmp_path)])
    assert result.exit_code == 1
    assert f"model metadata not found: {tmp_path / 'model.json'}" in result.output


# Report


class References(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources = []

    def handle_starttag(self, tag, attributes):
        for name, value in attributes:
            if name in ("src", "href") and value and not value.startswith("#"):
                self.sources.append(value)


def references(path):
    parser = References()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser.sources


def test_run_writes_report(binary_out):
    out, output = binary_out
    report = out / "report.html"
    assert f"report written to {report}" in output
    text = report.read_text(encoding="utf-8")
    for heading in ("Dataset", "Splits", "Tuning", "Test evaluation"):
        assert f">{heading}</h2>" in text
    assert "Not available" not in text
    sources = references(report)
    for expected in ("confusion_matrix.png", "class_scores.png", "precision_recall.png", "report/split_counts.png",
                     "report/samples.png"):
        assert expected in sources
    for source in sources:
        assert not Path(source).is_absolute()
        assert (out / source).is_file(), source


def test_report_shows_tuning_plots(binary_out, tmp_path):
    out, _ = binary_out
    plot = out / "tune" / "trial_curves.png"
    Image.new("RGB", (40, 30), "white").save(plot)
    try:
        result = CliRunner().invoke(main, ["report", str(out)])
        assert result.exit_code == 0, result.output
        assert "tune/trial_curves.png" in references(out / "report.html")
    finally:
        plot.unlink()
    assert png_size(out / "report" / "split_counts.png") == (900, 110 + 22 * 2)
    assert png_size(out / "report" / "supercategories.png") == (900, 110 + 22 * 28)
    assert png_size(out / "report" / "box_sizes.png") == (800, 450)
    assert png_size(out / "report" / "samples.png") == (984, 36 + 2 * (320 + 2 * 13 + 8))


def test_report_before_tuning(crop_out):
    out, _, _ = crop_out
    report = build_report(out)
    text = report.read_text(encoding="utf-8")
    assert "Not available: no tune/results.csv" in text
    assert f"raywaste tune {out.resolve()}" in text
    for source in references(report):
        assert (out / source).is_file(), source
