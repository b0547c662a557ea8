"""The Python API: each pipeline stage as one call that returns a result object.

Each call joins the Ray cluster at ``address`` (or ``RAY_ADDRESS``), or starts a local
Ray, unless the caller has already initialized Ray, in which case that Ray is used and
left running. ``preprocess`` and ``run`` check the annotations and the task before Ray
starts, so that a mistyped task fails at once. Keyword arguments name fields of the
stage's settings dataclass, so

    raywaste.preprocess("taco/", "out/", task="supercategory", size=64)

changes the task and the image size and keeps every other default.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from raywaste.baselines import DenseBaselineSettings
from raywaste.evaluation import EvaluationResult, EvaluationSettings
from raywaste.evaluation import evaluate as _evaluate
from raywaste.prediction import predict
from raywaste.preprocessing import PreprocessResult, PreprocessSettings, RunOptions, check_inputs, settings_with
from raywaste.preprocessing import preprocess as _preprocess
from raywaste.reporting import build_report
from raywaste.runtime import ray_session
from raywaste.splits import SplitFractions
from raywaste.search_space import SearchSpace
from raywaste.tuning import TuneResult, TuneSettings
from raywaste.tuning import resume as _resume
from raywaste.tuning import tune as _tune


@dataclass
class RunResult:
    """The results of all three stages of :func:`run`."""

    preprocess: PreprocessResult
    tune: TuneResult
    evaluate: EvaluationResult
    report: Path | None = None
    """``OUT/report.html``."""


def preprocess(
    taco_dir: str | Path,
    out_dir: str | Path,
    settings: PreprocessSettings | None = None,
    *,
    annotations: str | Path | None = None,
    options: RunOptions | None = None,
    address: str | None = None,
    **changes: Any,
) -> PreprocessResult:
    """Decode, crop and resize the photos of ``taco_dir`` into Parquet under ``out_dir/data``.

    ``changes`` set fields of :class:`~raywaste.preprocessing.PreprocessSettings` or of its
    :class:`~raywaste.images.ImageSettings` (``size``, ``color_mode``, ``square``, ...);
    ``fractions`` may be a ``"train,val,test"`` string.
    """
    if isinstance(changes.get("fractions"), str):
        changes["fractions"] = SplitFractions.parse(changes["fractions"])
    settings = settings_with(settings or PreprocessSettings(), **changes)
    inputs = check_inputs(taco_dir, settings, annotations)
    with ray_session(address):
        return _preprocess(taco_dir, out_dir, settings, annotations=annotations, options=options, inputs=inputs)


def tune(
    out_dir: str | Path,
    settings: TuneSettings | None = None,
    *,
    search_space: SearchSpace | str | Path | dict[str, Any] | None = None,
    overwrite: bool = False,
    address: str | None = None,
    **changes: Any,
) -> TuneResult:
    """Tune on the datasets in ``out_dir`` and save the best model as ``out_dir/best_model.keras``.

    ``search_space`` is a YAML or JSON file, a dict in that file's form, or a
    :class:`~raywaste.search_space.SearchSpace`. ``changes`` set fields of
    :class:`~raywaste.tune_settings.TuneSettings` (``num_samples``, ``max_epochs``,
    ``scheduler``, ``search``, ``cpus_per_trial``, ...).
    """
    settings = _with_changes(settings or TuneSettings(), changes)
    with ray_session(address):
        return _tune(out_dir, settings, search_space=search_space, overwrite=overwrite)


def resume(out_dir: str | Path, *, address: str | None = None) -> TuneResult:
    """Continue the interrupted tuning run in ``out_dir/tune`` with the settings it started with."""
    with ray_session(address):
        return _resume(out_dir)


def evaluate(
    out_dir: str | Path,
    *,
    model: str | Path | None = None,
    baseline_epochs: int | None = None,
) -> EvaluationResult:
    """Score the best model on the test split and write ``out_dir/metrics.json``; needs no Ray.

    ``baseline_epochs`` trains the dense-network baseline for that many epochs (0 leaves
    it out; None keeps the default).
    """
    settings = None
    if baseline_epochs is not None:
        settings = EvaluationSettings(dense_baseline=DenseBaselineSettings(epochs=baseline_epochs))
    return _evaluate(out_dir, model_path=model, settings=settings)


def run(
    taco_dir: str | Path,
    out_dir: str | Path,
    preprocess_settings: PreprocessSettings | None = None,
    tune_settings: TuneSettings | None = None,
    *,
    annotations: str | Path | None = None,
    options: RunOptions | None = None,
    search_space: SearchSpace | str | Path | dict[str, Any] | None = None,
    overwrite: bool = False,
    address: str | None = None,
) -> RunResult:
    """Run preprocess, tune and evaluate on one Ray session, then write ``out_dir/report.html``."""
    options = options or RunOptions(overwrite=overwrite)
    preprocess_settings = preprocess_settings or PreprocessSettings()
    inputs = check_inputs(taco_dir, preprocess_settings, annotations)
    with ray_session(address):
        prepared = _preprocess(taco_dir, out_dir, preprocess_settings, annotations=annotations, options=options, inputs=inputs)
        tuned = _tune(out_dir, tune_settings or TuneSettings(), search_space=search_space, overwrite=overwrite)
    evaluated = _evaluate(out_dir)
    return RunResult(prepared, tuned, evaluated, build_report(out_dir))


def _with_changes(settings: Any, changes: dict[str, Any]) -> Any:
    known = {field.name for field in fields(settings)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise TypeError(f"unknown setting(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}")
    return replace(settings, **changes)
