"""Early exits (BranchyNet, Teerapittayanon et al. 2016): routing, costs, the threshold sweep, errors."""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netshrink.data import digits
from netshrink.dynamic import (
    EarlyExitNet,
    early_exit_loss,
    entropy,
    evaluate_early_exit,
    exit_costs,
    sweep_thresholds,
    train_early_exit,
)
from netshrink.errors import ConfigError, ModelError
from netshrink.metrics import error_rate
from netshrink.models import build_model
from netshrink.train import TrainConfig

THRESHOLDS = [0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0]


@pytest.fixture(scope="module")
def data():
    return digits(seed=0)


@pytest.fixture(scope="module")
def trained(data):
    """A 64-64-64-64-10 MLP with exits after relu1 and relu2, trained jointly (about 3% test error)."""
    torch.manual_seed(0)
    backbone = build_model("mlp", in_features=64, hidden=[64, 64, 64])
    net = EarlyExitNet.from_sequential(backbone, ["relu1", "relu2"], data.train.tensors[0][:1])
    cfg = TrainConfig(epochs=8, lr=0.05, batch_size=32, schedule="cosine", device="cpu", progress=False)
    result = train_early_exit(net, data.train, data.val, cfg)
    return backbone, net.eval(), result


def test_training_gives_a_good_final_exit(trained, data):
    backbone, net, result = trained
    assert net.num_exits == 3 and net.exit_after == (0, 1)
    assert result.final_val_error < 0.1 and error_rate(net, data.test) < 0.1
    x = data.test.tensors[0]
    with torch.no_grad():
        torch.testing.assert_close(net(x), backbone(x), rtol=0, atol=0)  # forward = the network without exits
        for z in net.exit_logits(x)[:-1]:  # the early exits learned too
            assert float((z.argmax(1) != data.test.tensors[1]).float().mean()) < 0.2


def test_threshold_zero_sends_everyone_to_the_final_exit(trained, data):
    _, net, _ = trained
    x = data.test.tensors[0]
    decision = net.route(x, 0.0)
    assert bool((decision.exit_index == 2).all())
    with torch.no_grad():
        assert torch.equal(decision.logits, net(x))
    point = evaluate_early_exit(net, data.test, 0.0)
    assert point.exit_counts == (0, 0, len(x))
    assert point.error == pytest.approx(error_rate(net, data.test))


def test_a_huge_threshold_sends_everyone_to_the_first_exit(trained, data):
    _, net, _ = trained
    x = data.test.tensors[0]
    for big in (math.log(10) + 1e-3, math.inf):
        decision = net.route(x, big)
        assert bool((decision.exit_index == 0).all())
        with torch.no_grad():
            torch.testing.assert_close(decision.logits, net.exit_logits(x)[0])


def test_routing_follows_the_entropy_rule(trained, data):
    _, net, _ = trained
    x = data.test.tensors[0]
    thr = (0.05, 0.2)
    decision = net.route(x, thr)
    with torch.no_grad():
        all_logits = net.exit_logits(x)
    ents = [entropy(z) for z in all_logits]
    for i in range(len(x)):
        k = int(decision.exit_index[i])
        torch.testing.assert_close(decision.logits[i], all_logits[k][i], rtol=1e-5, atol=1e-5)
        assert all(float(ents[j][i]) >= thr[j] - 1e-6 for j in range(k))  # did not qualify earlier
        if k < 2:
            assert float(ents[k][i]) < thr[k] + 1e-6
    assert len(set(decision.exit_index.tolist())) == 3  # a real mix of exits at these thresholds


def test_costs_per_stage_and_exit(trained, data):
    _, net, _ = trained
    costs = exit_costs(net, data.test.tensors[0][:4])  # counted per example
    assert costs.stage_macs == (64 * 64, 64 * 64, 64 * 64 + 64 * 10)
    assert costs.head_macs == (640, 640)
    assert costs.per_exit == (4096 + 640, 2 * 4096 + 2 * 640, costs.backbone_macs + 2 * 640)


def test_sweep_is_monotone_in_the_threshold(trained, data):
    _, net, _ = trained
    curve = sweep_thresholds(net, data.test, THRESHOLDS)
    macs = curve.avg_macs
    assert all(a >= b for a, b in itertools.pairwise(macs)), macs
    assert macs[0] == curve.costs.per_exit[-1] and macs[-1] < 0.5 * macs[0]
    assert curve.thresholds[0] == (0.0, 0.0) and len(curve.points) == len(THRESHOLDS)
    for p in curve.points:
        assert sum(p.exit_counts) == len(data.test) and p.exit_index.shape == (len(data.test),)
        assert sum(p.exit_fractions) == pytest.approx(1.0)
    # exits taken never move later as the threshold grows
    for a, b in itertools.pairwise(curve.points):
        assert bool((b.exit_index <= a.exit_index).all())
    # the early exits cost little accuracy at moderate thresholds
    assert curve.points[2].error <= curve.points[0].error + 0.03
    assert curve.points[2].mac_reduction > 1.0


