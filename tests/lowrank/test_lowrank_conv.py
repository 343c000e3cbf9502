"""Tucker-2, CP and spatially separable conv decompositions: shapes, exactness, module wiring."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netshrink.lowrank import (
    CPConfig,
    CPConv,
    SeparableConfig,
    SeparableConv,
    Tucker2Conv,
    TuckerConfig,
    cp_factors,
    factorize_,
    separable_factors,
    tucker2_energy_ranks,
    tucker2_factors,
)

# (kernel, stride, padding, dilation, padding_mode)
GEOMETRIES = [
    (3, 1, 0, 1, "zeros"),
    (3, 2, 1, 1, "zeros"),
    ((3, 5), (2, 1), (1, 2), 1, "zeros"),
    (3, 1, "same", 2, "zeros"),
    (3, (1, 2), 1, (2, 1), "reflect"),
    ((5, 3), 1, "valid", 1, "circular"),
]


def _conv(kernel, stride, padding, dilation, mode, seed=0, bias=True) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(4, 6, kernel, stride=stride, padding=padding, dilation=dilation, padding_mode=mode, bias=bias)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(a))


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize(
    "config", [TuckerConfig(rank=[3, 2]), CPConfig(rank=3), SeparableConfig(rank=2)], ids=["tucker", "cp", "separable"]
)
def test_output_shape_matches_and_module_applies_its_kernel(geometry, config):
    conv = _conv(*geometry)
    model = nn.Sequential(conv)
    x = torch.randn(2, 4, 11, 13)
    want = conv(x)
    result = factorize_(model, config)
    new = model[0]
    assert isinstance(new, (Tucker2Conv, CPConv, SeparableConv))
    got = new(x)
    assert got.shape == want.shape
    # the module computes exactly the conv with its reconstructed kernel (the wiring is right)
    k = _module_kernel(new)
    if conv.padding_mode != "zeros":
        ref = F.conv2d(F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), k, conv.bias,
                       conv.stride, 0, conv.dilation)
    else:
        ref = F.conv2d(x, k, conv.bias, conv.stride, conv.padding, conv.dilation)
    assert torch.allclose(got, ref, atol=1e-5)
    assert result.layers["0"].rel_error == pytest.approx(_rel(conv.weight.detach(), k), rel=1e-4)


def _module_kernel(m: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(m, Tucker2Conv):
            return m.kernel()
        if isinstance(m, CPConv):
            return torch.einsum("nr,rc,ri,rj->ncij", m.last.weight[:, :, 0, 0], m.first.weight[:, :, 0, 0],
                                m.vertical.weight[:, 0, :, 0], m.horizontal.weight[:, 0, 0, :])
        return torch.einsum("nrj,rci->ncij", m.horizontal.weight[:, :, 0, :], m.vertical.weight[:, :, :, 0])


@pytest.mark.parametrize("geometry", GEOMETRIES[:4])
def test_full_rank_tucker_reproduces_the_conv_output(geometry):
    conv = _conv(*geometry, seed=1)
    x = torch.randn(2, 4, 12, 12)
    want = conv(x)
    model = nn.Sequential(conv)
    result = factorize_(model, TuckerConfig(rank=[6, 4]))
    assert result.layers["0"].rel_error < 1e-6
    assert _rel(want, model(x)) < 1e-4


def test_full_rank_separable_is_exact_and_error_falls_with_rank():
    conv = _conv(3, 1, 1, 1, "zeros", seed=2)
    k = conv.weight.detach().double()
    full = min(4 * 3, 6 * 3)
    errors = [_rel(k, separable_factors(k, r).reconstruct()) for r in range(1, full + 1)]
    assert errors[-1] < 1e-12
    assert all(a > b for a, b in itertools.pairwise(errors))
    x = torch.randn(1, 4, 9, 9)
    model = nn.Sequential(conv)
    want = conv(x)
    factorize_(model, SeparableConfig(energy=1.0))
    assert model[0].rank == full
    assert _rel(want, model(x)) < 1e-5


def test_tucker_energy_ranks_follow_the_mode_unfoldings():
    g = torch.Generator().manual_seed(3)
    # a kernel of exact multilinear rank (2, 3): every unfolding's energy sits in that many values
    core = torch.randn(2, 3, 3, 3, generator=g, dtype=torch.float64)
    u_out, _ = torch.linalg.qr(torch.randn(6, 2, generator=g, dtype=torch.float64))
    u_in, _ = torch.linalg.qr(torch.randn(5, 3, generator=g, dtype=torch.float64))
    k = torch.einsum("abhw,na,cb->nchw", core, u_out, u_in)
    assert tucker2_energy_ranks(k, 0.999999) == (2, 3)
    f = tucker2_factors(k, (2, 3))
    assert _rel(k, f.reconstruct()) < 1e-10


def test_cp_recovers_an_exact_low_rank_kernel_and_is_seeded():
    g = torch.Generator().manual_seed(4)
    factors = [torch.randn(d, 2, generator=g, dtype=torch.float64) for d in (5, 4, 3, 3)]
    k = torch.einsum("nr,cr,ir,jr->ncij", *factors)
    f = cp_factors(k, 2, seed=0, n_iter_max=500)
    assert _rel(k, f.reconstruct()) < 1e-4
    assert f.out_factor.shape == (5, 2) and f.vertical.shape == (3, 2)
    a, b = cp_factors(k, 3, seed=1, n_iter_max=20), cp_factors(k, 3, seed=1, n_iter_max=20)
    assert torch.equal(a.reconstruct(), b.reconstruct())


def test_decomposition_keeps_device_dtype_and_bias_free_convs():
    conv = _conv(3, 1, 1, 1, "zeros", seed=5, bias=False).double()
    model = nn.Sequential(conv)
    factorize_(model, TuckerConfig(rank=2))
    assert model[0].last.bias is None and model[0].core.weight.dtype == torch.float64
    assert model[0].netshrink_args()["rank"] == [2, 2] and model[0].netshrink_args()["bias"] is False
