"""Structured channel pruning: masked/pruned twins on every zoo model, the criteria, the entry point,
configs, and packing a physically pruned model."""

from __future__ import annotations

import copy

import pytest
import torch
from _structured_helpers import n_params, randomize_bn, twins
from torch import nn
from torch.utils.data import TensorDataset

from netshrink._registry import config_type
from netshrink.errors import ConfigError, ModelError
from netshrink.models import build_model, list_models
from netshrink.pack.nsk import load, pack
from netshrink.prune import prune_
from netshrink.prune.structured import (
    ChannelConfig,
    DependencyGraph,
    bn_scores,
    l1_scores,
    plan_removal,
    structured_prune_,
    taylor_scores,
)

INPUTS = {"mlp": (64,), "resnet50": (3, 32, 32)}
LM = ("llama_lm", "llama_tiny")  # token LMs with a KV cache in forward: torch.fx cannot trace them
SMALL = [n for n in list_models() if n != "resnet50" and n not in LM]


@pytest.mark.parametrize("name", SMALL)
def test_every_zoo_model_masked_and_pruned_twins_agree(name):
    torch.manual_seed(0)
    model = randomize_bn(build_model(name))
    x = torch.randn(4, *INPUTS.get(name, (1, 28, 28)))
    graph, _, pruned, removed, diff = twins(model, x, ratio=0.5)
    assert removed and graph.groups
    assert diff <= 1e-5
    assert n_params(pruned) < 0.6 * n_params(model)
    assert all(not isinstance(m, nn.Module) or "parametrizations" not in dict(m.named_children()) for m in pruned.modules())


@pytest.mark.parametrize("name", [n for n in LM if n in list_models()])
def test_untraceable_zoo_language_models_are_one_clear_error(name):
    model = build_model(name)
    with pytest.raises(ModelError, match="torch.fx cannot trace"):
        structured_prune_(model, 0.5, data=[(torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long))])


def test_resnet50_sized_graph_scales_and_twins_agree():
    torch.manual_seed(0)
    model = randomize_bn(build_model("resnet50"))
    assert 25_000_000 < n_params(model) < 26_000_000
    graph, _, pruned, _, diff = twins(model, torch.randn(1, 3, 32, 32), ratio=0.5)
    # stem + 16 blocks x 2 inner convs + 4 residual stages = 37 groups; the fc output is pinned
    assert len(graph.groups) == 37 and diff <= 1e-5
    assert pruned.fc.in_features == 1024 and pruned.fc.out_features == 1000


def conv_bn_net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(1), nn.Linear(4, 2))


def test_l1_criterion_removes_the_smallest_filters():
    model = conv_bn_net().eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([3.0, -0.5, 2.0, 0.1]).view(4, 1, 1, 1))
    structured_prune_(model, 0.5, "l1", input_shape=[1, 1, 1])
    assert model[0].weight.flatten().tolist() == [3.0, 2.0]
    assert model[1].num_features == 2 and model[4].in_features == 2


def test_bn_scale_criterion_uses_gamma_not_the_filter():
    model = conv_bn_net().eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([3.0, 2.0, 1.0, 0.5]).view(4, 1, 1, 1))
        model[1].weight.copy_(torch.tensor([0.1, -5.0, 0.2, 3.0]))
    graph = DependencyGraph.build(model, (torch.zeros(1, 1, 1, 1),))
    scores = bn_scores(model, graph)
    assert sorted(scores.values()) == pytest.approx([0.1, 0.2, 3.0, 5.0])
    prune_(model, ChannelConfig(ratio=0.5, criterion="bn_scale", input_shape=[1, 1, 1]))
    assert model[0].weight.flatten().tolist() == [2.0, 0.5]


def test_bn_scale_without_batchnorm_falls_back_to_l1():
    model = build_model("mlp", hidden=[4]).eval()
    graph = DependencyGraph.build(model, (torch.zeros(1, 64),))
    bn, l1 = bn_scores(model, graph), l1_scores(model, graph)
    classes = graph.groups[0].classes
    assert len(classes) == 4 and [bn[c] for c in classes] == [l1[c] for c in classes]


