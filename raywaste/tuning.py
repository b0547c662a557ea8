"""Tuning stage: parallel CNN trials with Ray Tune and early stopping by ASHA.

1. Load the train and validation splits from ``OUT/data`` and put them in the object store.
2. Run ``num_samples`` trials of :func:`raywaste.training.train_trial` over the search
   space; ASHA stops trials whose validation metric trails after a few epochs.
3. Write ``OUT/tune/results.csv`` (one row per trial) and copy the best trial's best
   checkpoint to ``OUT/best_model.keras``, with its config and dataset metadata in
   ``OUT/best_model.json``.

What this stage leaves for the next: a model that evaluation and prediction load with
``keras.models.load_model``, and the metadata that records how its inputs were made.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from raywaste.dataset import load_dataset_info, load_split_arrays
from raywaste.training import CHECKPOINT_MODEL, TrialData, train_trial, tuning_metric

log = logging.getLogger(__name__)

TUNE_DIR = "tune"
BEST_MODEL = "best_model.keras"
BEST_MODEL_INFO = "best_model.json"
RESULTS_FILE = "results.csv"


class TuningError(RuntimeError):
    """Tuning could not run or produced no usable trial."""


@dataclass(frozen=True)
class TuneSettings:
    """How many trials run, how long, and on what resources."""

    num_samples: int = 8
    max_epochs: int = 15
    grace_period: int = 3
    """Epochs every trial runs before ASHA may stop it."""
    reduction_factor: int = 3
    """ASHA keeps about 1 in this many trials at each rung."""
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    batch_size: int = 32
    class_weight: str = "balanced"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.max_epochs < 1:
            raise ValueError("num_samples and max_epochs must be at least 1")
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0:
            raise ValueError(f"invalid resources per trial: {self.cpus_per_trial} CPUs, {self.gpus_per_trial} GPUs")
        if self.class_weight not in ("balanced", "none"):
            raise ValueError(f"invalid class_weight {self.class_weight!r}; expected 'balanced' or 'none'")


@dataclass
class TuneResult:
    """Result of :func:`tune`."""

    out_dir: Path
    metric: str
    mode: str
    best_metric: float
    best_config: dict[str, Any]
    best_model: Path
    results_csv: Path
    trials: list[dict[str, Any]]


def default_search_space() -> dict[str, Any]:
    """Return the search space used when none is given: architecture and learning rate."""
    from ray import tune

    return {
        "learning_rate": tune.loguniform(1e-4, 3e-3),
        "conv_blocks": tune.choice([2, 3, 4]),
        "filters": tune.choice([16, 32]),
        "dropout": tune.uniform(0.0, 0.5),
        "dense_units": tune.choice([32, 64, 128]),
        "activation": tune.choice(["relu", "leaky_relu"]),
    }


def tune(
    out_dir: str | Path,
    settings: TuneSettings | None = None,
    search_space: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> TuneResult:
    """Tune the CNN on ``OUT/data`` and save the best model; Ray must be initialized."""
    import ray
    from ray import tune as ray_tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    settings = settings or TuneSettings()
    out_dir = Path(out_dir).resolve()
    experiment_dir = out_dir / TUNE_DIR
    if experiment_dir.exists():
        if not overwrite:
            raise TuningError(f"{experiment_dir} already exists; pass --overwrite to start a new tuning run there")
        shutil.rmtree(experiment_dir)

    # 1. Data into the object store, once for all trials.
    info = load_dataset_info(out_dir / "data")
    train_images, train_labels = load_split_arrays(info.data_dir, "train")
    val_images, val_labels = load_split_arrays(info.data_dir, "val")
    if len(train_labels) == 0 or len(val_labels) == 0:
        raise TuningError(f"{info.data_dir}: the train and val splits need examples (train {len(train_labels)}, val {len(val_labels)})")
    data = TrialData(train_images, train_labels, val_images, val_labels, info.class_names, info.is_binary)
    _check_resources(ray.cluster_resources(), settings)

    metric, mode = tuning_metric(info.is_binary), "max"
    space = dict(search_space or default_search_space())
    space.update({
        "max_epochs": settings.max_epochs,
        "batch_size": space.get("batch_size", settings.batch_size),
        "class_weight": space.get("class_weight", settings.class_weight),
        "seed": settings.seed,
    })

    # 2. Trials. Every improvement is checkpointed, which makes Tune snapshot its state
    # often; that is expected here, so Tune's warning about it is silenced.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    trainable = ray_tune.with_resources(
        ray_tune.with_parameters(train_trial, data=data),
        {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial},
    )
    scheduler = ASHAScheduler(
        time_attr="training_iteration",
        max_t=settings.max_epochs,
        grace_period=min(settings.grace_period, settings.max_epochs),
        reduction_factor=settings.reduction_factor,
    )
    tuner = ray_tune.Tuner(
        trainable,
        param_space=space,
        tune_config=ray_tune.TuneConfig(
            metric=metric,
            mode=mode,
            scheduler=scheduler,
            search_alg=BasicVariantGenerator(random_state=settings.seed),
            num_samples=settings.num_samples,
            trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}",
        ),
        run_config=ray_tune.RunConfig(
            name=TUNE_DIR,
            storage_path=str(out_dir),
            checkpoint_config=ray_tune.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=metric, checkpoint_score_order=mode
            ),
            verbose=1,
        ),
    )
    log.info("tuning %d trials of up to %d epochs on %s (metric %s)", settings.num_samples, settings.max_epochs, info.task, metric)
    results = tuner.fit()

    # 3. Results table and best model.
    trials = _trial_rows(results, metric, settings.max_epochs)
    results_csv = experiment_dir / RESULTS_FILE
    _write_results_csv(results_csv, trials)
    if results.num_errors:
        log.warning("%d of %d trials failed; see %s", results.num_errors, len(results), results_csv)
    completed = [result for result in results if result.error is None and result.metrics and metric in result.metrics]
    if not completed:
        first_error = next((result.error for result in results if result.error is not None), None)
        raise TuningError(f"no trial completed an epoch; first error: {first_error}")

    best = results.get_best_result(metric=metric, mode=mode, scope="all")
    checkpoint = best.get_best_checkpoint(metric=metric, mode=mode)
    if checkpoint is None:
        raise TuningError(f"the best trial ({best.path}) left no checkpoint")
    best_metric = float(best.metrics_dataframe[metric].max())
    best_model = out_dir / BEST_MODEL
    with checkpoint.as_directory() as directory:
        shutil.copyfile(Path(directory) / CHECKPOINT_MODEL, best_model)
    best_config = {key: value for key, value in best.config.items()}
    model_info = {
        "task": info.task,
        "class_names": info.class_names,
        "image_size": info.image_size,
        "color_mode": info.color_mode,
        "dataset": info.raw.get("settings"),
        "config": best_config,
        "metric": metric,
        "mode": mode,
        "best_metric": best_metric,
        "trial_path": best.path,
    }
    (out_dir / BEST_MODEL_INFO).write_text(json.dumps(model_info, indent=2, default=str) + "\n")
    (experiment_dir / "best_config.json").write_text(json.dumps(best_config, indent=2, default=str) + "\n")
    print(f"best trial: {metric} = {best_metric:.4f}, config {json.dumps(best_config, default=str)}")
    print(f"best model saved to {best_model}")
    return TuneResult(out_dir, metric, mode, best_metric, best_config, best_model, results_csv, trials)


def _check_resources(cluster: dict[str, float], settings: TuneSettings) -> None:
    """Fail at once when no node can ever hold one trial, instead of leaving trials pending forever."""
    import ray

    nodes = [node for node in ray.nodes() if node.get("Alive")]
    max_cpus = max((node["Resources"].get("CPU", 0.0) for node in nodes), default=cluster.get("CPU", 0.0))
    max_gpus = max((node["Resources"].get("GPU", 0.0) for node in nodes), default=cluster.get("GPU", 0.0))
    if settings.cpus_per_trial > max_cpus or settings.gpus_per_trial > max_gpus:
        raise TuningError(
            f"each trial requests {settings.cpus_per_trial:g} CPUs and {settings.gpus_per_trial:g} GPUs, but the largest "
            f"Ray node has {max_cpus:g} CPUs and {max_gpus:g} GPUs; lower --cpus-per-trial/--gpus-per-trial or add resources"
        )


def _trial_rows(results, metric: str, max_epochs: int) -> list[dict[str, Any]]:
    rows = []
    for result in results:
        history = result.metrics_dataframe
        epochs = int(history["epoch"].max()) if history is not None and "epoch" in history else 0
        row = {
            "trial_id": (result.metrics or {}).get("trial_id", Path(result.path).name),
            "status": "error" if result.error else "ok",
            f"best_{metric}": float(history[metric].max()) if history is not None and metric in history else None,
            f"last_{metric}": float(history[metric].iloc[-1]) if history is not None and metric in history else None,
            "epochs": epochs,
            "stopped_early": bool(result.error is None and epochs < max_epochs),
            "time_s": round(float((result.metrics or {}).get("time_total_s", 0.0)), 1),
        }
        row.update({f"config/{key}": value for key, value in sorted((result.config or {}).items())})
        row["error"] = str(result.error).splitlines()[0] if result.error else ""
        rows.append(row)
    rows.sort(key=lambda row: (row[f"best_{metric}"] is None, -(row[f"best_{metric}"] or 0.0)))
    return rows


def _write_results_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def settings_dict(settings: TuneSettings) -> dict[str, Any]:
    return asdict(settings)
