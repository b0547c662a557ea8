"""The Keras classifier, built from a plain config dict so that Ray Tune can search over it.

``make_model(config, input_shape, num_classes, augmentation)`` returns a compiled
``keras.Model``. The plain CNN rescales to [0, 1] and has ``conv_blocks`` blocks of
Conv2D, optional batch normalization, activation and max pooling, with the filters
doubling in each block. With ``backbone`` set, a ``keras.applications`` network takes
the place of the blocks. Then come pooling to a vector, dropout, a dense layer, and a
sigmoid output for two classes or a softmax output for more.

Rescaling and augmentation live inside the model, so a saved model takes the same uint8
images the dataset stores and inference needs no separate preprocessing. The random
flip, rotation and zoom layers act only in training; Keras skips them in ``predict``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

ACTIVATIONS = ("relu", "leaky_relu")
POOLINGS = ("global_average", "flatten")
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
FLIPS = ("none", "horizontal", "vertical", "horizontal_and_vertical")
# keras.applications constructors and the input range each one expects. MobileNetV3 and
# EfficientNet rescale inside the network and take [0, 255], but MobileNetV2 takes [-1, 1].
BACKBONES = {
    "mobilenet_v3_small": ("MobileNetV3Small", "0-255"),
    "mobilenet_v3_large": ("MobileNetV3Large", "0-255"),
    "mobilenet_v2": ("MobileNetV2", "-1-1"),
    "efficientnet_b0": ("EfficientNetB0", "0-255"),
}
# keras.applications rejects inputs smaller than this (pixels per side).
BACKBONE_MIN_SIZE = 32


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and optimizer settings; the keys of a Tune config."""

    backbone: str = "none"
    """A key of :data:`BACKBONES`, or "none" for the plain CNN."""
    weights: str = "none"
    """Backbone weights: "none" (random), "imagenet", or the path of a weights file."""
    freeze_backbone: bool = False
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
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    momentum: float = 0.9
    """Momentum of sgd and rmsprop."""
    weight_decay: float = 1e-4
    """Weight decay of adamw."""

    def __post_init__(self) -> None:
        if self.backbone != "none" and self.backbone not in BACKBONES:
            raise ValueError(f"invalid backbone {self.backbone!r}; expected none or one of {', '.join(BACKBONES)}")
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
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"invalid optimizer {self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
        if not self.learning_rate > 0:
            raise ValueError(f"invalid learning rate {self.learning_rate}; expected a positive number")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ModelConfig":
        """Take the model's keys from a larger Tune config and ignore the rest."""
        names = {field.name for field in fields(cls)}
        return cls(**{key: value for key, value in config.items() if key in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Augmentation:
    """Random changes to training images, as Keras preprocessing layers inside the model."""

    flip: str = "none"
    rotation: float = 0.0
    """Largest rotation either way, as a fraction of a full turn."""
    zoom: float = 0.0
    """Largest zoom in or out, as a fraction of the image size."""

    def __post_init__(self) -> None:
        if self.flip not in FLIPS:
            raise ValueError(f"invalid flip {self.flip!r}; expected one of {', '.join(FLIPS)}")
        if not 0.0 <= self.rotation <= 0.5 or not 0.0 <= self.zoom < 1.0:
            raise ValueError(f"invalid rotation {self.rotation} or zoom {self.zoom}; expected 0 <= rotation <= 0.5 and 0 <= zoom < 1")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Augmentation":
        names = {field.name for field in fields(cls)}
        return cls(**{key: value for key, value in config.items() if key in names})

    def layers(self, seed: int | None = None) -> list:
        from keras import layers

        result = []
        if self.flip != "none":
            result.append(layers.RandomFlip(self.flip, seed=seed))
        if self.rotation > 0:
            result.append(layers.RandomRotation(self.rotation, fill_mode="reflect", seed=seed))
        if self.zoom > 0:
            result.append(layers.RandomZoom(self.zoom, fill_mode="reflect", seed=seed))
        return result


def make_model(
    config: ModelConfig,
    input_shape: tuple[int, int, int],
    num_classes: int,
    augmentation: Augmentation | None = None,
    seed: int | None = None,
):
    """Build and compile the classifier for ``input_shape`` (height, width, channels) and ``num_classes``."""
    import keras
    from keras import layers

    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
    check_input_size(config, input_shape)

    inputs = keras.Input(shape=input_shape, dtype="uint8", name="image")
    if config.backbone == "none":
        x = layers.Rescaling(1.0 / 255)(inputs)
        for layer in (augmentation or Augmentation()).layers(seed):
            x = layer(x)
        x = _conv_blocks(config, x)
    else:
        # Rescaling(1.0) only casts to float: the backbone scales its input itself.
        x = layers.Rescaling(1.0)(inputs)
        for layer in (augmentation or Augmentation()).layers(seed):
            x = layer(x)
        x = _backbone(config, input_shape)(x)

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
    model = keras.Model(inputs, outputs, name="raywaste_cnn" if config.backbone == "none" else f"raywaste_{config.backbone}")
    model.compile(optimizer=make_optimizer(config), loss=loss)
    return model


def check_input_size(config: ModelConfig, input_shape: tuple[int, ...]) -> None:
    """Raise ValueError when the image is too small for the architecture."""
    side = min(input_shape[:2])
    if config.backbone != "none":
        if side < BACKBONE_MIN_SIZE:
            raise ValueError(f"backbone {config.backbone} needs images of at least {BACKBONE_MIN_SIZE}x{BACKBONE_MIN_SIZE} "
                             f"pixels, got {input_shape[0]}x{input_shape[1]}; preprocess with a larger --image-size")
        return
    if side // (2 ** config.conv_blocks) < 1:
        raise ValueError(
            f"{config.conv_blocks} pooling blocks shrink a {input_shape[0]}x{input_shape[1]} image below one pixel; "
            "use fewer conv_blocks or a larger image size"
        )


def make_optimizer(config: ModelConfig):
    """Return the Keras optimizer that ``config`` names, at its learning rate."""
    import keras

    if config.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate=config.learning_rate, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=config.learning_rate, momentum=config.momentum)
    if config.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=config.learning_rate, momentum=config.momentum)
    return keras.optimizers.Adam(learning_rate=config.learning_rate)


