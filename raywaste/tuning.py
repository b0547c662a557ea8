"""Tuning stage: parallel trials with Ray Tune, early stopping, checkpoints, resume, readable results.

1. Find the preprocessed datasets under OUT that the search space selects by image size
   and color mode (``OUT/data`` and ``OUT/data-*``). Check the settings against the search
   space, the datasets and the cluster, so that a combination that cannot work, or a trial
   that no node can hold, fails before any trial starts.
2. Write ``OUT/tune/tuning.json`` (settings, search space, metric, datasets), which
   :func:`resume` reads after an interruption, and put the train and validation splits in
   the object store once for all trials.
3. Run the trials (:func:`raywaste.training.train_trial`) with the chosen scheduler and
   searcher; Ray keeps each trial's best checkpoints under ``OUT/tune/<trial>/``.
4. Write ``OUT/tune/results.csv`` (one row per trial), ``best_config.json``, the plots,
   and copy the best checkpoint to ``OUT/best_model.keras`` with ``OUT/best_model.json``.
   When the run was interrupted (Ctrl-C), write only results.csv and raise
   :class:`TuningInterrupted`, so that no model of unfinished trials is saved.

What this stage leaves for the next: a model that evaluation and prediction load with
``keras.models.load_model``, and the metadata that records how its inputs were made.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import logging
import os
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raywaste import __version__
from raywaste.dataset import DatasetError, DatasetInfo, find_datasets, load_dataset_info, load_split_arrays, manifest_annotations_sha256
from raywaste.model import BACKBONE_MIN_SIZE
from raywaste.search_space import (
    PARAMETERS,
    Distribution,
    SearchSpace,
    SearchSpaceError,
    default_search_space,
    load_search_space,
    parse_search_space,
)
from raywaste.training import CHECKPOINT_MODEL, TrialData, dataset_key, train_trial
from raywaste.tune_results import (
    BEST_CONFIG_FILE,
    HYPERPARAMETER_PLOT,
    METRIC_PLOT,
    RESULTS_FILE,
    STATUS_ERROR,
    STATUS_INTERRUPTED,
    best_checkpoint,
    plot_hyperparameters,
    plot_metric_by_epoch,
    results_rows,
    saved_trial_states,
    summarize_trials,
    write_best_config,
    write_results_csv,
)
from raywaste.tune_settings import TuneSettings, TuningError, check_combination, make_scheduler, make_searcher, resolve_metric

__all__ = ["TuneResult", "TuneSettings", "TuningError", "TuningInterrupted", "default_search_space", "resume", "tune"]

log = logging.getLogger(__name__)

TUNE_DIR = "tune"
RUN_FILE = "tuning.json"
BEST_MODEL = "best_model.keras"
BEST_MODEL_INFO = "best_model.json"


class TuningInterrupted(TuningError):
    """The driver was interrupted (Ctrl-C) before every trial finished; ``raywaste tune --resume`` continues the run."""


@dataclass
class TuneResult:
    """Result of :func:`tune` and :func:`resume`."""

    out_dir: Path
    metric: str
    mode: str
    best_metric: float
    best_config: dict[str, Any]
    best_model: Path
    results_csv: Path
    trials: list[dict[str, Any]] = field(repr=False)
    """The rows of results.csv, best trial first."""
    plots: list[Path] = field(default_factory=list)
    tensorboard_command: str = ""


@dataclass
class TuningRun:
    """Record of a run that :func:`resume` rebuilds it from, stored as ``OUT/tune/tuning.json``."""

    settings: TuneSettings
    space: SearchSpace
    metric: str
    mode: str
    datasets: dict[str, str]
    """:func:`~raywaste.training.dataset_key` of each dataset the trials use, mapped to its folder under OUT."""
    task: str
    class_names: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "raywaste_version": __version__,
            "settings": self.settings.to_dict(),
            "search_space": self.space.to_dict(),
            "metric": self.metric,
            "mode": self.mode,
            "datasets": self.datasets,
            "task": self.task,
            "class_names": self.class_names,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str) -> "TuningRun":
        return cls(
            settings=TuneSettings(**data["settings"]),
            space=parse_search_space(data["search_space"], source=source),
            metric=data["metric"],
            mode=data["mode"],
            datasets=dict(data["datasets"]),
            task=data["task"],
            class_names=list(data["class_names"]),
        )


def tune(
    out_dir: str | Path,
    settings: TuneSettings | None = None,
    search_space: SearchSpace | str | Path | dict | None = None,
    overwrite: bool = False,
) -> TuneResult:
    """Tune on the datasets under ``out_dir`` and save the best model; Ray must be initialized.

    ``search_space`` is a :class:`~raywaste.search_space.SearchSpace`, the path of a
    YAML or JSON file, a dict in the file's form, or None for the default space.
    """
    settings = settings or TuneSettings()
    out_dir = Path(out_dir).resolve()
    experiment_dir = out_dir / TUNE_DIR
    space = settings.apply_to(_as_search_space(search_space))

    # 1. Datasets, settings and resources, checked before anything is written.
    infos, space = select_datasets(out_dir, space)
    check_combination(settings, space)
    check_model_fits(space, infos)
    check_splits(infos)
    first = next(iter(infos.values()))
    metric, mode = resolve_metric(settings.metric, first.is_binary)
    param_space = space.to_param_space(settings.search)
    param_space.update(seed=settings.seed, checkpoint_every=settings.checkpoint_every)
    check_resources(settings)
    check_new_experiment(out_dir, overwrite)
    if experiment_dir.exists():
        shutil.rmtree(experiment_dir)

    # 2. The run's record, and the data in the object store.
    run = TuningRun(settings, space, metric, mode, {key: info.data_dir.name for key, info in infos.items()},
                    first.task, first.class_names)
    experiment_dir.mkdir(parents=True)
    (experiment_dir / RUN_FILE).write_text(json.dumps(run.to_json(), indent=2) + "\n")
    trainable = _trainable(_load_trial_data(infos), settings)

    # 3. Trials.
    from ray import tune as ray_tune

    tuner = ray_tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=ray_tune.TuneConfig(
            metric=metric,
            mode=mode,
            scheduler=make_scheduler(settings, space),
            search_alg=make_searcher(settings),
            num_samples=settings.num_samples,
            max_concurrent_trials=settings.max_concurrent_trials or None,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=_run_config(out_dir, settings, metric, mode),
    )
    log.info("tuning %d trials of up to %s epochs on %s with %s and %s search (metric %s)", settings.num_samples,
             space["max_epochs"], first.task, settings.scheduler, settings.search, metric)
    results = tuner.fit()

    # 4. Results.
    return _write_results(out_dir, run, results)


def resume(out_dir: str | Path) -> TuneResult:
    """Continue an interrupted tuning run in ``out_dir/tune``; Ray must be initialized.

    Finished trials keep their results; unfinished and failed ones continue from their
    latest checkpoint. The trainable and its data are rebuilt from ``tuning.json``.
    """
    from ray import tune as ray_tune

    out_dir = Path(out_dir).resolve()
    experiment_dir = out_dir / TUNE_DIR
    run_file = experiment_dir / RUN_FILE
    check_resumable(out_dir)
    try:
        run = TuningRun.from_json(json.loads(run_file.read_text()), source=str(run_file))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise TuningError(f"cannot read {run_file}: {error}") from error

    infos = {key: load_dataset_info(out_dir / folder) for key, folder in run.datasets.items()}
    check_splits(infos)
    check_resources(run.settings)
    trainable = _trainable(_load_trial_data(infos), run.settings)

    _set_tune_environment()
    log.info("resuming the tuning run in %s", experiment_dir)
    tuner = ray_tune.Tuner.restore(str(experiment_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
    results = tuner.fit()
    return _write_results(out_dir, run, results)


def check_new_experiment(out_dir: str | Path, overwrite: bool) -> None:
    """Raise TuningError when ``OUT/tune`` contains a run and overwrite is False (use --resume or --overwrite)."""
    experiment_dir = Path(out_dir).resolve() / TUNE_DIR
    if experiment_dir.exists() and not overwrite:
        raise TuningError(f"{experiment_dir} already exists; pass --resume to continue that run, "
                          "or --overwrite to start a new one there")


def check_resumable(out_dir: str | Path) -> None:
    """Raise TuningError unless ``OUT/tune`` contains a run that :func:`resume` can continue; needs no running Ray."""
    from ray import tune as ray_tune

    experiment_dir = Path(out_dir).resolve() / TUNE_DIR
    if not (experiment_dir / RUN_FILE).is_file() or not ray_tune.Tuner.can_restore(str(experiment_dir)):
        raise TuningError(f"no tuning run to resume in {experiment_dir} ({RUN_FILE} or Ray Tune's experiment state is missing); "
                          "start one with 'raywaste tune'")


def trial_dirname(trial) -> str:
    """Name a trial's folder by its id alone, which keeps paths short and stable across resumes."""
    return f"trial_{trial.trial_id}"


