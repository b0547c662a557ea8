"""Assign images to train, validation and test splits.

Splits are per image, so every crop of one photo lands in the same split and no
object is seen in training and testing both. The assignment is deterministic for a
seed and stratified by label as far as the data allow. Each image joins the stratum of
its rarest label. Within each stratum, images go one by one to the split that is
furthest below its target share, in the stratum and overall.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass

from raywaste.tasks import Example

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


class SplitError(ValueError):
    """Split fractions that cannot be used."""


@dataclass(frozen=True)
class SplitFractions:
    train: float = DEFAULT_FRACTIONS[0]
    val: float = DEFAULT_FRACTIONS[1]
    test: float = DEFAULT_FRACTIONS[2]

    def __post_init__(self) -> None:
        values = (self.train, self.val, self.test)
        if any(value < 0 for value in values) or abs(sum(values) - 1.0) > 1e-6:
            raise SplitError(f"split fractions must be non-negative and sum to 1, got train={self.train}, val={self.val}, test={self.test}")
        if self.train <= 0:
            raise SplitError("the train fraction must be positive")

    @classmethod
    def parse(cls, text: str) -> "SplitFractions":
        """Parse ``"0.8,0.1,0.1"`` (train, val, test)."""
        try:
            values = [float(part) for part in text.split(",")]
        except ValueError:
            raise SplitError(f"invalid split fractions {text!r}; expected three numbers such as 0.8,0.1,0.1") from None
        if len(values) != 3:
            raise SplitError(f"invalid split fractions {text!r}; expected three numbers such as 0.8,0.1,0.1")
        return cls(*values)

    def as_tuple(self) -> tuple[float, float, float]:
        return (self.train, self.val, self.test)


def assign_splits(examples: list[Example], fractions: SplitFractions = SplitFractions(), seed: int = 0) -> dict[int, str]:
    """Return the split of every image id that has examples.

    The result depends only on the examples' image ids and labels, the fractions and the seed.
    """
    labels_by_image: dict[int, list[int]] = defaultdict(list)
    for example in examples:
        labels_by_image[example.image_id].append(example.label)
    label_counts = Counter(example.label for example in examples)

    # An image joins the stratum of its rarest label (ties: the smaller label), so that
    # rare classes are spread over the splits first.
    strata: dict[int, list[int]] = defaultdict(list)
    for image_id in sorted(labels_by_image):
        rarest = min(labels_by_image[image_id], key=lambda label: (label_counts[label], label))
        strata[rarest].append(image_id)

    rng = random.Random(seed)
    targets = fractions.as_tuple()
    assigned = [0, 0, 0]
    split_of: dict[int, str] = {}
    for label in sorted(strata, key=lambda label: (label_counts[label], label)):
        image_ids = strata[label]
        rng.shuffle(image_ids)
        stratum_assigned = [0, 0, 0]
        for position, image_id in enumerate(image_ids):
            choice = _split_with_max_deficit(targets, stratum_assigned, position, assigned)
            stratum_assigned[choice] += 1
            assigned[choice] += 1
            split_of[image_id] = SPLITS[choice]
    return split_of


def _split_with_max_deficit(targets: tuple[float, ...], stratum_counts: list[int], stratum_total: int, global_counts: list[int]) -> int:
    """Pick the split furthest below its share, adding the stratum's and the overall deficit.

    The stratum's deficit gives the first images of a small class to train. The overall
    deficit keeps the totals close to the fractions when there are many small strata.
    """
    global_total = sum(global_counts)

    def deficit(index: int) -> tuple[float, int]:
        local = targets[index] * (stratum_total + 1) - stratum_counts[index]
        overall = targets[index] * (global_total + 1) - global_counts[index]
        return (round(local + overall, 9), -index)

    candidates = [index for index in range(len(targets)) if targets[index] > 0]
    return max(candidates, key=deficit)


def split_summary(examples: list[Example], split_of: dict[int, str], class_names: list[str]) -> dict[str, dict[str, int]]:
    """Count examples per class per split: ``{split: {class name: count}}``."""
    summary = {split: {name: 0 for name in class_names} for split in SPLITS}
    for example in examples:
        summary[split_of[example.image_id]][example.label_name] += 1
    return summary


def format_summary(summary: dict[str, dict[str, int]]) -> str:
    """Render a split summary as a fixed-width table with a total row."""
    class_names = list(next(iter(summary.values())).keys())
    width = max([len("class"), len("total")] + [len(name) for name in class_names])
    lines = [f"{'class':<{width}}  " + "  ".join(f"{split:>6}" for split in SPLITS)]
    for name in class_names:
        lines.append(f"{name:<{width}}  " + "  ".join(f"{summary[split][name]:>6}" for split in SPLITS))
    lines.append(f"{'total':<{width}}  " + "  ".join(f"{sum(summary[split].values()):>6}" for split in SPLITS))
    return "\n".join(lines)
