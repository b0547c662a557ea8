import codecs
import hashlib
import logging
from collections import Counter

import pytest

from raywaste.annotations import load_annotations
from raywaste.tasks import OTHER_CLASS, TaskError, build_examples, normalize_task, read_class_map


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


def test_map_task_keeps_map_checksum(sample, taco_maps):
    task = build_examples(sample, f"map:{taco_maps / 'map_10.csv'}")
    assert task.class_map.path == taco_maps / "map_10.csv"
    assert task.class_map.sha256 == hashlib.sha256((taco_maps / "map_10.csv").read_bytes()).hexdigest()
    assert build_examples(sample, "supercategory").class_map is None


def test_map_not_utf8_names_file(sample, tmp_path):
    utf16 = tmp_path / "utf16.csv"
    utf16.write_bytes(bytes.fromhex("fffe00626164"))
    expected = f"cannot read class map {utf16}: not UTF-8 text (invalid byte 0xff at position 0); save it as UTF-8 CSV"
    with pytest.raises(TaskError) as caught:
        read_class_map(utf16)
    assert str(caught.value) == expected
    with pytest.raises(TaskError) as caught:
        build_examples(sample, f"map:{utf16}")
    assert str(caught.value) == expected


def test_map_invalid_byte_position_counts_bom(tmp_path):
    latin1 = tmp_path / "latin1.csv"
    before = b"Glass bottle,Bottle\nPop tab,Caf"
    latin1.write_bytes(codecs.BOM_UTF8 + before + "\u00e9\n".encode("latin-1"))
    with pytest.raises(TaskError, match=f"invalid byte 0xe9 at position {len(codecs.BOM_UTF8) + len(before)}\\)"):
        read_class_map(latin1)


def test_map_bom_is_allowed(tmp_path):
    with_bom = tmp_path / "bom.csv"
    with_bom.write_bytes(codecs.BOM_UTF8 + b"Glass bottle,Bottle\n")
    assert read_class_map(with_bom) == {"glass bottle": "Bottle"}


def test_map_unknown_category_warned(sample, taco_maps, tmp_path, caplog):
    typo = tmp_path / "typo.csv"
    official = (taco_maps / "map_10.csv").read_text()
    typo.write_text(official + "Glas bottle,Bottle\n")
    with caplog.at_level(logging.WARNING, logger="raywaste.tasks"):
        task = build_examples(sample, f"map:{typo}")
    warnings = [record.getMessage() for record in caplog.records if "are ignored" in record.getMessage()]
    typo_line = len(official.splitlines()) + 1
    assert len(warnings) == 1
    # TACO's own map_10.csv has four lines for categories that its annotations.json lacks.
    assert f"class map {typo}: 5 line(s) name categories that are not in {sample.path}, and are ignored: " in warnings[0]
    assert f"line {typo_line} 'Glas bottle'" in warnings[0]
    assert "'Retort pouch'" in warnings[0]
    assert task.class_names == build_examples(sample, f"map:{taco_maps / 'map_10.csv'}").class_names


def test_map_unknown_category_any_case(sample, tmp_path, caplog):
    class_map = tmp_path / "cases.csv"
    lines = [f"{category.name.upper()},Litter" for category in sample.categories.values() if category.name != "Cigarette"]
    class_map.write_text("\n".join([*lines, "cigarette,Cigarette"]) + "\n")
    with caplog.at_level(logging.WARNING, logger="raywaste.tasks"):
        task = build_examples(sample, f"map:{class_map}")
    assert not [record for record in caplog.records if "are not in" in record.getMessage()]
    assert task.class_names == ["Cigarette", "Litter"]


def test_normalize_task_makes_map_path_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    absolute = f"map:{tmp_path.resolve() / 'maps' / 'x.csv'}"
    assert normalize_task("map:maps/x.csv") == absolute
    assert normalize_task(f"map:{tmp_path}/maps/../maps/x.csv") == absolute
    assert normalize_task(" Supercategory") == "supercategory"
    assert normalize_task("category") == "category"
    assert normalize_task("binary:Bottle") == "binary:Bottle"


@pytest.mark.parametrize("task, message", [
    ("supercat", "unknown task 'supercat'; use binary:<supercategory>"),
    ("objects:x", "unknown task 'objects:x'"),
    ("map:", "task 'map' needs a CSV file"),
    ("map:  ", "task 'map' needs a CSV file"),
    ("binary:", "task 'binary' needs a supercategory"),
    ("category:Bottle", "task 'category' takes no argument"),
])
def test_normalize_task_rejects_typos(task, message):
    with pytest.raises(TaskError, match=message):
        normalize_task(task)
