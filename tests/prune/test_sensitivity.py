import csv
import itertools

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from netshrink._registry import config_type
from netshrink.data import digits
from netshrink.errors import ConfigError
from netshrink.metrics import macs
from netshrink.models import build_model
from netshrink.prune import AutoSparsityConfig, IterativeConfig, MagnitudeConfig, SensitivityCurves, allocate, prune_, sensitivity_sweep
from netshrink.prune._select import keep_count
from netshrink._allocate import eval_subset, evaluate
from netshrink.train import TrainConfig, Trainer


@pytest.fixture(scope="module")
def trained():
    splits = digits()
    torch.manual_seed(0)
    model = build_model("mlp", in_features=64, hidden=[48, 24])
    Trainer(model, TrainConfig(epochs=8, lr=0.05, batch_size=32, schedule="cosine", progress=False, device="cpu")).fit(splits.train)
    return splits, {k: v.clone() for k, v in model.state_dict().items()}


def _model(state):
    model = build_model("mlp", in_features=64, hidden=[48, 24])
    model.load_state_dict(state)
    return model


def test_sweep_curves_csv_and_png(trained, tmp_path):
    splits, state = trained
    model = _model(state)
    grid = [0.0, 0.5, 0.9, 0.99]
    curves = sensitivity_sweep(model, splits, grid=grid)
    assert curves.layers == ["fc1", "fc2", "fc3"] and curves.sparsities == grid
    assert curves.params == {"fc1": 48 * 64, "fc2": 24 * 48, "fc3": 10 * 24}
    assert curves.macs == curves.params  # a Linear layer: one MAC per weight per example
    assert curves.samples == len(splits.val)
    for n in curves.layers:
        assert curves.error[n][0] == curves.base_error and curves.loss[n][0] == curves.base_loss
        assert curves.loss[n][-1] > curves.base_loss + 0.1  # 99% of any one layer gone hurts
        rise = curves.rise(n)
        assert rise[0] == 0.0 and all(b >= a for a, b in zip(rise, rise[1:]))
    assert model.fc1.weight.count_nonzero() == model.fc1.weight.numel()  # the model itself is untouched
    rows = list(csv.DictReader(curves.to_csv(tmp_path / "s.csv").open()))
    assert len(rows) == 3 * 4 and rows[5]["layer"] == "fc2" and float(rows[5]["sparsity"]) == 0.5
    assert float(rows[7]["error"]) == pytest.approx(curves.error["fc2"][3], abs=1e-6)
    png = curves.plot(tmp_path / "s.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _synthetic(params, grid, seed=0):
    g = torch.Generator().manual_seed(seed)
    loss = {n: (torch.rand(len(grid), generator=g).cumsum(0) * torch.rand(1, generator=g)).tolist() for n in params}
    for n in params:
        loss[n][0] = 0.0
    return SensitivityCurves(list(grid), 0.0, 0.0, {n: [0.0] * len(grid) for n in params}, loss, dict(params), dict(params))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_allocation_is_the_brute_force_optimum(seed):
    params = {"a": 100, "b": 50, "c": 10}
    grid = [0.0, 0.3, 0.5, 0.8, 0.9]
    curves = _synthetic(params, grid, seed)
    target = 0.5  # cap = 80 weights: integer costs: the DP is exact
    alloc = allocate(curves, target)
    best = min(
        (sum(curves.loss[n][j] for n, j in zip(params, js)), js)
        for js in itertools.product(range(len(grid)), repeat=3)
        if sum(keep_count(params[n], grid[j]) for n, j in zip(params, js)) <= 80
    )
    assert alloc.predicted_rise == pytest.approx(best[0])
    kept = sum(keep_count(params[n], alloc.layer_sparsity[n]) for n in params)
    assert kept == alloc.kept <= 80 and alloc.reduction >= target
    coarse = allocate(curves, target, resolution=12)  # quantized units, costs rounded up: still within budget
    assert sum(keep_count(params[n], coarse.layer_sparsity[n]) for n in params) <= 80
    assert coarse.predicted_rise >= best[0] - 1e-12


def test_allocation_prunes_the_insensitive_layer_hardest():
    grid = [0.0, 0.5, 0.9]
    curves = SensitivityCurves(grid, 0.1, 0.3, {"big": [0.1] * 3, "small": [0.1] * 3}, {"big": [0.3, 0.31, 0.35], "small": [0.3, 0.8, 2.0]},
                               {"big": 1000, "small": 1000}, {"big": 1000, "small": 1000})
    assert allocate(curves, 0.45).layer_sparsity == {"big": 0.9, "small": 0.0}
    # with MACs as the budget, a layer cheap in weights but costly in MACs is where the cuts go
    curves.macs = {"big": 1000, "small": 50000}
    alloc = allocate(curves, 0.4, budget="macs")
    assert alloc.layer_sparsity["small"] == 0.5 and alloc.reduction >= 0.4


def test_a_budget_that_cannot_be_met_is_a_config_error():
    curves = _synthetic({"a": 10, "b": 10}, [0.0, 0.5])
    with pytest.raises(ConfigError) as ei:
        allocate(curves, 0.8)
    assert ei.value.field == "sparsity" and "cannot be met" in str(ei.value)


def test_auto_sparsity_beats_uniform_magnitude_and_writes_its_report(trained, tmp_path):
    splits, state = trained
    sub = eval_subset(splits.val, 2000)
    auto, uniform = _model(state), _model(state)
    res = prune_(auto, AutoSparsityConfig(sparsity=0.8, report_dir=str(tmp_path)), data=splits)
    prune_(uniform, MagnitudeConfig(sparsity=0.8))
    layers = [auto.fc1, auto.fc2, auto.fc3]
    removed = sum(int((m.weight == 0).sum()) for m in layers) / sum(m.weight.numel() for m in layers)
    assert removed >= 0.8  # the budget is met
    assert res.allocation.layer_sparsity["fc3"] < res.allocation.layer_sparsity["fc1"]  # the classifier is the sensitive one
    assert evaluate(auto, sub)[1] < evaluate(uniform, sub)[1]
    assert {p.name for p in tmp_path.iterdir()} == {"sensitivity.csv", "sensitivity.png", "allocation.json"}


def test_macs_budget_on_a_conv_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 10))
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g))
    dense = macs(net, torch.zeros(1, 1, 8, 8)).dense
    res = prune_(net, AutoSparsityConfig(sparsity=0.6, budget="macs", samples=64), data=data)
    assert res.allocation.kind == "macs" and res.allocation.total == dense
    assert macs(net, torch.zeros(1, 1, 8, 8)).effective <= 0.4 * dense


