"""Classify new photos with a trained model, preprocessed exactly as its training data.

A model is ``best_model.keras`` with its metadata ``best_model.json`` beside it (same
name, ``.json``), which tuning writes. The metadata give the task, the class names and
the image settings of the dataset the model was trained on (size, color mode, square
mode, padding, ...). Photos go through :func:`raywaste.images.read_examples` with those
settings, the function that preprocessing runs, so a photo that is also in the dataset
yields the same pixels here as in its Parquet row.

The metadata stay a separate file because a ``.keras`` archive has no documented place
for user data, and because the JSON is readable without TensorFlow. A model copied
without its ``.json`` is rejected with a message that names the missing file.

Whole-photo tasks (``binary:*``) classify each photo. Crop tasks classify every box that
an annotations file lists for the photo, or the whole photo when asked to.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from raywaste.annotations import ImageInfo, Taco, load_annotations
from raywaste.images import ImageSettings, read_examples
from raywaste.tuning import BEST_MODEL

log = logging.getLogger(__name__)

# Suffixes (compared case-insensitively) that a folder argument contributes; single files
# are read whatever their suffix.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
# Photos decoded before the model runs once; bounds memory on large folders.
PHOTOS_PER_BATCH = 64
# Binary tasks: the positive class from this probability on, unless another threshold is asked for.
DEFAULT_THRESHOLD = 0.5


class PredictionError(ValueError):
    """A model, its metadata or the request cannot be used."""


@dataclass(frozen=True)
class ModelInfo:
    """A trained model's metadata: what it classifies and how its inputs were made."""

    model_path: Path
    task: str
    class_names: list[str]
    image: ImageSettings

    @property
    def is_crop_task(self) -> bool:
        return not self.task.startswith("binary:")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.image.size, self.image.size, self.image.channels)


@dataclass
class Prediction:
    """The class probabilities of one photo or one box of a photo."""

    file: str
    probabilities: list[float]
    top: list[tuple[str, float]]
    """The ``k`` most probable classes with their probabilities, most probable first."""
    label: str
    """The predicted class: the most probable one, or for binary tasks the decision at the threshold."""
    image_id: int | None = None
    annotation_id: int | None = None
    bbox: list[float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "image_id": self.image_id,
            "annotation_id": self.annotation_id,
            "bbox": self.bbox,
            "label": self.label,
            "top": [{"class": name, "probability": probability} for name, probability in self.top],
        }


@dataclass
class FileError:
    """A photo or box that could not be classified, with the reason."""

    file: str
    message: str
    annotation_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "annotation_id": self.annotation_id, "message": self.message}

    def describe(self) -> str:
        """Return a one-line description that names the file (once) and the annotation."""
        where = "" if self.file in self.message else f"{self.file}: "
        if self.annotation_id is not None:
            where = f"{self.file} annotation {self.annotation_id}: "
        return where + self.message


