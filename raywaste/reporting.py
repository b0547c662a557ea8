"""The run report: one HTML page with the dataset, the splits, tuning and the test evaluation.

:func:`build_report` reads what the stages left in ``OUT`` (``data/dataset.json``,
``tune/results.csv``, ``best_model.json``, ``metrics.json`` and the figures) and writes
``OUT/report.html``. The page has its style inline and refers to its images by paths
relative to ``OUT``, so the folder can be copied or served as it is. Figures the report
draws itself go to ``OUT/report/``. Every ``*.png`` under ``OUT/tune`` is shown with the
tuning results. For a stage that has not run yet, the page names the command that adds it,
so the report can be built after any stage.
"""

from __future__ import annotations

import csv
import html
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from raywaste import __version__
from raywaste.annotations import AnnotationsError
from raywaste.dataset import DATASET_FILE, SUMMARY_FILE, DatasetError, load_dataset_info
from raywaste.evaluation import (
    DEFAULT_THRESHOLD,
    METRICS_FILE,
    EvaluationError,
    comparison_rows,
    dataset_changes,
    model_data_dir,
)
from raywaste.inspection import (
    BOX_SIZES_PNG,
    SAMPLES_PNG,
    SUPERCATEGORIES_PNG,
    format_findings,
    inspect_annotations,
    sample_tiles,
)
from raywaste.plots import plot_buckets, plot_counts, plot_image_grid, plot_split_counts
from raywaste.tune_results import HYPERPARAMETER_PLOT, METRIC_PLOT
from raywaste.tuning import BEST_MODEL, BEST_MODEL_INFO, RESULTS_FILE, TUNE_DIR

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
FIGURES_DIR = "report"
SPLIT_COUNTS_PNG = "split_counts.png"
REPORT_SAMPLES = 6
_DECIMAL = re.compile(r"-?\d+(\.\d+)?([eE][-+]?\d+)?")
# Evaluation figures in the order the page shows them, with their captions.
EVALUATION_FIGURES = (
    ("confusion_matrix", "Confusion matrix: true classes in rows, predicted classes in columns."),
    ("class_scores", "Precision, recall and F1 per class."),
    ("precision_recall", "Precision-recall curve of the positive class, with the 0.5 and the chosen thresholds."),
    ("misclassified", "The most confident mistakes, as the model saw them (the stored input pixels)."),
)

