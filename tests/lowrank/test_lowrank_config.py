"""Config validation and the errors of the lowrank methods: one ConfigError naming the field and layer."""

import copy

import pytest
import torch
from torch import nn

from netshrink._registry import config_type, list_methods
from netshrink.errors import ConfigError
from netshrink.lowrank import (
    CPConfig,
    SeparableConfig,
    SvdConfig,
    TuckerConfig,
    factorize_,
)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 4, 1),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 10),
    )


def test_methods_are_registered_in_the_lowrank_family():
    names = {m.name for m in list_methods("lowrank")}
    assert {"svd", "tucker", "cp", "separable"} <= names
    cfg = config_type("svd").from_dict({"energy": 0.9, "layers": ["fc*"], "train": "fixed_random"})
    assert isinstance(cfg, SvdConfig) and cfg.to_dict()["energy"] == 0.9
    assert config_type("tucker").from_dict({"rank": [4, 2]}).rank == [4, 2]


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: SvdConfig(rank=0), "rank"),
        (lambda: SvdConfig(), "rank"),
        (lambda: SvdConfig(rank=2, energy=0.5), "energy"),
        (lambda: SvdConfig(energy=0.0), "energy"),
        (lambda: SvdConfig(energy=1.5), "energy"),
        (lambda: SvdConfig(param_ratio=0.0), "param_ratio"),
        (lambda: SvdConfig(rank=2, layer_rank={"fc": 0}), "layer_rank.fc"),
        (lambda: SvdConfig(rank=2, train="frozen"), "train"),
        (lambda: TuckerConfig(rank=[1, 2, 3]), "rank"),
        (lambda: TuckerConfig(rank=[0, 2]), "rank"),
        (lambda: TuckerConfig(rank=2, energy=0.9), "energy"),
        (lambda: CPConfig(rank=0), "rank"),
        (lambda: CPConfig.from_dict({"energy": 0.5}), "energy"),
        (lambda: SeparableConfig.from_dict({"rank": 1, "n_iter_max": 3}), "n_iter_max"),
        (lambda: SvdConfig.from_dict({"rank": "4"}), "rank"),
    ],
)
def test_bad_configs_name_their_field(make, field):
    with pytest.raises(ConfigError) as err:
        make()
    assert err.value.field == field


def _fails(model: nn.Module, config, field: str, *words: str) -> None:
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError) as err:
        config.check_model(model)
    assert err.value.field == field
    with pytest.raises(ConfigError) as err2:
        factorize_(model, config)
    assert str(err2.value) == str(err.value)
    for w in words:
        assert w in str(err.value)
    assert "\n" not in str(err.value)
    # nothing was replaced before the error
    assert model.state_dict().keys() == before.keys() and not getattr(model, "netshrink_edits", [])


def test_rank_above_full_rank_names_the_layer():
    _fails(_net(), SvdConfig(rank=11), "rank", "'5'", "full rank 10")
    _fails(_net(), SvdConfig(rank=2, layer_rank={"5": 64}), "layer_rank.5", "full rank 10")
    _fails(_net(), TuckerConfig(rank=4), "rank", "'0'", "[8, 3]")
    _fails(_net(), SeparableConfig(rank=10, layers=["0"]), "rank", "'0'", "full rank 9")
    _fails(_net(), CPConfig(layer_rank={"0": 28, "3": 1}), "layer_rank.0", "'0'", "full rank 27")


def test_layers_the_method_does_not_apply_to():
    _fails(_net(), TuckerConfig(rank=2, layers=["2"]), "layers[0]", "'2'", "grouped")
    _fails(_net(), CPConfig(rank=2, layers=["0", "5"]), "layers[1]", "'5'", "Linear")
    _fails(_net(), SeparableConfig(rank=1, layers=["3"]), "layers[0]", "'3'", "1x1")
    _fails(_net(), SvdConfig(rank=1, layers=["0"]), "layers[0]", "'0'", "Conv2d")


def test_unknown_layer_names():
    _fails(_net(), SvdConfig(rank=1, layers=["fc9"]), "layers[0]", "fc9")
    _fails(_net(), SvdConfig(rank=1, layer_rank={"fc9": 2}), "layer_rank.fc9", "fc9")
    _fails(_net(), TuckerConfig(layers=["0"], layer_rank={"3": 1}), "layer_rank.3")


def test_layer_rank_alone_must_cover_every_layer():
    _fails(_net(), SvdConfig(layer_rank={"9": 1}), "layer_rank.9")
    _fails(_net(), CPConfig(layer_rank={"0": 2}), "layer_rank", "'3'")
    model = _net()
    factorize_(model, CPConfig(layers=["0"], layer_rank={"0": 2}))
    assert model[0].rank == 2


def test_defaults_skip_what_does_not_apply_and_the_insides_of_replaced_modules():
    model = _net()
    result = factorize_(model, TuckerConfig(rank=1))
    assert sorted(result.layers) == ["0", "3"]  # the grouped conv is left alone
    assert [e["path"] for e in model.netshrink_edits] == ["0", "3"]
    with pytest.raises(ConfigError, match="no layer that separable applies to"):
        factorize_(model, SeparableConfig(rank=1))  # 0.core is inside a replaced module; 2 is grouped
    factorize_(model, SeparableConfig(rank=1, layers=["0.core"]))  # named, it is factorized
    assert [e["path"] for e in model.netshrink_edits] == ["0", "3", "0.core"]
    with pytest.raises(ConfigError, match="no layer that svd"):
        factorize_(nn.Sequential(nn.Conv2d(1, 1, 3)), SvdConfig(rank=1))


def test_a_method_of_another_family_is_refused():
    from netshrink.prune import MagnitudeConfig

    with pytest.raises(ConfigError, match="not a lowrank method"):
        factorize_(_net(), MagnitudeConfig(sparsity=0.5))
