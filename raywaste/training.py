"""One Tune trial: train the classifier epoch by epoch, score it on the validation split, report.

:func:`train_trial` runs inside a Ray Tune trial. It takes its arrays from the object
store (through ``tune.with_parameters``), never from a closure, and limits TensorFlow to
the CPUs Ray gave the trial. After every epoch it reports the validation metrics with
``ray.tune.report`` and writes them as TensorBoard scalars. Every ``checkpoint_every``
epochs, and at the last epoch, the report carries a checkpoint: ``model.keras`` (weights
and optimizer state) and ``state.json`` (the epoch). A trial restored from a checkpoint,
after a pause (HyperBand), an exploit (PBT) or a resumed experiment, continues from that
epoch with that optimizer state.

The work itself is in plain functions (:func:`build_model`, :func:`train_epoch`,
:func:`save_checkpoint`, :func:`load_checkpoint`) that need no Ray.
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

from raywaste.metrics import average_precision, confusion_matrix, macro_f1, per_class_scores

log = logging.getLogger(__name__)

CHECKPOINT_MODEL = "model.keras"
CHECKPOINT_STATE = "state.json"
TENSORBOARD_DIR = "tensorboard"


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


def dataset_key(image_size: int, color_mode: str) -> str:
    """Return the key of a dataset in the trials' ``datasets`` mapping, e.g. "64-grayscale"."""
    return f"{int(image_size)}-{color_mode}"


def tuning_metric(is_binary: bool) -> str:
    """Return the default validation metric that ranks trials: average precision for binary tasks, else macro F1."""
    return "val_average_precision" if is_binary else "val_macro_f1"


def configure_tensorflow(cpus: float | None) -> int:
    """Limit TensorFlow's thread pools to ``cpus`` and turn on GPU memory growth.

    Must run before TensorFlow executes its first operation in this process. Returns the
    intra-op thread count in effect (0 means TensorFlow's default: one per core).
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
        log.warning("TensorFlow thread and GPU settings unchanged, because TensorFlow was already initialized: %s", error)
    return tf.config.threading.get_intra_op_parallelism_threads()


def validation_metrics(probabilities: np.ndarray, labels: np.ndarray, is_binary: bool) -> dict[str, float]:
    """Score ``(n, classes)`` probabilities against true labels.

    Every task gets loss, accuracy and macro F1; binary tasks also get the average
    precision and the F1 of the positive class (label 1) at the 0.5 threshold.
    """
    predicted = probabilities.argmax(axis=1)
    clipped = np.clip(probabilities[np.arange(len(labels)), labels], 1e-7, 1.0)
    metrics = {
        "val_loss": float(-np.log(clipped).mean()) if len(labels) else 0.0,
        "val_accuracy": float((predicted == labels).mean()) if len(labels) else 0.0,
        "val_macro_f1": macro_f1(labels, predicted, probabilities.shape[1]),
    }
    if is_binary:
        metrics["val_average_precision"] = average_precision(labels == 1, probabilities[:, 1])
        metrics["val_f1"] = float(per_class_scores(confusion_matrix(labels, predicted, 2))["f1"][1])
    return metrics


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """Weight each class by ``n / (classes present * count)``, so every present class weighs the same in the loss."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = len(labels) / (present.sum() * counts[present])
    return {index: float(weight) for index, weight in enumerate(weights)}


def build_model(config: dict[str, Any], data: TrialData):
    """Build and compile a fresh model for a trial config."""
    from raywaste.model import Augmentation, ModelConfig, make_model

    return make_model(ModelConfig.from_config(config), data.input_shape, data.num_classes,
                      augmentation=Augmentation.from_config(config), seed=int(config.get("seed", 0)))


def save_checkpoint(model, directory: str | Path, epoch: int) -> None:
    """Write ``model.keras`` (architecture, weights, optimizer state) and ``state.json`` into ``directory``."""
    directory = Path(directory)
    model.save(directory / CHECKPOINT_MODEL)
    state = {"epoch": epoch, "optimizer_iterations": int(model.optimizer.iterations.numpy())}
    (directory / CHECKPOINT_STATE).write_text(json.dumps(state))


