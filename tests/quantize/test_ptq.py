import copy
import logging

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import netshrink as ns
from netshrink._registry import config_type
from netshrink.data import digits
from netshrink.errors import ConfigError, DataError, ModelError
from netshrink.metrics import sqnr_db
from netshrink.prune import MagnitudeConfig, prune_
from netshrink.quantize import Int8Config, UniformConfig, quantize_
from netshrink.quantize.fake import ActFakeQuant, WeightFakeQuant, input_quant_of


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    splits = digits()
    torch.manual_seed(0)
    model = ns.build_model("mlp", in_features=64, hidden=[48, 24])
    ns.Trainer(model, ns.TrainConfig(epochs=6, lr=0.05, batch_size=32, progress=False)).fit(splits.train)
    return model, splits


@pytest.mark.parametrize("config", [Int8Config(), UniformConfig(bits=8, observer="mse", act_observer="percentile", per_channel=False)])
def test_ptq_at_8_bits_keeps_accuracy(trained, config):
    model, splits = trained
    base = ns.error_rate(model, splits.test)
    q = copy.deepcopy(model)
    res = quantize_(q, config, data=splits)
    err = ns.error_rate(q, splits.test)
    assert err <= base + 0.02
    assert set(res.bits) == {"fc1", "fc2", "fc3"} and all(b == 8 for b in res.bits.values())
    assert all(s > 30 for s in res.weight_sqnr_db.values())
    assert set(res.inputs) == {"fc1", "fc2", "fc3"}
    # inputs to fc2/fc3 follow a ReLU: the asymmetric quantizer puts zero at code 0
    assert int(res.inputs["fc2"].zero_point) == 0
    x = splits.test.tensors[0][:64]
    assert sqnr_db(model(x), q(x)) > 25


def test_quantized_weights_and_inputs_lie_on_the_grid(trained):
    model, splits = trained
    q = copy.deepcopy(model)
    quantize_(q, UniformConfig(bits=4, per_channel=True), data=splits.train)
    w = q.fc1.weight.detach()
    wq = q.fc1.parametrizations.weight[0]
    assert isinstance(wq, WeightFakeQuant)
    codes = w / wq.scale[:, None]
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.abs().max() <= 8
    for row in w:
        assert torch.unique(row).numel() <= 16
    # the input quantizer really runs in the forward pass: fc1 sees quantized inputs
    seen = []
    h = q.fc1.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    try:
        q(splits.test.tensors[0][:8])
    finally:
        h.remove()
    aq = input_quant_of(q.fc1)
    assert isinstance(aq, ActFakeQuant)
    # the hook sees the layer's raw input; the layer's own forward quantizes it
    direct = nn.functional.linear(aq(seen[0].flatten(1)), q.fc1.weight, q.fc1.bias)
    assert torch.allclose(q.fc1(seen[0].flatten(1)), direct)
    assert not torch.allclose(q.fc1(seen[0].flatten(1)), nn.functional.linear(seen[0].flatten(1), q.fc1.weight, q.fc1.bias))


def test_names_state_dict_and_deepcopy_survive(trained):
    model, splits = trained
    q = copy.deepcopy(model)
    quantize_(q, Int8Config(), data=splits)
    names = dict(q.named_modules())
    assert isinstance(names["fc1"], nn.Linear) and "fc1.input_quant" in names
    keys = set(q.state_dict())
    assert {"fc1.parametrizations.weight.original", "fc1.input_quant.scale", "fc1.input_quant.zero_point"} <= keys
    twin = copy.deepcopy(q)
    x = splits.test.tensors[0][:32]
    assert torch.equal(twin(x), q(x))
    assert input_quant_of(twin.fc1) is not input_quant_of(q.fc1)
    fresh = copy.deepcopy(model)
    quantize_(fresh, Int8Config(), data=splits.val)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x), q(x))


def test_bias_correction_reduces_the_mean_output_error(trained):
    model, splits = trained
    cfg = {"bits": 3, "per_channel": False, "symmetric": False, "activations": False, "calibration_samples": 600}
    plain, corrected = copy.deepcopy(model), copy.deepcopy(model)
    quantize_(plain, UniformConfig(**cfg), data=splits.train)
    res = quantize_(corrected, UniformConfig(**cfg, bias_correction=True), data=splits.train)
    assert set(res.bias_shift) == {"fc1", "fc2", "fc3"} and all(s > 0 for s in res.bias_shift.values())
    x = splits.val.tensors[0]  # held out from the calibration data
    with torch.no_grad():
        ref = model(x)
        err_plain = (plain(x) - ref).mean(0).abs().mean()
        err_corr = (corrected(x) - ref).mean(0).abs().mean()
    assert err_corr < 0.5 * err_plain
    # only the biases changed
    assert torch.equal(plain.fc1.weight, corrected.fc1.weight)
    assert not torch.equal(plain.fc3.bias, corrected.fc3.bias)


def test_bias_correction_on_calibration_data_zeroes_the_first_layer_mean_error(trained):
    model, splits = trained
    q = copy.deepcopy(model)
    x = splits.train.tensors[0][:256]
    quantize_(q, UniformConfig(bits=2, activations=False, bias_correction=True, calibration_samples=256), data=x)
    with torch.no_grad():
        f = x.flatten(1)
        assert torch.allclose(q.fc1(f).mean(0), model.fc1(f).mean(0), atol=1e-5)