def _as_search_space(search_space: SearchSpace | str | Path | dict | None) -> SearchSpace:
    if search_space is None:
        return default_search_space()
    if isinstance(search_space, SearchSpace):
        return search_space
    if isinstance(search_space, dict):
        return parse_search_space(search_space, source="the search_space argument")
    return load_search_space(search_space)


def select_datasets(out_dir: Path, space: SearchSpace) -> tuple[dict[str, DatasetInfo], SearchSpace]:
    """Return the datasets the search space selects by image size and color mode, keyed by dataset key.

    A null ``image_size`` or ``color_mode`` takes the value of ``OUT/data``, or of the only
    dataset when there is no ``OUT/data``. The returned search space has it filled in.
    """
    found = find_datasets(out_dir)
    if not found:
        raise DatasetError(f"no preprocessed dataset under {out_dir} (no data/dataset.json); run 'raywaste preprocess' first")
    default = found[0] if found[0].data_dir.name == "data" or len(found) == 1 else None

    changes = {}
    for name, attribute in (("image_size", "image_size"), ("color_mode", "color_mode")):
        value = space[name]
        if isinstance(value, Distribution) and not value.is_finite:
            raise SearchSpaceError(f"{space.source}: {PARAMETERS[name].key}: select datasets with a constant or "
                                   f"{{choice: [...]}}, not {value.kind}")
        if value is None or (isinstance(value, Distribution) and None in value.values):
            if default is None:
                raise DatasetError(f"{out_dir} contains several datasets and no data/ folder: "
                                   f"{_describe(found)}; set data.image_size and data.color_mode in the search space")
            if isinstance(value, Distribution):
                changes[name] = {value.kind: [getattr(default, attribute) if v is None else v for v in value.values]}
            else:
                changes[name] = getattr(default, attribute)
    if changes:
        space = space.with_values(**changes)

    selected: dict[str, DatasetInfo] = {}
    for size, color in itertools.product(space.possible_values("image_size"), space.possible_values("color_mode")):
        matches = [info for info in found if info.image_size == size and info.color_mode == color]
        if not matches:
            raise DatasetError(
                f"no preprocessed dataset with image size {size} and color mode {color} under {out_dir} "
                f"(found: {_describe(found)}); make one with: raywaste preprocess TACO_DIR {out_dir} "
                f"--image-size {size} --color-mode {color} --dataset-name data-{size}-{color}"
            )
        if len(matches) > 1:
            raise DatasetError(f"several datasets under {out_dir} have image size {size} and color mode {color}: "
                               f"{_describe(matches)}; move all but one elsewhere")
        selected[dataset_key(size, color)] = matches[0]

    first = next(iter(selected.values()))
    for info in selected.values():
        if info.task != first.task or info.class_names != first.class_names:
            raise DatasetError(f"{info.data_dir} (task {info.task}, {info.num_classes} classes) differs from {first.data_dir} "
                               f"(task {first.task}, {first.num_classes} classes); the datasets of one tuning run need the "
                               "same task and classes")
    return selected, space


