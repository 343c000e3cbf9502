import pytest
import yaml

from netshrink.errors import ConfigError
from netshrink.recipe import load_recipe, parse_recipe

GOOD = {
    "model": "lenet_300_100",
    "data": "mnist",
    "train": {"epochs": 1},
    "stages": [
        {"method": "magnitude", "sparsity": 0.9, "steps": 2, "finetune": {"epochs": 1, "lr": 0.01}},
        {"method": "kmeans", "bits": 5, "layer_bits": {"fc3": 6}},
        {"method": "huffman"},
    ],
}


def _with(path, value):
    """GOOD with the dotted ``path`` set to ``value`` (list indices as ints)."""
    import copy

    data = copy.deepcopy(GOOD)
    node = data
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node[k]
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return data


def test_good_recipe_parses_and_expands_iterative_stages():
    r = parse_recipe(GOOD)
    assert [s.config.method for s in r.stages] == ["magnitude", "kmeans", "huffman"]
    labels = [s.label for s in r.expanded()]
    assert labels == ["magnitude 1/2", "magnitude 2/2", "kmeans", "huffman"]
    assert r.expanded()[0].finetune.epochs == 1
    assert r.fingerprint() == parse_recipe(GOOD).fingerprint()


@pytest.mark.parametrize(
    "path, value, field",
    [
        ("bogus", 1, "bogus"),
        ("model", "resnet9000", "model"),
        ("data", "imagenet", "data"),
        ("train.lr", "fast", "train.lr"),
        ("train.bogus", 1, "train.bogus"),
        ("stages.0.sparsity", 1.0, "stages[0].sparsity"),
        ("stages.0.sparsity", "lots", "stages[0].sparsity"),
        ("stages.0.colour", "red", "stages[0].colour"),
        ("stages.1.bits", 17, "stages[1].bits"),
        ("stages.1.bits", 0, "stages[1].bits"),
        ("stages.1.layer_bits", {"fc9": 4}, "stages[1].layer_bits.fc9"),
        ("stages.2.method", "quantum", "stages[2].method"),
        ("stages.0.finetune", {"epochs": -1}, "stages[0].finetune.epochs"),
    ],
)
def test_bad_recipe_names_the_field(path, value, field):
    data = _with(path, value) if path != "bogus" else {**GOOD, "bogus": 1}
    with pytest.raises(ConfigError) as ei:
        parse_recipe(data)
    assert ei.value.field == field
    assert "\n" not in str(ei.value)


def test_unknown_layer_in_layers_list(tmp_path):
    data = _with("stages.0.layers", ["fc1", "conv7"])
    with pytest.raises(ConfigError, match=r"stages\[0\].layers\[1\]: no layer named 'conv7'"):
        parse_recipe(data)


def test_yaml_syntax_error_gives_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: lenet5\nstages: [\n  - method: {\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_recipe(p)


def test_shipped_recipes_are_valid():
    from pathlib import Path

    recipes = sorted(Path(__file__).resolve().parents[1].joinpath("recipes").glob("*.yaml"))
    assert recipes
    for p in recipes:
        r = load_recipe(p)
        assert r.stages, p
        yaml.safe_load(p.read_text())


def test_model_that_cannot_take_the_data_is_caught_before_running():
    data = {**GOOD, "model": "lenet5", "data": "digits", "stages": []}
    with pytest.raises(ConfigError) as ei:
        parse_recipe(data)
    assert ei.value.field == "data" and "(1, 8, 8)" in str(ei.value)


def test_stages_after_a_factorization_can_name_its_new_layers():
    data = {
        "model": "lenet_300_100",
        "data": "mnist",
        "stages": [
            {"method": "svd", "layers": ["fc1"], "rank": 20},
            {"method": "magnitude", "layer_sparsity": {"fc1.first": 0.5, "fc1.second": 0.5}},
            {"method": "kmeans", "layers": ["fc1.*", "fc2"]},
        ],
    }
    r = parse_recipe(data)
    assert [s.config.method for s in r.stages] == ["svd", "magnitude", "kmeans"]
    data["stages"][1]["layer_sparsity"] = {"fc1.third": 0.5}
    with pytest.raises(ConfigError, match=r"stages\[1\].layer_sparsity.fc1.third"):
        parse_recipe(data)


@pytest.mark.parametrize(
    "path, value, field, needle",
    [
        ("model", "no.such.module:build", "model", "cannot import 'no.such.module'"),
        ("model", "lenet_9000", "model", "package.module:function"),
        ("model_args", [1, 2], "model_args", "expected a mapping"),
        ("weights", 3, "weights", "expected a path"),
        ("weights", "missing.safetensors", "weights", "file not found"),
        ("data", "missing/folder", "data", "no such file or folder"),
        ("data", "cifar10", "data", "unknown data set 'cifar10'"),
        ("data_args", "seed=1", "data_args", "expected a mapping"),
        ("task", "translation", "task", "unknown task 'translation'"),
        ("task", {"name": "classification", "colour": 1}, "task.colour", "unknown task argument"),
        ("task", "no_such_module_xyz:make", "task", "cannot import"),
    ],
)
def test_bad_user_fields_name_the_field(path, value, field, needle):
    with pytest.raises(ConfigError) as err:
        parse_recipe(_with(path, value))
    assert err.value.field == field and needle in str(err.value), str(err.value)


def test_user_fields_parse(tmp_path):
    import numpy as np

    np.savez(tmp_path / "d.npz", x=np.zeros((20, 784), np.float32), y=np.zeros(20, np.int64))
    r = parse_recipe({**GOOD, "data": "d.npz", "data_args": {"seed": 2}, "task": {"name": "classification", "target_key": "y"}}, base=tmp_path)
    assert r.data == str(tmp_path / "d.npz") and r.data_args == {"seed": 2} and r.task.target_key == "y" and r.weights is None
    assert not r.user_model and parse_recipe(GOOD).task.name == "classification"
