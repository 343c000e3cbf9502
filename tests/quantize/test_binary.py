import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import netshrink as ns
from netshrink.errors import ConfigError
from netshrink.quantize import (
    BinaryConfig,
    TernaryConfig,
    binarize,
    quantize_,
    ternarize,
)


def _w(shape=(6, 20), seed=0, scale=0.1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def test_xnor_binary_values_are_plus_minus_alpha_per_channel():
    w = _w() * torch.linspace(0.5, 3.0, 6)[:, None]
    b = binarize(w, scale=True, per_channel=True)
    alpha = w.abs().mean(1)
    assert torch.allclose(b.alpha, alpha)
    for c in range(6):
        assert set(b.values[c].unique().tolist()) <= {-float(alpha[c]), float(alpha[c])}
        assert torch.equal(torch.sign(b.values[c]), torch.where(w[c] >= 0, 1.0, -1.0))
    # alpha = mean|W| is the least-squares scale of sign(W): any other scale does worse
    err = lambda a: float(((w - a[:, None] * torch.sign(w)) ** 2).sum())
    assert err(alpha) < err(alpha * 1.1) and err(alpha) < err(alpha * 0.9)


def test_binaryconnect_without_scale_is_plus_minus_one_and_stochastic_is_unbiased():
    w = torch.tensor([-1.5, -0.6, 0.0, 0.2, 0.9])
    det = binarize(w, scale=False)
    assert det.values.tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0]
    reps = w.repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    st = binarize(reps, stochastic=True, scale=False, per_channel=False, generator=g).values
    assert set(st.unique().tolist()) == {-1.0, 1.0}
    # P(+1) = hard_sigmoid(w) = clip((w + 1) / 2, 0, 1)  =>  E[w_b] = clip(w, -1, 1)
    assert torch.allclose(st.mean(0), w.clamp(-1, 1), atol=0.02)
    again = binarize(reps, stochastic=True, scale=False, per_channel=False, generator=torch.Generator().manual_seed(0)).values
    assert torch.equal(st, again)


def test_ternary_values_threshold_and_scale():
    w = _w((4, 50), seed=1)
    t = ternarize(w)
    delta = 0.7 * w.abs().mean()
    keep = w.abs() > delta
    alpha = w.abs()[keep].mean()
    assert torch.allclose(t.delta, delta) and torch.allclose(t.alpha, alpha)
    vals = set(t.values.unique().tolist())
    assert vals == {-float(alpha), 0.0, float(alpha)}
    assert torch.equal(t.values == 0, ~keep)
    tc = ternarize(w, per_channel=True)
    for c in range(4):
        a = float(tc.alpha[c])
        assert set(tc.values[c].unique().tolist()) <= {-a, 0.0, a}


def test_binary_parametrization_trains_clips_and_passes_the_gradient():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight[0, 0] = 1.7  # outside [-1, 1]: clipped, and gets no gradient until then
    res = quantize_(lin, BinaryConfig())
    stored = lin.parametrizations.weight.original
    assert float(stored.detach().abs().max()) <= 1.0
    alpha = res.alpha[""]
    w = lin.weight.detach()
    for c in range(3):
        assert set(w[c].abs().unique().tolist()) == {float(alpha[c])}
    x = torch.randn(5, 4)
    lin(x).sum().backward()
    assert torch.allclose(stored.grad, x.sum(0).expand(3, 4))  # straight through, |w| <= 1 everywhere
    # an update that pushes a weight past 1 is clipped at the next training forward pass
    with torch.no_grad():
        stored[1, 1] = 3.0
    lin.train()
    lin(x)
    assert float(stored.detach()[1, 1]) == 1.0


def test_ste_gate_is_zero_outside_one():
    lin = nn.Linear(2, 1, bias=False)
    quantize_(lin, BinaryConfig(clip=False, scale=False))
    with torch.no_grad():
        lin.parametrizations.weight.original.copy_(torch.tensor([[2.0, 0.5]]))
    lin(torch.ones(1, 2)).sum().backward()
    assert lin.parametrizations.weight.original.grad.tolist() == [[0.0, 1.0]]
    assert lin.weight.detach().tolist() == [[1.0, 1.0]]


def test_stochastic_binary_is_deterministic_in_eval():
    lin = nn.Linear(30, 8)
    quantize_(lin, BinaryConfig(stochastic=True))
    lin.eval()
    assert torch.equal(lin.weight, lin.weight)
    lin.train()
    torch.manual_seed(0)
    a = lin.weight.detach().clone()
    b = lin.weight.detach().clone()
    assert not torch.equal(a, b)


@pytest.mark.parametrize("config", [BinaryConfig(layers=["2"]), TernaryConfig(layers=["2"])])
def test_low_bit_layers_train_with_the_trainer(config):
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = (x[:, :2].sum(1) > 0).long()
    net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
    res = quantize_(net, config)
    assert list(res.alpha) == ["2"]
    hist = ns.Trainer(net, ns.TrainConfig(epochs=5, lr=0.05, batch_size=32, progress=False)).fit(TensorDataset(x, y)).history
    assert hist[-1].train_loss < hist[0].train_loss
    net.eval()
    w = net[2].weight.detach()
    allowed = 2 if isinstance(config, BinaryConfig) else 3
    assert max(torch.unique(row).numel() for row in w) <= allowed
    if isinstance(config, TernaryConfig):
        assert 0.0 in w.unique().tolist() and res.zeros["2"] > 0.2


@pytest.mark.parametrize("cls, args, field", [(TernaryConfig, {"threshold": 0.0}, "threshold"), (BinaryConfig, {"stochastic": "yes"}, "stochastic")])
def test_bad_low_bit_config(cls, args, field):
    with pytest.raises(ConfigError) as ei:
        cls.from_dict(args)
    assert ei.value.field == field


def test_unsupported_named_layer_is_refused():
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    with pytest.raises(ConfigError) as ei:
        quantize_(net, TernaryConfig(layers=["1"]))
    assert ei.value.field == "layers[0]" and "BatchNorm1d" in str(ei.value)
