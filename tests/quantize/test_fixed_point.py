import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import netshrink as ns
from netshrink.errors import ConfigError
from netshrink.quantize import FixedPointConfig, fixed_point_step_, quantize_, to_fixed
from netshrink.quantize.fixed_point import FixedPointFormat, FixedPointWeights


def _on_grid(x, fl):
    v = x * 2.0**fl
    return bool(torch.all(v == v.round()))


@pytest.mark.parametrize("il, fl", [(1, 7), (2, 6), (4, 12), (8, 0)])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_values_lie_on_the_grid_and_saturate(il, fl, rounding):
    x = torch.randn(5000, generator=torch.Generator().manual_seed(0)) * 2.0 ** (il - 1)
    y = to_fixed(x, il, fl, rounding, torch.Generator().manual_seed(1))
    fmt = FixedPointFormat(il, fl)
    assert _on_grid(y, fl)
    assert float(y.min()) >= fmt.lo and float(y.max()) <= fmt.hi
    inside = (x >= fmt.lo) & (x <= fmt.hi)
    tol = fmt.eps / 2 if rounding == "nearest" else fmt.eps
    assert torch.all((y - x)[inside].abs() <= tol + 1e-6)
    # saturation: out-of-range values go to the ends
    big = to_fixed(torch.tensor([1e6, -1e6]), il, fl, rounding)
    assert big.tolist() == [fmt.hi, fmt.lo]


def test_format_bounds():
    fmt = FixedPointFormat(2, 3)
    assert (fmt.word_length, fmt.eps, fmt.lo, fmt.hi) == (5, 0.125, -2.0, 1.875)
    assert to_fixed(torch.tensor([0.3, -0.3, 1.9, -2.5]), 2, 3).tolist() == [0.25, -0.25, 1.875, -2.0]


def test_stochastic_rounding_is_unbiased_and_seeded():
    x = torch.full((40000,), 0.3)
    a = to_fixed(x, 2, 2, "stochastic", torch.Generator().manual_seed(3))
    assert set(a.unique().tolist()) == {0.25, 0.5}
    assert abs(float(a.mean()) - 0.3) < 0.003
    assert torch.equal(a, to_fixed(x, 2, 2, "stochastic", torch.Generator().manual_seed(3)))


def test_small_updates_survive_only_with_stochastic_rounding():
    """Gupta et al. 2015: an update below eps/2 is lost to round-to-nearest, kept in expectation by stochastic rounding."""
    fl = 4
    eps = 2.0**-fl
    results = {}
    for rounding in ("nearest", "stochastic"):
        lin = nn.Linear(200, 1, bias=False)
        nn.init.zeros_(lin.weight)
        cfg = FixedPointConfig(il=2, fl=fl, rounding=rounding, bias=False)
        quantize_(lin, cfg)
        g = torch.Generator().manual_seed(0)
        for _ in range(40):
            with torch.no_grad():
                lin.parametrizations.weight.original.add_(0.1 * eps)  # an optimizer step of eps / 10
            fixed_point_step_(lin, cfg, g)
        w = lin.weight.detach()
        assert _on_grid(w, fl)
        results[rounding] = float(w.mean())
    assert results["nearest"] == 0.0
    assert abs(results["stochastic"] - 4 * eps) < 1.5 * eps  # 40 steps of eps/10


def test_trainer_keeps_stored_weights_in_fixed_point():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = (x[:, 0] > 0).long()
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    res = quantize_(net, FixedPointConfig(il=3, fl=8, rounding="stochastic"))
    assert set(res.saturated) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert all(c <= 2.0**-8 for c in res.max_abs_change.values())
    hist = ns.Trainer(net, ns.TrainConfig(epochs=4, lr=0.1, batch_size=32, progress=False)).fit(TensorDataset(x, y)).history
    assert hist[-1].train_loss < hist[0].train_loss
    net.train()
    net(x[:1])  # the Trainer's FixedPointRounding converted the last step; a forward pass writes nothing
    for layer in (net[0], net[2]):
        for t in ("weight", "bias"):
            stored = layer.parametrizations[t].original.detach()
            assert _on_grid(stored, 8) and float(stored.abs().max()) <= 4.0
            assert torch.equal(getattr(layer, t).detach(), stored)
            assert isinstance(layer.parametrizations[t][0], FixedPointWeights)


def test_eval_forward_rounds_without_touching_the_stored_weight():
    lin = nn.Linear(3, 2)
    quantize_(lin, FixedPointConfig(il=2, fl=3, rounding="nearest", bias=False))
    stored = lin.parametrizations.weight.original
    with torch.no_grad():
        stored.add_(0.01)
    lin.eval()
    w = lin.weight.detach()
    assert _on_grid(w, 3) and not _on_grid(stored.detach(), 3)


@pytest.mark.parametrize("args, field", [({"il": 0}, "il"), ({"fl": -1}, "fl"), ({"il": 10, "fl": 20}, "fl"), ({"rounding": "up"}, "rounding")])
def test_bad_format_names_the_field(args, field):
    with pytest.raises(ConfigError) as ei:
        FixedPointConfig.from_dict(args)
    assert ei.value.field == field


def _hand_loop_twin(net, loader, lr, epochs, seed):
    """What the Trainer does with plain SGD on a fixed-order loader, with the explicit conversion."""
    torch.manual_seed(seed)
    fixed_point_step_(net)  # FixedPointRounding.on_fit_start
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.0)
    net.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
            fixed_point_step_(net)


def test_the_trainer_adds_the_rounding_callback_and_matches_a_hand_loop_bit_for_bit():
    from torch.utils.data import DataLoader

    from netshrink.quantize.fixed_point import FixedPointRounding

    torch.manual_seed(0)
    x = torch.randn(96, 8)
    y = (x[:, 0] > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    quantize_(net, FixedPointConfig(il=3, fl=8, rounding="stochastic"))
    twin = copy.deepcopy(net)
    trainer = ns.Trainer(net, ns.TrainConfig(epochs=2, lr=0.1, momentum=0.0, progress=False, device="cpu", seed=3))
    assert sum(isinstance(cb, FixedPointRounding) for cb in trainer.callbacks) == 1
    trainer.fit(loader)
    _hand_loop_twin(twin, loader, 0.1, 2, 3)
    for (k, a), b in zip(net.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), k
    stored = net[0].parametrizations.weight.original.detach()
    assert _on_grid(stored, 8)  # converted after the last step, with no forward pass needed
    # the forward pass never writes the stored tensor: an off-grid value is read rounded, left as it is
    with torch.no_grad():
        stored_param = net[0].parametrizations.weight.original
        stored_param.add_(2.0**-10)
    net.train()
    net(x[:4])
    assert not _on_grid(stored_param.detach(), 8) and _on_grid(net[0].weight.detach(), 8)