def _describe(infos: list[DatasetInfo]) -> str:
    return ", ".join(f"{info.data_dir.name} ({info.image_size} px, {info.color_mode})" for info in infos)


def check_splits(infos: dict[str, DatasetInfo]) -> None:
    """Reject datasets whose train or val split cannot train or rank trials.

    A binary task needs positive examples in both: without them in val, the average
    precision and F1 that rank the trials are 0 for every trial, and the search is blind.
    """
    for info in infos.values():
        counts = info.raw.get("counts", {})
        totals = {split: int(counts.get(split, {}).get("total", 0)) for split in ("train", "val")}
        if not all(totals.values()):
            raise TuningError(f"{info.data_dir}: the train and val splits need examples (train {totals['train']}, "
                              f"val {totals['val']}); preprocess again with other --split fractions")
        if info.is_binary:
            positive = info.class_names[1]
            missing = [split for split in ("train", "val") if not counts[split].get("per_class", {}).get(positive)]
            if missing:
                raise TuningError(f"{info.data_dir}: the {' and '.join(missing)} split(s) have no {positive!r} example, so "
                                  "trials cannot be trained or ranked; preprocess again with a larger val fraction "
                                  "(--split) or with more photos")


def check_model_fits(space: SearchSpace, infos: dict[str, DatasetInfo]) -> None:
    """Reject search spaces whose deepest plain CNN or whose backbone does not fit the smallest image."""
    smallest = min(info.image_size for info in infos.values())
    backbones = space.possible_values("backbone")
    if "none" in backbones:
        blocks = _largest(space, "conv_blocks")
        if smallest // (2 ** blocks) < 1:
            raise TuningError(f"{space.source}: model.conv_blocks up to {blocks} shrinks the {smallest}x{smallest} images "
                              "below one pixel; use fewer conv_blocks or a larger image size")
    if any(backbone != "none" for backbone in backbones) and smallest < BACKBONE_MIN_SIZE:
        raise TuningError(f"{space.source}: model.backbone needs images of at least {BACKBONE_MIN_SIZE} pixels, but a selected "
                          f"dataset has {smallest}; preprocess with --image-size {BACKBONE_MIN_SIZE} or more")


