import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from netshrink.errors import ConfigError, ModelError
from netshrink.prune import MagnitudeConfig, ObdConfig, ObsConfig, apply_mask, get_mask, hessian_diagonal, obs_prune, prune_
from netshrink.prune.hessian import fisher_diagonal, hessian_diagonal_exact, hessian_diagonal_hutchinson


def _spd(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    return a @ a.T / n + torch.eye(n, dtype=torch.float64)


def _tiny_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def _xy(n=32, d=5, classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def test_exact_diagonal_equals_the_analytic_one_on_a_quadratic():
    a = _spd(6)
    b = torch.randn(6, dtype=torch.float64)
    w = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(4, dtype=torch.float64, requires_grad=True)
    loss = 0.5 * w.reshape(-1) @ a @ w.reshape(-1) + b @ w.reshape(-1) + 3.0 * v.pow(2).sum()
    hw, hv = hessian_diagonal_exact(loss, [w, v], chunk=4)  # chunk < numel: several batched passes
    torch.testing.assert_close(hw.reshape(-1), a.diagonal())
    torch.testing.assert_close(hv, torch.full((4,), 6.0, dtype=torch.float64))
    lw, lv = hessian_diagonal_exact(loss, [w, v], batched=False)  # one backward pass per weight
    assert torch.equal(lw, hw) and torch.equal(lv, hv)


def test_exact_diagonal_of_a_linear_layer_is_the_mean_squared_input():
    # loss = mean_n ½‖W x_n − y_n‖²  =>  ∂²/∂W_rk² = mean_n x_nk²  for every row r
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(6, 3))
    x, y = torch.randn(40, 6), torch.randn(40, 3)
    expected = x.pow(2).mean(0).expand(3, 6)
    h = hessian_diagonal(layer, {"0": layer[0]}, [(x, y)], mode="exact", loss="mse")["0"]
    torch.testing.assert_close(h, expected, rtol=1e-5, atol=1e-6)
    # sampled targets: an unbiased estimate of the same Gauss–Newton diagonal (each sample drawn 300 times)
    xr, yr = x.repeat(300, 1), y.repeat(300, 1)
    h = hessian_diagonal(layer, {"0": layer[0]}, [(xr, yr)], mode="gauss_newton", loss="mse", seed=5)["0"]
    torch.testing.assert_close(h, expected, rtol=0.3, atol=0.0)


def test_hutchinson_approaches_the_exact_diagonal_and_is_seeded():
    net = _tiny_net()
    x, y = _xy()
    params = [net[0].weight, net[2].weight]
    exact = hessian_diagonal_exact(nn.functional.cross_entropy(net(x), y), params)
    est = hessian_diagonal_hutchinson(nn.functional.cross_entropy(net(x), y), params, 4000, torch.Generator().manual_seed(3))
    for e, h in zip(exact, est):
        assert float((h - e).norm() / e.norm()) < 0.15
    again = hessian_diagonal_hutchinson(nn.functional.cross_entropy(net(x), y), params, 4000, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(est, again))


def test_fisher_is_non_negative_and_equals_per_sample_gradients_squared():
    net = _tiny_net()
    x, y = _xy(n=10)
    params = {"0.weight": net[0].weight, "2.weight": net[2].weight}
    fisher = fisher_diagonal(net, params, x, y)
    manual = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(10):
        gs = torch.autograd.grad(nn.functional.cross_entropy(net(x[i : i + 1]), y[i : i + 1]), list(params.values()))
        for n, g in zip(params, gs):
            manual[n] += g.pow(2)
    for n in params:
        assert torch.all(fisher[n] >= 0)
        torch.testing.assert_close(fisher[n], manual[n], rtol=1e-4, atol=1e-7)
    gn = fisher_diagonal(net, params, x, y, sampled=True, generator=torch.Generator().manual_seed(0))
    assert all(torch.all(g >= 0) for g in gn.values())


def _data(n=96, d=5, seed=1):
    x, y = _xy(n=n, d=d, seed=seed)
    return TensorDataset(x, y)


@pytest.mark.parametrize("mode", ["exact", "fisher", "gauss_newton", "hutchinson"])
def test_obd_keeps_the_weights_of_highest_saliency(mode):
    net = _tiny_net()
    data = _data()
    batches = list(DataLoader(data, batch_size=32))[:2]
    h = hessian_diagonal(net, {"0": net[0], "2": net[2]}, batches, mode=mode, probes=16, seed=0)
    sal0 = 0.5 * h["0"] * net[0].weight.detach().pow(2)
    res = prune_(net, ObdConfig(sparsity=0.5, hessian=mode, batches=2, batch_size=32, probes=16), data=DataLoader(data, batch_size=32))
    assert res.sparsity == {"0": 0.5, "2": pytest.approx(0.5)}
    kept = get_mask(net[0])
    assert sal0[kept].min() >= sal0[~kept].max()


def test_obd_masked_entries_stay_pruned_and_count():
    net = _tiny_net()
    first = torch.ones(4, 5, dtype=torch.bool)
    first[0] = False  # 5 of 20 already pruned
    apply_mask(net[0], first)
    prune_(net, ObdConfig(sparsity=0.5, layers=["0"], batches=1), data=_data())
    mask = get_mask(net[0])
    assert not mask[0].any() and int(mask.sum()) == 10


def _correlated_inputs(n=512, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ (torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d))


def _recon_error(layer, x, ref):
    with torch.no_grad():
        return float((layer(x) - ref).pow(2).sum(1).mean())


def test_obs_reconstructs_a_linear_layer_better_than_magnitude_and_obd():
    x = _correlated_inputs()
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(24, 12))
    with torch.no_grad():
        ref = base(x)
    data = TensorDataset(x, ref)  # targets = the dense layer's outputs: OBD's loss is the reconstruction error
    errors = {}
    for name, cfg in {
        "obs": ObsConfig(sparsity=0.6, batches=4, batch_size=128, damping=1e-6),
        "obs_block": ObsConfig(sparsity=0.6, batches=4, batch_size=128, damping=1e-6, block_size=4),
        "obd": ObdConfig(sparsity=0.6, batches=4, batch_size=128, hessian="exact", loss="mse"),
        "magnitude": MagnitudeConfig(sparsity=0.6),
    }.items():
        net = nn.Sequential(nn.Linear(24, 12))
        net.load_state_dict(base.state_dict())
        res = prune_(net, cfg, data=data)
        assert res.sparsity["0"] == pytest.approx(0.6, abs=1 / 288)
        errors[name] = _recon_error(net, x, ref)
    assert errors["obs"] < 0.5 * errors["magnitude"]
    assert errors["obs"] < 0.5 * errors["obd"]
    assert errors["obs_block"] < 0.5 * errors["obd"]