def test_joint_loss_is_the_weighted_sum():
    g = torch.Generator().manual_seed(0)
    zs = [torch.randn(6, 10, generator=g) for _ in range(3)]
    y = torch.arange(6)
    expected = 0.5 * F.cross_entropy(zs[0], y) + 1.0 * F.cross_entropy(zs[1], y) + 2.0 * F.cross_entropy(zs[2], y)
    torch.testing.assert_close(early_exit_loss(zs, y, [0.5, 1.0, 2.0]), expected)
    with pytest.raises(ConfigError, match="weights"):
        early_exit_loss(zs, y, [1.0])


def test_conv_backbone_and_bad_inputs():
    torch.manual_seed(0)
    conv = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 4, 3, padding=1), relu1=nn.ReLU(), pool=nn.MaxPool2d(2),
        conv2=nn.Conv2d(4, 8, 3, padding=1), relu2=nn.ReLU(), flatten=nn.Flatten(1), fc=nn.Linear(8 * 16, 10),
    ))
    x = torch.randn(5, 1, 8, 8)
    net = EarlyExitNet.from_sequential(conv, ["pool"], x).eval()
    assert net.heads[0][1].in_features == 4 * 4 * 4
    assert net.route(x, 0.0).logits.shape == (5, 10)
    assert exit_costs(net, x).stage_macs[0] == 64 * 4 * 9
    with pytest.raises(ConfigError) as err:
        EarlyExitNet.from_sequential(conv, ["conv9"], x)
    assert err.value.field == "exits_after[0]" and "relu2" in str(err.value)
    with pytest.raises(ConfigError, match="exits_after"):
        EarlyExitNet.from_sequential(conv, [], x)
    with pytest.raises(ConfigError, match="last layer"):
        EarlyExitNet.from_sequential(conv, ["fc"], x)
    with pytest.raises(ConfigError, match="thresholds"):
        net.route(x, [0.1, 0.2])
    with pytest.raises(ConfigError, match="thresholds"):
        net.route(x, -0.5)
    with pytest.raises(ConfigError, match="exits"):
        EarlyExitNet([nn.Identity(), nn.Identity()], {1: nn.Identity()})
    with pytest.raises(ModelError, match="2 stages"):
        EarlyExitNet([nn.Identity()], {0: nn.Identity()})


# ------------------------------------------------------------------------------ other tasks


def _lm_exit_net():
    from tests._task_models import VOCAB

    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Embedding(VOCAB, 16), nn.Linear(16, 24), nn.ReLU()), nn.Sequential(nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, VOCAB))]
    return EarlyExitNet(stages, {0: nn.Linear(24, VOCAB)})  # a per-token head after stage 0


def test_early_exit_trains_and_routes_a_language_model_on_dict_batches():
    from netshrink.dynamic import train_early_exit
    from netshrink.task import language_modeling
    from netshrink.train import TrainConfig
    from tests._task_models import TokenDicts

    torch.set_num_threads(1)
    task = language_modeling()
    train, val = TokenDicts(256, seed=1), TokenDicts(64, seed=2)
    net = _lm_exit_net()
    before = task.evaluate(net, val)
    train_early_exit(net, train, None, TrainConfig(epochs=4, lr=0.05, batch_size=32, progress=False, device="cpu"), task=task)
    final = task.evaluate(net, val)
    assert final < 0.5 * before
    everyone_final = evaluate_early_exit(net, val, 0.0, task=task)  # T = 0: nobody leaves early
    assert everyone_final.exit_counts == (0, 64) and everyone_final.error == pytest.approx(final, rel=1e-6)
    everyone_first = evaluate_early_exit(net, val, math.inf, task=task)  # T = inf: everybody leaves at exit 0
    nll = n = 0.0
    for batch in torch.utils.data.DataLoader(val, batch_size=64):
        inputs, target = task.split(batch)
        with torch.no_grad():
            z = net.eval().exit_logits(inputs.kwargs["input_ids"])[0]
        nll += float(F.cross_entropy(z.reshape(-1, z.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"))
        n += int((target != -100).sum())
    assert everyone_first.exit_counts == (64, 0) and everyone_first.error == pytest.approx(math.exp(nll / n), rel=1e-5)
    curve = sweep_thresholds(net, val, [0.0, 0.5, 1.5, math.inf], task=task)
    assert all(b <= a for a, b in zip(curve.avg_macs, curve.avg_macs[1:]))


def test_early_exit_refuses_a_regression_task():
    from netshrink.dynamic import train_early_exit

    net = _lm_exit_net()
    with pytest.raises(ConfigError) as ei:
        train_early_exit(net, [], task="regression")
    assert ei.value.field == "task"