def test_pruned_zeros_stay_zero_and_mask_is_kept(trained):
    model, _ = trained
    q = copy.deepcopy(model)
    prune_(q, MagnitudeConfig(sparsity=0.6))
    zeros = q.fc1.weight.detach() == 0
    quantize_(q, UniformConfig(bits=4, symmetric=False, activations=False))  # weights only: no data needed
    assert torch.all(q.fc1.weight.detach()[zeros] == 0)
    from netshrink.prune._mask import get_mask

    assert get_mask(q.fc1) is not None


def test_conv_layers_are_quantized_per_output_channel():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    x = torch.randn(32, 1, 8, 8)
    ref = net(x).detach()
    res = quantize_(net, UniformConfig(bits=8), data=TensorDataset(x, torch.zeros(32, dtype=torch.long)))
    assert net[0].parametrizations.weight[0].scale.shape == (4,)
    assert sqnr_db(ref, net(x)) > 30 and res.inputs["0"].bits == 8


def test_recipe_names_resolve_and_round_trip():
    assert config_type("int8") is Int8Config and config_type("uniform") is UniformConfig
    cfg = UniformConfig.from_dict({"bits": 6, "layer_bits": {"fc3": 8}, "observer": "percentile", "layers": ["fc*"]})
    assert UniformConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    assert Int8Config().method == "int8" and UniformConfig().method == "uniform"


@pytest.mark.parametrize(
    "args, field",
    [({"bits": 1}, "bits"), ({"bits": 9}, "bits"), ({"act_bits": 12}, "act_bits"), ({"layer_bits": {"fc1": 1}}, "layer_bits.fc1"),
     ({"observer": "kl"}, "observer"), ({"percentile": 30.0}, "percentile"), ({"calibration_samples": 0}, "calibration_samples")],
)
def test_bad_config_names_the_field(args, field):
    with pytest.raises(ConfigError) as ei:
        UniformConfig.from_dict(args)
    assert ei.value.field == field


def test_int8_refuses_other_widths():
    with pytest.raises(ConfigError) as ei:
        Int8Config(bits=4)
    assert ei.value.field == "bits"


def test_calibration_data_errors(trained):
    model, splits = trained
    empty = TensorDataset(torch.empty(0, 1, 8, 8), torch.empty(0, dtype=torch.long))
    with pytest.raises(DataError, match="calibration data is empty"):
        quantize_(copy.deepcopy(model), UniformConfig(), data=empty)
    bad = splits.val.tensors[0][:40].clone()
    bad[3, 0, 2, 2] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        quantize_(copy.deepcopy(model), UniformConfig(), data=TensorDataset(bad, torch.zeros(40, dtype=torch.long)))
    with pytest.raises(DataError, match="missing"):
        quantize_(copy.deepcopy(model), UniformConfig(activations=True))


class WithUnsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.up = nn.ConvTranspose1d(4, 4, 2)
        self.head = nn.Linear(4 * 6, 3)

    def forward(self, idx):
        h = self.up(self.emb(idx).transpose(1, 2))
        return self.head(h.flatten(1))


def test_unsupported_layer_named_is_an_error_and_unnamed_is_left_in_float(caplog):
    torch.manual_seed(0)
    net = WithUnsupported()
    with pytest.raises(ConfigError) as ei:
        quantize_(net, UniformConfig(layers=["head", "up"], activations=False))
    assert ei.value.field == "layers[1]" and "ConvTranspose1d" in str(ei.value)
    with pytest.raises(ConfigError) as ei:
        UniformConfig(layers=["nothing"]).check_model(net)
    assert ei.value.field == "layers[0]"
    with caplog.at_level(logging.WARNING, logger="netshrink.quantize"):
        res = quantize_(net, UniformConfig(bits=8, activations=False))
    assert list(res.bits) == ["head"]
    assert "'emb'" in caplog.text and "'up'" in caplog.text
    from torch.nn.utils import parametrize

    assert not parametrize.is_parametrized(net.up) and not parametrize.is_parametrized(net.emb)


def test_quantizing_twice_is_refused(trained):
    model, _ = trained
    q = copy.deepcopy(model)
    quantize_(q, UniformConfig(activations=False))
    with pytest.raises(ModelError, match="already quantized"):
        quantize_(q, UniformConfig(activations=False))


def test_a_refused_call_leaves_the_model_as_it_was(trained):
    model, _ = trained
    q = copy.deepcopy(model)
    quantize_(q, UniformConfig(activations=False, layers=["fc3"]))
    before = {k: v.clone() for k, v in q.state_dict().items()}
    with pytest.raises(ModelError, match="fc3"):
        quantize_(q, UniformConfig(activations=False))
    assert q.state_dict().keys() == before.keys()
    from netshrink.quantize._common import weight_quantizer_of

    assert weight_quantizer_of(q.fc1) is None and input_quant_of(q.fc1) is None


def test_unsupported_weight_layers_are_reported_as_skipped():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.fc = nn.Linear(8, 3)

        def forward(self, ids):
            return self.fc(self.emb(ids).mean(1))

    torch.manual_seed(0)
    net = Net().eval()
    res = quantize_(net, Int8Config(), data=torch.randint(0, 20, (16, 5)))
    assert set(res.bits) == {"fc"} and "Embedding" in res.skipped["emb"] and "float" in res.skipped["emb"]
