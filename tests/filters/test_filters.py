"""Compact filters: the equivariance equation, CReLU sharing, depthwise-separable mimicking, pack round trips."""

import copy

import pytest
import torch
from torch import nn

from netshrink._registry import config_type
from netshrink.errors import ConfigError, DataError, ModelError
from netshrink.filters import (
    CReLUConfig,
    CReLUConv2d,
    DepthwiseConfig,
    DepthwiseSeparableConv2d,
    EquivariantConfig,
    EquivariantConv2d,
    channel_permutation,
    compact_,
    depthwise_factors,
    transform,
)
from netshrink.filters.depthwise import relative_output_error
from netshrink.filters.equivariant import GROUPS
from netshrink.lowrank._common import module_params
from netshrink.models import build_model
from netshrink.pack import load, pack


@pytest.mark.parametrize("group", ["flip", "p4", "p4m"])
@pytest.mark.parametrize("side", [9, 10])
def test_equivariance_equation_holds_for_every_group_element(group, side):
    torch.manual_seed(0)
    layer = EquivariantConv2d(3, 2 * len(GROUPS[group]), 3, padding=1, group=group).double()
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(2, 3, side, side, dtype=torch.float64)
    y = layer(x)
    for t in GROUPS[group]:
        # T' phi(x) = phi(T x)
        torch.testing.assert_close(layer.transform_output(y, t), layer(transform(x, t)), rtol=1e-10, atol=1e-10)
    # a plain conv with the same kernel but unshared filters is not equivariant
    if group != "flip":
        plain = nn.Conv2d(3, layer.out_channels, 3, padding=1).double()
        t = GROUPS[group][1]
        assert not torch.allclose(layer.transform_output(plain(x), t), plain(transform(x, t)))


def test_p4_channel_permutation_is_a_cyclic_shift_and_filters_are_rotations():
    assert channel_permutation("p4", (0, 1)) == [3, 0, 1, 2]  # t^{-1} g_i = rot^(i-1)
    assert channel_permutation("p4", (0, 0)) == [0, 1, 2, 3]
    layer = EquivariantConv2d(1, 8, 3, group="p4")
    w = layer.dense_weight()
    assert torch.equal(w[2:4], torch.rot90(layer.weight, 1, dims=(-2, -1)))
    assert module_params(layer) == 2 * 1 * 9 + 2  # |G| = 4 times fewer weights than a dense 8-filter conv


def test_equivariant_projection_recovers_an_equivariant_kernel():
    torch.manual_seed(1)
    src = EquivariantConv2d(2, 8, 3, group="p4m")
    dst = EquivariantConv2d(2, 8, 3, group="p4m").set_from_dense(src.dense_weight().detach(), src.bias.repeat(8))
    torch.testing.assert_close(dst.weight, src.weight)


def test_crelu_shares_a_filter_and_its_negation():
    torch.manual_seed(2)
    layer = CReLUConv2d(3, 8, 3, padding=1)
    assert module_params(layer) == 4 * 3 * 9 + 4
    x = torch.randn(2, 3, 6, 6)
    z = nn.functional.conv2d(x, layer.conv.weight, layer.conv.bias, padding=1)
    torch.testing.assert_close(layer(x), torch.cat([z.relu(), (-z).relu()], 1))
    linear = CReLUConv2d(3, 8, 3, padding=1, relu=False)
    linear.set_from_dense(layer.dense_weight().detach(), torch.cat([layer.conv.bias, -layer.conv.bias]).detach())
    torch.testing.assert_close(linear.conv.weight, layer.conv.weight)
    torch.testing.assert_close(linear(x).relu(), layer(x))  # a following ReLU makes the linear form CReLU


def test_depthwise_factors_are_the_per_channel_truncated_svd():
    torch.manual_seed(3)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    layer = DepthwiseSeparableConv2d(4, 6, 3, multiplier=6).double().set_from_dense(w)
    torch.testing.assert_close(layer.dense_weight(), w)  # full rank: exact
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(layer(x), nn.functional.conv2d(x, w, layer.pointwise.bias))
    d, p = depthwise_factors(w, 1)
    one = DepthwiseSeparableConv2d(4, 6, 3).double().set_from_dense(w)
    err = float((one.dense_weight().detach() - w).norm())
    svals = torch.linalg.svdvals(w.permute(1, 0, 2, 3).reshape(4, 6, 9))
    assert err == pytest.approx(float(svals[:, 1:].pow(2).sum().sqrt()), rel=1e-9)  # Eckart-Young per channel
    assert d.shape == (4, 1, 3, 3) and p.shape == (6, 4, 1, 1)