def _largest(space: SearchSpace, name: str) -> int:
    value = space[name]
    if isinstance(value, Distribution) and value.kind == "randint":
        return int(value.values[1]) - 1
    return int(max(space.possible_values(name)))


def check_resources(settings: TuneSettings) -> None:
    """Fail at once when no node can ever hold one trial, instead of leaving trials pending forever."""
    import ray

    cluster = ray.cluster_resources()
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    max_cpus = max((node["Resources"].get("CPU", 0.0) for node in nodes), default=cluster.get("CPU", 0.0))
    max_gpus = max((node["Resources"].get("GPU", 0.0) for node in nodes), default=cluster.get("GPU", 0.0))
    if settings.cpus_per_trial > max_cpus or settings.gpus_per_trial > max_gpus:
        raise TuningError(
            f"each trial requests {settings.cpus_per_trial:g} CPUs and {settings.gpus_per_trial:g} GPUs, but the largest "
            f"Ray node has {max_cpus:g} CPUs and {max_gpus:g} GPUs; lower --cpus-per-trial/--gpus-per-trial or add resources"
        )


def _load_trial_data(infos: dict[str, DatasetInfo]) -> dict[str, TrialData]:
    data = {}
    for key, info in infos.items():
        train_images, train_labels = load_split_arrays(info.data_dir, "train")
        val_images, val_labels = load_split_arrays(info.data_dir, "val")
        data[key] = TrialData(train_images, train_labels, val_images, val_labels, info.class_names, info.is_binary)
        log.info("dataset %s: %d train and %d val examples of %s", info.data_dir, len(train_labels), len(val_labels), info.input_shape)
    return data


def _trainable(data: dict[str, TrialData], settings: TuneSettings):
    from ray import tune as ray_tune

    return ray_tune.with_resources(
        ray_tune.with_parameters(train_trial, datasets=data),
        {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial},
    )


def _set_tune_environment() -> None:
    """Set the environment variables that Ray Tune reads when ``Tuner.fit`` starts."""
    # A checkpoint every epoch makes Tune snapshot its state often; that is expected here,
    # so Tune's warning about it is silenced.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Unless this is 1, Tune adds its CSV, JSON and TensorBoard loggers. _run_config passes the
    # CSV and JSON loggers itself, because Tune's TensorBoard logger would repeat the trials'
    # own event files and print a TensorBoard command for a temporary folder without them.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")


def _run_config(out_dir: Path, settings: TuneSettings, metric: str, mode: str):
    from ray import tune as ray_tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    _set_tune_environment()
    return ray_tune.RunConfig(
        name=TUNE_DIR,
        storage_path=str(out_dir),
        checkpoint_config=ray_tune.CheckpointConfig(
            num_to_keep=settings.checkpoints_to_keep, checkpoint_score_attribute=metric, checkpoint_score_order=mode
        ),
        # Artifacts are the TensorBoard files each trial writes into its working directory.
        sync_config=ray_tune.SyncConfig(sync_artifacts=True),
        # Each trial's progress.csv and result.json, which the ResultGrid and resume read.
        callbacks=[CSVLoggerCallback(), JsonLoggerCallback()],
        verbose=1,
    )


