from collections import Counter, defaultdict

import pytest

from raywaste.annotations import load_annotations
from raywaste.splits import SplitError, SplitFractions, assign_splits, split_summary
from raywaste.tasks import build_examples


@pytest.fixture(scope="module")
def official(taco_official):
    return load_annotations(taco_official)


def test_splits_are_deterministic(official):
    examples = build_examples(official, "binary:Bottle").examples
    assert assign_splits(examples, seed=3) == assign_splits(examples, seed=3)
    assert assign_splits(examples, seed=3) != assign_splits(examples, seed=4)


def test_split_sizes_follow_fractions(official):
    examples = build_examples(official, "binary:Bottle").examples
    counts = Counter(assign_splits(examples, SplitFractions(0.7, 0.2, 0.1), seed=0).values())
    assert counts == {"train": 1050, "val": 300, "test": 150}


def test_binary_split_is_stratified(official):
    task = build_examples(official, "binary:Bottle")
    split_of = assign_splits(task.examples, seed=0)
    summary = split_summary(task.examples, split_of, task.class_names)
    positives = sum(example.label for example in task.examples)
    for split, fraction in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
        assert abs(summary[split]["Bottle"] - fraction * positives) <= 1


def test_crops_of_one_image_share_a_split(official):
    task = build_examples(official, "supercategory")
    split_of = assign_splits(task.examples, seed=0)
    splits_per_image = defaultdict(set)
    for example in task.examples:
        splits_per_image[example.image_id].add(split_of[example.image_id])
    assert all(len(splits) == 1 for splits in splits_per_image.values())
    assert set(split_of) == {example.image_id for example in task.examples}


def test_common_classes_reach_every_split(official):
    task = build_examples(official, "supercategory")
    summary = split_summary(task.examples, assign_splits(task.examples, seed=0), task.class_names)
    totals = Counter(example.label_name for example in task.examples)
    for name, total in totals.items():
        if total >= 100:
            assert summary["val"][name] > 0, name
            assert summary["test"][name] > 0, name


def test_zero_test_fraction(official):
    examples = build_examples(official, "binary:Bottle").examples
    assert "test" not in set(assign_splits(examples, SplitFractions(0.9, 0.1, 0.0), seed=0).values())


@pytest.mark.parametrize("text", ["0.8,0.1", "0.8,0.1,0.2", "a,b,c", "0,0.5,0.5", "-0.1,0.6,0.5"])
def test_invalid_fractions(text):
    with pytest.raises(SplitError):
        SplitFractions.parse(text)
