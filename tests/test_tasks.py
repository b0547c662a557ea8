from collections import Counter

import pytest

from raywaste.annotations import load_annotations
from raywaste.tasks import OTHER_CLASS, TaskError, build_examples, read_class_map


@pytest.fixture(scope="module")
def sample(taco_sample):
    return load_annotations(taco_sample / "annotations.json")


def test_binary_one_example_per_image(sample):
    task = build_examples(sample, "binary:Bottle")
    assert task.class_names == ["no Bottle", "Bottle"]
    assert len(task.examples) == len(sample.images) == 102
    bottle_categories = {c.id for c in sample.categories.values() if c.supercategory == "Bottle"}
    for example in task.examples:
        expected = any(a.category_id in bottle_categories for a in sample.annotations_of(example.image_id))
        assert example.label == int(expected)
        assert example.bbox is None
        assert example.annotation_id is None
    assert sum(example.label for example in task.examples) == 24


def test_binary_supercategory_any_case(sample):
    assert build_examples(sample, "binary:bottle cap").task == "binary:Bottle cap"


def test_binary_unknown_supercategory(sample):
    with pytest.raises(TaskError, match="unknown supercategory 'Bottel'"):
        build_examples(sample, "binary:Bottel")


def test_supercategory_one_crop_per_annotation(sample):
    task = build_examples(sample, "supercategory")
    assert len(task.examples) == len(sample.annotations) == 397
    for example in task.examples:
        annotation = next(a for a in sample.annotations_of(example.image_id) if a.id == example.annotation_id)
        assert example.label_name == sample.categories[annotation.category_id].supercategory
        assert task.class_names[example.label] == example.label_name
        assert example.bbox == annotation.bbox


def test_supercategory_merges_rare_classes(sample):
    task = build_examples(sample, "supercategory", min_class_examples=10)
    counts = Counter(example.label_name for example in task.examples)
    assert OTHER_CLASS in task.class_names
    assert all(count >= 10 for name, count in counts.items() if name != OTHER_CLASS)
    assert "Battery" in task.merged_into_other
    assert "Cigarette" not in task.merged_into_other
    assert sum(counts.values()) == 397


def test_map_task_uses_class_map(sample, taco_maps):
    task = build_examples(sample, f"map:{taco_maps / 'map_10.csv'}")
    assert task.class_names == sorted(["Bottle", "Bottle cap", "Can", "Cigarette", "Cup", "Lid", "Other",
                                       "Plastic bag + wrapper", "Pop tab", "Straw"])
    class_map = read_class_map(taco_maps / "map_10.csv")
    for example in task.examples:
        annotation = next(a for a in sample.annotations_of(example.image_id) if a.id == example.annotation_id)
        assert example.label_name == class_map[sample.categories[annotation.category_id].name.casefold()]


def test_map_background_left_out(sample, taco_maps):
    task = build_examples(sample, f"map:{taco_maps / 'map_3.csv'}")
    assert "Background" not in task.class_names
    assert task.excluded_annotations == 397 - len(task.examples)
    assert task.excluded_annotations > 0


def test_map_missing_category_is_an_error(sample, tmp_path):
    partial = tmp_path / "partial.csv"
    partial.write_text("Glass bottle,Bottle\nDrink can,Can\n")
    with pytest.raises(TaskError, match="has no line for categories used in") as caught:
        build_examples(sample, f"map:{partial}")
    assert "Cigarette" in str(caught.value)


def test_map_file_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("Glass bottle,Bottle\nonly-one-column\n")
    with pytest.raises(TaskError, match="line 2"):
        read_class_map(bad)
    with pytest.raises(TaskError, match="cannot read class map"):
        read_class_map(tmp_path / "missing.csv")


def test_unknown_task(sample):
    with pytest.raises(TaskError, match="unknown task 'objects'"):
        build_examples(sample, "objects")