def test_depthwise_mimicking_lowers_the_output_error():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3))
    dense, svd_only = copy.deepcopy(model), copy.deepcopy(model)
    data = torch.randn(64, 3, 8, 8)
    init = compact_(svd_only, DepthwiseConfig(steps=0, layers=["2"]))
    fitted = compact_(model, DepthwiseConfig(steps=150, lr=3e-3, layers=["2"], batch_size=16), data=data)
    assert isinstance(model[2], DepthwiseSeparableConv2d) and isinstance(svd_only[2], DepthwiseSeparableConv2d)
    assert init.layers["2"].output_error is None
    inputs = [dense[1](dense[0](data))]
    err_init = relative_output_error(dense[2], svd_only[2], inputs)
    err_fit = fitted.layers["2"].output_error
    assert err_fit == pytest.approx(relative_output_error(dense[2], model[2], inputs), rel=1e-5)
    assert err_fit < 0.9 * err_init
    assert fitted.params_after < fitted.params_before


@pytest.mark.parametrize(
    "config,kind",
    [(EquivariantConfig(group="p4", layers=["conv1"]), EquivariantConv2d),
     (EquivariantConfig(group="flip"), EquivariantConv2d),
     (CReLUConfig(), CReLUConv2d),
     (DepthwiseConfig(steps=5, samples=8, batch_size=4, multiplier=2), DepthwiseSeparableConv2d)],
)
def test_compact_lenet5_packs_and_loads_exactly(tmp_path, config, kind):
    torch.manual_seed(0)
    model = build_model("lenet5").eval()
    data = torch.randn(8, 1, 28, 28)
    result = compact_(model, config, data=data)
    assert all(isinstance(model.get_submodule(n), kind) for n in result.layers)
    assert result.params_after < result.params_before
    path = tmp_path / "m.nsk"
    pack(model, path)
    loaded = load(path).eval()
    assert loaded.netshrink_edits == model.netshrink_edits
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(loaded(x), model(x))


def test_bad_inputs_give_clear_errors():
    model = build_model("lenet5")
    with pytest.raises(ConfigError, match=r"layers\[0\].*'fc1'.*not a Conv2d"):
        compact_(model, CReLUConfig(layers=["fc1"]))
    with pytest.raises(ConfigError, match=r"layers\[0\].*'nope'"):
        compact_(model, EquivariantConfig(layers=["nope"]))
    odd = nn.Sequential(nn.Conv2d(1, 6, 3))
    with pytest.raises(ConfigError, match=r"'0'.*not a multiple of 4"):
        compact_(odd, EquivariantConfig(layers=["0"]))
    with pytest.raises(ConfigError, match=r"'0'.*odd number"):
        compact_(nn.Sequential(nn.Conv2d(1, 5, 3)), CReLUConfig(layers=["0"]))
    with pytest.raises(ConfigError, match=r"'0'.*1x1"):
        compact_(nn.Sequential(nn.Conv2d(4, 4, 1)), DepthwiseConfig(layers=["0"], steps=0))
    with pytest.raises(ConfigError, match="multiplier.*full rank.*'conv1'"):
        compact_(model, DepthwiseConfig(multiplier=26, layers=["conv1"], steps=0))
    with pytest.raises(ConfigError, match="data"):
        compact_(model, DepthwiseConfig(layers=["conv1"]))
    with pytest.raises(DataError):
        compact_(model, DepthwiseConfig(layers=["conv1"]), data=torch.empty(0, 1, 28, 28))
    with pytest.raises(ConfigError, match="multiplier"):
        DepthwiseConfig(multiplier=0)
    with pytest.raises(ConfigError, match="group"):
        EquivariantConfig.from_dict({"group": "p6"})
    with pytest.raises(ModelError, match="square"):
        EquivariantConv2d(1, 4, (3, 5))
    with pytest.raises(ModelError, match="multiple of 2"):
        CReLUConv2d(1, 3, 3)
    assert config_type("crelu") is CReLUConfig and config_type("depthwise") is DepthwiseConfig
