"""The search space file: defaults, distributions, validation messages, and Ray's param_space."""

import json
from pathlib import Path

import pytest

from raywaste.search_space import (
    PARAMETERS,
    Distribution,
    SearchSpaceError,
    default_search_space,
    load_search_space,
    parse_search_space,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "search-space.yaml"


def test_defaults_fill_every_parameter():
    space = parse_search_space({})
    assert set(space.values) == set(PARAMETERS)
    assert space["max_epochs"] == 15
    assert space["learning_rate"] == Distribution("loguniform", (1e-4, 3e-3))
    assert space["image_size"] is None
    assert "learning_rate" in space.searched
    assert "max_epochs" not in space.searched


def test_yaml_and_json_files_agree(tmp_path):
    content = {
        "model": {"conv_blocks": {"choice": [1, 2]}, "activation": "leaky_relu", "leaky_relu_slope": 0.2},
        "optimization": {"learning_rate": {"loguniform": [0.0001, 0.01]}, "batch_size": {"grid": [16, 32]}, "max_epochs": 4},
        "data": {"rotation": {"uniform": [0.0, 0.1]}, "class_weight": "none"},
    }
    json_file = tmp_path / "space.json"
    json_file.write_text(json.dumps(content))
    yaml_file = tmp_path / "space.yaml"
    yaml_file.write_text(
        "model:\n  conv_blocks: {choice: [1, 2]}\n  activation: leaky_relu\n  leaky_relu_slope: 0.2\n"
        "optimization:\n  learning_rate: {loguniform: [1e-4, 1.0e-2]}\n  batch_size: {grid: [16, 32]}\n  max_epochs: 4\n"
        "data:\n  rotation: {uniform: [0.0, 0.1]}\n  class_weight: none\n"
    )
    from_json = load_search_space(json_file)
    from_yaml = load_search_space(yaml_file)
    assert from_json.values == from_yaml.values
    assert from_yaml["learning_rate"] == Distribution("loguniform", (1e-4, 1e-2))
    assert from_yaml["class_weight"] == "none"
    assert {"conv_blocks", "learning_rate", "batch_size", "rotation"} <= set(from_yaml.searched)
    assert "activation" not in from_yaml.searched


def test_round_trip_through_to_dict():
    space = default_search_space().with_values(dropout={"choice": [0.1, 0.2]}, max_epochs=7)
    again = parse_search_space(json.loads(json.dumps(space.to_dict())))
    assert again.values == space.values


def test_example_file_is_valid():
    space = load_search_space(EXAMPLE)
    assert space.searched
    assert space["backbone"] == "none"


@pytest.mark.parametrize(
    "content, expected",
    [
        ({"model": {"filter": 8}}, "unknown key model.filter (did you mean 'filters'?)"),
        ({"modle": {}}, "unknown section 'modle' (did you mean 'model'?)"),
        ({"data": {"learning_rate": 0.1}}, "unknown key data.learning_rate"),
        ({"model": {"dropout": 1.5}}, "model.dropout: invalid value 1.5; expected a number >= 0 and < 1"),
        ({"model": {"conv_blocks": 2.5}}, "model.conv_blocks: invalid value 2.5; expected an integer"),
        ({"model": {"conv_blocks": True}}, "model.conv_blocks: invalid value True"),
        ({"model": {"activation": "relux"}}, "model.activation: invalid value 'relux' (did you mean 'relu'?)"),
        ({"model": {"batch_norm": "yes"}}, "model.batch_norm: invalid value 'yes'; expected true or false"),
        ({"model": {"dropout": {"normal": [0, 1]}}}, "model.dropout: invalid distribution {'normal': [0, 1]}"),
        ({"model": {"dropout": {"uniform": [0.4, 0.1]}}}, "model.dropout: uniform [0.4, 0.1] needs low < high"),
        ({"model": {"dropout": {"uniform": [0.1]}}}, "model.dropout: uniform needs [low, high], got [0.1]"),
        ({"model": {"dropout": {"uniform": [0.0, 1.0]}}}, "model.dropout: invalid value 1.0"),
        ({"model": {"filters": {"uniform": [8, 32]}}}, "model.filters: uniform needs a real-valued key, but model.filters is int; use randint or choice"),
        ({"model": {"filters": {"randint": [8, 8]}}}, "model.filters: randint [8, 8] is empty"),
        ({"model": {"filters": {"choice": []}}}, "model.filters: choice needs a non-empty list, got []"),
        ({"model": {"filters": {"choice": [8, 8]}}}, "model.filters: choice lists 8 more than once"),
        ({"model": {"filters": {"choice": [8, -1]}}}, "model.filters: invalid value -1"),
        ({"model": {"filters": {"choice": [8], "grid": [8]}}}, "model.filters: invalid distribution"),
        ({"optimization": {"learning_rate": 0}}, "optimization.learning_rate: invalid value 0; expected a number > 0"),
        ({"optimization": {"learning_rate": {"loguniform": [0.0, 0.1]}}}, "optimization.learning_rate: invalid value 0.0"),
        ({"optimization": {"max_epochs": {"choice": [5, 10]}}}, "optimization.max_epochs must be a single value for the whole run"),
        ({"optimization": {"optimizer": "adagrad"}}, "optimization.optimizer: invalid value 'adagrad'; expected one of adam, adamw, sgd, rmsprop"),
        ({"data": {"flip": {"choice": ["horizontal", "diagonal"]}}}, "data.flip: invalid value 'diagonal'"),
        ({"data": {"color_mode": "cmyk"}}, "data.color_mode: invalid value 'cmyk'"),
        ({"model": {"weights": "/nonexistent/weights.h5"}}, "model.weights: weights file not found: /nonexistent/weights.h5"),
        ({"model": {"kernel_size": None}}, "model.kernel_size: a value is missing (null)"),
        ({"model": [1, 2]}, "section 'model' must be a mapping"),
        ([1, 2], "expected a mapping with the sections model, optimization, data"),
    ],
)
def test_invalid_entries_name_key_and_value(content, expected):
    with pytest.raises(SearchSpaceError) as raised:
        parse_search_space(content, source="space.yaml")
    assert expected in str(raised.value)
    assert str(raised.value).startswith("space.yaml: ")


def test_unreadable_files(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: {conv_blocks: [1, 2\n")
    with pytest.raises(SearchSpaceError, match="broken.yaml is not valid YAML"):
        load_search_space(broken)
    broken_json = tmp_path / "broken.json"
    broken_json.write_text("{")
    with pytest.raises(SearchSpaceError, match="broken.json is not valid JSON"):
        load_search_space(broken_json)
    with pytest.raises(SearchSpaceError, match="cannot read the search space file"):
        load_search_space(tmp_path / "missing.yaml")


def test_empty_file_means_defaults(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set\n")
    assert load_search_space(empty).values == default_search_space().values


def test_weights_file_path_is_resolved(tmp_path):
    weights = tmp_path / "backbone.weights.h5"
    weights.write_bytes(b"not checked here")
    space = parse_search_space({"model": {"backbone": "mobilenet_v3_small", "weights": str(weights)}})
    assert space["weights"] == str(weights.resolve())


def test_random_param_space_uses_ray_domains():
    from ray.tune.search.sample import Categorical, Float, Integer

    space = parse_search_space({"model": {"filters": {"randint": [4, 9]}, "dropout": {"uniform": [0.0, 0.3]}},
                                "optimization": {"batch_size": {"choice": [16, 32]}}})
    param_space = space.to_param_space("random")
    assert isinstance(param_space["filters"], Integer)
    assert (param_space["filters"].lower, param_space["filters"].upper) == (4, 9)
    assert isinstance(param_space["dropout"], Float)
    assert isinstance(param_space["batch_size"], Categorical)
    assert param_space["batch_size"].categories == [16, 32]
    assert param_space["max_epochs"] == 15
    assert param_space["learning_rate"].sampler.__class__.__name__ == "_LogUniform"


def test_grid_search_turns_choices_into_grids():
    space = parse_search_space({"model": {"conv_blocks": {"choice": [1, 2]}, "filters": 8, "dropout": 0.1,
                                          "activation": "relu", "batch_norm": False, "dense_units": 16},
                                "optimization": {"learning_rate": {"choice": [0.001, 0.01]}}})
    param_space = space.to_param_space("grid")
    assert param_space["conv_blocks"] == {"grid_search": [1, 2]}
    assert param_space["learning_rate"] == {"grid_search": [0.001, 0.01]}


def test_grid_search_rejects_ranges():
    with pytest.raises(SearchSpaceError, match=r"model.dropout: grid search needs a finite list of values, but it is uniform \[0.0, 0.5\]"):
        default_search_space().to_param_space("grid")


def test_optuna_rejects_grid_entries():
    space = parse_search_space({"data": {"zoom": {"grid": [0.0, 0.1]}}}, source="space.yaml")
    with pytest.raises(SearchSpaceError, match=r"space.yaml: data.zoom: Optuna cannot search a grid"):
        space.to_param_space("optuna")


def test_pbt_mutations_cover_searched_mutable_keys():
    space = parse_search_space({"optimization": {"batch_size": {"choice": [16, 32, 64]}}})
    mutations = space.pbt_mutations()
    assert set(mutations) == {"learning_rate", "batch_size"}
    assert mutations["batch_size"] == [16, 32, 64]
    fixed = parse_search_space({"optimization": {"learning_rate": 0.001}})
    assert fixed.pbt_mutations() == {}


def test_with_values_validates_overrides():
    space = default_search_space().with_values(max_epochs=4, batch_size=8, class_weight="none")
    assert (space["max_epochs"], space["batch_size"], space["class_weight"]) == (4, 8, "none")
    with pytest.raises(SearchSpaceError, match="optimization.batch_size: invalid value 0"):
        default_search_space().with_values(batch_size=0)
