"""Readable tuning results: the per-trial table, the best checkpoint, and the plots.

Everything here reads the ``ResultGrid`` that ``Tuner.fit`` returned (or the rows made
from it) and writes files; nothing runs trials. A trial's history is its reported rows, one
per epoch: when a restored trial repeats an epoch (it resumed from a checkpoint older than
its last report), the later report of that epoch wins.

A trial's status is "ok" (it ran to its end, or its scheduler stopped it), "error", or
"interrupted": the driver was stopped (Ctrl-C) before the trial finished, and
``raywaste tune --resume`` continues it.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raywaste.search_space import PARAMETERS, Distribution, SearchSpace

RESULTS_FILE = "results.csv"
BEST_CONFIG_FILE = "best_config.json"
METRIC_PLOT = "metric_by_epoch.png"
HYPERPARAMETER_PLOT = "hyperparameters.png"

STATUS_OK = "ok"
STATUS_ERROR = "error"
STATUS_INTERRUPTED = "interrupted"
# The schedulers that stop trials before max_epochs. FIFO and PBT run every trial to its end.
EARLY_STOPPING_SCHEDULERS = ("asha", "hyperband")
# Ray Tune's status of a trial that has ended without an error (ray.tune.experiment.Trial.TERMINATED).
RAY_TERMINATED = "TERMINATED"


@dataclass
class TrialSummary:
    """One trial's outcome: its config, per-epoch history of the metric, and status."""

    trial_id: str
    config: dict[str, Any]
    epochs: list[int]
    values: list[float]
    """The tuning metric at each epoch of ``epochs``."""
    accuracy: list[float]
    status: str
    """STATUS_OK, STATUS_ERROR or STATUS_INTERRUPTED."""
    stopped_early: bool
    """True when ASHA or HyperBand stopped the trial before max_epochs."""
    error: str
    time_s: float
    path: str

    @property
    def best(self) -> float | None:
        return max(self.values) if self.values else None

    @property
    def last(self) -> float | None:
        return self.values[-1] if self.values else None

    @property
    def epochs_run(self) -> int:
        return self.epochs[-1] if self.epochs else 0


def saved_trial_states(experiment_dir: Path) -> dict[str, tuple[str, str]]:
    """Return each trial's id and Ray Tune status, keyed by its folder name, from the experiment's saved state.

    ``Tuner.fit`` saves the experiment state one last time before it stops the trials that
    still run, so unlike the trials in its ``ResultGrid``, the saved state keeps them
    RUNNING, PENDING or PAUSED after an interruption (Ray 2.60).
    """
    from ray.tune import ExperimentAnalysis

    # Loading the state warns about each trial without results (one that never started),
    # which Ray has already done when it built the ResultGrid.
    analysis_log = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = analysis_log.level
    analysis_log.setLevel(logging.ERROR)
    try:
        trials = ExperimentAnalysis(str(experiment_dir)).trials
    finally:
        analysis_log.setLevel(level)
    return {Path(trial.path).name: (trial.trial_id, trial.status) for trial in trials}


def trial_status(has_error: bool, done: bool, saved_status: str | None) -> str:
    """Classify a trial as STATUS_OK, STATUS_ERROR or STATUS_INTERRUPTED.

    Ray 2.60 sets the ``done`` metric of a trial's last result when the trainable returns or
    the scheduler stops the trial, but not when an interrupted ``Tuner.fit`` stops it. After a
    resume, a trial that finished before the interruption can lack it, so a saved TERMINATED
    status counts as finished too.
    """
    if has_error:
        return STATUS_ERROR
    if done or saved_status == RAY_TERMINATED:
        return STATUS_OK
    return STATUS_INTERRUPTED


