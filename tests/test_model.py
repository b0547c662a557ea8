import numpy as np
import pytest

from raywaste.model import ModelConfig, class_probabilities, make_model
from raywaste.training import balanced_class_weights, validation_metrics


def test_binary_model_has_one_sigmoid_unit():
    model = make_model(ModelConfig(conv_blocks=2, filters=4, dense_units=8), (32, 32, 3), 2)
    assert model.output_shape == (None, 1)
    assert model.layers[-1].activation.__name__ == "sigmoid"
    assert model.input.dtype == "uint8"


def test_multiclass_model_has_softmax():
    model = make_model(ModelConfig(conv_blocks=3, filters=4, dense_units=8, activation="leaky_relu", batch_norm=True), (32, 32, 1), 5)
    assert model.output_shape == (None, 5)
    assert model.layers[-1].activation.__name__ == "softmax"
    conv_filters = [layer.filters for layer in model.layers if layer.__class__.__name__ == "Conv2D"]
    assert conv_filters == [4, 8, 16]
    assert any(layer.__class__.__name__ == "LeakyReLU" for layer in model.layers)
    assert any(layer.__class__.__name__ == "BatchNormalization" for layer in model.layers)


def test_probabilities_sum_to_one():
    images = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    for classes in (2, 4):
        model = make_model(ModelConfig(conv_blocks=1, filters=2, dense_units=4), (16, 16, 3), classes)
        probabilities = class_probabilities(model, images)
        assert probabilities.shape == (6, classes)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_model_learns_a_trivial_task():
    rng = np.random.default_rng(0)
    dark = rng.integers(0, 60, (40, 16, 16, 1), dtype=np.uint8)
    light = rng.integers(190, 256, (40, 16, 16, 1), dtype=np.uint8)
    images = np.concatenate([dark, light])
    labels = np.array([0] * 40 + [1] * 40)
    model = make_model(ModelConfig(conv_blocks=1, filters=4, dense_units=8, dropout=0.0, learning_rate=0.01), (16, 16, 1), 2)
    model.fit(images, labels.astype("float32"), epochs=15, batch_size=16, verbose=0)
    metrics = validation_metrics(class_probabilities(model, images), labels, is_binary=True)
    assert metrics["val_accuracy"] > 0.9
    assert metrics["val_average_precision"] > 0.9


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"conv_blocks": 0}, "conv_blocks"),
        ({"activation": "tanh"}, "activation"),
        ({"dropout": 1.0}, "dropout"),
        ({"learning_rate": 0.0}, "learning rate"),
    ],
)
def test_invalid_config(changes, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**changes)


def test_too_many_blocks_for_image_size():
    with pytest.raises(ValueError, match="fewer conv_blocks"):
        make_model(ModelConfig(conv_blocks=5), (16, 16, 3), 2)


def test_config_ignores_tune_keys():
    config = ModelConfig.from_config({"filters": 8, "max_epochs": 3, "batch_size": 16})
    assert config.filters == 8


def test_balanced_weights_equalize_classes():
    weights = balanced_class_weights(np.array([0, 0, 0, 1]), 3)
    assert weights[0] * 3 == pytest.approx(weights[1] * 1)
    assert weights[2] == 0.0
