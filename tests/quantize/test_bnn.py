import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import netshrink as ns
from netshrink import metrics
from netshrink.data import load_dataset
from netshrink.errors import ConfigError, ModelError
from netshrink.models import build_model
from netshrink.pack import load, pack, read_info
from netshrink.quantize import BinaryConfig, BnnConfig, SignActivation, quantize_
from netshrink.quantize.bnn import sign_ste
from netshrink.recipe import parse_recipe


def _bnn_mlp(hidden=(32, 32), seed=0):
    torch.manual_seed(seed)
    return build_model("mlp_bn", in_features=64, hidden=list(hidden), num_classes=10)


def _inputs_of(model, name, x):
    seen = []
    h = model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    with torch.no_grad():
        model(x)
    h.remove()
    return seen[0]


def test_sign_ste_forward_and_hard_tanh_gradient():
    x = torch.tensor([-2.0, -1.0, -0.3, 0.0, 0.4, 1.0, 1.5], requires_grad=True)
    y = sign_ste(x)
    assert y.tolist() == [-1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0]  # sign(0) = +1
    y.backward(torch.arange(1.0, 8.0))
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0]  # 1(|x| <= 1)
    assert sign_ste(torch.tensor([0.2, -0.0])).tolist() == [1.0, 1.0]


def test_bnn_binarizes_weights_and_hidden_activations_only():
    model = _bnn_mlp().eval()
    res = quantize_(model, BnnConfig())
    assert res.activations == ["relu1", "relu2"]
    assert all(isinstance(model.get_submodule(n), SignActivation) for n in res.activations)
    assert model.netshrink_edits == [{"path": "relu1", "type": "sign_activation", "args": {}},
                                     {"path": "relu2", "type": "sign_activation", "args": {}}]
    for name in ("fc1", "fc2", "fc3"):  # the paper's weights: ±1 (alpha = 1), BN absorbs the scale
        assert set(model.get_submodule(name).weight.detach().unique().tolist()) == {-1.0, 1.0}
    x = torch.rand(16, 1, 8, 8) * 16
    first = _inputs_of(model, "fc1", x)
    assert first.unique().numel() > 2  # the first layer's input stays real (the pixels)
    for name in ("fc2", "fc3"):
        assert set(_inputs_of(model, name, x).unique().tolist()) == {-1.0, 1.0}
    with torch.no_grad():
        out = model(x)
    assert out.unique().numel() > 2  # the class scores stay real


def test_bnn_with_xnor_scaling_uses_mean_abs_per_channel():
    model = _bnn_mlp()
    w = model.fc2.weight.detach().clone()
    res = quantize_(model, BnnConfig(scale=True, clip=False))
    assert torch.allclose(res.weights.alpha["fc2"], w.abs().mean(1))


def test_default_leaves_an_activation_after_the_last_layer():
    net = nn.Sequential(nn.Linear(4, 8), nn.Hardtanh(), nn.Linear(8, 3), nn.Sigmoid())
    res = quantize_(net, BnnConfig())
    assert res.activations == ["1"] and isinstance(net[3], nn.Sigmoid)
    net2 = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3), nn.Sigmoid())
    assert quantize_(net2, BnnConfig(activations=["3"])).activations == ["3"]  # named: any activation module


def test_bnn_mlp_trains_on_digits():
    splits = load_dataset("digits")
    model = _bnn_mlp(hidden=(64, 64))
    quantize_(model, BnnConfig())
    base = metrics.error_rate(model, splits.test)
    hist = ns.Trainer(model, ns.TrainConfig(epochs=6, optimizer="adam", lr=0.01, batch_size=32, progress=False)).fit(splits.train).history
    err = metrics.error_rate(model, splits.test)
    assert hist[-1].train_loss < hist[0].train_loss
    assert err < 0.3 and err < base
    assert float(model.fc2.parametrizations.weight.original.detach().abs().max()) <= 1.0  # clipped after the updates


