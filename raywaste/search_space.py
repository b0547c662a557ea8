"""The search space: which hyperparameters the trials try, read from a YAML or JSON file.

A file has up to three sections, ``model``, ``optimization`` and ``data``. Each key is
either a constant or a distribution written as a one-key mapping::

    model:
      conv_blocks: {choice: [2, 3]}
      dropout: {uniform: [0.0, 0.5]}
    optimization:
      learning_rate: {loguniform: [1.0e-4, 3.0e-3]}
      max_epochs: 20

Keys left out keep the defaults in :data:`PARAMETERS`, which docs/search-space.md lists.
:func:`load_search_space` validates a file and returns a :class:`SearchSpace`; its
:meth:`SearchSpace.to_param_space` builds the Ray Tune ``param_space``, whose keys are
the flat parameter names (``conv_blocks``, ``learning_rate``, ...) that a trial reads.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raywaste.images import COLOR_MODES
from raywaste.model import ACTIVATIONS, BACKBONES, FLIPS, OPTIMIZERS, POOLINGS

SECTIONS = ("model", "optimization", "data")
DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")


class SearchSpaceError(ValueError):
    """A search space file that cannot be read or contains an invalid key or value."""


@dataclass(frozen=True)
class Distribution:
    """A distribution of one parameter: ``kind`` is one of :data:`DISTRIBUTIONS`.

    ``values`` contains the options of ``choice`` and ``grid``, or ``(low, high)`` of the
    ranges. ``randint`` excludes ``high``, as Ray Tune's ``tune.randint`` does.
    """

    kind: str
    values: tuple

    @property
    def is_finite(self) -> bool:
        return self.kind in ("choice", "grid")

    def to_json(self) -> dict[str, list]:
        return {self.kind: list(self.values)}


@dataclass(frozen=True)
class Parameter:
    """One key of a search space file, with its type, allowed values and default."""

    section: str
    name: str
    kind: type
    """bool, int, float or str."""
    default: Any
    help: str
    choices: tuple = ()
    """Allowed strings; empty for free text and numbers."""
    minimum: float | None = None
    maximum: float | None = None
    maximum_open: bool = False
    """True when ``maximum`` itself is not allowed."""
    searchable: bool = True
    """False for keys that must be one constant for the whole run."""
    nullable: bool = False
    """True when null (None) is allowed; it means "take it from the dataset"."""

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"


def _parameters(*parameters: Parameter) -> dict[str, Parameter]:
    return {parameter.name: parameter for parameter in parameters}


# Every key of the file, in the order docs/search-space.md lists them.
PARAMETERS: dict[str, Parameter] = _parameters(
    # The architecture.
    Parameter("model", "backbone", str, "none", "keras.applications network under the head, or none for the plain CNN",
              choices=("none", *BACKBONES)),
    Parameter("model", "weights", str, "none", "backbone weights: none (random), imagenet (downloaded by Keras), or a local file path",
              searchable=False),
    Parameter("model", "freeze_backbone", bool, False, "keep the backbone's weights fixed and train only the head"),
    Parameter("model", "conv_blocks", int, Distribution("choice", (2, 3, 4)), "plain CNN: blocks of convolution and max pooling",
              minimum=1, maximum=8),
    Parameter("model", "filters", int, Distribution("choice", (16, 32)), "plain CNN: filters of the first block; each block doubles them",
              minimum=1, maximum=1024),
    Parameter("model", "kernel_size", int, 3, "plain CNN: side of the convolution kernels, in pixels", minimum=1, maximum=15),
    Parameter("model", "activation", str, Distribution("choice", ("relu", "leaky_relu")), "activation after each block and the dense layer",
              choices=ACTIVATIONS),
    Parameter("model", "leaky_relu_slope", float, 0.1, "slope of Leaky ReLU for negative inputs", minimum=0.0, maximum=1.0,
              maximum_open=True),
    Parameter("model", "batch_norm", bool, Distribution("choice", (False, True)), "plain CNN: batch normalization after each convolution"),
    Parameter("model", "pooling", str, "global_average", "how the last feature map becomes a vector",
              choices=POOLINGS),
    Parameter("model", "dropout", float, Distribution("uniform", (0.0, 0.5)), "dropout rate before the dense layer", minimum=0.0,
              maximum=1.0, maximum_open=True),
    Parameter("model", "dense_units", int, Distribution("choice", (32, 64, 128)), "units of the dense layer before the output",
              minimum=1, maximum=8192),
    # The optimization.
    Parameter("optimization", "optimizer", str, "adam", "Keras optimizer", choices=OPTIMIZERS),
    Parameter("optimization", "learning_rate", float, Distribution("loguniform", (1e-4, 3e-3)), "initial learning rate",
              minimum=0.0, maximum=10.0),
    Parameter("optimization", "momentum", float, 0.9, "momentum of sgd and rmsprop", minimum=0.0, maximum=1.0, maximum_open=True),
    Parameter("optimization", "weight_decay", float, 1e-4, "weight decay of adamw", minimum=0.0, maximum=1.0),
    Parameter("optimization", "batch_size", int, 32, "examples per gradient step", minimum=1, maximum=65536),
    Parameter("optimization", "max_epochs", int, 15, "epochs of a trial that is not stopped early", minimum=1, maximum=100000,
              searchable=False),
    # The data.
    Parameter("data", "image_size", int, None, "dataset to train on, by its image size in pixels (null: the one in OUT/data)",
              minimum=1, maximum=4096, nullable=True),
    Parameter("data", "color_mode", str, None, "dataset to train on, by its color mode (null: the one in OUT/data)",
              choices=COLOR_MODES, nullable=True),
    Parameter("data", "flip", str, "horizontal", "random flips during training", choices=FLIPS),
    Parameter("data", "rotation", float, 0.0, "random rotation during training, as a fraction of a full turn", minimum=0.0,
              maximum=0.5),
    Parameter("data", "zoom", float, 0.0, "random zoom in or out during training, as a fraction of the image size", minimum=0.0,
              maximum=0.9),
    Parameter("data", "class_weight", str, "balanced", "weight the loss so every class counts the same (balanced) or not (none)",
              choices=("balanced", "none")),
)

# Keys that PBT may change during a trial: the model's architecture is fixed once it is built,
# but the learning rate and the batch size take effect at the next epoch.
PBT_MUTABLE = ("learning_rate", "batch_size")


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space: every parameter name mapped to a constant or a :class:`Distribution`."""

    values: dict[str, Any]
    source: str = "the default search space"
    """Origin named in messages: a file name or "the default search space"."""
    searched: tuple[str, ...] = field(default=())
    """Names whose value is a distribution, in :data:`PARAMETERS` order."""

    def __post_init__(self) -> None:
        names = tuple(name for name in PARAMETERS if isinstance(self.values.get(name), Distribution))
        object.__setattr__(self, "searched", names)

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def possible_values(self, name: str) -> list[Any]:
        """Return the values a finite parameter can take; ranges return their bounds."""
        value = self.values[name]
        return list(value.values) if isinstance(value, Distribution) else [value]

    def with_values(self, **changes: Any) -> "SearchSpace":
        """Return a copy with some parameters replaced, validated like file entries."""
        values = dict(self.values)
        for name, value in changes.items():
            parameter = _parameter(name, self.source)
            values[name] = _parse_entry(parameter, value, self.source)
        return SearchSpace(values, self.source)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Return the nested file form, which :func:`parse_search_space` reads back."""
        nested: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
        for name, parameter in PARAMETERS.items():
            value = self.values[name]
            nested[parameter.section][name] = value.to_json() if isinstance(value, Distribution) else value
        return nested

    def to_param_space(self, search: str) -> dict[str, Any]:
        """Build Ray Tune's ``param_space`` for ``search`` ("random", "grid" or "optuna").

        Grid search turns every ``choice`` into a grid and rejects ranges; Optuna
        rejects ``grid`` entries, since Ray's OptunaSearch cannot convert them.
        """
        from ray import tune

        space: dict[str, Any] = {}
        for name, value in self.values.items():
            if not isinstance(value, Distribution):
                space[name] = value
                continue
            key = PARAMETERS[name].key
            kind = value.kind
            if search == "grid":
                if not value.is_finite:
                    raise SearchSpaceError(
                        f"{self.source}: {key}: grid search needs a finite list of values, but it is "
                        f"{kind} {list(value.values)}; write it as {{choice: [...]}} or use --search random"
                    )
                kind = "grid"
            if search == "optuna" and kind == "grid":
                raise SearchSpaceError(
                    f"{self.source}: {key}: Optuna cannot search a grid ({{grid: {list(value.values)}}}); "
                    "write it as {choice: [...]} or use --search random"
                )
            space[name] = _ray_domain(tune, kind, value.values)
        return space

    def pbt_mutations(self) -> dict[str, Any]:
        """Return PBT's ``hyperparam_mutations``: the searched keys of :data:`PBT_MUTABLE`."""
        from ray import tune

        mutations: dict[str, Any] = {}
        for name in PBT_MUTABLE:
            value = self.values[name]
            if not isinstance(value, Distribution):
                continue
            if value.kind == "grid":
                raise SearchSpaceError(
                    f"{self.source}: {PARAMETERS[name].key}: PBT mutates this key during a trial, which would leave "
                    f"the grid {list(value.values)}; write it as {{choice: [...]}}"
                )
            mutations[name] = list(value.values) if value.kind == "choice" else _ray_domain(tune, value.kind, value.values)
        return mutations


