"""Low-rank methods on the zoo CNNs (BatchNorm, residual adds, depthwise convs): the factorized model packs
into .nsk and loads back with equal outputs, exports to ONNX with the same outputs in onnxruntime, and a
layer the method does not apply to is a one-line ConfigError naming the field and the layer."""

import re

import pytest
import torch
from torch import nn

from netshrink.errors import ConfigError
from netshrink.lowrank import (
    CPConfig,
    LayerwiseConfig,
    RankBudgetConfig,
    SeparableConfig,
    SvdConfig,
    TuckerConfig,
    factorize_,
)

pytest.importorskip("onnxruntime")






CASES = [
    ("resnet_small", TuckerConfig(macs_ratio=0.3, layers=["stages.*.conv*"], n_iter_max=10)),
    ("resnet_small", CPConfig(rank=6, layers=["stages.0.0.conv1", "stages.2.0.conv2"], n_iter_max=20)),
    ("resnet_small", SeparableConfig(param_ratio=0.4, layers=["stem.conv", "stages.1.0.conv1"])),
    ("resnet_small", SvdConfig(rank=4, layers=["fc"])),
    ("resnet_small", RankBudgetConfig(macs_ratio=0.5, criterion="error", input_shape=[1, 28, 28], n_iter_max=5)),
    ("vgg_small", TuckerConfig(rank="vbmf", layers=["block2.*.conv"], n_iter_max=10)),
    ("vgg_small", SvdConfig(rank=16, layers=["fc1"], train="fixed_random")),
    ("mobilenet_small", TuckerConfig(macs_ratio=0.5, layers=["block*.pw.conv"], n_iter_max=10)),
    ("mobilenet_small", CPConfig(rank=3, layers=["stem.conv"], n_iter_max=20)),
    ("mobilenet_small", RankBudgetConfig(params_ratio=0.6, criterion="error", n_iter_max=5)),
]


@pytest.mark.parametrize("name,config", CASES, ids=[f"{n}-{c.method}" for n, c in CASES])
def test_factorized_zoo_cnn_packs_loads_and_exports(zoo_cnn, assert_packs_and_exports, name, config):
    model = zoo_cnn(name)
    result = factorize_(model, config)
    assert result.layers and result.params_after < result.params_before
    for layer in result.layers:
        assert getattr(type(model.get_submodule(layer)), "netshrink_type", None) is not None
    assert_packs_and_exports(model)


def test_layerwise_on_a_residual_cnn_packs_and_exports(zoo_cnn, assert_packs_and_exports):
    model = zoo_cnn("resnet_small")
    data = torch.utils.data.TensorDataset(torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,)))
    cfg = LayerwiseConfig(method="tucker", args={"rank": 8, "n_iter_max": 5}, layers=["stages.0.0.conv1", "stages.0.0.conv2"],
                          fit_steps=3, finetune_steps=2, samples=16, batch_size=8)
    result = factorize_(model, cfg, data=data)
    assert set(result.layers) == {"stages.0.0.conv1", "stages.0.0.conv2"}
    assert all(f.output_error is not None for f in result.layers.values())
    assert_packs_and_exports(model)


@pytest.mark.parametrize(
    "config,field,words",
    [
        (TuckerConfig(rank=2, layers=["block1.dw.conv"]), r"layers\[0\]", "tucker does not apply to layer 'block1.dw.conv': it is a grouped conv (groups=16)"),
        (CPConfig(rank=2, layers=["stem.conv", "block2.dw.conv"]), r"layers\[1\]", "cp does not apply to layer 'block2.dw.conv': it is a grouped conv"),
        (SeparableConfig(rank=1, layers=["block1.pw.conv"]), r"layers\[0\]", "1x1 conv"),
        (SvdConfig(rank=2, layers=["stem.conv"]), r"layers\[0\]", "svd does not apply to layer 'stem.conv': it is a Conv2d, not a Linear"),
        (RankBudgetConfig(macs_ratio=0.5, layers=["block3.dw.conv"], input_shape=[1, 28, 28]), r"layers\[0\]", "grouped conv"),
        (LayerwiseConfig(method="cp", args={"rank": 2}, layers=["block1.dw.conv"]), r"layers\[0\]", "grouped conv"),
        (TuckerConfig(rank=2, layers=["stem.bn"]), r"layers\[0\]", "tucker does not apply to 'stem.bn': it is a BatchNorm2d"),
        (SvdConfig(rank=2, layers=["pool"]), r"layers\[0\]", "it is a AdaptiveAvgPool2d"),
        (TuckerConfig(rank=[40, 2], layers=["block1.pw.conv"]), "rank", "above the full rank"),
    ],
)
def test_a_method_that_does_not_apply_is_one_clear_line(zoo_cnn, config, field, words):
    model = zoo_cnn("mobilenet_small")
    data = torch.utils.data.TensorDataset(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError) as err:
        factorize_(model, config, data=data)
    text = str(err.value)
    assert "\n" not in text and words in text
    assert re.match(field, text), text
    # nothing was replaced: the model is unchanged
    assert not getattr(model, "netshrink_edits", [])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_default_layers_skip_what_does_not_apply(zoo_cnn):
    model = zoo_cnn("mobilenet_small")
    result = factorize_(model, TuckerConfig(rank=1))
    # every plain conv is replaced (stem, the 1x1 pointwise convs); the depthwise ones are left alone
    assert set(result.layers) == {"stem.conv", "block1.pw.conv", "block2.pw.conv", "block3.pw.conv"}
    assert isinstance(model.block1.dw.conv, nn.Conv2d) and model.block1.dw.conv.groups == 16
    with pytest.raises(ConfigError, match="has no layer that separable applies to"):
        factorize_(nn.Sequential(nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, groups=4)), SeparableConfig(rank=1))


def test_rank_budget_scoring_leaves_batchnorm_statistics_alone(zoo_cnn):
    model = zoo_cnn("resnet_small").train()  # a model in training mode: scoring must still not touch BN's statistics
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    data = torch.utils.data.TensorDataset(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,)))
    result = factorize_(model, RankBudgetConfig(params_ratio=0.7, layers=["stages.2.0.conv*", "fc"], batches=2,
                                                batch_size=8, levels=[0.25, 0.5], n_iter_max=3), data=data)
    assert result.layers and model.training
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in stats.items())