def summarize_trials(results, metric: str, max_epochs: int, scheduler: str,
                     saved_states: dict[str, tuple[str, str]]) -> list[TrialSummary]:
    """Turn a Ray Tune ``ResultGrid`` into one :class:`TrialSummary` per trial.

    ``saved_states`` is :func:`saved_trial_states` of the experiment.
    """
    summaries = []
    for result in results:
        history = result.metrics_dataframe
        by_epoch: dict[int, dict[str, Any]] = {}
        if history is not None and "epoch" in history and metric in history:
            for row in history.to_dict("records"):
                if row.get("epoch") is not None and not _is_nan(row["epoch"]):
                    by_epoch[int(row["epoch"])] = row
        epochs = sorted(by_epoch)
        metrics = result.metrics or {}
        folder = Path(result.path).name
        # A trial that never reported has no trial_id metric.
        saved_id, saved_status = saved_states.get(folder, (folder, None))
        status = trial_status(result.error is not None, bool(metrics.get("done")), saved_status)
        epochs_run = epochs[-1] if epochs else 0
        summaries.append(TrialSummary(
            trial_id=str(metrics.get("trial_id") or saved_id),
            config=dict(result.config or {}),
            epochs=epochs,
            values=[float(by_epoch[epoch][metric]) for epoch in epochs],
            accuracy=[float(by_epoch[epoch].get("val_accuracy", math.nan)) for epoch in epochs],
            status=status,
            stopped_early=status == STATUS_OK and scheduler in EARLY_STOPPING_SCHEDULERS and epochs_run < max_epochs,
            error=str(result.error).strip().splitlines()[-1] if result.error else "",
            time_s=float(metrics.get("time_total_s", 0.0)),
            path=str(result.path),
        ))
    return summaries


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def results_rows(trials: list[TrialSummary], metric: str) -> list[dict[str, Any]]:
    """Return the rows of results.csv, best trial first."""
    rows = []
    for trial in trials:
        row = {
            "trial_id": trial.trial_id,
            "status": trial.status,
            f"best_{metric}": trial.best,
            f"last_{metric}": trial.last,
            "last_val_accuracy": trial.accuracy[-1] if trial.accuracy else None,
            "epochs": trial.epochs_run,
            "stopped_early": trial.stopped_early,
            "time_s": round(trial.time_s, 1),
        }
        row.update({f"config/{key}": value for key, value in sorted(trial.config.items())})
        row["error"] = trial.error
        rows.append(row)
    rows.sort(key=lambda row: (row[f"best_{metric}"] is None, -(row[f"best_{metric}"] or 0.0)))
    return rows


def write_results_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def best_checkpoint(results, metric: str, mode: str):
    """Return ``(result, checkpoint, metrics)`` of the best kept checkpoint over all trials, or None.

    The exported model is a checkpoint, so trials are ranked by their checkpointed epochs,
    not by epochs that no checkpoint kept.
    """
    sign = 1.0 if mode == "max" else -1.0
    best = None
    for result in results:
        for checkpoint, metrics in result.best_checkpoints or []:
            value = metrics.get(metric)
            if value is None or _is_nan(value):
                continue
            if best is None or sign * float(value) > sign * float(best[2][metric]):
                best = (result, checkpoint, metrics)
    return best


def write_best_config(path: Path, config: dict[str, Any]) -> None:
    path.write_text(json.dumps(config, indent=2, default=str) + "\n")