TUNING_CAPTIONS = {
    METRIC_PLOT: "The validation metric of every trial by epoch. The best trial is drawn in red, and a cross marks "
                 "the last epoch of a trial that the scheduler stopped early.",
    HYPERPARAMETER_PLOT: "Each searched hyperparameter against the trial's validation metric at its last epoch. "
                         "Hollow markers are trials stopped early.",
}

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f3f3f3; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .85em; color: #555; }
.missing { color: #a33; } .note { color: #555; font-size: .9em; }
pre { background: #f6f6f6; padding: .6em; overflow-x: auto; font-size: .85em; }
"""


def build_report(out_dir: str | Path) -> Path:
    """Write ``OUT/report.html`` from the results in ``out_dir``; return its path."""
    out_dir = Path(out_dir).resolve()
    if not out_dir.is_dir():
        raise FileNotFoundError(f"output folder not found: {out_dir}; run 'raywaste run' or 'raywaste preprocess' first")
    figures_dir = out_dir / FIGURES_DIR
    # The dataset the best model was tuned on, which need not be OUT/data when several exist.
    dataset = _read_json(out_dir / model_data_dir(out_dir / BEST_MODEL) / DATASET_FILE)
    metrics = _read_json(out_dir / METRICS_FILE)
    title = f"raywaste run report: {dataset['task']}" if dataset else "raywaste run report"

    sections = [
        _dataset_section(out_dir, dataset, figures_dir),
        _splits_section(out_dir, dataset, figures_dir),
        _tuning_section(out_dir),
        _evaluation_section(out_dir, metrics),
    ]
    stale = _stale_results_warning(out_dir, metrics)
    page = "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_text(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_text(title)}</h1>",
        f'<p class="note">{_text(str(out_dir))}, written {time.strftime("%Y-%m-%d %H:%M:%S")} by raywaste {__version__}</p>',
        '<p><a href="#dataset">Dataset</a> · <a href="#splits">Splits</a> · <a href="#tuning">Tuning</a> · '
        '<a href="#evaluation">Test evaluation</a></p>',
        *stale,
        *sections,
        "</body></html>",
    ])
    path = out_dir / REPORT_FILE
    path.write_text(page, encoding="utf-8")
    log.info("report written to %s", path)
    return path


def _stale_results_warning(out_dir: Path, metrics: dict | None) -> list[str]:
    """Warn when the best model or the test scores were made from another dataset than the one shown."""
    model_info = _read_json(out_dir / BEST_MODEL_INFO)
    if model_info is None:
        return []
    try:
        info = load_dataset_info(out_dir / model_data_dir(out_dir / BEST_MODEL))
    except (DatasetError, EvaluationError):
        return []
    changes = dataset_changes(model_info, info)
    if metrics is not None and metrics.get("class_names") != info.class_names and "class_names" not in changes:
        changes.append(f"class_names of {METRICS_FILE}")
    if not changes:
        return []
    return [f'<p class="missing">The tuning and test results on this page come from a model tuned on another dataset '
            f"than the one described here (changed: {_text(', '.join(changes))}). Run <code>raywaste tune {_text(str(out_dir))} "
            f"--overwrite</code> and <code>raywaste evaluate {_text(str(out_dir))}</code> to bring them up to date.</p>"]


def _dataset_section(out_dir: Path, dataset: dict | None, figures_dir: Path) -> str:
    parts = ['<h2 id="dataset">Dataset</h2>']
    if dataset is None:
        return "\n".join(parts + [_missing(f"no {DATASET_FILE} in {out_dir / 'data'}", f"raywaste preprocess TACO_DIR {out_dir}")])

    settings = dataset.get("settings", {})
    image = settings.get("image", {})
    errors = dataset.get("errors", {})
    rows = [
        ("task", dataset["task"]),
        ("classes", f"{len(dataset['class_names'])}: {', '.join(dataset['class_names'])}"),
        ("images", f"{image.get('size', dataset['image_size'])} x {image.get('size', dataset['image_size'])} px, "
                   f"{dataset['color_mode']}, square mode {image.get('square', '?')}, padding {image.get('padding', 0)}, "
                   f"minimum box side {image.get('min_box_size', 0)} px"),
        ("split fractions", ", ".join(f"{split} {fraction:g}" for split, fraction in dataset["split_fractions"].items())
         + f" (seed {dataset['seed']})"),
        ("annotations", dataset.get("annotations", "")),
        ("photos", dataset.get("data_root", "")),
        ("examples not made", f"{errors.get('failed', 0)} failed, {errors.get('skipped', 0)} skipped"
         + "".join(f"; {reason} {count}" for reason, count in errors.get("by_reason", {}).items())),
    ]
    if dataset.get("merged_into_other"):
        rows.append(("merged into Other", ", ".join(dataset["merged_into_other"])))
    parts.append(_key_value_table(rows))
    parts.append(_annotations_overview(Path(dataset.get("annotations", "")), Path(dataset.get("data_root", "")), figures_dir))
    return "\n".join(parts)


def _annotations_overview(annotations: Path, photos_root: Path, figures_dir: Path) -> str:
    """Summarize the annotations file the dataset was made from, if it is still readable."""
    try:
        taco, summary = inspect_annotations(annotations)
    except AnnotationsError as error:
        return f'<p class="note">The annotations file cannot be summarized here: {_text(str(error))}</p>'

    spread = summary.annotations_per_image
    parts = [
        "<h3>Annotations</h3>",
        f"<p>{summary.images} images, {summary.annotations} annotations, {len(summary.categories)} categories in "
        f"{len(summary.supercategories)} supercategories. Annotations per image: min {spread['min']}, median "
        f"{spread['median']}, mean {spread['mean']}, max {spread['max']}. "
        f"Boxes under 32x32 pixels: {next(iter(summary.box_sizes.values()), 0)}.</p>",
    ]
    findings = format_findings(summary.findings)
    if findings:
        parts.append("<p>Findings of validation:</p><ul>" + "".join(f"<li>{_text(line.strip())}</li>" for line in findings) + "</ul>")

    name = annotations.name
    supercategories = {row["name"]: row["annotations"] for row in summary.supercategories}
    plot_counts(supercategories, figures_dir / SUPERCATEGORIES_PNG, f"annotations per supercategory ({name})", "annotations")
    plot_buckets(summary.box_sizes, figures_dir / BOX_SIZES_PNG, f"box sizes ({name})", "box area in annotated pixels", "boxes")
    parts.append(_figure(figures_dir / SUPERCATEGORIES_PNG, figures_dir.parent, "Annotations per supercategory."))
    parts.append(_figure(figures_dir / BOX_SIZES_PNG, figures_dir.parent, "Box sizes (COCO's small objects are under 32x32)."))

    tiles = sample_tiles(taco, photos_root, REPORT_SAMPLES) if photos_root.is_dir() else []
    if tiles:
        plot_image_grid(tiles, figures_dir / SAMPLES_PNG, f"sample photos with their boxes ({name})", columns=3, tile_px=320)
        parts.append(_figure(figures_dir / SAMPLES_PNG, figures_dir.parent, "Sample photos with their annotated boxes."))
    return "\n".join(parts)


def _splits_section(out_dir: Path, dataset: dict | None, figures_dir: Path) -> str:
    parts = ['<h2 id="splits">Splits</h2>']
    if dataset is None:
        return "\n".join(parts + [_missing("no dataset yet", f"raywaste preprocess TACO_DIR {out_dir}")])
    summary = {split: entry["per_class"] for split, entry in dataset["counts"].items()}
    splits = list(summary)
    rows = [[name, *(summary[split][name] for split in splits), sum(summary[split][name] for split in splits)]
            for name in dataset["class_names"]]
    rows.append(["total", *(dataset["counts"][split]["total"] for split in splits), sum(dataset["counts"][s]["total"] for s in splits)])
    parts.append(f'<p class="note">Examples per class and split, as in {SUMMARY_FILE}. Splits are assigned per photo.</p>')
    parts.append(_table(["class", *splits, "all"], rows))
    plot_split_counts(summary, figures_dir / SPLIT_COUNTS_PNG, f"examples per class and split ({dataset['task']})")
    parts.append(_figure(figures_dir / SPLIT_COUNTS_PNG, out_dir, "Examples per class, stacked by split."))
    return "\n".join(parts)


def _tuning_section(out_dir: Path) -> str:
    parts = ['<h2 id="tuning">Tuning</h2>']
    results = out_dir / TUNE_DIR / RESULTS_FILE
    if not results.is_file():
        return "\n".join(parts + [_missing(f"no {TUNE_DIR}/{RESULTS_FILE}", f"raywaste tune {out_dir}")])

    best = _read_json(out_dir / BEST_MODEL_INFO)
    if best:
        parts.append(f"<p>Best trial: {_text(best.get('metric', ''))} = {_number(best.get('best_metric'))} on the val split. "
                     f"Its model is <code>best_model.keras</code>, with its metadata in <code>{BEST_MODEL_INFO}</code>.</p>")
        parts.append("<pre>" + _text(json.dumps(best.get("config", {}), indent=2, default=str)) + "</pre>")
    with results.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if rows:
        columns = [column for column in rows[0] if column != "error" or any(row.get("error") for row in rows)]
        header = [column.removeprefix("config/") for column in columns]
        parts.append(f'<p class="note">All trials, best first ({TUNE_DIR}/{RESULTS_FILE}).</p>')
        parts.append(_table(header, [[_cell(row.get(column, "")) for column in columns] for row in rows]))
    for png in sorted((out_dir / TUNE_DIR).glob("*.png")):
        parts.append(_figure(png, out_dir, TUNING_CAPTIONS.get(png.name, png.stem.replace("_", " "))))
    return "\n".join(parts)


def _evaluation_section(out_dir: Path, metrics: dict | None) -> str:
    parts = ['<h2 id="evaluation">Test evaluation</h2>']
    if metrics is None:
        return "\n".join(parts + [_missing(f"no {METRICS_FILE}", f"raywaste evaluate {out_dir}")])

    split = metrics.get("split", "test")
    summary = f"{metrics['num_examples']} examples of the {split} split: accuracy {metrics['accuracy']:.3f}, macro F1 {metrics['macro_f1']:.3f}"
    if metrics.get("average_precision") is not None:
        summary += f", average precision {metrics['average_precision']:.3f}"
    parts.append(f"<p>{_text(summary)}.</p>")

    names = metrics["class_names"]
    per_class = [[name, *(_number(metrics["per_class"][name][key]) for key in ("precision", "recall", "f1")),
                  metrics["per_class"][name]["support"]] for name in names]
    parts.append(_table(["class", "precision", "recall", "F1", "support"], per_class))

    chosen = metrics.get("chosen_threshold")
    if chosen:
        positive = names[1]
        scored = chosen[split]
        parts.append(
            f"<p>Decision threshold chosen on the val split ({chosen['val_examples']} examples, never on {split}): "
            f"{chosen['value']:.4g}, where the val F1 of {_text(positive)} is {chosen['val_f1']:.3f} "
            f"({chosen['val_f1_at_default']:.3f} at {DEFAULT_THRESHOLD:g}).</p>"
        )
        parts.append(_table(
            ["threshold", "accuracy", f"F1 of {positive}", "macro F1"],
            [[f"{DEFAULT_THRESHOLD:g}", _number(metrics["accuracy"]), _number(metrics["per_class"][positive]["f1"]), _number(metrics["macro_f1"])],
             [f"{chosen['value']:.4g} (chosen on val)", _number(scored["accuracy"]), _number(scored["per_class"][positive]["f1"]),
              _number(scored["macro_f1"])]],
        ))
    elif metrics.get("decision_threshold") is not None:
        parts.append(f'<p class="note">Decision threshold {metrics["decision_threshold"]:g}; none could be chosen on the val split.</p>')

    rows = comparison_rows(metrics)
    binary = metrics.get("average_precision") is not None
    header = ["model", "accuracy", "macro F1"] + (["average precision"] if binary else []) + ["what it is"]
    table_rows = []
    for row in rows:
        cells = [row["name"], _number(row["accuracy"]), _number(row["macro_f1"])]
        if binary:
            cells.append(_number(row["average_precision"]))
        table_rows.append(cells + [row["description"]])
    parts.append(f"<h3>Model and baselines on the {_text(split)} split</h3>")
    parts.append(_table(header, table_rows))

    figures = metrics.get("figures", {"confusion_matrix": "confusion_matrix.png"})
    for name, caption in EVALUATION_FIGURES:
        if name in figures:
            parts.append(_figure(out_dir / figures[name], out_dir, caption))
    return "\n".join(parts)


def _figure(path: Path, base: Path, caption: str) -> str:
    """Return an HTML figure for ``path``, referenced relative to ``base``; a note when the file is missing."""
    if not path.is_file():
        return f'<p class="missing">figure missing: {_text(str(path))}</p>'
    source = path.relative_to(base).as_posix()
    return f'<figure><img src="{html.escape(source)}" alt="{_text(caption)}"><figcaption>{_text(caption)}</figcaption></figure>'


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_text(str(cell))}</th>" for cell in header)
    body = "".join(
        "<tr>" + "".join(
            f'<td class="number">{_text(str(cell))}</td>' if _is_number(cell) else f"<td>{_text(str(cell))}</td>" for cell in row
        ) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _key_value_table(rows: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{_text(key)}</th><td>{_text(str(value))}</td></tr>" for key, value in rows)
    return f"<table><tbody>{body}</tbody></table>"


def _missing(what: str, command: str) -> str:
    return f'<p class="missing">Not available: {_text(what)}. Run <code>{_text(command)}</code> to add it.</p>'


def _cell(value: str) -> str:
    """Shorten long decimals from a CSV cell to four significant digits; leave other text alone."""
    if not _is_number(value) or len(value) <= 8:
        return value
    number = float(value)
    return value if number.is_integer() else f"{number:.4g}"


def _number(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (int, float)):
        return f"{value:.3f}"
    return str(value)


def _is_number(value: Any) -> bool:
    """Tell whether a cell shows a plain decimal number (Python's float() also takes "1_000", "nan" and "inf")."""
    return isinstance(value, (int, float)) or bool(_DECIMAL.fullmatch(str(value)))


def _text(value: str) -> str:
    return html.escape(value, quote=True)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as error:
        log.warning("cannot read %s for the report: %s", path, error)
        return None
