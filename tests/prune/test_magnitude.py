import pytest
import torch
from torch import nn

from netshrink.errors import ConfigError
from netshrink.prune import MagnitudeConfig, get_mask, make_permanent, prune_
from netshrink.prune._select import geometric_schedule, global_masks


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))


def test_layer_sparsity_keeps_the_largest_weights():
    net = _net()
    w0 = net[0].weight.detach().clone()
    res = prune_(net, MagnitudeConfig(sparsity=0.75))
    assert res.sparsity["0"] == pytest.approx(0.75, abs=1 / 600)
    kept = net[0].weight.detach() != 0
    assert w0[kept].abs().min() >= w0[~kept].abs().max()


def test_global_scope_uses_one_threshold():
    net = _net()
    ws = [net[0].weight.detach().abs().clone(), net[2].weight.detach().abs().clone()]
    prune_(net, MagnitudeConfig(sparsity=0.8, scope="global"))
    kept = [net[0].weight != 0, net[2].weight != 0]
    total = sum(k.numel() for k in kept)
    assert sum(int(k.sum()) for k in kept) == total - round(0.8 * total)
    smallest_kept = min(w[k].min() for w, k in zip(ws, kept))
    largest_cut = max(w[~k].max() for w, k in zip(ws, kept))
    assert smallest_kept >= largest_cut


def test_quality_threshold_is_quality_times_std():
    net = _net()
    w = net[0].weight.detach().clone()
    prune_(net, MagnitudeConfig(quality=1.0, layers=["0"]))
    thr = float(w.std())
    assert torch.equal(net[0].weight.detach() != 0, w.abs() >= thr)
    assert get_mask(net[2]) is None  # layer not chosen is untouched


def test_pruning_is_cumulative_and_masks_survive_training_steps():
    net = _net()
    prune_(net, MagnitudeConfig(sparsity=0.5))
    first = get_mask(net[0]).clone()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(8, 20)).pow(2).sum().backward()
        opt.step()
    assert torch.all(net[0].weight[~first] == 0)
    prune_(net, MagnitudeConfig(sparsity=0.9))
    second = get_mask(net[0])
    assert not torch.any(second & ~first)  # nothing pruned comes back
    assert (net[0].weight == 0).float().mean() == pytest.approx(0.9, abs=1 / 600)


def test_make_permanent_keeps_outputs():
    net = _net()
    prune_(net, MagnitudeConfig(sparsity=0.6))
    x = torch.randn(4, 20)
    y = net(x)
    make_permanent(net)
    assert not hasattr(net[0], "parametrizations")
    assert torch.equal(net(x), y)


def test_make_permanent_on_a_deep_copy_leaves_the_original_masked():
    import copy

    net = _net()
    prune_(net, MagnitudeConfig(sparsity=0.6))
    x = torch.randn(4, 20)
    y = net(x)
    twin = make_permanent(copy.deepcopy(net))
    assert not hasattr(twin[0], "parametrizations")
    assert get_mask(net[0]) is not None  # the original keeps its mask and its weight property
    assert torch.equal(net(x), y) and torch.equal(twin(x), y)


def test_iterative_steps_expand_into_growing_rounds():
    rounds = MagnitudeConfig(sparsity=0.96, steps=3).substages()
    sp = [r.sparsity for r in rounds]
    assert len(sp) == 3 and sp[-1] == pytest.approx(0.96) and sp[0] < sp[1] < sp[2]
    keeps = [1 - s for s in sp]
    assert keeps[1] / keeps[0] == pytest.approx(keeps[2] / keeps[1])
    assert geometric_schedule(0.5, 1) == [0.5]


def test_global_masks_split_back_per_layer():
    scores = {"a": torch.tensor([1.0, 5.0]), "b": torch.tensor([[3.0, 0.5]])}
    m = global_masks(scores, 0.5)
    assert m["a"].tolist() == [False, True] and m["b"].tolist() == [[True, False]]


@pytest.mark.parametrize(
    "args, field",
    [
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"sparsity": "high"}, "sparsity"),
        ({}, "sparsity"),
        ({"sparsity": 0.5, "quality": 1.0}, "quality"),
        ({"sparsity": 0.5, "steps": 0}, "steps"),
        ({"sparsity": 0.5, "bogus": 1}, "bogus"),
        ({"layer_sparsity": {"fc1": 1.5}}, "layer_sparsity.fc1"),
    ],
)
def test_bad_config_names_the_field(args, field):
    with pytest.raises(ConfigError) as ei:
        MagnitudeConfig.from_dict(args)
    assert ei.value.field == field


def test_unknown_layer_name_is_a_config_error():
    net = _net()
    with pytest.raises(ConfigError, match="no layer named 'fc9'"):
        prune_(net, MagnitudeConfig(sparsity=0.5, layers=["fc9"]))
    with pytest.raises(ConfigError) as ei:
        MagnitudeConfig(layer_sparsity={"fc9": 0.5}).check_model(net)
    assert ei.value.field == "layer_sparsity.fc9"
