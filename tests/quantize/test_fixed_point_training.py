"""Fixed-point training of Gupta et al. 2015 beyond the weights: layer outputs and gradients in ⟨IL, FL⟩."""

import copy

import pytest
import torch
from torch import nn

import netshrink as ns
from netshrink.data import digits
from netshrink.errors import ConfigError, ModelError
from netshrink.quantize import FixedPointConfig, quantize_
from netshrink.quantize.fixed_point import FixedPointAct, FixedPointFormat, FixedPointWeights, attach_fixed_point_act, remove_fixed_point_act


def _on_grid(x, fl):
    v = x * 2.0**fl
    return bool(torch.all(v == v.round()))


def _act(il, fl, rounding, grad=None):
    return FixedPointAct(FixedPointFormat(il, fl), grad, rounding).train()


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_outputs_lie_on_the_grid_and_saturate(rounding):
    torch.manual_seed(0)
    q = _act(2, 4, rounding)
    y = torch.randn(4000) * 3
    out = q(y.requires_grad_())
    fmt = FixedPointFormat(2, 4)
    assert _on_grid(out.detach(), 4)
    out = out.detach()
    assert float(out.min()) == fmt.lo and float(out.max()) == fmt.hi  # |y| up to ~10 saturates at both ends
    inside = (y.detach() >= fmt.lo) & (y.detach() <= fmt.hi)
    tol = fmt.eps / 2 if rounding == "nearest" else fmt.eps
    assert torch.all((out.detach() - y.detach())[inside].abs() <= tol + 1e-7)


def test_nearest_is_deterministic_and_stochastic_is_unbiased_in_the_forward_pass():
    x = torch.full((50000,), 0.3)
    near = _act(2, 2, "nearest")
    assert torch.equal(near(x), near(x)) and set(near(x).unique().tolist()) == {0.25}
    torch.manual_seed(1)
    s = _act(2, 2, "stochastic")(x)
    assert set(s.unique().tolist()) == {0.25, 0.5}
    assert abs(float(s.mean()) - 0.3) < 0.003  # E[Round(x)] = x; std of the mean ~0.0005


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_the_error_at_a_layer_output_is_rounded_to_the_gradient_format(rounding):
    grad = FixedPointFormat(1, 10)  # eps 2^-10, range [-1, 1 - 2^-10]
    q = FixedPointAct(None, grad, rounding).train()
    x = torch.zeros(20000, requires_grad=True)
    g = torch.cat([torch.full((10000,), 3e-4), torch.tensor([5.0, -5.0]), torch.full((9998,), -1e-3)])
    torch.manual_seed(2)
    q(x).backward(g)
    dx = x.grad
    assert _on_grid(dx, 10)
    assert float(dx[10000]) == grad.hi and float(dx[10001]) == grad.lo  # saturates
    if rounding == "nearest":  # 3e-4 < eps/2 = 4.9e-4: lost, deterministically
        assert float(dx[:10000].abs().max()) == 0.0
        x2 = torch.zeros(20000, requires_grad=True)
        q(x2).backward(g)
        assert torch.equal(dx, x2.grad)
    else:  # kept in expectation
        assert abs(float(dx[:10000].mean()) - 3e-4) < 3e-5
        assert abs(float(dx[10002:].mean()) + 1e-3) < 3e-5


def test_the_error_stops_where_the_output_saturated():
    q = _act(2, 4, "nearest")
    x = torch.tensor([-3.0, -1.0, 0.5, 1.95, 2.5], requires_grad=True)
    q(x).backward(torch.ones(5))
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]  # range [-2, 1.9375]: 1.95 and beyond saturate


def test_weight_gradients_are_rounded_and_outputs_are_quantized_in_a_model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    cfg = FixedPointConfig(il=3, fl=8, rounding="nearest", activations=True, act_il=4, act_fl=5, gradients=True, grad_il=2, grad_fl=9)
    res = quantize_(net, cfg)
    assert res.outputs == ["0", "2"] and res.act_format == FixedPointFormat(4, 5) and res.grad_format == FixedPointFormat(2, 9)
    net.train()
    out = net(torch.randn(32, 8))
    assert _on_grid(out.detach(), 5) and float(out.detach().abs().max()) <= 8.0
    nn.functional.cross_entropy(out, torch.randint(0, 3, (32,))).backward()
    for layer in (net[0], net[2]):
        for t in ("weight", "bias"):
            g = layer.parametrizations[t].original.grad
            assert g is not None and _on_grid(g, 9) and float(g.abs().max()) <= 2.0
            assert isinstance(layer.parametrizations[t][0], FixedPointWeights)
    # eval: nearest rounding, no randomness, still on the grid
    net.eval()
    x = torch.randn(16, 8)
    a, b = net(x), net(x)
    assert torch.equal(a, b) and _on_grid(a.detach(), 5)


