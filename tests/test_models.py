"""Tests of netshrink.models: parameter counts, shapes, names, the registry and netshrink_spec."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from netshrink import models
from netshrink.errors import ConfigError
from netshrink.models import build_model, lenet5, lenet_300_100, list_models, mlp, register_model


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_lenet_300_100_parameters_names_and_shapes():
    m = lenet_300_100()
    assert n_params(m) == 266_610  # 784*300+300 + 300*100+100 + 100*10+10
    linears = {n: (l.in_features, l.out_features) for n, l in m.named_modules() if isinstance(l, nn.Linear)}
    assert linears == {"fc1": (784, 300), "fc2": (300, 100), "fc3": (100, 10)}
    x = torch.randn(5, 1, 28, 28)
    out = m(x)
    assert out.shape == (5, 10)
    torch.testing.assert_close(m(x.reshape(5, 784)), out)  # flat input gives the same logits
    assert sum(isinstance(mod, nn.ReLU) for mod in m.modules()) == 2


def test_lenet5_is_caffes_lenet():
    m = lenet5()
    assert n_params(m) == 431_080  # 520 + 25,050 + 400,500 + 5,010
    named = dict(m.named_modules())
    assert (named["conv1"].in_channels, named["conv1"].out_channels, named["conv1"].kernel_size) == (1, 20, (5, 5))
    assert (named["conv2"].in_channels, named["conv2"].out_channels, named["conv2"].kernel_size) == (20, 50, (5, 5))
    assert (named["fc1"].in_features, named["fc1"].out_features) == (800, 500)
    assert (named["fc2"].in_features, named["fc2"].out_features) == (500, 10)
    assert sum(isinstance(mod, nn.MaxPool2d) for mod in m.modules()) == 2
    relus = [n for n, mod in m.named_modules() if isinstance(mod, nn.ReLU)]
    assert len(relus) == 1  # Caffe's lenet: a ReLU only after fc1
    order = [n for n, _ in m.named_children()]
    assert order.index("fc1") < order.index(relus[0]) < order.index("fc2")
    assert m(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_lenet5_other_input_sizes_and_channels():
    m = lenet5(in_channels=3, num_classes=7, input_size=32)
    assert m.fc1.in_features == 50 * 5 * 5
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    with pytest.raises(ConfigError, match="input_size"):
        lenet5(input_size=8)


def test_mlp_on_digit_shaped_input():
    m = mlp()
    assert [n for n, l in m.named_modules() if isinstance(l, nn.Linear)] == ["fc1", "fc2"]
    assert n_params(m) == 64 * 32 + 32 + 32 * 10 + 10
    assert m(torch.rand(4, 1, 8, 8)).shape == (4, 10)
    deep = mlp(hidden=(16, 12))
    assert [(l.in_features, l.out_features) for l in deep.modules() if isinstance(l, nn.Linear)] == [(64, 16), (16, 12), (12, 10)]


def test_build_model_attaches_a_json_spec_that_rebuilds_the_model():
    m = build_model("mlp", hidden=(16, 8))
    assert m.netshrink_spec == {"zoo": "mlp", "args": {"in_features": 64, "hidden": [16, 8], "num_classes": 10}}
    spec = json.loads(json.dumps(m.netshrink_spec))
    twin = build_model(spec["zoo"], **spec["args"])
    assert twin.netshrink_spec == m.netshrink_spec
    assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}
    twin.load_state_dict(m.state_dict())
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(twin(x), m(x))
    assert copy.deepcopy(m).netshrink_spec == m.netshrink_spec


@pytest.mark.parametrize("name,count", [("lenet_300_100", 266_610), ("lenet5", 431_080)])
def test_build_model_by_name(name, count):
    m = build_model(name)
    assert n_params(m) == count
    assert m.netshrink_spec["zoo"] == name


def test_build_model_errors_name_what_is_wrong():
    with pytest.raises(ConfigError, match="unknown model 'resnet999'") as err:
        build_model("resnet999")
    assert err.value.field == "model" and "lenet5" in str(err.value)
    with pytest.raises(ConfigError, match="unknown argument") as err:
        build_model("lenet5", channels=3)
    assert err.value.field == "model.args.channels"
    with pytest.raises(ConfigError) as err:
        build_model("mlp", hidden=[8, -1])
    assert err.value.field == "model.args.hidden[1]"
    with pytest.raises(ConfigError, match="positive integer"):
        build_model("lenet_300_100", num_classes=0)
    with pytest.raises(ConfigError, match="plain JSON"):
        build_model("mlp", hidden=(torch.tensor(3),))


def test_registry_lists_and_extends(monkeypatch):
    assert {"lenet_300_100", "lenet5", "mlp"} <= set(list_models())
    monkeypatch.setattr(models, "_MODELS", models._MODELS.copy())

    @register_model("tiny")
    def tiny(width: int = 3) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(4, width))

    assert "tiny" in list_models()
    m = build_model("tiny", width=5)
    assert m.netshrink_spec == {"zoo": "tiny", "args": {"width": 5}} and m[1].out_features == 5
    with pytest.raises(ConfigError, match="already registered"):
        register_model("tiny")(lambda: nn.Identity())


# ------------------------------------------------------------- CNNs for structured pruning (issue 3)


@pytest.mark.parametrize(
    "name,params",
    [("resnet_small", 77_754), ("vgg_small", 147_162), ("mobilenet_small", 9_034), ("mlp_concat", 237_706)],
)
def test_structured_zoo_models_shapes_and_parameter_counts(name, params):
    m = build_model(name).eval()
    assert n_params(m) == params
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert m.netshrink_spec["zoo"] == name and json.dumps(m.netshrink_spec)


def test_resnet_small_has_batchnorm_and_projection_shortcuts():
    m = build_model("resnet_small")
    assert sum(isinstance(x, nn.BatchNorm2d) for x in m.modules()) == 1 + 3 * 2 + 2  # stem, 2 per block, 2 projections
    assert isinstance(m.stages[0][0].shortcut, nn.Identity) and isinstance(m.stages[1][0].shortcut, nn.Sequential)


def test_mobilenet_small_blocks_are_depthwise_separable():
    m = build_model("mobilenet_small")
    dw, pw = m.block1.dw.conv, m.block1.pw.conv
    assert dw.groups == dw.in_channels == dw.out_channels == 16 and pw.kernel_size == (1, 1) and pw.groups == 1


def test_mlp_concat_feeds_both_hidden_layers_to_the_classifier():
    m = build_model("mlp_concat", in_features=64, hidden=[8, 4], num_classes=3)
    assert m.fc3.in_features == 12 and m(torch.randn(2, 64)).shape == (2, 3)


def test_resnet50_is_resnet50_sized():
    with torch.device("meta"):
        m = models.resnet50()
    assert n_params(m) == 25_557_032  # torchvision's ResNet-50 has the same count
    assert [len(s) for s in m.stages] == [3, 4, 6, 3]


@pytest.mark.parametrize("name,args,field", [("vgg_small", {"input_size": 4}, "input_size"), ("resnet_small", {"depths": [1, 1]}, "depths"),
                                             ("mobilenet_small", {"widths": [8]}, "widths"), ("mlp_concat", {"hidden": [8]}, "hidden")])
def test_structured_zoo_bad_arguments(name, args, field):
    with pytest.raises(ConfigError, match=field):
        build_model(name, **args)