def _ray_domain(tune, kind: str, values: tuple) -> Any:
    if kind == "choice":
        return tune.choice(list(values))
    if kind == "grid":
        return tune.grid_search(list(values))
    if kind == "uniform":
        return tune.uniform(*values)
    if kind == "loguniform":
        return tune.loguniform(*values)
    return tune.randint(*values)


def default_search_space() -> SearchSpace:
    """Return the search space used when no file is given (the defaults of :data:`PARAMETERS`)."""
    return SearchSpace({name: parameter.default for name, parameter in PARAMETERS.items()})


def load_search_space(path: str | Path) -> SearchSpace:
    """Read and validate a search space file (``.yaml``, ``.yml`` or ``.json``)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise SearchSpaceError(f"cannot read the search space file {path}: {error}") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise SearchSpaceError(f"{path} is not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {error}") from None
    return parse_search_space(data if data is not None else {}, source=str(path))


def parse_search_space(data: Any, source: str = "the search space") -> SearchSpace:
    """Validate the nested file form and fill in the defaults of keys it leaves out."""
    if not isinstance(data, dict):
        raise SearchSpaceError(f"{source}: expected a mapping with the sections {', '.join(SECTIONS)}, got {type(data).__name__}")
    values = {name: parameter.default for name, parameter in PARAMETERS.items()}
    for section, entries in data.items():
        if section not in SECTIONS:
            raise SearchSpaceError(f"{source}: unknown section {section!r}{_suggestion(section, SECTIONS)}; expected {', '.join(SECTIONS)}")
        if entries is None:
            continue
        if not isinstance(entries, dict):
            raise SearchSpaceError(f"{source}: section {section!r} must be a mapping of keys to values, got {entries!r}")
        for name, entry in entries.items():
            parameter = PARAMETERS.get(name)
            if parameter is None or parameter.section != section:
                known = [key for key, candidate in PARAMETERS.items() if candidate.section == section]
                raise SearchSpaceError(
                    f"{source}: unknown key {section}.{name}{_suggestion(str(name), known)}; "
                    f"the keys of {section} are {', '.join(known)}"
                )
            values[name] = _parse_entry(parameter, entry, source)
    return SearchSpace(values, source)


def _parameter(name: str, source: str) -> Parameter:
    try:
        return PARAMETERS[name]
    except KeyError:
        raise SearchSpaceError(f"{source}: unknown parameter {name!r}{_suggestion(name, list(PARAMETERS))}") from None


def _suggestion(name: str, known: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _parse_entry(parameter: Parameter, entry: Any, source: str) -> Any:
    """Validate one key's entry: a constant, or a one-key mapping that names a distribution."""
    if not isinstance(entry, dict):
        return _check_value(parameter, entry, source)

    key = parameter.key
    if len(entry) != 1 or next(iter(entry)) not in DISTRIBUTIONS:
        raise SearchSpaceError(
            f"{source}: {key}: invalid distribution {entry!r}; expected one of "
            + ", ".join(f"{{{kind}: [...]}}" for kind in DISTRIBUTIONS)
        )
    if not parameter.searchable:
        raise SearchSpaceError(f"{source}: {key} must be a single value for the whole run, not the distribution {entry!r}")
    kind, arguments = next(iter(entry.items()))
    if not isinstance(arguments, list) or not arguments:
        raise SearchSpaceError(f"{source}: {key}: {kind} needs a non-empty list, got {arguments!r}")

    if kind in ("choice", "grid"):
        values = tuple(_check_value(parameter, value, source) for value in arguments)
        duplicates = sorted({repr(value) for value in values if values.count(value) > 1})
        if duplicates:
            raise SearchSpaceError(f"{source}: {key}: {kind} lists {', '.join(duplicates)} more than once")
        return Distribution(kind, values)

    if len(arguments) != 2:
        raise SearchSpaceError(f"{source}: {key}: {kind} needs [low, high], got {arguments!r}")
    if kind == "randint":
        if parameter.kind is not int:
            raise SearchSpaceError(f"{source}: {key}: randint needs an integer key, but {key} is {parameter.kind.__name__}")
        low, high = (_check_value(parameter, value, source, check_range=False) for value in arguments)
        if low >= high:
            raise SearchSpaceError(f"{source}: {key}: randint [{low}, {high}] is empty; the upper bound is excluded, so use low < high")
        _check_value(parameter, low, source)
        _check_value(parameter, high - 1, source)
        return Distribution(kind, (low, high))

    if parameter.kind is not float:
        raise SearchSpaceError(
            f"{source}: {key}: {kind} needs a real-valued key, but {key} is {parameter.kind.__name__}; "
            + ("use randint or choice" if parameter.kind is int else "use choice")
        )
    low, high = (_check_value(parameter, value, source) for value in arguments)
    if not low < high:
        raise SearchSpaceError(f"{source}: {key}: {kind} [{low}, {high}] needs low < high")
    if kind == "loguniform" and low <= 0:
        raise SearchSpaceError(f"{source}: {key}: loguniform [{low}, {high}] needs a positive lower bound")
    return Distribution(kind, (low, high))