def test_digits_trains_with_weights_outputs_and_gradients_in_16_bit_fixed_point():
    torch.manual_seed(0)
    splits = digits()
    model = ns.build_model("mlp", in_features=64, hidden=[48, 24])
    quantize_(model, FixedPointConfig(il=4, fl=12, rounding="stochastic", activations=True, gradients=True))
    hist = ns.Trainer(model, ns.TrainConfig(epochs=6, lr=0.05, batch_size=32, progress=False)).fit(splits.train).history
    assert hist[-1].train_loss < 0.2 * hist[0].train_loss
    assert ns.error_rate(model, splits.test) < 0.08  # float, trained the same way: 5.2%
    model.train()
    model(splits.train.tensors[0][:1])  # the last step was converted by the Trainer's FixedPointRounding
    assert _on_grid(model.fc1.parametrizations.weight.original.detach(), 12)
    # a deep copy keeps the output quantizers, each run by the copy's own hook
    twin = copy.deepcopy(model).eval()
    x = splits.test.tensors[0][:32]
    assert torch.equal(twin(x), model.eval()(x))
    assert isinstance(twin.fc1.output_quant, FixedPointAct) and twin.fc1.output_quant is not model.fc1.output_quant
    assert remove_fixed_point_act(twin) == 3
    assert "output_quant" not in twin.fc1._modules and not twin.fc1._forward_hooks


def test_a_layer_with_an_output_quantizer_is_refused_before_anything_changes():
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    attach_fixed_point_act(net[1], FixedPointAct(FixedPointFormat(2, 6), None))
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ModelError, match="output quantizer"):
        quantize_(net, FixedPointConfig(activations=True))
    assert not hasattr(net[0], "parametrizations") and "output_quant" not in net[0]._modules
    assert net.state_dict().keys() == before.keys()


@pytest.mark.parametrize(
    "args, field",
    [
        ({"act_il": 3}, "act_il"),
        ({"grad_fl": 3}, "grad_fl"),
        ({"activations": True, "act_il": 0}, "act_il"),
        ({"activations": True, "act_fl": -2}, "act_fl"),
        ({"gradients": True, "grad_il": 10, "grad_fl": 20}, "grad_fl"),
        ({"gradients": "yes"}, "gradients"),
    ],
)
def test_bad_activation_and_gradient_formats_name_the_field(args, field):
    with pytest.raises(ConfigError) as ei:
        FixedPointConfig.from_dict(args)
    assert ei.value.field == field


def test_unset_formats_default_to_the_weight_format():
    cfg = FixedPointConfig.from_dict({"il": 2, "fl": 14, "activations": True, "gradients": True, "grad_fl": 20})
    assert cfg.act_format == FixedPointFormat(2, 14) and cfg.grad_format == FixedPointFormat(2, 20)
    assert FixedPointConfig().act_format is None and FixedPointConfig().grad_format is None


def test_fixed_point_outputs_export_to_onnx_as_round_and_clip(tmp_path):
    from netshrink.export import export_onnx, ort_predict, ort_session

    torch.manual_seed(0)
    model = ns.build_model("mlp", in_features=64, hidden=[48, 24])
    quantize_(model, FixedPointConfig(il=4, fl=12, activations=True, gradients=True))
    model.eval()
    res = export_onnx(model, tmp_path / "fx.onnx", (1, 8, 8))
    assert res.ops.get("Round") == 3 and res.ops.get("Clip") == 3  # one output quantizer per layer
    x = torch.rand(16, 1, 8, 8)
    assert float(abs(torch.from_numpy(ort_predict(ort_session(tmp_path / "fx.onnx"), x)) - model(x).detach()).max()) == 0.0
