"""BatchNorm folding: the pure formula against BatchNorm itself, pairs found in any forward, packed models
that load with the folded structure."""

import copy

import pytest
import torch
from torch import nn

from netshrink.models import build_model
from netshrink.pack import load, pack
from netshrink.quantize import Int8Config, quantize_
from netshrink.quantize.fold import FoldedBatchNorm, fold_batchnorm_, fold_bn_weights
from netshrink.task import Inputs


def _randomize(bn: nn.Module, g: torch.Generator) -> None:
    bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
    bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.2)
    if bn.affine:
        bn.weight.data.copy_(torch.randn(bn.num_features, generator=g))
        bn.bias.data.copy_(torch.randn(bn.num_features, generator=g))


@pytest.mark.parametrize("bias, affine", [(True, True), (False, True), (True, False)])
def test_fold_formula_equals_conv_then_batchnorm(bias, affine):
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, bias=bias)
    bn = nn.BatchNorm2d(5, affine=affine, eps=1e-3).eval()
    with torch.no_grad():
        _randomize(bn, g)
        x = torch.randn(4, 3, 9, 9, generator=g)
        w, b = fold_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                               bn.weight if affine else None, bn.bias if affine else None)
        want = bn(conv(x))
        got = nn.functional.conv2d(x, w, b)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    # the formula itself: W' = W gamma / sqrt(var + eps)
    gamma = bn.weight.detach() if affine else torch.ones(5)
    assert torch.allclose(w[2], conv.weight[2].detach() * gamma[2] / torch.sqrt(bn.running_var[2] + 1e-3), atol=1e-6)


def test_linear_then_batchnorm1d_and_in_functional_forward():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.bn1, self.fc2 = nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8), nn.Linear(8, 2)

        def forward(self, x):  # functional ops between modules: no Sequential to read the order from
            return self.fc2(torch.nn.functional.silu(self.bn1(self.fc1(x * 2.0))))

    g = torch.Generator().manual_seed(1)
    net = Net().eval()
    with torch.no_grad():
        _randomize(net.bn1, g)
    x = torch.randn(16, 6, generator=g)
    want = net(x)
    res = fold_batchnorm_(net, Inputs((x,)).call)
    assert res.folded == {"bn1": "fc1"} and not res.kept and isinstance(net.bn1, FoldedBatchNorm)
    assert net.fc1.bias is not None and torch.allclose(net(x), want, atol=1e-5)
    assert res.max_output_change < 1e-5


def test_bn_after_a_layer_called_twice_or_without_stats_stays():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)
            self.bn = nn.BatchNorm2d(2)
            self.bn_nostats = nn.BatchNorm2d(2, track_running_stats=False)
            self.conv2 = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            return self.bn_nostats(self.conv2(self.bn(self.conv(self.conv(x)))))

    net = Net().eval()
    res = fold_batchnorm_(net, Inputs((torch.randn(2, 2, 4, 4),)).call)
    assert not res.folded
    assert "called 2 times" in res.kept["bn"] and "running statistics" in res.kept["bn_nostats"]


def test_folded_quantized_zoo_model_packs_and_loads_exactly(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet_small", widths=[4, 8, 8]).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                _randomize(m, g)
    x = torch.rand(32, 1, 12, 12, generator=g)
    ref = model(x)
    q = copy.deepcopy(model)
    res = quantize_(q, Int8Config(), data=x)
    assert len(res.bn_folded) == 9 and res.bn_folded["stem.bn"] == "stem.conv"
    assert (q(x) - ref).abs().max() <= 0.05 * ref.abs().max()
    path = tmp_path / "q.nsk"
    pack(q, path)
    back = load(path, restore=True).eval()  # rebuilt from the zoo: the edits make the convs biased, the BNs identities
    assert isinstance(back.stem.bn, FoldedBatchNorm) and back.stem.conv.bias is not None
    assert torch.equal(back(x), q(x))