def test_obs_one_removal_is_hassibi_and_storks_update_and_losses_are_exact():
    h = _spd(6, seed=2)
    w = torch.randn(1, 6, dtype=torch.float64)
    res = obs_prune(w, h, [1])
    hinv = torch.linalg.inv(h)
    sal = w[0].pow(2) / (2 * hinv.diagonal())
    q = int(torch.argmin(sal))
    expected = w[0] - (w[0, q] / hinv[q, q]) * hinv[:, q]
    torch.testing.assert_close(res.weight[0], expected)
    assert res.weight[0, q] == 0 and not res.keep[0, q] and int(res.keep.sum()) == 5
    assert float(res.loss[0]) == pytest.approx(float(sal[q]))
    # several greedy steps: the summed losses equal ½ δwᵀ H δw of the total change (the error is quadratic)
    res = obs_prune(w, h, [4], block_size=1)
    dw = (res.weight - w)[0]
    assert float(res.loss[0]) == pytest.approx(float(0.5 * dw @ h @ dw), rel=1e-9)


def test_obs_keeps_pruned_entries_and_protected_columns():
    h = _spd(5, seed=4)
    w = torch.randn(2, 5, dtype=torch.float64)
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[0, 1] = False
    protected = torch.tensor([False, False, False, False, True])
    res = obs_prune(w, h, [2, 3], keep=keep, protected=protected)
    assert res.weight[0, 1] == 0 and not res.keep[0, 1]
    assert res.keep[:, 4].all()
    assert res.keep.sum(1).tolist() == [2, 2]


def test_obs_on_a_conv_layer_beats_magnitude():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    x = torch.randn(16, 3, 6, 6)
    x = x + 0.8 * x.roll(1, dims=1)  # correlated channels
    with torch.no_grad():
        ref = base(x)
    errs = {}
    for name, cfg in {"obs": ObsConfig(sparsity=0.5, batches=1, batch_size=16), "mag": MagnitudeConfig(sparsity=0.5)}.items():
        net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
        net.load_state_dict(base.state_dict())
        prune_(net, cfg, data=TensorDataset(x, torch.zeros(16)))
        assert (net[0].weight == 0).float().mean() == pytest.approx(0.5, abs=1 / 108)
        with torch.no_grad():
            errs[name] = float((net(x) - ref).pow(2).mean())
    assert errs["obs"] < errs["mag"]


def test_obs_rejects_grouped_convolutions():
    net = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ModelError, match="obs"):
        prune_(net, ObsConfig(sparsity=0.5), data=TensorDataset(torch.randn(4, 4, 5, 5), torch.zeros(4)))


@pytest.mark.parametrize(
    "cls, args, field",
    [
        (ObdConfig, {"sparsity": 1.0}, "sparsity"),
        (ObdConfig, {"sparsity": -0.1}, "sparsity"),
        (ObdConfig, {}, "sparsity"),
        (ObdConfig, {"sparsity": 0.5, "hessian": "bogus"}, "hessian"),
        (ObdConfig, {"sparsity": 0.5, "probes": 0}, "probes"),
        (ObdConfig, {"sparsity": 0.5, "batches": 0}, "batches"),
        (ObdConfig, {"sparsity": 0.5, "loss": "hinge"}, "loss"),
        (ObsConfig, {"sparsity": 1.5}, "sparsity"),
        (ObsConfig, {"sparsity": 0.5, "damping": 0.0}, "damping"),
        (ObsConfig, {"sparsity": 0.5, "block_size": 0}, "block_size"),
        (ObsConfig, {"sparsity": 0.5, "scope": "global", "layer_sparsity": {"0": 0.2}}, "scope"),
    ],
)
def test_bad_configs_name_the_field(cls, args, field):
    with pytest.raises(ConfigError) as ei:
        cls.from_dict(args)
    assert ei.value.field == field


@pytest.mark.parametrize("cfg", [ObdConfig(sparsity=0.5), ObsConfig(sparsity=0.5)])
def test_data_driven_criteria_need_data(cfg):
    with pytest.raises(ConfigError) as ei:
        prune_(_tiny_net(), cfg)
    assert ei.value.field == "data"