def _check_value(parameter: Parameter, value: Any, source: str, check_range: bool = True) -> Any:
    """Return ``value`` converted to the parameter's type, or raise naming the key and the value."""
    key = parameter.key
    if value is None:
        if parameter.nullable:
            return None
        raise SearchSpaceError(f"{source}: {key}: a value is missing (null); expected {_expected(parameter)}")

    kind = parameter.kind
    if kind is bool:
        if not isinstance(value, bool):
            raise SearchSpaceError(f"{source}: {key}: invalid value {value!r}; expected true or false")
        return value
    if kind is str:
        if parameter.name == "weights":
            return _check_weights(value, source)
        if not isinstance(value, str) or (parameter.choices and value not in parameter.choices):
            raise SearchSpaceError(f"{source}: {key}: invalid value {value!r}{_suggestion(str(value), parameter.choices)}; "
                                   f"expected {_expected(parameter)}")
        return value

    number = _number(value, kind)
    if number is None:
        raise SearchSpaceError(f"{source}: {key}: invalid value {value!r}; expected {_expected(parameter)}")
    if check_range and not _in_range(parameter, number):
        raise SearchSpaceError(f"{source}: {key}: invalid value {value!r}; expected {_expected(parameter)}")
    return number


def _number(value: Any, kind: type) -> int | float | None:
    if isinstance(value, bool):
        return None
    if kind is int:
        return value if isinstance(value, int) else None
    if isinstance(value, str):
        # PyYAML reads 1e-4 (no dot) as a string, following YAML 1.1; accept it as a number.
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _in_range(parameter: Parameter, number: float) -> bool:
    if parameter.minimum is not None and number < parameter.minimum:
        return False
    if parameter.name == "learning_rate" and number <= 0:
        return False
    if parameter.maximum is not None:
        return number < parameter.maximum if parameter.maximum_open else number <= parameter.maximum
    return True


def _expected(parameter: Parameter) -> str:
    if parameter.kind is bool:
        return "true or false"
    if parameter.kind is str:
        text = "one of " + ", ".join(parameter.choices) if parameter.choices else "a string"
        return text + (" or null" if parameter.nullable else "")
    kind = "an integer" if parameter.kind is int else "a number"
    if parameter.name == "learning_rate":
        low = "> 0"
    elif parameter.minimum is not None:
        low = f">= {parameter.minimum:g}"
    else:
        low = ""
    high = f"{'<' if parameter.maximum_open else '<='} {parameter.maximum:g}" if parameter.maximum is not None else ""
    bounds = " and ".join(part for part in (low, high) if part)
    return f"{kind} {bounds}".strip() + (" or null" if parameter.nullable else "")


def _check_weights(value: Any, source: str) -> str:
    if not isinstance(value, str) or not value:
        raise SearchSpaceError(f"{source}: model.weights: invalid value {value!r}; expected none, imagenet or the path of a weights file")
    if value in ("none", "imagenet"):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise SearchSpaceError(
            f"{source}: model.weights: weights file not found: {value}; give the path of a Keras weights file "
            "(.h5 or .weights.h5) that every Ray node can read, or none, or imagenet"
        )
    return str(path.resolve())
