"""A trial's pieces without Ray: checkpoints that continue training, augmentation, backbones, metrics."""

import numpy as np
import pytest

from raywaste.model import Augmentation, ModelConfig, class_probabilities, make_model
from raywaste.training import (
    TrialData,
    apply_mutable_config,
    build_model,
    load_checkpoint,
    save_checkpoint,
    train_epoch,
    validation_metrics,
)


def small_data(channels=3, size=16, count=40, classes=2):
    rng = np.random.default_rng(0)
    labels = np.arange(count) % classes
    images = rng.integers(0, 80, (count, size, size, channels), dtype=np.uint8)
    images[labels == 1] += 150
    return TrialData(images, labels.astype(np.int32), images[:12], labels[:12].astype(np.int32),
                     [f"class {i}" for i in range(classes)], is_binary=classes == 2)


CONFIG = {"conv_blocks": 1, "filters": 4, "dense_units": 8, "dropout": 0.0, "learning_rate": 0.01, "batch_size": 10,
          "flip": "horizontal", "rotation": 0.0, "zoom": 0.0, "class_weight": "balanced", "seed": 0}


def optimizer_state(model):
    return [np.array(variable.numpy()) for variable in model.optimizer.variables]


def test_checkpoint_continues_epoch_and_optimizer(tmp_path):
    data = small_data()
    model = build_model(CONFIG, data)
    for epoch in range(2):
        metrics = train_epoch(model, data, CONFIG, epoch)
    assert metrics["epoch"] == 2
    assert metrics["optimizer_iterations"] == 2 * 4  # 40 examples in batches of 10
    save_checkpoint(model, tmp_path, epoch=2)
    saved_state = optimizer_state(model)

    restored, state = load_checkpoint(tmp_path)
    assert state == {"epoch": 2, "optimizer_iterations": 8}
    assert int(restored.optimizer.iterations.numpy()) == 8
    restored_state = optimizer_state(restored)
    assert len(restored_state) == len(saved_state) > 2  # iterations, learning rate, Adam's moments
    for saved, loaded in zip(saved_state, restored_state):
        np.testing.assert_array_equal(saved, loaded)
    for saved, loaded in zip(model.get_weights(), restored.get_weights()):
        np.testing.assert_array_equal(saved, loaded)

    metrics = train_epoch(restored, data, CONFIG, state["epoch"])
    assert metrics["epoch"] == 3
    assert metrics["optimizer_iterations"] == 12


def test_restored_model_takes_new_learning_rate(tmp_path):
    data = small_data()
    model = build_model(CONFIG, data)
    train_epoch(model, data, CONFIG, 0)
    save_checkpoint(model, tmp_path, epoch=1)
    restored, _ = load_checkpoint(tmp_path)
    apply_mutable_config(restored, {**CONFIG, "learning_rate": 0.002})
    metrics = train_epoch(restored, data, {**CONFIG, "learning_rate": 0.002}, 1)
    assert metrics["learning_rate"] == pytest.approx(0.002)


def test_augmentation_only_in_training(tmp_path):
    import keras

    config = ModelConfig(conv_blocks=1, filters=4, dense_units=8, dropout=0.0)
    augmentation = Augmentation(flip="horizontal_and_vertical", rotation=0.2, zoom=0.3)
    model = make_model(config, (16, 16, 3), 2, augmentation=augmentation, seed=1)
    names = [layer.__class__.__name__ for layer in model.layers]
    assert ["RandomFlip", "RandomRotation", "RandomZoom"] == [name for name in names if name.startswith("Random")]

    images = np.random.default_rng(1).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    first = class_probabilities(model, images)
    np.testing.assert_array_equal(first, class_probabilities(model, images))
    trained = np.asarray(model(images, training=True))
    assert not np.allclose(trained[:, 0], first[:, 1])

    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert [layer.__class__.__name__ for layer in loaded.layers] == names
    np.testing.assert_allclose(class_probabilities(loaded, images), first, rtol=1e-6)


@pytest.mark.parametrize("optimizer, expected", [("adam", "Adam"), ("adamw", "AdamW"), ("sgd", "SGD"), ("rmsprop", "RMSprop")])
def test_optimizer_choice(optimizer, expected):
    model = make_model(ModelConfig(conv_blocks=1, filters=2, dense_units=4, optimizer=optimizer, learning_rate=0.005), (8, 8, 1), 3)
    assert model.optimizer.__class__.__name__ == expected
    assert float(np.asarray(model.optimizer.learning_rate)) == pytest.approx(0.005)


def test_backbone_from_weights_file(tmp_path):
    import keras

    config = ModelConfig(backbone="mobilenet_v3_small", dense_units=8)
    model = make_model(config, (32, 32, 1), 3)
    assert model.output_shape == (None, 3)
    backbone = model.get_layer("backbone_mobilenet_v3_small").get_layer("MobileNetV3Small")
    weights_file = tmp_path / "mobilenet.weights.h5"
    backbone.save_weights(weights_file)

    loaded = make_model(ModelConfig(backbone="mobilenet_v3_small", weights=str(weights_file), freeze_backbone=True,
                                    dense_units=8), (32, 32, 1), 3)
    loaded_backbone = loaded.get_layer("backbone_mobilenet_v3_small").get_layer("MobileNetV3Small")
    assert not loaded_backbone.trainable
    for expected, actual in zip(backbone.get_weights(), loaded_backbone.get_weights()):
        np.testing.assert_array_equal(expected, actual)

    images = np.random.default_rng(2).integers(0, 256, (4, 32, 32, 1), dtype=np.uint8)
    probabilities = class_probabilities(loaded, images)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    loaded.save(tmp_path / "model.keras")
    again = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(class_probabilities(again, images), probabilities, rtol=1e-5)


def test_backbone_needs_32_pixels():
    with pytest.raises(ValueError, match="at least 32x32"):
        make_model(ModelConfig(backbone="mobilenet_v2"), (16, 16, 3), 2)


def test_binary_metrics_include_positive_f1():
    labels = np.array([0, 0, 1, 1, 1])
    positive = np.array([0.2, 0.7, 0.8, 0.4, 0.9])
    metrics = validation_metrics(np.stack([1 - positive, positive], axis=1), labels, is_binary=True)
    # Predicted positives: 3 of them, 2 right; recall 2 of 3.
    assert metrics["val_f1"] == pytest.approx(2 / 3)
    assert metrics["val_accuracy"] == pytest.approx(0.6)
    assert set(metrics) == {"val_loss", "val_accuracy", "val_macro_f1", "val_average_precision", "val_f1"}


def test_multiclass_metrics_have_no_binary_keys():
    probabilities = np.eye(3)[[0, 1, 2, 2]]
    metrics = validation_metrics(probabilities, np.array([0, 1, 2, 1]), is_binary=False)
    assert set(metrics) == {"val_loss", "val_accuracy", "val_macro_f1"}
    assert metrics["val_accuracy"] == pytest.approx(0.75)
