"""Tuning settings: single-value checks, rejected scheduler and searcher combinations, metrics per task."""

import importlib.util

import pytest

from raywaste.search_space import default_search_space, parse_search_space
from raywaste.tune_settings import TuneSettings, TuningError, check_combination, make_scheduler, make_searcher, resolve_metric

# A space that PBT can use: the learning rate is searched, everything else is small and fixed.
PBT_SPACE = parse_search_space({"optimization": {"max_epochs": 6}})


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_samples": 0}, "invalid num_samples 0"),
        ({"scheduler": "median"}, "invalid scheduler 'median'; expected one of asha, hyperband, pbt, fifo"),
        ({"search": "bayes"}, "invalid search 'bayes'; expected one of random, grid, optuna"),
        ({"metric": "recall"}, "invalid metric 'recall'"),
        ({"cpus_per_trial": 0}, "invalid resources per trial: 0 CPUs"),
        ({"gpus_per_trial": -0.5}, "invalid resources per trial: 1.0 CPUs, -0.5 GPUs"),
        ({"reduction_factor": 1}, "invalid reduction_factor 1"),
        ({"keep_checkpoints": 0}, "invalid keep_checkpoints 0"),
        ({"class_weight": "inverse"}, "invalid class_weight 'inverse'"),
    ],
)
def test_invalid_settings(changes, message):
    with pytest.raises(ValueError, match=message):
        TuneSettings(**changes)


def test_pbt_keeps_three_checkpoints_by_default():
    assert TuneSettings().checkpoints_to_keep == 2
    assert TuneSettings(scheduler="pbt").checkpoints_to_keep == 3
    assert TuneSettings(scheduler="pbt", keep_checkpoints=5).checkpoints_to_keep == 5


def test_fractional_resources_allowed():
    settings = TuneSettings(cpus_per_trial=0.5, gpus_per_trial=0.25)
    assert (settings.cpus_per_trial, settings.gpus_per_trial) == (0.5, 0.25)


def test_overrides_apply_to_space():
    space = TuneSettings(max_epochs=4, batch_size=8).apply_to(default_search_space())
    assert space["max_epochs"] == 4
    assert space["batch_size"] == 8
    assert space["class_weight"] == "balanced"


@pytest.mark.parametrize(
    "settings, space, message",
    [
        (TuneSettings(scheduler="pbt", search="optuna", num_samples=4, keep_checkpoints=3), PBT_SPACE,
         "PBT cannot be combined with a search algorithm such as Optuna"),
        (TuneSettings(scheduler="pbt", search="grid", num_samples=4, keep_checkpoints=3), PBT_SPACE,
         "PBT mutates hyperparameters during trials, which defeats a grid"),
        (TuneSettings(scheduler="pbt", num_samples=4, keep_checkpoints=3),
         parse_search_space({"optimization": {"learning_rate": {"grid": [0.001, 0.01]}, "max_epochs": 6}}, source="space.yaml"),
         "PBT mutates optimization.learning_rate, which space.yaml defines as a grid"),
        (TuneSettings(scheduler="pbt", num_samples=4, keep_checkpoints=3),
         parse_search_space({"optimization": {"learning_rate": 0.001, "max_epochs": 6}}, source="space.yaml"),
         "PBT needs at least one of optimization.learning_rate, optimization.batch_size to be a distribution"),
        (TuneSettings(scheduler="pbt", num_samples=1, keep_checkpoints=3), PBT_SPACE, "PBT needs at least 2 trials"),
        (TuneSettings(scheduler="pbt", num_samples=4, perturbation_interval=3, checkpoint_every=2, keep_checkpoints=3), PBT_SPACE,
         "--perturbation-interval 3 must be a multiple of --checkpoint-every 2"),
        (TuneSettings(scheduler="pbt", num_samples=4, perturbation_interval=6, keep_checkpoints=3), PBT_SPACE,
         "--perturbation-interval 6 leaves no perturbation within max_epochs 6"),
        (TuneSettings(scheduler="pbt", num_samples=4, keep_checkpoints=2), PBT_SPACE, "use at least 3"),
        (TuneSettings(scheduler="hyperband", reduction_factor=4), default_search_space().with_values(max_epochs=3),
         "HyperBand: max_epochs 3 is below --reduction-factor 4"),
        (TuneSettings(scheduler="hyperband", checkpoint_every=2), default_search_space(), "use --checkpoint-every 1"),
        (TuneSettings(grace_period=5), default_search_space().with_values(max_epochs=3),
         "ASHA: --grace-period 5 is longer than --max-epochs 3"),
        (TuneSettings(scheduler="fifo", checkpoint_every=4), default_search_space().with_values(max_epochs=3),
         "--checkpoint-every 4 is longer than max_epochs 3"),
    ],
)
def test_combinations_that_cannot_work(settings, space, message):
    with pytest.raises(TuningError) as raised:
        check_combination(settings, space)
    assert message in str(raised.value)


