"""Baselines that the tuned CNN must beat, trained on the same train split.

* Majority class: predict the most frequent class of the train split for every example.
  Its accuracy is the share of that class in the scored split, and its macro F1 shows
  what a classifier that ignores the image scores.
* The course's dense network: the image converted to grayscale and flattened, then one
  hidden Dense layer and the output layer, with no convolutions. The course that
  raywaste grew from trained such a network (Flatten and Dense layers) on 1000x1000
  grayscale photos. Here it is trained on the dataset's own image size, for a capped
  number of epochs, with the same class weighting as the CNN trials.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raywaste.training import balanced_class_weights

# ITU-R BT.601 luma weights, which Pillow's "L" conversion also uses.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])


@dataclass(frozen=True)
class DenseBaselineSettings:
    """The course's dense network and its training budget."""

    epochs: int = 10
    """Training epochs; 0 leaves the dense baseline out."""
    hidden_units: int = 128
    learning_rate: float = 1e-3
    batch_size: int = 32
    seed: int = 0
    max_train_values: int = 500_000_000
    """Train examples times grayscale pixels above which the baseline is left out, as too costly to fit in memory."""

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.hidden_units < 1 or self.batch_size < 1:
            raise ValueError(f"invalid dense baseline settings: epochs {self.epochs}, hidden units {self.hidden_units}, "
                             f"batch size {self.batch_size}; expected epochs >= 0 and positive sizes")


def majority_class(train_labels: np.ndarray, num_classes: int) -> int:
    """Return the most frequent label of the train split (the smallest label on ties)."""
    if len(train_labels) == 0:
        raise ValueError("the train split is empty, so it has no majority class")
    return int(np.bincount(train_labels, minlength=num_classes).argmax())


def majority_probabilities(train_labels: np.ndarray, num_classes: int, count: int) -> np.ndarray:
    """Return ``(count, num_classes)`` probabilities of the train split's class frequencies for every example.

    The majority class gets the highest probability, so the predictions are that class,
    and for binary tasks the positive score is the same for all examples.
    """
    frequencies = np.bincount(train_labels, minlength=num_classes).astype(np.float64)
    frequencies /= frequencies.sum()
    return np.tile(frequencies, (count, 1))


def to_grayscale(images: np.ndarray) -> np.ndarray:
    """Convert ``(n, height, width, 3)`` uint8 RGB to ``(n, height, width, 1)`` uint8 luma; pass grayscale through."""
    if images.shape[-1] == 1:
        return images
    luma = np.tensordot(images.astype(np.float32), LUMA_WEIGHTS.astype(np.float32), axes=([-1], [0]))
    return np.clip(np.rint(luma), 0, 255).astype(np.uint8)[..., np.newaxis]


def make_dense_model(input_shape: tuple[int, int, int], num_classes: int, settings: DenseBaselineSettings):
    """Build and compile the course's dense network for grayscale ``input_shape``."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=input_shape, dtype="uint8", name="image")
    x = layers.Rescaling(1.0 / 255)(inputs)
    x = layers.Flatten()(x)
    x = layers.Dense(settings.hidden_units, activation="relu")(x)
    if num_classes == 2:
        outputs = layers.Dense(1, activation="sigmoid")(x)
        loss = "binary_crossentropy"
    else:
        outputs = layers.Dense(num_classes, activation="softmax")(x)
        loss = "sparse_categorical_crossentropy"
    model = keras.Model(inputs, outputs, name="course_dense_network")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=settings.learning_rate), loss=loss)
    return model


def dense_baseline_probabilities(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    images: np.ndarray,
    num_classes: int,
    settings: DenseBaselineSettings,
) -> np.ndarray | None:
    """Train the dense network on the train split and return class probabilities for ``images``.

    Returns None when ``settings.epochs`` is 0 or the train split is too large for
    ``settings.max_train_values``.
    """
    import keras

    from raywaste.model import class_probabilities

    gray_train = to_grayscale(train_images)
    if settings.epochs == 0 or gray_train.size > settings.max_train_values or len(train_labels) == 0:
        return None
    keras.utils.set_random_seed(settings.seed)
    model = make_dense_model(gray_train.shape[1:], num_classes, settings)
    targets = train_labels.astype(np.float32) if num_classes == 2 else train_labels
    model.fit(gray_train, targets, batch_size=settings.batch_size, epochs=settings.epochs, shuffle=True,
              class_weight=balanced_class_weights(train_labels, num_classes), verbose=0)
    return class_probabilities(model, to_grayscale(images))
