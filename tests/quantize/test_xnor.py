import copy

import numpy as np
import pytest
import torch
from torch import nn

from netshrink.errors import ConfigError, ModelError
from netshrink.models import build_model
from netshrink.quantize import BinaryConfig, BnnConfig, XnorLinear, quantize_, to_xnor_
from netshrink.quantize import xnor
from netshrink.quantize.xnor import pack_signs, reference_forward, xnor_dot


def _signs(shape, seed):
    return torch.where(torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.5, -1.0, 1.0)


def test_pack_signs_bit_layout_and_zero_padding():
    x = torch.ones(2, 70)
    x[0, [0, 3, 64, 69]] = -0.5
    x[1, 5] = 0.0  # sign(0) = +1: bit 0
    x[1, 6] = -0.0  # -0.0 is not < 0: +1 as well
    w = pack_signs(x)
    assert w.dtype == np.uint64 and w.shape == (2, 2)
    assert int(w[0, 0]) == (1 << 0) | (1 << 3) and int(w[0, 1]) == (1 << 0) | (1 << 5)
    assert int(w[1, 0]) == 0 and int(w[1, 1]) == 0


@pytest.mark.parametrize("batch, n, rows", [(1, 64, 3), (5, 70, 9), (7, 300, 33), (64, 1024, 40)])
def test_xnor_dot_equals_the_plus_minus_one_matmul(batch, n, rows, monkeypatch):
    monkeypatch.setattr(xnor, "CHUNK_WORDS", 64)  # several output chunks even for small shapes
    a, w = _signs((batch, n), 0), _signs((rows, n), 1)
    got = xnor_dot(pack_signs(a), pack_signs(w), n)
    assert got.dtype == np.int32
    assert np.array_equal(got, (a @ w.T).to(torch.int64).numpy())


def test_xnor_linear_equals_the_float_binarized_layer_exactly():
    torch.manual_seed(0)
    lin = nn.Linear(200, 37)
    quantize_(lin, BinaryConfig(scale=True, per_channel=True))  # XNOR-Net scaling, with a bias
    xl = XnorLinear.from_linear(lin)
    x = torch.randn(11, 200)
    y = xl(x)
    assert torch.equal(y, reference_forward(lin, x))  # alpha * (sign(x) sign(W)^T) + b, bit for bit
    with torch.no_grad():
        float_layer = lin(torch.where(x >= 0, 1.0, -1.0))
    # the float layer sums +-alpha terms: equal up to float32 summation rounding only
    assert torch.allclose(y, float_layer, rtol=1e-5, atol=1e-5)
    assert xl(x[0]).shape == (37,) and torch.equal(xl(x.reshape(1, 11, 200))[0], y)
    assert xl.weight_bits.shape == (4, 37) and xl.weight_bits.dtype == torch.int64
    assert np.array_equal(xl.packed_weight(), pack_signs(lin.weight.detach()))


def test_xnor_linear_is_bit_exact_on_the_paper_bnn_layer():
    torch.manual_seed(1)
    lin = nn.Linear(1000, 64, bias=False)
    quantize_(lin, BinaryConfig(scale=False))  # alpha = 1, no bias: the BNN layer before its BN
    x = _signs((9, 1000), 2)
    with torch.no_grad():
        assert torch.equal(XnorLinear.from_linear(lin)(x), lin(x))


def test_to_xnor_on_a_trained_bnn_mlp_keeps_the_outputs_exactly():
    torch.manual_seed(0)
    model = build_model("mlp_bn", in_features=64, hidden=[128, 96], num_classes=10)
    quantize_(model, BnnConfig())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(128, 64), torch.randint(0, 10, (128,))
    for _ in range(3):  # a few steps so the weights and BN statistics are not the initial ones
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    xn = copy.deepcopy(model)
    new = to_xnor_(xn)
    assert sorted(new) == ["fc2", "fc3"]  # fc1's input is real (the pixels): it stays a float layer
    assert isinstance(xn.fc1, nn.Linear) and isinstance(xn.fc2, XnorLinear)
    with torch.no_grad():
        assert torch.equal(xn(x), model(x))


def test_named_layer_without_binary_input_is_converted_with_its_input_binarized():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 4))
    quantize_(net, BinaryConfig())
    x = torch.randn(3, 10)
    ref = reference_forward(net[0], x)
    to_xnor_(net, layers=["0"])
    assert torch.equal(net(x), ref)


def test_xnor_bad_inputs():
    with pytest.raises(ModelError, match="not binary"):
        XnorLinear.from_linear(nn.Linear(8, 2))  # a float layer
    with pytest.raises(ModelError, match="nn.Linear layers only"):
        XnorLinear.from_linear(nn.Conv2d(1, 2, 3))
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2))
    quantize_(conv, BinaryConfig())
    with pytest.raises(ConfigError) as ei:
        to_xnor_(conv, layers=["0"])
    assert ei.value.field == "layers[0]" and "Conv2d" in str(ei.value)
    with pytest.raises(ConfigError) as ei:
        to_xnor_(conv)  # no SignActivation feeds any layer
    assert ei.value.field == "layers"
    with pytest.raises(ConfigError) as ei:
        to_xnor_(conv, layers=["fc9"])
    assert ei.value.field == "layers[0]"
    assert isinstance(conv[2], nn.Linear)  # nothing was replaced
    lin = nn.Linear(8, 2)
    quantize_(lin, BinaryConfig())
    xl = XnorLinear.from_linear(lin)
    with pytest.raises(ModelError, match=r"\(\.\.\., 8\)"):
        xl(torch.randn(3, 9))
    with pytest.raises(ConfigError) as ei:
        XnorLinear(0, 3)
    assert ei.value.field == "in_features"
