"""One Tune trial: train the CNN epoch by epoch, score it on the validation split, report.

:func:`train_trial` runs inside a Ray Tune trial. It takes its arrays from the object
store (through ``tune.with_parameters``), never from a closure, limits TensorFlow to the
CPUs Ray gave the trial, and after every epoch reports the validation metrics with
``ray.tune.report``. When the tuning metric improves it also reports a checkpoint with
``model.keras`` (weights and optimizer state) and the epoch, so a restored trial continues
where it left off.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raywaste.metrics import average_precision, macro_f1

log = logging.getLogger(__name__)

CHECKPOINT_MODEL = "model.keras"
CHECKPOINT_STATE = "state.json"


@dataclass
class TrialData:
    """Arrays and metadata every trial needs; shipped once through the object store."""

    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    class_names: list[str]
    is_binary: bool

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def tuning_metric(is_binary: bool) -> str:
    """Return the validation metric that ranks trials: average precision for binary tasks, else macro F1."""
    return "val_average_precision" if is_binary else "val_macro_f1"


def configure_tensorflow(cpus: float | None) -> None:
    """Limit TensorFlow's thread pools to ``cpus`` and turn on GPU memory growth.

    Must run before TensorFlow executes its first operation in this process.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import tensorflow as tf

    threads = max(1, int(cpus)) if cpus else None
    try:
        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(min(threads, 2))
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError as error:
        # TensorFlow was initialized earlier in this process; its settings stay as they are.
        log.debug("TensorFlow settings unchanged: %s", error)


def validation_metrics(probabilities: np.ndarray, labels: np.ndarray, is_binary: bool) -> dict[str, float]:
    """Score ``(n, classes)`` probabilities against true labels."""
    predicted = probabilities.argmax(axis=1)
    clipped = np.clip(probabilities[np.arange(len(labels)), labels], 1e-7, 1.0)
    metrics = {
        "val_loss": float(-np.log(clipped).mean()) if len(labels) else 0.0,
        "val_accuracy": float((predicted == labels).mean()) if len(labels) else 0.0,
        "val_macro_f1": macro_f1(labels, predicted, probabilities.shape[1]),
    }
    if is_binary:
        metrics["val_average_precision"] = average_precision(labels == 1, probabilities[:, 1])
    return metrics


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """Weight each class by ``n / (classes present * count)``, so every present class weighs the same in the loss."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = len(labels) / (present.sum() * counts[present])
    return {index: float(weight) for index, weight in enumerate(weights)}


def train_trial(config: dict[str, Any], data: TrialData) -> None:
    """Train one trial as a Ray Tune function trainable.

    ``config`` contains the model keys plus ``batch_size``, ``max_epochs``,
    ``class_weight`` ("balanced" or "none") and ``seed``.
    """
    import ray
    from ray import tune

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    configure_tensorflow(cpus)
    import keras

    from raywaste.model import ModelConfig, class_probabilities, make_model

    keras.utils.set_random_seed(int(config.get("seed", 0)))
    metric = tuning_metric(data.is_binary)
    max_epochs = int(config["max_epochs"])
    batch_size = int(config.get("batch_size", 32))
    class_weight = (
        balanced_class_weights(data.train_labels, data.num_classes) if config.get("class_weight", "balanced") == "balanced" else None
    )
    targets = data.train_labels.astype(np.float32) if data.num_classes == 2 else data.train_labels

    start_epoch, best = 0, float("-inf")
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            model = keras.models.load_model(Path(directory) / CHECKPOINT_MODEL)
            state = json.loads((Path(directory) / CHECKPOINT_STATE).read_text())
        start_epoch, best = int(state["epoch"]), float(state["best"])
    else:
        model = make_model(ModelConfig.from_config(config), data.input_shape, data.num_classes)

    for epoch in range(start_epoch, max_epochs):
        history = model.fit(
            data.train_images, targets, batch_size=batch_size, epochs=epoch + 1, initial_epoch=epoch,
            shuffle=True, class_weight=class_weight, verbose=0,
        )
        probabilities = class_probabilities(model, data.val_images)
        metrics = validation_metrics(probabilities, data.val_labels, data.is_binary)
        metrics["train_loss"] = float(history.history["loss"][-1])
        metrics["epoch"] = epoch + 1

        if metrics[metric] > best:
            best = max(best, metrics[metric])
            with tempfile.TemporaryDirectory() as directory:
                model.save(Path(directory) / CHECKPOINT_MODEL)
                (Path(directory) / CHECKPOINT_STATE).write_text(json.dumps({"epoch": epoch + 1, "best": best}))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))
        else:
            tune.report(metrics)