def test_bnn_packs_at_one_bit_and_loads_back_exactly(tmp_path):
    model = _bnn_mlp(hidden=(64, 64))
    quantize_(model, BnnConfig())
    x = torch.randn(256, 64)
    ns.Trainer(model, ns.TrainConfig(epochs=1, lr=0.05, batch_size=32, progress=False)).fit(TensorDataset(x, torch.randint(0, 10, (256,))))
    model.eval()
    stats = pack(model, tmp_path / "bnn.nsk")
    info = read_info(tmp_path / "bnn.nsk")
    for name, numel in (("fc1.weight", 64 * 64), ("fc2.weight", 64 * 64), ("fc3.weight", 64 * 10)):
        t = info.tensor(name)
        assert t.encoding == "binary"
        signs = next(s for s in t.sections if s.part == "signs")
        assert signs.nbytes <= (numel + 7) // 8
    loaded = load(tmp_path / "bnn.nsk")
    assert isinstance(loaded.relu1, SignActivation) and isinstance(loaded.relu2, SignActivation)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))
    assert stats.total_bytes < stats.dense_fp32_bytes / 8  # BN tensors and the header stay: not 32x on a toy model


def test_bnn_stage_in_a_recipe_validates_and_names_its_field():
    recipe = {"name": "bnn", "model": "mlp_bn", "model_args": {"in_features": 64, "hidden": [16, 16]}, "data": "digits",
              "train": {"epochs": 1, "progress": False}, "stages": [{"method": "bnn", "scale": True}]}
    r = parse_recipe(copy.deepcopy(recipe))
    assert isinstance(r.stages[0].config, BnnConfig) and r.stages[0].config.scale
    recipe["stages"][0]["activations"] = ["fc1"]
    with pytest.raises(ConfigError) as ei:
        parse_recipe(recipe)
    assert ei.value.field.endswith("activations[0]") and "Linear" in str(ei.value)


@pytest.mark.parametrize("args, field", [({"activations": []}, "activations"), ({"scale": "yes"}, "scale"),
                                         ({"activations": "relu1"}, "activations"), ({"sign": True}, "sign")])
def test_bad_bnn_options(args, field):
    with pytest.raises(ConfigError) as ei:
        BnnConfig.from_dict(args)
    assert ei.value.field == field


@pytest.mark.parametrize("config, field, words", [
    (BnnConfig(activations=["fc2"]), "activations[0]", "Linear"),
    (BnnConfig(activations=["bn1"]), "activations[0]", "BatchNorm1d"),
    (BnnConfig(activations=["relu9"]), "activations[0]", "no activation module"),
    (BnnConfig(layers=["bn1"]), "layers[0]", "BatchNorm1d"),
])
def test_bnn_on_an_unsupported_module_is_refused_and_changes_nothing(config, field, words):
    model = _bnn_mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError) as ei:
        quantize_(model, config)
    assert ei.value.field == field and words in str(ei.value)
    assert isinstance(model.relu1, nn.ReLU) and not hasattr(model, "netshrink_edits")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_functional_activations_cannot_be_binarized():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    with pytest.raises(ConfigError) as ei:
        quantize_(Functional(), BnnConfig())
    assert ei.value.field == "activations" and "F.relu" in str(ei.value)


def test_bnn_on_an_already_binary_model_is_refused():
    model = _bnn_mlp()
    quantize_(model, BinaryConfig(layers=["fc2"]))
    with pytest.raises(ModelError, match="already quantized"):
        quantize_(model, BnnConfig())
    assert isinstance(model.relu1, nn.ReLU)


def test_bnn_recipe_runs_end_to_end_and_packs_one_bit_weights(digits_recipe, tmp_path):
    from netshrink.pipeline import run_recipe

    recipe = dict(digits_recipe, name="digits-bnn", model="mlp_bn", model_args={"in_features": 64, "hidden": [64, 64]},
                  train={"epochs": 3, "optimizer": "adam", "lr": 0.01, "batch_size": 32, "progress": False},
                  stages=[{"method": "bnn", "finetune": {"epochs": 3, "optimizer": "adam", "lr": 0.01, "batch_size": 32, "progress": False}},
                          {"method": "huffman"}])
    res = run_recipe(parse_recipe(recipe), tmp_path / "out", progress=False)
    assert [r.method for r in res.rows] == ["baseline", "bnn", "huffman"]
    assert res.rows[-1].test_error < 0.3
    info = read_info(res.model_path)
    assert {t.name for t in info.tensors if t.encoding == "binary"} == {"fc1.weight", "fc2.weight", "fc3.weight"}
    x = load_dataset("digits").test.tensors[0][:64]
    res.model.eval()
    with torch.no_grad():
        assert torch.equal(load(res.model_path).eval()(x), res.model(x))