def _conv_blocks(config: ModelConfig, x):
    from keras import layers

    for block in range(config.conv_blocks):
        x = layers.Conv2D(config.filters * 2**block, config.kernel_size, padding="same", use_bias=not config.batch_norm)(x)
        if config.batch_norm:
            x = layers.BatchNormalization()(x)
        x = _activation(config)(x)
        x = layers.MaxPooling2D()(x)
    return x


def _backbone(config: ModelConfig, input_shape: tuple[int, int, int]):
    """Return the backbone as one nested model that takes [0, 255] floats with the input's channels."""
    import keras
    from keras import layers

    constructor_name, input_range = BACKBONES[config.backbone]
    constructor = getattr(keras.applications, constructor_name)
    weights = None if config.weights == "none" else config.weights
    inputs = keras.Input(shape=input_shape, name="pixels")
    x = inputs
    if input_shape[2] == 1:
        # keras.applications networks take three channels; a gray image repeats its one.
        x = layers.Concatenate(name="gray_to_rgb")([x, x, x])
    if input_range == "-1-1":
        x = layers.Rescaling(1.0 / 127.5, offset=-1.0)(x)
    network = constructor(input_shape=(*input_shape[:2], 3), include_top=False, weights=weights)
    network.trainable = not config.freeze_backbone
    # training=False keeps a frozen backbone's batch normalization in inference mode while the head trains.
    outputs = network(x, training=False) if config.freeze_backbone else network(x)
    return keras.Model(inputs, outputs, name=f"backbone_{config.backbone}")


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
