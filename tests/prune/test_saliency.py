import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from netshrink.data import digits
from netshrink.errors import ConfigError
from netshrink.models import build_model
from netshrink.prune import (
    KarninConfig,
    KarninTracker,
    SkeletonizationConfig,
    TaylorConfig,
    get_mask,
    prune_,
    skeleton_relevance,
)
from netshrink.prune.importance import taylor_group
from netshrink.prune.saliency import l1_error, taylor_scores
from netshrink.train import TrainConfig, Trainer


def _mlp(seed=0, hidden=8):
    torch.manual_seed(seed)
    return build_model("mlp", in_features=6, hidden=[hidden], num_classes=3)


def _data(n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


# ------------------------------------------------------------------------------ skeletonization


def test_a_dead_neuron_has_zero_relevance():
    net = _mlp()
    with torch.no_grad():
        net.fc2.weight[:, 3] = 0.0  # neuron 3 of fc1 reaches nothing
    x, y = _data().tensors
    rel = skeleton_relevance(net, {"fc1": net.fc1}, [(x[:32], y[:32]), (x[32:], y[32:])])["fc1"]
    assert rel[3] == 0.0
    assert torch.count_nonzero(rel) == 7


def test_skeletonization_removes_the_least_relevant_units_whole():
    net = _mlp()
    loader = DataLoader(_data(), batch_size=32)  # a DataLoader is used as given: the same two batches
    rel = skeleton_relevance(net, {"fc1": net.fc1}, list(loader))["fc1"]
    res = prune_(net, SkeletonizationConfig(sparsity=2 / 8, layers=["fc1"], batches=2), data=loader)
    assert res.sparsity["fc1"] == pytest.approx(2 / 8)
    gone = (~get_mask(net.fc1).any(1)).nonzero().flatten()
    assert sorted(gone.tolist()) == sorted(torch.argsort(rel)[:2].tolist())
    assert get_mask(net.fc1).sum() == 6 * 6
    assert not get_mask(net.fc1, "bias")[gone].any() and torch.all(net.fc1.bias[gone] == 0)  # removed whole


def test_relevance_is_minus_the_gate_derivative_and_is_smoothed():
    # gating unit i scales its row and bias: ∂E/∂α_i = Σ_k ∂E/∂W_ik W_ik + ∂E/∂b_i b_i
    net = _mlp()
    x, y = _data().tensors
    batches = [(x[:32], y[:32]), (x[32:], y[32:])]
    per_batch = []
    for xb, yb in batches:
        net.zero_grad()
        l1_error(net(xb), yb).backward()
        g = (net.fc1.weight.grad * net.fc1.weight).sum(1) + net.fc1.bias.grad * net.fc1.bias
        torch.testing.assert_close(g.pow(2), taylor_group(net.fc1.weight, net.fc1.weight.grad, net.fc1.bias, net.fc1.bias.grad))
        per_batch.append(-g.detach())
    rel = skeleton_relevance(net, {"fc1": net.fc1}, batches, decay=0.8)["fc1"]
    torch.testing.assert_close(rel, 0.8 * per_batch[0] + 0.2 * per_batch[1], rtol=1e-5, atol=1e-7)


def test_skeletonization_global_scope_removes_a_fraction_of_all_units():
    net = _mlp()
    res = prune_(net, SkeletonizationConfig(sparsity=0.5, scope="global", batches=1, prune_bias=False), data=_data())
    rows = [get_mask(net.fc1).any(1), get_mask(net.fc2).any(1)]
    assert sum(int((~r).sum()) for r in rows) == round(0.5 * 11)
    assert get_mask(net.fc1, "bias") is None
    assert 0 < res.overall < 1


# ---------------------------------------------------------------------------------------- Taylor


def test_taylor_on_a_known_linear_case():
    layer = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, -1.0, 2.0]]))
    model = nn.Sequential(layer)
    x, t = torch.tensor([[1.0, 2.0, -1.0]]), torch.tensor([[1.0]])
    # mse loss ½(w·x − t)²: g = (w·x − t) x = (0.5 − 2 − 2 − 1) x = −4.5 x
    g = -4.5 * x[0]
    w = layer.weight.detach()[0]
    weight = taylor_scores(model, {"0": layer}, [(x, t)], "weight", loss="mse")["0"]
    torch.testing.assert_close(weight[0], (g * w).pow(2))
    unit = taylor_scores(model, {"0": layer}, [(x, t)], "channel", loss="mse")["0"]
    torch.testing.assert_close(unit, (g * w).sum().pow(2).reshape(1))


def test_taylor_handler_weight_and_channel_granularity():
    net = _mlp()
    res = prune_(net, TaylorConfig(sparsity=0.75, batches=2, batch_size=32), data=_data())
    assert res.sparsity == {"fc1": 0.75, "fc2": pytest.approx(0.75, abs=1 / 24)}
    net = _mlp()
    prune_(net, TaylorConfig(sparsity=0.25, granularity="channel", layers=["fc1"], batches=2, batch_size=32), data=_data())
    rows = get_mask(net.fc1)
    assert torch.equal(rows.all(1), rows.any(1))  # whole rows only
    assert int((~rows.any(1)).sum()) == 2