def test_auto_sparsity_runs_as_a_round_of_the_iterative_procedure(trained):
    splits, state = trained
    model = _model(state)
    cfg = IterativeConfig(sparsity=0.75, criterion="auto_sparsity", criterion_args={"grid": [0.0, 0.5, 0.7, 0.8, 0.9, 0.95]},
                          rounds=2, finetune={"epochs": 1, "lr": 0.02, "progress": False, "device": "cpu"})
    res = prune_(model, cfg, data=splits)
    assert res.stopped_by == "target" and res.rounds[-1].sparsity >= 0.75


@pytest.mark.parametrize(
    "args, field",
    [
        ({"sparsity": 1.0}, "sparsity"),
        ({"grid": [0.0, 1.0]}, "grid[1]"),
        ({"grid": []}, "grid"),
        ({"criterion": "kmeans"}, "criterion"),
        ({"criterion": "iterative"}, "criterion"),
        ({"criterion_args": {"layers": ["fc1"]}}, "criterion_args.layers"),
        ({"criterion": "obd", "criterion_args": {"hessian": "bogus"}}, "criterion_args.hessian"),
        ({"samples": 0}, "samples"),
        ({"budget": "latency"}, "budget"),
    ],
)
def test_bad_configs_name_the_field(args, field):
    with pytest.raises(ConfigError) as ei:
        config_type("auto_sparsity").from_dict(args)
    assert ei.value.field == field


def test_needs_data():
    with pytest.raises(ConfigError) as ei:
        prune_(build_model("mlp", in_features=64, hidden=[8]), AutoSparsityConfig(sparsity=0.5))
    assert ei.value.field == "data"


def test_a_recipe_names_auto_sparsity_and_the_iterative_procedure(digits_recipe, tmp_path):
    from netshrink.pipeline import run_recipe
    from netshrink.recipe import parse_recipe

    digits_recipe["train"]["epochs"] = 3
    ft = {"epochs": 1, "lr": 0.01, "batch_size": 32, "progress": False}
    digits_recipe["stages"] = [
        {"method": "auto_sparsity", "label": "auto", "sparsity": 0.6, "report_dir": str(tmp_path / "sens"), "finetune": ft},
        {"method": "iterative", "label": "more", "sparsity": 0.8, "rounds": 2, "criterion": "taylor", "finetune": ft},
    ]
    res = run_recipe(parse_recipe(digits_recipe), tmp_path / "out", progress=False)
    auto, more = res.rows[1], res.rows[2]
    assert (tmp_path / "sens" / "sensitivity.csv").exists()
    assert auto.method == "auto_sparsity" and more.method == "iterative"
    assert more.nonzeros < auto.nonzeros
