"""Structured matrices on the Linear layers of the zoo CNNs: pack round trip exact, ONNX equal to torch,
and a layer that is not a Linear is a one-line ConfigError naming the field and the layer."""

import pytest
import torch
from torch import nn

from netshrink.errors import ConfigError
from netshrink.matrices import CirculantConfig, HashedConfig, ToeplitzConfig, structure_
from netshrink.models import build_model

pytest.importorskip("onnxruntime")

CASES = [
    ("vgg_small", CirculantConfig(layers=["fc1"], signs=True)),
    ("vgg_small", ToeplitzConfig(layers=["fc1", "fc2"])),
    ("resnet_small", HashedConfig(ratio=0.25, layers=["fc"])),
    ("mobilenet_small", CirculantConfig(block=5)),
]


@pytest.mark.parametrize("name,config", CASES, ids=[f"{n}-{c.method}" for n, c in CASES])
def test_structured_head_packs_loads_and_exports(assert_packs_and_exports, name, config):
    torch.manual_seed(0)
    model = build_model(name).eval()
    result = structure_(model, config)
    assert result.layers and result.params_after < result.params_before
    assert_packs_and_exports(model)


def test_a_conv_named_for_a_structured_matrix_is_one_clear_line():
    model = build_model("resnet_small")
    with pytest.raises(ConfigError) as err:
        structure_(model, CirculantConfig(layers=["fc", "stem.conv"]))
    assert str(err.value) == "layers[1]: circulant does not apply to layer 'stem.conv': it is a Conv2d, not a Linear"
    with pytest.raises(ConfigError, match=r"^layers\[0\]: toeplitz does not apply to 'stem.bn': it is a BatchNorm2d"):
        structure_(model, ToeplitzConfig(layers=["stem.bn"]))
    assert not getattr(model, "netshrink_edits", [])
    assert isinstance(model.fc, nn.Linear)