def _write_results(out_dir: Path, run: TuningRun, results) -> TuneResult:
    experiment_dir = out_dir / TUNE_DIR
    metric, mode = run.metric, run.mode
    max_epochs = int(run.space["max_epochs"])

    trials = summarize_trials(results, metric, max_epochs, run.settings.scheduler, saved_trial_states(experiment_dir))
    rows = results_rows(trials, metric)
    results_csv = experiment_dir / RESULTS_FILE
    write_results_csv(results_csv, rows)
    failed = sum(1 for row in rows if row["status"] == STATUS_ERROR)
    if failed:
        log.warning("%d of %d trials failed; see %s", failed, len(rows), results_csv)
    interrupted = sum(1 for row in rows if row["status"] == STATUS_INTERRUPTED)
    if interrupted:
        failed_note = f" ({failed} of them failed)" if failed else ""
        raise TuningInterrupted(
            f"tuning was interrupted: {len(rows) - interrupted} of {len(rows)} trials finished{failed_note}. "
            f"No best model was saved, and the trials so far are listed in {results_csv}. "
            f"Continue the run with: raywaste tune --resume {shlex.quote(str(out_dir))}"
        )

    best = best_checkpoint(results, metric, mode)
    if best is None:
        first_error = next((result.error for result in results if result.error is not None), None)
        raise TuningError(f"no trial left a checkpoint with {metric}; first error: {first_error}")
    best_result, checkpoint, best_metrics = best
    best_config = dict(best_result.config)
    best_metric = float(best_metrics[metric])
    best_model = out_dir / BEST_MODEL
    staged = best_model.with_name(f".{BEST_MODEL}.partial")
    with checkpoint.as_directory() as directory:
        shutil.copyfile(Path(directory) / CHECKPOINT_MODEL, staged)
    os.replace(staged, best_model)

    key = dataset_key(best_config["image_size"], best_config["color_mode"])
    folder = run.datasets[key]
    info = load_dataset_info(out_dir / folder)
    model_info = {
        "task": info.task,
        "class_names": info.class_names,
        "image_size": info.image_size,
        "color_mode": info.color_mode,
        "data_dir": folder,
        "dataset": info.raw.get("settings"),
        "annotations_sha256": manifest_annotations_sha256(out_dir / folder),
        "config": best_config,
        "metric": metric,
        "mode": mode,
        "best_metric": best_metric,
        "epoch": int(best_metrics.get("epoch", 0)),
        "trial_id": best_metrics.get("trial_id"),
        "trial_path": best_result.path,
        "scheduler": run.settings.scheduler,
        "search": run.settings.search,
    }
    (out_dir / BEST_MODEL_INFO).write_text(json.dumps(model_info, indent=2, default=str) + "\n")
    write_best_config(experiment_dir / BEST_CONFIG_FILE, best_config)

    plots = [experiment_dir / METRIC_PLOT, experiment_dir / HYPERPARAMETER_PLOT]
    plot_metric_by_epoch(trials, metric, plots[0], best_metrics.get("trial_id"), max_epochs)
    plot_hyperparameters(trials, run.space, metric, plots[1])

    command = f"tensorboard --logdir {experiment_dir}"
    stopped = sum(1 for row in rows if row["stopped_early"])
    print(f"{len(rows)} trials, {stopped} stopped early, {failed} failed; table in {results_csv}")
    print(f"best trial {model_info['trial_id']}: {metric} = {best_metric:.4f} at epoch {model_info['epoch']}, "
          f"config {json.dumps(best_config, default=str)}")
    print(f"best model saved to {best_model}; plots: {', '.join(str(plot) for plot in plots)}")
    note = "" if importlib.util.find_spec("tensorboard") else "  (install TensorBoard first: pip install tensorboard)"
    print(f"TensorBoard: {command}{note}")
    return TuneResult(out_dir, metric, mode, best_metric, best_config, best_model, results_csv, rows, plots, command)
