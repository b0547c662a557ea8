import json
from pathlib import Path

import pytest

from raywaste.annotations import AnnotationsError, load_annotations


def write_coco(path: Path, images=None, annotations=None, categories=None) -> Path:
    document = {
        "images": images if images is not None else [{"id": 1, "file_name": "batch_1/a.jpg", "width": 100, "height": 80}],
        "annotations": annotations if annotations is not None else [],
        "categories": categories if categories is not None else [{"id": 0, "name": "Glass bottle", "supercategory": "Bottle"}],
    }
    path.write_text(json.dumps(document))
    return path


def test_official_file_counts(taco_official):
    taco = load_annotations(taco_official)
    assert len(taco.images) == 1500
    assert len(taco.annotations) == 4784
    assert len(taco.categories) == 60
    assert len(taco.supercategories) == 28
    assert len(taco.scene_categories) == 7


def test_official_repeated_ids_keep_both(taco_official):
    taco = load_annotations(taco_official)
    assert taco.report.repeated_annotation_ids == {309: [93, 101], 4040: [1281, 1300]}
    for annotation_id in (309, 4040):
        owners = sorted(a.image_id for a in taco.annotations if a.id == annotation_id)
        assert len(owners) == 2
    assert {a.id for a in taco.annotations_of(93)} >= {309}
    assert {a.id for a in taco.annotations_of(101)} >= {309}


def test_official_boxes_at_minus_one_are_clipped(taco_official):
    taco = load_annotations(taco_official)
    assert len(taco.report.clipped_boxes) == 7
    assert taco.report.oversized_boxes == []
    for annotation in taco.annotations:
        x, y, width, height = annotation.bbox
        image = taco.images[annotation.image_id]
        assert x >= 0
        assert y >= 0
        assert x + width <= image.width
        assert y + height <= image.height


def test_food_can_matches_any_case(taco_official):
    taco = load_annotations(taco_official)
    assert taco.find_category("Food can").name == "Food Can"
    assert taco.find_category("FOOD CAN").name == "Food Can"
    assert taco.find_supercategory("bottle") == "Bottle"


def test_annotations_indexed_by_id_not_position(tmp_path):
    images = [
        {"id": 7, "file_name": "b.jpg", "width": 50, "height": 50},
        {"id": 3, "file_name": "a.jpg", "width": 50, "height": 50},
    ]
    annotations = [{"id": 11, "image_id": 3, "category_id": 5, "bbox": [1, 1, 10, 10]}]
    categories = [{"id": 5, "name": "Drink can", "supercategory": "Can"}]
    taco = load_annotations(write_coco(tmp_path / "a.json", images, annotations, categories))
    assert taco.images[3].file_name == "a.jpg"
    assert [a.id for a in taco.annotations_of(3)] == [11]
    assert taco.annotations_of(7) == []
    assert taco.report.images_without_annotations == 1


@pytest.mark.parametrize(
    "annotation, expected",
    [
        ({"id": 5, "image_id": 99, "category_id": 0, "bbox": [0, 0, 5, 5]}, "annotation id 5 refers to image id 99"),
        ({"id": 6, "image_id": 1, "category_id": 42, "bbox": [0, 0, 5, 5]}, "annotation id 6 refers to category id 42"),
        ({"id": 7, "image_id": 1, "category_id": 0, "bbox": [0, 0, 0, 5]}, "annotation id 7 (image id 1) has an invalid box"),
        ({"id": 8, "image_id": 1, "category_id": 0, "bbox": [0, 0, -3, 5]}, "annotation id 8 (image id 1) has an invalid box"),
        ({"id": 9, "image_id": 1, "category_id": 0}, "annotation entry #0 lacks"),
    ],
)
def test_bad_annotation_names_file_and_id(tmp_path, annotation, expected):
    path = write_coco(tmp_path / "bad.json", annotations=[annotation])
    with pytest.raises(AnnotationsError) as caught:
        load_annotations(path)
    assert expected in str(caught.value)
    assert str(path) in str(caught.value)


def test_duplicate_image_id_is_an_error(tmp_path):
    images = [{"id": 1, "file_name": "a.jpg", "width": 9, "height": 9}, {"id": 1, "file_name": "b.jpg", "width": 9, "height": 9}]
    with pytest.raises(AnnotationsError, match="image id 1 occurs twice"):
        load_annotations(write_coco(tmp_path / "a.json", images=images))