def load_checkpoint(directory: str | Path) -> tuple[Any, dict[str, Any]]:
    """Load the model and state that :func:`save_checkpoint` wrote."""
    import keras

    directory = Path(directory)
    model = keras.models.load_model(directory / CHECKPOINT_MODEL)
    state = json.loads((directory / CHECKPOINT_STATE).read_text())
    return model, state


def apply_mutable_config(model, config: dict[str, Any]) -> None:
    """Set the learning rate of a restored model to the config's, which PBT may have changed."""
    model.optimizer.learning_rate = float(config["learning_rate"])


def train_epoch(model, data: TrialData, config: dict[str, Any], epoch: int) -> dict[str, float]:
    """Train one epoch (``epoch`` counts from 0) and return the validation metrics and the training loss."""
    from raywaste.model import class_probabilities

    class_weight = balanced_class_weights(data.train_labels, data.num_classes) if config.get("class_weight", "balanced") == "balanced" else None
    targets = data.train_labels.astype(np.float32) if data.num_classes == 2 else data.train_labels
    history = model.fit(
        data.train_images, targets, batch_size=int(config.get("batch_size", 32)), epochs=epoch + 1, initial_epoch=epoch,
        shuffle=True, class_weight=class_weight, verbose=0,
    )
    probabilities = class_probabilities(model, data.val_images)
    metrics = validation_metrics(probabilities, data.val_labels, data.is_binary)
    metrics["train_loss"] = float(history.history["loss"][-1])
    metrics["epoch"] = epoch + 1
    metrics["learning_rate"] = float(np.asarray(model.optimizer.learning_rate))
    metrics["optimizer_iterations"] = int(model.optimizer.iterations.numpy())
    return metrics


class TensorBoardWriter:
    """Write a trial's metrics as TensorBoard scalars with TensorFlow alone.

    ``tf.summary.scalar`` needs the tensorboard package; ``tf.summary.write`` with the
    scalars plugin's metadata writes the same event records without it.
    """

    def __init__(self, log_dir: str | Path):
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2

        self._tf = tf
        self._writer = tf.summary.create_file_writer(str(log_dir))
        self._metadata = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))

    def write(self, metrics: dict[str, float], step: int) -> None:
        tf = self._tf
        with self._writer.as_default():
            for name, value in metrics.items():
                if name != "epoch":
                    tf.summary.write(name, tf.constant(float(value), tf.float32), step=step, metadata=self._metadata)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def train_trial(config: dict[str, Any], datasets: dict[str, TrialData]) -> None:
    """Train one trial as a Ray Tune function trainable.

    ``config`` contains the search space's keys (see :mod:`raywaste.search_space`) plus
    ``seed`` and ``checkpoint_every``. ``datasets`` maps :func:`dataset_key` to the data.
    """
    import ray
    from ray import tune

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    threads = configure_tensorflow(cpus)
    import keras

    keras.utils.set_random_seed(int(config.get("seed", 0)))
    data = datasets[dataset_key(config["image_size"], config["color_mode"])]
    max_epochs = int(config["max_epochs"])
    checkpoint_every = int(config.get("checkpoint_every", 1))

    start_epoch = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            model, state = load_checkpoint(directory)
        start_epoch = int(state["epoch"])
        apply_mutable_config(model, config)
        log.info("trial restored at epoch %d from %s", start_epoch, checkpoint.path)
    else:
        model = build_model(config, data)

    writer = TensorBoardWriter(Path(tune.get_context().get_trial_dir()) / TENSORBOARD_DIR)
    try:
        for epoch in range(start_epoch, max_epochs):
            metrics = train_epoch(model, data, config, epoch)
            metrics["resumed_from_epoch"] = start_epoch
            metrics["cpu_threads"] = threads
            writer.write(metrics, step=epoch + 1)

            if (epoch + 1) % checkpoint_every == 0 or epoch + 1 == max_epochs:
                with tempfile.TemporaryDirectory() as directory:
                    save_checkpoint(model, directory, epoch + 1)
                    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))
            else:
                tune.report(metrics)
    finally:
        writer.close()
