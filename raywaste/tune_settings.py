"""Tuning settings: the trials' resources, the scheduler and searcher, the metric, checkpoints.

:class:`TuneSettings` contains the run's settings, each validated on its own.
:func:`check_combination` rejects scheduler, searcher and search space combinations that
cannot work in Ray Tune (the reasons are given next to each check), and
:func:`make_scheduler` and :func:`make_searcher` build the Ray objects.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import asdict, dataclass
from typing import Any

from raywaste.search_space import PBT_MUTABLE, PARAMETERS, Distribution, SearchSpace

SCHEDULERS = ("asha", "hyperband", "pbt", "fifo")
SEARCHERS = ("random", "grid", "optuna")
METRIC_CHOICES = ("auto", "average_precision", "f1", "macro_f1")
# The metric each choice names, and the tasks it applies to.
BINARY_METRICS = {"auto": "val_average_precision", "average_precision": "val_average_precision", "f1": "val_f1"}
MULTICLASS_METRICS = {"auto": "val_macro_f1", "macro_f1": "val_macro_f1"}
log = logging.getLogger(__name__)

# ASHA's grace period when none is given, in epochs.
DEFAULT_GRACE_PERIOD = 3
# Ray's PBT warns that num_to_keep <= 2 can delete a checkpoint that another trial is about to clone.
PBT_MIN_KEEP_CHECKPOINTS = 3


class TuningError(RuntimeError):
    """Tuning could not run or produced no usable trial."""


@dataclass(frozen=True)
class TuneSettings:
    """How many trials run, how they are scheduled and searched, and on what resources.

    ``max_epochs``, ``batch_size`` and ``class_weight`` override the search space's
    values when set; None keeps the search space's (by default 15, 32 and "balanced").
    """

    num_samples: int = 8
    """Trials to sample; with grid search, how many times the whole grid runs."""
    max_epochs: int | None = None
    scheduler: str = "asha"
    search: str = "random"
    metric: str = "auto"
    """auto (binary: average precision, multi-class: macro F1), average_precision, f1 or macro_f1."""
    grace_period: int | None = None
    """ASHA: epochs every trial runs before it may be stopped; None: DEFAULT_GRACE_PERIOD, or max_epochs when fewer."""
    reduction_factor: int = 3
    """ASHA and HyperBand: about 1 in this many trials continues at each rung."""
    perturbation_interval: int = 2
    """PBT: epochs between two exploit-and-explore steps."""
    checkpoint_every: int = 1
    """Epochs between two checkpoints; the last epoch always gets one."""
    keep_checkpoints: int | None = None
    """Checkpoints kept per trial, the best by the metric (Ray also keeps the latest); None: 2, or 3 with PBT."""
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent_trials: int = 0
    """0: as many as the cluster's resources allow."""
    batch_size: int | None = None
    class_weight: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"invalid num_samples {self.num_samples}; expected 1 or more")
        if self.max_epochs is not None and self.max_epochs < 1:
            raise ValueError(f"invalid max_epochs {self.max_epochs}; expected 1 or more")
        for name, value, choices in (("scheduler", self.scheduler, SCHEDULERS), ("search", self.search, SEARCHERS),
                                     ("metric", self.metric, METRIC_CHOICES)):
            if value not in choices:
                raise ValueError(f"invalid {name} {value!r}; expected one of {', '.join(choices)}")
        for name in ("grace_period", "perturbation_interval", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"invalid {name} {getattr(self, name)}; expected 1 or more")
        if self.reduction_factor < 2:
            raise ValueError(f"invalid reduction_factor {self.reduction_factor}; expected 2 or more")
        if not self.cpus_per_trial > 0 or self.gpus_per_trial < 0:
            raise ValueError(f"invalid resources per trial: {self.cpus_per_trial} CPUs, {self.gpus_per_trial} GPUs; "
                             "expected more than 0 CPUs and 0 or more GPUs")
        if self.max_concurrent_trials < 0:
            raise ValueError(f"invalid max_concurrent_trials {self.max_concurrent_trials}; expected 0 (no limit) or more")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"invalid batch_size {self.batch_size}; expected 1 or more")
        if self.class_weight not in (None, "balanced", "none"):
            raise ValueError(f"invalid class_weight {self.class_weight!r}; expected 'balanced' or 'none'")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def checkpoints_to_keep(self) -> int:
        if self.keep_checkpoints is not None:
            return self.keep_checkpoints
        return PBT_MIN_KEEP_CHECKPOINTS if self.scheduler == "pbt" else 2

    def grace_period_for(self, max_epochs: int) -> int:
        """Return ASHA's grace period: the one given, or the default capped at ``max_epochs``."""
        if self.grace_period is not None:
            return self.grace_period
        return min(DEFAULT_GRACE_PERIOD, max_epochs)

    def apply_to(self, space: SearchSpace) -> SearchSpace:
        """Return ``space`` with this run's overrides of max_epochs, batch_size and class_weight."""
        changes = {name: getattr(self, name) for name in ("max_epochs", "batch_size", "class_weight") if getattr(self, name) is not None}
        return space.with_values(**changes) if changes else space


def resolve_metric(choice: str, is_binary: bool) -> tuple[str, str]:
    """Return the reported metric that ranks trials and its mode, for a ``--metric`` choice and task."""
    metrics = BINARY_METRICS if is_binary else MULTICLASS_METRICS
    if choice not in metrics:
        task = "binary" if is_binary else "multi-class"
        raise TuningError(f"metric {choice!r} does not apply to a {task} task; choose one of {', '.join(metrics)}")
    return metrics[choice], "max"