def test_exact_duplicate_annotation_dropped(tmp_path):
    annotation = {"id": 4, "image_id": 1, "category_id": 0, "bbox": [1, 1, 5, 5]}
    taco = load_annotations(write_coco(tmp_path / "a.json", annotations=[annotation, dict(annotation)]))
    assert len(taco.annotations) == 1
    assert taco.report.dropped_exact_duplicates == [4]


def test_box_far_outside_is_left_for_image_stage(tmp_path):
    # 100x80 image; a box that fits only the rotated 80x100 photo.
    annotation = {"id": 4, "image_id": 1, "category_id": 0, "bbox": [10, 10, 60, 85]}
    taco = load_annotations(write_coco(tmp_path / "a.json", annotations=[annotation]))
    assert taco.report.oversized_boxes == [4]
    assert taco.annotations[0].bbox == (10.0, 10.0, 60.0, 85.0)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(AnnotationsError, match="not found"):
        load_annotations(tmp_path / "nope.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(AnnotationsError, match="cannot read annotations file"):
        load_annotations(broken)
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"\xff\xd8\xff\xe0 a JPEG given by mistake")
    with pytest.raises(AnnotationsError, match=r"photo.jpg: not JSON text \(invalid start byte at byte 0\)"):
        load_annotations(photo)
    not_coco = tmp_path / "list.json"
    not_coco.write_text("[]")
    with pytest.raises(AnnotationsError, match="not a COCO annotations file"):
        load_annotations(not_coco)


def broken_coco(path: Path) -> Path:
    """A file with one problem of each kind the loader finds, beside valid entries."""
    images = [
        {"id": 1, "file_name": "batch_1/a.jpg", "width": 100, "height": 80},
        {"id": 1, "file_name": "batch_1/b.jpg", "width": 100, "height": 80},
        {"id": 2, "file_name": "batch_1/c.jpg", "width": 100, "height": 80},
    ]
    categories = [{"id": 0, "name": "Glass bottle", "supercategory": "Bottle"}]
    annotations = [
        {"id": 10, "image_id": 1, "category_id": 0, "bbox": [-1, 5, 20, 20]},
        {"id": 11, "image_id": 1, "category_id": 42, "bbox": [0, 0, 5, 5]},
        {"id": 12, "image_id": 99, "category_id": 0, "bbox": [0, 0, 5, 5]},
        {"id": 13, "image_id": 2, "category_id": 0, "bbox": [0, 0, 0, 5]},
        {"id": 14, "image_id": 2, "category_id": 0, "bbox": [1, 1, 5, 5]},
        {"id": 14, "image_id": 2, "category_id": 0, "bbox": [2, 2, 5, 5]},
    ]
    return write_coco(path, images, annotations, categories)


def test_non_strict_collects_every_problem(tmp_path):
    taco = load_annotations(broken_coco(tmp_path / "broken.json"), strict=False)
    errors = taco.report.errors
    assert len(errors) == 5
    assert any("image id 1 occurs twice" in message for message in errors)
    assert any("annotation id 11 refers to category id 42" in message for message in errors)
    assert any("annotation id 12 refers to image id 99" in message for message in errors)
    assert any("annotation id 13 (image id 2) has an invalid box" in message for message in errors)
    assert any("annotation id 14 occurs twice on image id 2" in message for message in errors)
    assert taco.report.unknown_category_references == {11: 42}
    assert taco.report.unknown_image_references == {12: 99}


def test_non_strict_keeps_valid_entries(tmp_path):
    taco = load_annotations(broken_coco(tmp_path / "broken.json"), strict=False)
    assert taco.images[1].file_name == "batch_1/a.jpg"
    assert sorted(taco.images) == [1, 2]
    assert sorted(a.id for a in taco.annotations) == [10, 14]
    assert taco.report.clipped_boxes == [10]
    assert taco.annotations_of(1)[0].bbox == (0.0, 5.0, 19.0, 20.0)


def test_strict_raises_on_same_file(tmp_path):
    with pytest.raises(AnnotationsError, match="image id 1 occurs twice"):
        load_annotations(broken_coco(tmp_path / "broken.json"))


def test_official_file_has_no_errors(taco_official):
    assert load_annotations(taco_official, strict=False).report.errors == []