def plot_metric_by_epoch(trials: list[TrialSummary], metric: str, path: Path, best_trial_id: str | None, max_epochs: int) -> None:
    """Draw the validation metric against epochs, one line per trial; an x marks a trial stopped early."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(figsize=(8, 5))
    any_early = False
    for trial in trials:
        if not trial.epochs:
            continue
        is_best = trial.trial_id == best_trial_id
        axes.plot(trial.epochs, trial.values, color="tab:red" if is_best else "tab:blue", alpha=1.0 if is_best else 0.45,
                  linewidth=2.2 if is_best else 1.0, marker="o", markersize=3, zorder=3 if is_best else 2,
                  label=f"best trial {trial.trial_id}" if is_best else None)
        if trial.stopped_early:
            axes.plot(trial.epochs[-1], trial.values[-1], marker="x", color="black", markersize=7, zorder=4)
            any_early = True
    if any_early:
        axes.plot([], [], marker="x", color="black", linestyle="none", label="stopped early")
    axes.set_xlabel("epoch")
    axes.set_ylabel(metric)
    axes.set_xlim(0.5, max_epochs + 0.5)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_title(f"{metric} of {len(trials)} trials")
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_hyperparameters(trials: list[TrialSummary], space: SearchSpace, metric: str, path: Path) -> list[str]:
    """Draw each searched hyperparameter against the trials' final metric; return the names drawn.

    Hollow markers are trials stopped early, whose final metric comes from an earlier epoch.
    """
    plt = _pyplot()
    from matplotlib.lines import Line2D

    names = [name for name in space.searched if any(name in trial.config for trial in trials)]
    finished = [trial for trial in trials if trial.values]
    columns = min(3, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / columns))
    figure, axes_grid = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.3 * rows), squeeze=False)
    for index, axes in enumerate(axes_grid.flat):
        if index >= len(names):
            axes.set_visible(False)
            continue
        name = names[index]
        _draw_parameter(axes, name, space[name], finished)
        axes.set_title(PARAMETERS[name].key, fontsize=10)
        axes.set_ylabel(f"final {metric}", fontsize=8)
        axes.grid(alpha=0.3)
    if not names:
        axes_grid[0][0].set_visible(True)
        axes_grid[0][0].text(0.5, 0.5, "no searched hyperparameter", ha="center", va="center")
    handles = [Line2D([], [], marker="o", linestyle="none", color="tab:blue", label="ran all epochs"),
               Line2D([], [], marker="o", linestyle="none", markerfacecolor="none", color="tab:blue",
                      label="stopped early (metric of its last epoch)")]
    figure.legend(handles=handles, loc="upper right", fontsize=8, frameon=False)
    figure.suptitle(f"hyperparameters against the final {metric}", fontsize=11, x=0.35)
    figure.tight_layout(rect=(0, 0, 1, 0.95))
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return names


def _draw_parameter(axes, name: str, distribution: Distribution, trials: list[TrialSummary]) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    values = [trial.config.get(name) for trial in trials]
    finals = [trial.last for trial in trials]
    early = [trial.stopped_early for trial in trials]
    numeric = all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in values)
    if numeric and not distribution.is_finite:
        x = np.asarray(values, dtype=float)
        low, high = (float(bound) for bound in distribution.values)
        if distribution.kind == "loguniform":
            axes.set_xscale("log")
            axes.set_xlim(low / 1.15, high * 1.15)
            # A searched range often spans one decade or less: label 1, 2 and 5 of each decade.
            axes.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            axes.xaxis.set_minor_formatter(NullFormatter())
        else:
            margin = 0.03 * (high - low)
            axes.set_xlim(low - margin, high + margin)
    else:
        # Categories (strings, booleans, choices) sit at fixed positions with a little jitter.
        categories = list(dict.fromkeys(distribution.values)) if distribution.is_finite else sorted(set(map(str, values)))
        labels = [str(category) for category in categories]
        positions = {label: position for position, label in enumerate(labels)}
        jitter = np.random.default_rng(0).uniform(-0.12, 0.12, len(values))
        x = np.asarray([positions.get(str(value), -1) for value in values], dtype=float) + jitter
        axes.set_xticks(range(len(labels)), labels=labels, fontsize=8)
        axes.set_xlim(-0.6, len(labels) - 0.4)
    for stopped in (False, True):
        selected = [i for i in range(len(values)) if early[i] == stopped]
        if selected:
            axes.scatter(x[selected], np.asarray(finals)[selected], s=28, edgecolors="tab:blue",
                         facecolors="none" if stopped else "tab:blue")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt

