"""SSL group lasso, network slimming's L1 on BN scales, global / threshold selection, and the
least-squares reconstruction of He et al. 2017."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from netshrink.errors import ConfigError
from netshrink.models import build_model
from netshrink.prune import prune_
from netshrink.prune.structured import (
    ChannelConfig,
    DependencyGraph,
    bn_scores,
    group_lasso,
    group_norms,
    plan_removal,
    slimming_regularizer,
    ssl_regularizer,
)


def test_group_norms_of_each_kind():
    w = torch.ones(2, 3, 2, 2)
    assert group_norms(w, "filter").tolist() == pytest.approx([math.sqrt(12)] * 2)
    assert group_norms(w, "channel").tolist() == pytest.approx([math.sqrt(8)] * 3)
    assert group_norms(w, "shape").shape == (3, 2, 2) and float(group_norms(w, "shape")[0, 0, 0]) == pytest.approx(math.sqrt(2))
    assert float(group_lasso(w, "filter")) == pytest.approx(2 * math.sqrt(12))
    with pytest.raises(ConfigError, match="kinds"):
        group_norms(w, "row")


def test_group_lasso_gradient_is_the_unit_direction_of_each_group():
    w = torch.tensor([[3.0, 4.0], [0.0, 0.0]], requires_grad=True)  # second filter all zero: finite gradient
    (g,) = torch.autograd.grad(group_lasso(w, "filter"), [w])
    assert g[0].tolist() == pytest.approx([0.6, 0.8]) and torch.isfinite(g).all() and g[1].abs().max() < 1e-5


def test_ssl_regularizer_sums_the_kinds_over_layers_and_zeroes_groups_when_trained():
    torch.manual_seed(0)
    model = build_model("mlp", hidden=[8])
    reg = ssl_regularizer(0.5, kinds=["filter", "channel"])
    expect = 0.5 * sum(group_lasso(m.weight, k) for m in (model.fc1, model.fc2) for k in ("filter", "channel"))
    x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
    assert float(reg(model, x, y, model(x)).detach()) == pytest.approx(float(expect.detach()), rel=1e-6)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(60):  # the penalty alone: groups collapse to (near) zero
        opt.zero_grad()
        reg(model, x, y, model(x)).backward()
        opt.step()
    assert group_norms(model.fc1.weight, "filter").max() < 0.05
    for bad in ({"strength": -1.0}, {"strength": 1.0, "kinds": ["depth"]}, {"strength": 1.0, "kinds": []}):
        with pytest.raises(ConfigError):
            ssl_regularizer(**bad)


def test_slimming_regularizer_is_l1_of_bn_scales():
    model = build_model("resnet_small")
    gammas = sum(float(m.weight.detach().abs().sum()) for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    x = torch.zeros(1, 1, 8, 8)
    assert float(slimming_regularizer(1e-3)(model, x, None, torch.zeros(1)).detach()) == pytest.approx(1e-3 * gammas, rel=1e-6)


def test_global_scope_and_threshold_selection():
    model = build_model("resnet_small").eval()
    with torch.no_grad():
        for i, m in enumerate(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            m.weight.copy_(torch.linspace(0.01, 1.0, m.num_features) * (i + 1))
    graph = DependencyGraph.build(model, (torch.zeros(1, 1, 8, 8),))
    scores = bn_scores(model, graph)
    total = sum(g.size for g in graph.groups)
    glob = plan_removal(graph, scores, ChannelConfig(ratio=0.3, scope="global"))
    low = sorted(scores[c] for g in graph.groups for c in g.classes)[: len(glob)]
    assert len(glob) == int(0.3 * total) and max(scores[c] for c in glob) <= max(low)
    thr = plan_removal(graph, scores, ChannelConfig(threshold=0.5))
    assert thr and all(scores[c] < 0.5 for c in thr)
    assert all(any(c not in thr for c in g.classes) for g in graph.groups)  # every group keeps a channel
    with pytest.raises(ConfigError, match="scope"):
        ChannelConfig(scope="global", layer_ratio={"fc": 0.5})
    with pytest.raises(ConfigError, match="threshold"):
        ChannelConfig(threshold=-1.0)


class DupConv(nn.Module):
    """Filters 2 and 3 of conv1 are half of filters 0 and 1: after removing them, conv2 refit by least
    squares reproduces the dense output exactly (relu(z / 2) = relu(z) / 2)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 3, 3, padding=1)
        with torch.no_grad():
            self.conv1.weight[2:] = 0.5 * self.conv1.weight[:2]
            self.conv1.bias[2:] = 0.5 * self.conv1.bias[:2]

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x))).flatten(1)


def test_least_squares_reconstruction_recovers_an_exact_refit():
    torch.manual_seed(0)
    dense = DupConv().eval()
    data = TensorDataset(torch.randn(64, 1, 6, 6), torch.zeros(64, dtype=torch.long))
    x = data.tensors[0][:8]
    plain, refit = copy.deepcopy(dense), copy.deepcopy(dense)
    prune_(plain, ChannelConfig(ratio=0.5), data=data)
    prune_(refit, ChannelConfig(ratio=0.5, reconstruct=True, ridge=0.0, batches=2, batch_size=32), data=data)
    assert refit.conv1.out_channels == 2 and refit.conv2.in_channels == 2
    with torch.no_grad():
        assert (refit(x) - dense(x)).abs().max() < 1e-4 < (plain(x) - dense(x)).abs().max()


def test_reconstruction_lowers_the_output_error_of_a_pruned_cnn():
    torch.manual_seed(0)
    dense = build_model("vgg_small", widths=[8, 16], hidden=32, input_size=12).eval()
    data = TensorDataset(torch.randn(128, 1, 12, 12), torch.zeros(128, dtype=torch.long))
    x = torch.randn(32, 1, 12, 12)
    plain, refit = copy.deepcopy(dense), copy.deepcopy(dense)
    prune_(plain, ChannelConfig(ratio=0.5), data=data)
    prune_(refit, ChannelConfig(ratio=0.5, reconstruct=True, batches=2, batch_size=64), data=data)
    with torch.no_grad():
        e_plain, e_refit = (plain(x) - dense(x)).pow(2).mean(), (refit(x) - dense(x)).pow(2).mean()
    assert e_refit < 0.5 * e_plain
    with pytest.raises(ConfigError, match="data"):
        prune_(copy.deepcopy(dense), ChannelConfig(ratio=0.5, reconstruct=True, input_shape=[1, 12, 12]))
