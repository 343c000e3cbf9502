"""Compact filters on the zoo CNNs (BatchNorm, residual adds, depthwise convs): the model packs into .nsk
and loads back with equal outputs, exports to ONNX with the same outputs in onnxruntime, and a conv the
method does not apply to is a one-line ConfigError naming the field and the layer."""

import pytest
import torch

from netshrink.errors import ConfigError
from netshrink.filters import CReLUConfig, DepthwiseConfig, EquivariantConfig, compact_

pytest.importorskip("onnxruntime")






CASES = [
    ("resnet_small", EquivariantConfig(group="p4", layers=["stem.conv", "stages.1.0.conv1"])),
    ("vgg_small", EquivariantConfig(group="p4m", layers=["block1.*.conv"])),
    ("resnet_small", CReLUConfig(relu=False)),
    ("mobilenet_small", CReLUConfig(relu=False)),
    ("resnet_small", DepthwiseConfig(layers=["stages.*.0.conv1", "stages.*.0.conv2"], multiplier=2, steps=2, samples=8, batch_size=4)),
    ("mobilenet_small", DepthwiseConfig(steps=0)),
]


@pytest.mark.parametrize("name,config", CASES, ids=[f"{n}-{c.method}" for n, c in CASES])
def test_compact_zoo_cnn_packs_loads_and_exports(zoo_cnn, assert_packs_and_exports, name, config):
    model = zoo_cnn(name)
    result = compact_(model, config, data=torch.randn(8, 1, 28, 28))
    assert result.layers and result.params_after < result.params_before
    assert_packs_and_exports(model)


def test_defaults_leave_depthwise_convs_alone(zoo_cnn):
    model = zoo_cnn("mobilenet_small")
    assert set(compact_(model, DepthwiseConfig(steps=0)).layers) == {"stem.conv"}  # dw: grouped, pw: 1x1
    assert model.block1.dw.conv.groups == 16


@pytest.mark.parametrize(
    "config,words",
    [
        (CReLUConfig(layers=["block1.dw.conv"]), "layers[0]: crelu does not apply to layer 'block1.dw.conv': it is a grouped conv (groups=16)"),
        (EquivariantConfig(layers=["stem.conv", "block3.dw.conv"]), "layers[1]: equivariant does not apply to layer 'block3.dw.conv'"),
        (DepthwiseConfig(layers=["block2.pw.conv"], steps=0), "layers[0]: depthwise does not apply to layer 'block2.pw.conv': it is a 1x1 conv"),
        (DepthwiseConfig(layers=["fc"], steps=0), "layers[0]: depthwise does not apply to layer 'fc': it is a Linear, not a Conv2d"),
        (CReLUConfig(layers=["stem.bn"]), "layers[0]: crelu does not apply to 'stem.bn': it is a BatchNorm2d"),
    ],
)
def test_a_filter_method_that_does_not_apply_is_one_clear_line(zoo_cnn, config, words):
    model = zoo_cnn("mobilenet_small")
    with pytest.raises(ConfigError) as err:
        compact_(model, config, data=torch.randn(4, 1, 28, 28))
    assert "\n" not in str(err.value) and words in str(err.value), str(err.value)
    assert not getattr(model, "netshrink_edits", [])