def check_combination(settings: TuneSettings, space: SearchSpace) -> None:
    """Reject scheduler, searcher and search space combinations that cannot work, naming the conflict."""
    max_epochs = int(space["max_epochs"])
    scheduler, search = settings.scheduler, settings.search

    if search == "optuna" and importlib.util.find_spec("optuna") is None:
        raise TuningError("--search optuna needs the optuna package; install it with: pip install 'raywaste[optuna]'")

    grace_period = settings.grace_period_for(max_epochs)
    if scheduler == "asha" and grace_period > max_epochs:
        # Ray's ASHAScheduler asserts grace_period <= max_t.
        raise TuningError(f"ASHA: --grace-period {grace_period} is longer than --max-epochs {max_epochs}; "
                          "lower --grace-period or raise --max-epochs")
    if scheduler == "asha" and grace_period == max_epochs:
        # Ray accepts it, and short smoke runs use it, but every trial then runs to the end.
        log.warning("ASHA: grace period %d equals --max-epochs, so no trial can be stopped early", grace_period)

    if scheduler == "hyperband":
        # HyperBandScheduler skips every bracket whose first rung int(max_t / eta**s) is 0; with
        # max_t < eta only the bracket without early stopping remains.
        if max_epochs < settings.reduction_factor:
            raise TuningError(f"HyperBand: max_epochs {max_epochs} is below --reduction-factor {settings.reduction_factor}, "
                              "so HyperBand would stop no trial early; raise max_epochs or lower --reduction-factor")
        # HyperBand pauses trials at rung epochs and resumes them from their latest checkpoint;
        # a rung between two checkpoints would repeat epochs.
        if settings.checkpoint_every != 1:
            raise TuningError(f"HyperBand pauses trials at any epoch and resumes them from a checkpoint; "
                              f"use --checkpoint-every 1 (got {settings.checkpoint_every})")

    if scheduler == "pbt":
        _check_pbt(settings, space, max_epochs)

    if settings.checkpoint_every > max_epochs:
        raise TuningError(f"--checkpoint-every {settings.checkpoint_every} is longer than max_epochs {max_epochs}; "
                          "lower it (the last epoch is always checkpointed)")


def _check_pbt(settings: TuneSettings, space: SearchSpace, max_epochs: int) -> None:
    # PopulationBasedTraining.on_trial_add raises for any SearchGenerator searcher, Optuna included.
    if settings.search == "optuna":
        raise TuningError("PBT cannot be combined with a search algorithm such as Optuna (Ray Tune rejects it); "
                          "use --search random with --scheduler pbt, or another scheduler with --search optuna")
    # Grid search fixes each value of a grid, and PBT's mutations move trials off it.
    if settings.search == "grid":
        raise TuningError("PBT mutates hyperparameters during trials, which defeats a grid; "
                          "use --search random with --scheduler pbt")
    grids = [PARAMETERS[name].key for name in PBT_MUTABLE
             if isinstance(space[name], Distribution) and space[name].kind == "grid"]
    if grids:
        raise TuningError(f"PBT mutates {', '.join(grids)}, which {space.source} defines as a grid; write it as {{choice: [...]}}")
    if not any(name in space.searched for name in PBT_MUTABLE):
        raise TuningError("PBT needs at least one of " + ", ".join(PARAMETERS[name].key for name in PBT_MUTABLE)
                          + f" to be a distribution in the search space, to mutate it; {space.source} fixes them all")
    if settings.num_samples < 2:
        raise TuningError("PBT needs at least 2 trials (--num-samples) to copy the better ones")
    # A function trainable hands PBT its last reported checkpoint; it must be taken at the
    # perturbation epoch, or PBT clones an older state (or none).
    if settings.perturbation_interval % settings.checkpoint_every != 0:
        raise TuningError(f"PBT: --perturbation-interval {settings.perturbation_interval} must be a multiple of "
                          f"--checkpoint-every {settings.checkpoint_every}, so that every exploit finds a current checkpoint")
    if settings.perturbation_interval >= max_epochs:
        raise TuningError(f"PBT: --perturbation-interval {settings.perturbation_interval} leaves no perturbation within "
                          f"max_epochs {max_epochs}; lower it")
    if settings.checkpoints_to_keep < PBT_MIN_KEEP_CHECKPOINTS:
        raise TuningError(f"PBT: --keep-checkpoints {settings.keep_checkpoints} may delete checkpoints that other trials are "
                          f"about to copy; use at least {PBT_MIN_KEEP_CHECKPOINTS}")


def make_scheduler(settings: TuneSettings, space: SearchSpace):
    """Build the Ray Tune scheduler; its metric and mode come from TuneConfig."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler, PopulationBasedTraining

    max_epochs = int(space["max_epochs"])
    if settings.scheduler == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=max_epochs, grace_period=settings.grace_period_for(max_epochs),
                             reduction_factor=settings.reduction_factor)
    if settings.scheduler == "hyperband":
        return HyperBandScheduler(time_attr="training_iteration", max_t=max_epochs, reduction_factor=settings.reduction_factor)
    if settings.scheduler == "pbt":
        return PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=settings.perturbation_interval,
                                       hyperparam_mutations=space.pbt_mutations())
    return FIFOScheduler()


def make_searcher(settings: TuneSettings):
    """Build the search algorithm: Ray's random/grid generator or OptunaSearch (TPE, seeded)."""
    if settings.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        # TuneConfig(max_concurrent_trials=...) wraps it in a ConcurrencyLimiter.
        return OptunaSearch(seed=settings.seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=settings.seed)

