import copy

import pytest
import torch
from torch import nn

import netshrink as ns
from netshrink.data import digits
from netshrink.errors import ConfigError, ModelError
from netshrink.quantize import QATConfig, quantize_
from netshrink.quantize.fake import ActFakeQuant, input_quant_of


@pytest.fixture(scope="module")
def warm():
    """A float MLP after two epochs on digits, and the splits."""
    torch.set_num_threads(1)
    splits = digits()
    torch.manual_seed(0)
    model = ns.build_model("mlp", in_features=64, hidden=[48, 24])
    ns.Trainer(model, ns.TrainConfig(epochs=2, lr=0.05, batch_size=32, progress=False)).fit(splits.train)
    return model, splits


def test_qat_at_4_bits_trains_and_keeps_16_levels_per_channel(warm):
    model, splits = warm
    q = copy.deepcopy(model)
    quantize_(q, QATConfig(bits=4, act_bits=8), data=splits)
    before = {n: p.detach().clone() for n, p in q.named_parameters()}
    result = ns.Trainer(q, ns.TrainConfig(epochs=4, lr=0.02, batch_size=32, progress=False)).fit(splits.train, splits.val)
    losses = [h.train_loss for h in result.history]
    assert losses[-1] < losses[0]
    assert result.final_val_error < 0.12
    # the float weights behind the quantizer learned (the STE carries the gradient)
    orig = "fc1.parametrizations.weight.original"
    assert not torch.equal(before[orig], dict(q.named_parameters())[orig])
    q.eval()
    for layer in (q.fc1, q.fc2, q.fc3):
        w = layer.weight.detach()
        assert max(torch.unique(row).numel() for row in w) <= 16
        scale = layer.parametrizations.weight[0].scale
        codes = w / scale[:, None]
        assert torch.allclose(codes, codes.round(), atol=1e-4)
    # in QAT the range follows the trained weight: the stored scale is the min-max scale of the current weight
    orig_w = q.fc2.parametrizations.weight.original.detach()
    q.train()
    _ = q.fc2.weight
    assert torch.allclose(q.fc2.parametrizations.weight[0].scale, orig_w.abs().amax(1) / 7)


def test_qat_without_data_starts_activation_ranges_from_training(warm):
    model, splits = warm
    q = copy.deepcopy(model)
    res = quantize_(q, QATConfig(bits=6, act_ema=0.1))
    assert res.inputs == {}
    aq = input_quant_of(q.fc2)
    assert isinstance(aq, ActFakeQuant) and not bool(aq.calibrated)
    q.eval()
    with pytest.raises(ModelError, match="not calibrated"):
        q(splits.val.tensors[0][:4])
    ns.Trainer(q, ns.TrainConfig(epochs=1, lr=0.01, batch_size=32, progress=False)).fit(splits.train)
    assert bool(aq.calibrated) and float(aq.hi) > 0 and float(aq.lo) == 0.0  # after a ReLU
    assert ns.error_rate(q, splits.val) < 0.2


def test_activation_ema_moves_the_range():
    aq = ActFakeQuant(8, ema=0.5)
    aq.train()
    aq(torch.tensor([0.0, 1.0]))
    assert float(aq.hi) == 1.0  # the first batch sets the range
    aq(torch.tensor([0.0, 3.0]))
    assert float(aq.hi) == pytest.approx(2.0)
    aq.eval()
    aq(torch.tensor([0.0, 100.0]))
    assert float(aq.hi) == pytest.approx(2.0)  # eval never moves it


def test_qat_gradient_is_straight_through_on_the_weight():
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    quantize_(lin, QATConfig(bits=4, activations=False))
    x = torch.randn(7, 5)
    lin(x).sum().backward()
    # inside the min-max range every weight gets the gradient of the effective weight: sum_n x_n
    expected = x.sum(0).expand(3, 5)
    assert torch.allclose(lin.parametrizations.weight.original.grad, expected, atol=1e-5)


def test_qat_config_checks():
    with pytest.raises(ConfigError) as ei:
        QATConfig(bias_correction=True)
    assert ei.value.field == "bias_correction"
    with pytest.raises(ConfigError) as ei:
        QATConfig.from_dict({"act_ema": 2.0})
    assert ei.value.field == "act_ema"
    with pytest.raises(ConfigError) as ei:
        QATConfig.from_dict({"bits": 9})
    assert ei.value.field == "bits"
    assert QATConfig().method == "qat" and QATConfig().bits == 4


def test_qat_folds_batchnorm_first_and_exports_to_int8(tmp_path):
    from netshrink.export import export_onnx, ort_predict, ort_session

    torch.manual_seed(0)
    splits = digits()
    net = nn.Sequential(nn.Conv2d(1, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    ns.Trainer(net, ns.TrainConfig(epochs=1, lr=0.05, batch_size=32, progress=False)).fit(splits.train)
    res = quantize_(net, QATConfig(bits=8), data=splits)
    assert res.bn_folded == {"1": "0"} and not isinstance(net[1], nn.BatchNorm2d)
    ns.Trainer(net, ns.TrainConfig(epochs=1, lr=0.01, batch_size=32, progress=False)).fit(splits.train)
    net.eval()
    exp = export_onnx(net, tmp_path / "qat.onnx", (1, 8, 8), int8=True)
    assert set(exp.quantized) == {"0", "4"}
    x = splits.test.tensors[0][:64]
    sim = net(x).detach().numpy()
    assert abs(ort_predict(ort_session(exp.path), x) - sim).max() <= 0.05 * abs(sim).max()
