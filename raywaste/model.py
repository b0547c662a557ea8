"""The Keras CNN, built from a plain config dict so that Ray Tune can search over it.

``make_model(config, input_shape, num_classes)`` returns a compiled ``keras.Model``. It
rescales to [0, 1] and has ``conv_blocks`` blocks of Conv2D, activation and max pooling,
with the filters doubling in each block. Then come pooling to a vector, dropout, a dense
layer, and a sigmoid output for two classes or a softmax output for more.

Rescaling lives inside the model, so a saved model takes the same uint8 images the
dataset stores and inference needs no separate preprocessing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

ACTIVATIONS = ("relu", "leaky_relu")
POOLINGS = ("global_average", "flatten")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and optimizer settings; the keys of a Tune config."""

    conv_blocks: int = 3
    filters: int = 32
    """Filters of the first block; each further block doubles them."""
    kernel_size: int = 3
    activation: str = "relu"
    leaky_relu_slope: float = 0.1
    batch_norm: bool = False
    pooling: str = "global_average"
    dropout: float = 0.3
    dense_units: int = 64
    learning_rate: float = 1e-3

    def __post_init__(self) -> None:
        if self.conv_blocks < 1:
            raise ValueError(f"invalid conv_blocks {self.conv_blocks}; expected 1 or more")
        if self.filters < 1 or self.dense_units < 1 or self.kernel_size < 1:
            raise ValueError("filters, dense_units and kernel_size must be positive")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"invalid activation {self.activation!r}; expected one of {', '.join(ACTIVATIONS)}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"invalid pooling {self.pooling!r}; expected one of {', '.join(POOLINGS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"invalid dropout {self.dropout}; expected 0 <= dropout < 1")
        if not self.learning_rate > 0:
            raise ValueError(f"invalid learning rate {self.learning_rate}; expected a positive number")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ModelConfig":
        """Take the model's keys from a larger Tune config and ignore the rest."""
        names = {field.name for field in fields(cls)}
        return cls(**{key: value for key, value in config.items() if key in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_model(config: ModelConfig, input_shape: tuple[int, int, int], num_classes: int, augmentation: list | None = None):
    """Build and compile the CNN for ``input_shape`` (height, width, channels) and ``num_classes``."""
    import keras
    from keras import layers

    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
    smallest_side = min(input_shape[:2]) // (2 ** config.conv_blocks)
    if smallest_side < 1:
        raise ValueError(
            f"{config.conv_blocks} pooling blocks shrink a {input_shape[0]}x{input_shape[1]} image below one pixel; "
            "use fewer conv_blocks or a larger image size"
        )

    inputs = keras.Input(shape=input_shape, dtype="uint8", name="image")
    x = layers.Rescaling(1.0 / 255)(inputs)
    for layer in augmentation or []:
        x = layer(x)
    for block in range(config.conv_blocks):
        x = layers.Conv2D(config.filters * 2**block, config.kernel_size, padding="same", use_bias=not config.batch_norm)(x)
        if config.batch_norm:
            x = layers.BatchNormalization()(x)
        x = _activation(config)(x)
        x = layers.MaxPooling2D()(x)
    x = layers.GlobalAveragePooling2D()(x) if config.pooling == "global_average" else layers.Flatten()(x)
    x = layers.Dropout(config.dropout)(x)
    x = layers.Dense(config.dense_units)(x)
    x = _activation(config)(x)

    if num_classes == 2:
        outputs = layers.Dense(1, activation="sigmoid", name="probability")(x)
        loss = "binary_crossentropy"
    else:
        outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
        loss = "sparse_categorical_crossentropy"
    model = keras.Model(inputs, outputs, name="raywaste_cnn")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=config.learning_rate), loss=loss)
    return model


def _activation(config: ModelConfig):
    from keras import layers

    if config.activation == "leaky_relu":
        return layers.LeakyReLU(negative_slope=config.leaky_relu_slope)
    return layers.ReLU()


def class_probabilities(model, images, batch_size: int = 256):
    """Return ``(n, num_classes)`` probabilities, also for the one-unit sigmoid output."""
    import numpy as np

    predictions = np.asarray(model.predict(images, batch_size=batch_size, verbose=0), dtype=np.float64)
    if predictions.ndim == 2 and predictions.shape[1] == 1:
        positive = predictions[:, 0]
        return np.stack([1.0 - positive, positive], axis=1)
    return predictions