@pytest.mark.parametrize(
    "settings",
    [
        TuneSettings(),
        TuneSettings(scheduler="fifo", search="grid"),
        TuneSettings(scheduler="hyperband", reduction_factor=3),
        TuneSettings(scheduler="pbt", num_samples=4, keep_checkpoints=3, perturbation_interval=2, checkpoint_every=2),
    ],
)
def test_combinations_that_work(settings):
    space = PBT_SPACE if settings.scheduler == "pbt" else default_search_space()
    if settings.search == "grid":
        space = space.with_values(dropout=0.2, learning_rate={"choice": [0.001, 0.01]})
    check_combination(settings, space)
    assert make_scheduler(settings, space) is not None
    assert make_searcher(settings) is not None


def test_default_grace_period_capped_at_max_epochs():
    assert TuneSettings().grace_period_for(15) == 3
    assert TuneSettings().grace_period_for(2) == 2
    assert TuneSettings(grace_period=5).grace_period_for(2) == 5
    space = default_search_space().with_values(max_epochs=2)
    check_combination(TuneSettings(), space)
    assert make_scheduler(TuneSettings(), space) is not None


def test_grace_period_of_all_epochs_only_warns(caplog):
    check_combination(TuneSettings(grace_period=1), default_search_space().with_values(max_epochs=1))
    assert "no trial can be stopped early" in caplog.text


def test_scheduler_classes_follow_settings():
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, HyperBandScheduler, PopulationBasedTraining

    space = PBT_SPACE
    assert isinstance(make_scheduler(TuneSettings(), space), AsyncHyperBandScheduler)
    assert isinstance(make_scheduler(TuneSettings(scheduler="hyperband"), space), HyperBandScheduler)
    assert type(make_scheduler(TuneSettings(scheduler="fifo"), space)) is FIFOScheduler
    pbt = make_scheduler(TuneSettings(scheduler="pbt", num_samples=2, keep_checkpoints=3), space)
    assert isinstance(pbt, PopulationBasedTraining)
    assert set(pbt._hyperparam_mutations) == {"learning_rate"}


@pytest.mark.skipif(importlib.util.find_spec("optuna") is not None, reason="optuna is installed")
def test_optuna_missing_names_the_extra():
    with pytest.raises(TuningError, match=r"pip install 'raywaste\[optuna\]'"):
        check_combination(TuneSettings(search="optuna"), default_search_space())


@pytest.mark.parametrize(
    "choice, is_binary, expected",
    [
        ("auto", True, "val_average_precision"),
        ("average_precision", True, "val_average_precision"),
        ("f1", True, "val_f1"),
        ("auto", False, "val_macro_f1"),
        ("macro_f1", False, "val_macro_f1"),
    ],
)
def test_metric_per_task(choice, is_binary, expected):
    assert resolve_metric(choice, is_binary) == (expected, "max")


@pytest.mark.parametrize("choice, is_binary", [("f1", False), ("average_precision", False), ("macro_f1", True)])
def test_metric_that_does_not_apply(choice, is_binary):
    with pytest.raises(TuningError, match=f"metric '{choice}' does not apply"):
        resolve_metric(choice, is_binary)