@dataclass
class PredictionResult:
    model: ModelInfo
    predictions: list[Prediction] = field(default_factory=list)
    errors: list[FileError] = field(default_factory=list)
    threshold: float | None = None
    """Binary tasks: the probability of the positive class from which a photo is labelled positive."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": str(self.model.model_path),
            "task": self.model.task,
            "class_names": self.model.class_names,
            "threshold": self.threshold,
            "predictions": [prediction.to_dict() for prediction in self.predictions],
            "errors": [error.to_dict() for error in self.errors],
        }


@dataclass(frozen=True)
class _Request:
    """One photo to decode: where it is, its annotated size, and the boxes to classify (None: whole photo)."""

    display_name: str
    root: Path
    file_name: str
    annotated_size: tuple[int, int]
    boxes: list[tuple[float, float, float, float] | None]
    annotation_ids: list[int | None]
    image_id: int | None


def resolve_model_path(model: str | Path) -> Path:
    """Return the ``.keras`` file for ``model``: the file itself, or ``best_model.keras`` in an output folder."""
    path = Path(model)
    if path.is_dir():
        path = path / BEST_MODEL
    if not path.is_file():
        raise PredictionError(f"model not found: {path}; pass a .keras file or an output folder of 'raywaste tune'")
    if path.suffix.lower() != ".keras":
        raise PredictionError(f"{path} is not a model; the first argument is a .keras file or an output folder of "
                              "'raywaste tune', and the photos follow it")
    return path


def load_model_info(model: str | Path) -> ModelInfo:
    """Read the metadata JSON beside a ``.keras`` model (``best_model.json`` for ``best_model.keras``)."""
    model_path = resolve_model_path(model)
    info_path = model_path.with_suffix(".json")
    try:
        raw = json.loads(info_path.read_text())
    except FileNotFoundError:
        raise PredictionError(
            f"model metadata not found: {info_path}; copy it together with {model_path.name} "
            "(tuning writes both), since it holds the classes and the preprocessing settings"
        ) from None
    except (OSError, json.JSONDecodeError) as error:
        raise PredictionError(f"cannot read model metadata {info_path}: {error}") from error

    missing = [key for key in ("task", "class_names", "image_size", "color_mode") if key not in raw]
    if missing:
        raise PredictionError(f"model metadata {info_path} lacks {', '.join(missing)}; tune the model again")
    image_fields = dict((raw.get("dataset") or {}).get("image") or {})
    if not image_fields:
        log.warning("%s has no dataset image settings; assuming the defaults beside its size and color mode", info_path)
    image_fields.update(size=int(raw["image_size"]), color_mode=raw["color_mode"])
    known = set(ImageSettings.__dataclass_fields__)
    try:
        image = ImageSettings(**{key: value for key, value in image_fields.items() if key in known})
    except (TypeError, ValueError) as error:
        raise PredictionError(f"invalid image settings in {info_path}: {error}") from error
    return ModelInfo(model_path, str(raw["task"]), list(raw["class_names"]), image)


def find_images(inputs: list[str | Path]) -> tuple[list[Path], list[FileError]]:
    """Expand files and folders (recursively, by IMAGE_SUFFIXES) into a sorted list of photos."""
    files: list[Path] = []
    errors: list[FileError] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(child for child in path.rglob("*") if child.is_file() and child.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                errors.append(FileError(str(path), f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in folder {path}"))
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            errors.append(FileError(str(path), f"{path} not found; check the path"))
    return files, errors


def predict(
    model: str | Path,
    inputs: list[str | Path],
    annotations: str | Path | None = None,
    whole_image: bool = False,
    top_k: int = 3,
    threshold: float | str | None = None,
) -> PredictionResult:
    """Classify the photos in ``inputs`` (files or folders) with ``model``.

    Crop tasks need ``annotations`` (a COCO file that lists the photos and their boxes)
    unless ``whole_image`` is set. Photos or boxes that fail are collected in
    ``errors``, and the rest are still classified. For binary tasks, ``threshold`` sets
    the label: a number in (0, 1), ``"chosen"`` for the threshold that evaluation chose on
    the validation split (read from ``metrics.json`` beside the model), or None for 0.5.
    """
    info = load_model_info(model)
    if top_k < 1:
        raise PredictionError(f"invalid top-k {top_k}; expected 1 or more")
    decision = _decision_threshold(info, threshold)
    if info.is_crop_task and annotations is None and not whole_image:
        raise PredictionError(
            f"the model classifies boxes (task {info.task}); pass an annotations file with the photos' boxes, "
            "or classify each whole photo as one box (--whole-image, or whole_image=True in Python)"
        )
    index = _ImageIndex(load_annotations(annotations)) if annotations is not None else None

    files, errors = find_images(inputs)
    result = PredictionResult(info, errors=errors, threshold=decision)
    requests = []
    for path in files:
        request = _request_for(path, info, index, whole_image)
        if isinstance(request, FileError):
            result.errors.append(request)
        else:
            requests.append(request)
    if not requests:
        return result

    keras_model = _load_keras_model(info)
    for start in range(0, len(requests), PHOTOS_PER_BATCH):
        _classify(keras_model, info, requests[start:start + PHOTOS_PER_BATCH], top_k, result)
    return result


def _decision_threshold(info: ModelInfo, threshold: float | str | None) -> float | None:
    """Return the binary decision threshold for a ``threshold`` request; None for multi-class models."""
    if info.is_crop_task:
        if threshold is not None:
            raise PredictionError(f"--threshold applies to binary tasks only; the model's task is {info.task}")
        return None
    if threshold is None:
        return DEFAULT_THRESHOLD
    if threshold == "chosen":
        from raywaste.evaluation import METRICS_FILE

        metrics_path = info.model_path.parent / METRICS_FILE
        try:
            metrics = json.loads(metrics_path.read_text())
        except FileNotFoundError:
            metrics = {}
        except (OSError, json.JSONDecodeError) as error:
            raise PredictionError(f"cannot read {metrics_path}: {error}; run 'raywaste evaluate' again") from error
        chosen = metrics.get("chosen_threshold")
        scored_model = metrics.get("model")
        if not chosen or (scored_model and Path(scored_model).resolve() != info.model_path.resolve()):
            raise PredictionError(f"no threshold chosen for {info.model_path.name} in {metrics_path}; "
                                  "run 'raywaste evaluate' on its folder first, or pass a number")
        return float(chosen["value"])
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        value = -1.0
    if not 0.0 < value < 1.0:
        raise PredictionError(f"invalid threshold {threshold!r}; expected a number between 0 and 1, or 'chosen'")
    return value


def _request_for(path: Path, info: ModelInfo, index: _ImageIndex | None, whole_image: bool) -> _Request | FileError:
    image = index.find(path) if index is not None else None
    if image is None:
        if index is not None and info.is_crop_task and not whole_image:
            return FileError(str(path), f"{path} is not listed in {index.taco.path}; add it there or pass --whole-image")
        # Without annotations, the stored size serves as the annotated size, which
        # read_examples accepts for any EXIF orientation. If the header cannot be read,
        # (1, 1) is passed and read_examples returns the decode error. The resolved path
        # keeps a symbolic link from looking like a file outside its folder.
        resolved = path.resolve()
        size = _stored_size(resolved) or (1, 1)
        return _Request(str(path), resolved.parent, resolved.name, size, [None], [None], None)

    image_info, root = image
    taco = index.taco
    if info.is_crop_task and not whole_image:
        annotations = sorted(taco.annotations_of(image_info.id), key=lambda annotation: annotation.id)
        boxes = [annotation.bbox for annotation in annotations]
        annotation_ids = [annotation.id for annotation in annotations]
        if not boxes:
            return FileError(str(path), f"{path} has no annotations in {taco.path}, so there is no box to classify")
    else:
        boxes, annotation_ids = [None], [None]
    return _Request(str(path), root, image_info.file_name, (image_info.width, image_info.height),
                    boxes, annotation_ids, image_info.id)


class _ImageIndex:
    """The images of an annotations file, found by the path of a photo on disk."""

    def __init__(self, taco: Taco) -> None:
        self.taco = taco
        self.root = taco.path.parent.resolve()
        self.by_name = {image.file_name: image for image in taco.images.values()}
        self.by_parts = [(Path(image.file_name).parts, image) for image in taco.images.values()]

    def find(self, path: Path) -> tuple[ImageInfo, Path] | None:
        """Return the entry for ``path`` and the folder its ``file_name`` is relative to.

        A path under the annotations file's folder is looked up by its relative path. Any
        other path matches an entry whose ``file_name`` its trailing parts end with, if
        exactly one does (TACO repeats bare names such as ``000006.jpg`` across batches).
        """
        resolved = path.resolve()
        if resolved.is_relative_to(self.root):
            image = self.by_name.get(resolved.relative_to(self.root).as_posix())
            if image is not None:
                return image, self.root
        parts = resolved.parts
        matches = [(name_parts, image) for name_parts, image in self.by_parts
                   if len(name_parts) < len(parts) and parts[-len(name_parts):] == name_parts]
        if len(matches) != 1:
            return None
        name_parts, image = matches[0]
        return image, Path(*parts[:-len(name_parts)])


def _stored_size(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def _load_keras_model(info: ModelInfo):
    from raywaste.training import configure_tensorflow

    configure_tensorflow(None)
    import keras

    try:
        model = keras.models.load_model(info.model_path)
    except (OSError, ValueError) as error:
        raise PredictionError(f"cannot load model {info.model_path}: {error}") from error
    if tuple(model.input_shape[1:]) != info.input_shape:
        raise PredictionError(
            f"{info.model_path} expects inputs of shape {tuple(model.input_shape[1:])}, but its metadata "
            f"{info.model_path.with_suffix('.json')} describe {info.input_shape}; the two files do not belong together"
        )
    outputs = model.output_shape[-1]
    if outputs != (1 if len(info.class_names) == 2 else len(info.class_names)):
        raise PredictionError(
            f"{info.model_path} has {outputs} output(s) but its metadata list {len(info.class_names)} classes; "
            "the two files do not belong together"
        )
    return model


def _classify(model, info: ModelInfo, requests: list[_Request], top_k: int, result: PredictionResult) -> None:
    from raywaste.model import class_probabilities

    arrays, owners = [], []
    for request in requests:
        examples, _ = read_examples(request.root, request.file_name, request.annotated_size, request.boxes, info.image)
        for example, box, annotation_id in zip(examples, request.boxes, request.annotation_ids):
            if isinstance(example, np.ndarray):
                arrays.append(example)
                owners.append((request, box, annotation_id))
            else:
                result.errors.append(FileError(request.display_name, example.message, annotation_id))
    if not arrays:
        return

    probabilities = class_probabilities(model, np.stack(arrays))
    k = min(top_k, len(info.class_names))
    for row, (request, box, annotation_id) in zip(probabilities, owners):
        order = np.argsort(-row, kind="stable")[:k]
        if result.threshold is not None:
            label = info.class_names[int(row[1] >= result.threshold)]
        else:
            label = info.class_names[int(order[0])]
        result.predictions.append(Prediction(
            file=request.display_name,
            probabilities=[float(value) for value in row],
            top=[(info.class_names[index], float(row[index])) for index in order],
            label=label,
            image_id=request.image_id,
            annotation_id=annotation_id,
            bbox=list(box) if box is not None else None,
        ))


def format_predictions(result: PredictionResult) -> str:
    """Render predictions one line each: the photo, the box, then the top classes with probabilities."""
    lines = []
    for prediction in result.predictions:
        where = prediction.file
        if prediction.annotation_id is not None:
            box = ", ".join(f"{value:g}" for value in prediction.bbox or [])
            where += f" annotation {prediction.annotation_id} (box {box})"
        classes = ", ".join(f"{name} {probability:.3f}" for name, probability in prediction.top)
        lines.append(f"{where}: {prediction.label} ({classes})")
    return "\n".join(lines)