# ---------------------------------------------------------------------------------------- Karnin


def _toy_regression():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=g)
    return x, 3.0 * x[:, :1]  # only input 0 matters


def test_karnin_tracker_on_a_toy_run():
    x, y = _toy_regression()
    model = nn.Sequential(nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.5, 0.5]]))
    tracker = KarninTracker(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(120):
        opt.zero_grad()
        (0.5 * (model(x[i % 4 * 16 : i % 4 * 16 + 16]) - y[i % 4 * 16 : i % 4 * 16 + 16]).pow(2).mean()).backward()
        opt.step()
        tracker.step()
    w = model[0].weight.detach()[0]
    assert w[0] == pytest.approx(3.0, abs=0.05) and abs(float(w[1])) < 0.05
    by_lr = tracker.sensitivities(lr=0.1)["0"][0]
    by_grad = tracker.sensitivities()["0"][0]
    torch.testing.assert_close(by_lr, by_grad, rtol=1e-4, atol=1e-6)  # plain SGD: −g·Δw = Δw²/η
    assert by_lr[0] > 100 * abs(float(by_lr[1]))
    prune_(model, KarninConfig(sparsity=0.5), data=tracker)
    assert get_mask(model[0]).tolist() == [[True, False]]


def test_karnin_records_trainer_steps_and_runs_its_own_fine_tune():
    torch.set_num_threads(1)
    splits = digits()
    torch.manual_seed(0)
    model = build_model("mlp", in_features=64, hidden=[16])
    tracker = KarninTracker(model, ["fc1"])
    Trainer(model, TrainConfig(epochs=1, lr=0.05, batch_size=128, progress=False, device="cpu"), callbacks=[tracker]).fit(splits.train)
    assert tracker.steps == -(-len(splits.train) // 128) and tracker.grad_steps == tracker.steps
    sens = tracker.sensitivities()["fc1"]
    assert sens.shape == (16, 64) and torch.isfinite(sens).all()
    # given a data set instead of a tracker, the handler fine-tunes with plain SGD while tracking
    res = prune_(model, KarninConfig(sparsity=0.5, epochs=1, lr=0.01, batch_size=128), data=splits)
    assert res.sparsity["fc1"] == pytest.approx(0.5) and res.sparsity["fc2"] == pytest.approx(0.5)
    with pytest.raises(ConfigError) as ei:
        prune_(model, KarninConfig(sparsity=0.5), data=tracker)  # tracks fc1 only
    assert ei.value.field == "layers"


# --------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "cls, args, field",
    [
        (SkeletonizationConfig, {"sparsity": 1.0}, "sparsity"),
        (SkeletonizationConfig, {"sparsity": 0.5, "decay": 1.0}, "decay"),
        (TaylorConfig, {"sparsity": -0.5}, "sparsity"),
        (TaylorConfig, {"sparsity": 0.5, "granularity": "filter"}, "granularity"),
        (KarninConfig, {"sparsity": 0.5, "lr": 0.0}, "lr"),
        (KarninConfig, {"sparsity": 0.5, "epochs": 0}, "epochs"),
        (KarninConfig, {"sparsity": 0.5, "layer_sparsity": {"fc1": 1.0}}, "layer_sparsity.fc1"),
    ],
)
def test_bad_configs_name_the_field(cls, args, field):
    with pytest.raises(ConfigError) as ei:
        cls.from_dict(args)
    assert ei.value.field == field


@pytest.mark.parametrize("cfg", [SkeletonizationConfig(sparsity=0.5), TaylorConfig(sparsity=0.5), KarninConfig(sparsity=0.5)])
def test_data_driven_criteria_need_data(cfg):
    with pytest.raises(ConfigError) as ei:
        prune_(_mlp(), cfg)
    assert ei.value.field == "data"


def test_karnin_as_a_trainer_callback_equals_a_hand_loop_that_steps_the_tracker():
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 6, generator=g), torch.randint(0, 3, (96,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    twin = copy.deepcopy(model)
    tracker = KarninTracker(model)
    Trainer(model, TrainConfig(epochs=2, lr=0.1, momentum=0.0, progress=False, device="cpu"), callbacks=[tracker]).fit(loader)
    hand = KarninTracker(twin)
    opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.0)
    for _ in range(2):
        for xb, yb in loader:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(twin(xb), yb).backward()
            opt.step()
            hand.step()
    assert tracker.steps == hand.steps == 6 and tracker.grad_steps == 6
    for n in ("0", "2"):
        torch.testing.assert_close(tracker.sensitivities()[n], hand.sensitivities()[n], rtol=0, atol=0)
        torch.testing.assert_close(tracker.sensitivities(lr=0.1)[n], hand.sensitivities(lr=0.1)[n], rtol=0, atol=0)
