"""auto_channel: per-layer channel ratios chosen under a params / MACs / latency budget."""

import copy

import pytest
import torch

from netshrink import metrics
from netshrink.data import digits
from netshrink.errors import ConfigError
from netshrink.models import build_model
from netshrink.prune.structured import AutoChannelConfig, auto_channel_prune
from netshrink.recipe import parse_recipe
from netshrink.train import TrainConfig, Trainer


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    data = digits()
    model = build_model("mlp", in_features=64, hidden=[48, 24])
    Trainer(model, TrainConfig(epochs=5, lr=0.05, batch_size=32, progress=False)).fit(data.train)
    return model, data


@pytest.mark.parametrize("budget", ["params", "macs"])
def test_the_budget_is_met_by_the_pruned_model(trained, budget):
    model, data = copy.deepcopy(trained[0]), trained[1]
    example = data.test[0][0].unsqueeze(0)
    dense = metrics.count_params(model) if budget == "params" else metrics.macs(model, example).dense
    res = auto_channel_prune(model, AutoChannelConfig(reduction=0.5, budget=budget, grid=[0.25, 0.5, 0.75]), data=data)
    now = metrics.count_params(model) if budget == "params" else metrics.macs(model, example).dense
    assert res.dense_cost == dense and res.measured_cost == now <= 0.5 * dense
    assert res.layer_ratio and set(res.layer_ratio) <= {"fc1", "fc2"}
    assert all(r in (0.25, 0.5, 0.75) for r in res.layer_ratio.values())
    for name, ratio in res.layer_ratio.items():  # the layers really shrank by their ratio
        before, after = res.channels[name]
        assert after == before - int(ratio * before + 1e-9)
    assert metrics.error_rate(model, data.test) < 0.5


def _timed(model, config, data):
    """A latency budget is measured, so on a loaded machine the sweep may see no saving at all: then the
    answer is the one clear ConfigError naming ``reduction`` and the model is left as it was (no timing
    assertion in a test)."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        res = auto_channel_prune(model, config, data=data)
    except ConfigError as exc:
        assert "reduction" in str(exc) and "cannot be met" in str(exc)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        return None
    assert res.budget == "latency" and res.dense_cost > 0 and res.measured_cost > 0
    return res


def test_latency_budget_is_timed_and_reported(trained):
    model, data = copy.deepcopy(trained[0]), trained[1]
    _timed(model, AutoChannelConfig(reduction=0.01, budget="latency", latency_batch=64), data)


def test_latency_budget_in_the_deployed_onnxruntime_form(trained):
    pytest.importorskip("onnxruntime")
    from netshrink.deploy import measured_latency

    model, data = copy.deepcopy(trained[0]), trained[1]
    _timed(model, AutoChannelConfig(reduction=0.01, budget="latency", latency_batch=32, latency_runtime="onnxruntime",
                                    grid=[0.5]), data)
    # the pruned model still exports and runs in onnxruntime, where its latency was measured
    assert measured_latency(model, data.test[0][0].unsqueeze(0), 32, "onnxruntime") > 0
    with pytest.raises(ConfigError, match="latency_runtime"):
        AutoChannelConfig(latency_runtime="tensorrt")


def test_an_unreachable_budget_names_reduction_and_leaves_the_model(trained):
    model, data = copy.deepcopy(trained[0]), trained[1]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="reduction"):
        auto_channel_prune(model, AutoChannelConfig(reduction=0.9, budget="params", grid=[0.25]), data=data)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_needs_validation_data_and_valid_fields(trained):
    model = copy.deepcopy(trained[0])
    with pytest.raises(ConfigError, match="data"):
        auto_channel_prune(model, AutoChannelConfig(), data=trained[1].train)
    for field, value in [("reduction", 1.0), ("grid", []), ("budget", "energy"), ("latency_batch", 0)]:
        recipe = {"model": "mlp", "data": "digits", "stages": [{"method": "auto_channel", field: value}]}
        with pytest.raises(ConfigError, match=field):
            parse_recipe(recipe)
    recipe = {"model": "mlp", "data": "digits", "stages": [{"method": "auto_channel", "layers": ["fc9"]}]}
    with pytest.raises(ConfigError, match="layers.fc9"):
        parse_recipe(recipe)