def test_taylor_criterion_matches_a_hand_computed_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    graph = DependencyGraph.build(model, (x[:1],))
    scores = taylor_scores(model, graph, [(x, y)])
    loss = nn.functional.cross_entropy(model(x), y)
    gw, gb = torch.autograd.grad(loss, [model[0].weight, model[0].bias])
    expect = ((gw * model[0].weight).sum(1) + gb * model[0].bias) ** 2
    by_pos = [scores[graph.find(a)] for a in graph.layers["0"].out_atoms]
    assert by_pos == pytest.approx(expect.tolist(), rel=1e-5, abs=1e-12)


def test_taylor_prune_through_the_entry_point_on_data():
    torch.manual_seed(0)
    model = build_model("resnet_small", widths=[8, 8, 16])
    data = TensorDataset(torch.randn(32, 1, 12, 12), torch.randint(0, 10, (32,)))
    result = prune_(model, ChannelConfig(ratio=0.5, criterion="taylor", batches=2, batch_size=16), data=data)
    assert result.removed == 4 + 8 and result.channels["fc"] == (10, 10) if "fc" in result.channels else True
    assert model.fc.in_features == 8 and model(torch.randn(2, 1, 12, 12)).shape == (2, 10)


def test_zero_mode_keeps_shapes_and_matches_remove_mode():
    torch.manual_seed(0)
    a = randomize_bn(build_model("vgg_small")).eval()
    b = copy.deepcopy(a)
    x = torch.randn(2, 1, 28, 28)
    prune_(a, ChannelConfig(ratio=0.25, mode="zero", input_shape=[1, 28, 28]))
    prune_(b, ChannelConfig(ratio=0.25, input_shape=[1, 28, 28]))
    assert n_params(a) == n_params(build_model("vgg_small")) > n_params(b)
    assert (a(x) - b(x)).abs().max() <= 1e-5


def test_layer_selection_and_per_layer_ratio():
    model = build_model("lenet5").eval()
    res = prune_(model, ChannelConfig(ratio=0.5, layers=["conv2", "fc1"], layer_ratio={"fc1": 0.9}, input_shape=[1, 28, 28]))
    assert model.conv1.out_channels == 20 and model.conv2.out_channels == 25 and model.fc1.out_features == 50
    assert res.channels == {"conv2": (50, 25), "fc1": (500, 50)} and res.sparsity["fc1"] == pytest.approx(0.9)


def test_pruned_zoo_model_packs_and_loads(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(build_model("mobilenet_small")).eval()
    prune_(model, ChannelConfig(ratio=0.5, input_shape=[1, 28, 28]))
    pack(model, tmp_path / "m.nsk")
    loaded = load(tmp_path / "m.nsk").eval()
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(model(x), loaded(x))
    assert loaded.block1.pw.conv.in_channels == 8 and type(loaded.block1.pw.conv) is nn.Conv2d


def test_registered_for_recipes_and_validated():
    assert config_type("channel") is ChannelConfig
    assert ChannelConfig.from_dict({"ratio": 0.3, "criterion": "bn_scale"}).criterion == "bn_scale"
    for bad in ({"ratio": 1.0}, {"ratio": -0.1}, {"layer_ratio": {"fc1": 1.5}}, {"criterion": "l2"}, {"input_shape": [0, 28]},
                {"batches": 0}):
        with pytest.raises(ConfigError):
            ChannelConfig.from_dict(bad)
    with pytest.raises(ConfigError, match="layers.nope"):
        ChannelConfig(layers=["nope"]).check_model(build_model("lenet5"))


def test_needs_an_example_and_data_for_taylor():
    with pytest.raises(ConfigError, match="input_shape"):
        prune_(build_model("lenet5"), ChannelConfig(ratio=0.5))
    with pytest.raises(ConfigError, match="data"):
        prune_(build_model("lenet5"), ChannelConfig(ratio=0.5, criterion="taylor", input_shape=[1, 28, 28]))


def test_plan_keeps_at_least_one_channel_per_group():
    model = build_model("mlp", hidden=[3]).eval()
    graph = DependencyGraph.build(model, (torch.zeros(1, 64),))
    removed = plan_removal(graph, l1_scores(model, graph), ChannelConfig(ratio=0.99))
    assert len(removed) == 2
