"""SVD of Linear layers: error bounds, rank choice, the LowRankLinear module, Denil's fixed-basis variants."""

import itertools
import math

import pytest
import torch
from torch import nn

from netshrink.lowrank import (
    LowRankLinear,
    SvdConfig,
    energy_rank,
    factorize_,
    fixed_basis_factors,
    ratio_rank,
    svd_factors,
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a.double() - b.double()) / torch.linalg.vector_norm(a.double()))


def _known_spectrum(s: list[float], rows: int = 8, cols: int = 6, seed: int = 0) -> torch.Tensor:
    """A ``rows x cols`` matrix with singular values ``s`` (random orthonormal bases)."""
    g = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(rows, len(s), generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(cols, len(s), generator=g, dtype=torch.float64))
    return q1 @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ q2.T


def test_full_rank_svd_reconstructs_exactly():
    w = torch.randn(12, 20, generator=torch.Generator().manual_seed(1))
    f = svd_factors(w, 12)
    assert f.u.shape == (12, 12) and f.v.shape == (12, 20) and f.u.dtype == torch.float32
    assert _rel(w, f.reconstruct()) < 1e-6
    assert f.svd_error == 0.0


def test_error_decreases_with_rank_and_equals_the_dropped_energy():
    w = torch.randn(15, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    s = torch.linalg.svdvals(w)
    errors = []
    for r in range(1, 11):
        f = svd_factors(w, r)
        err = _rel(w, f.reconstruct())
        expected = math.sqrt(float((s[r:] ** 2).sum())) / float(torch.linalg.vector_norm(w))
        assert err == pytest.approx(expected, abs=1e-10)
        assert f.svd_error == pytest.approx(expected, abs=1e-10)
        errors.append(err)
    assert all(a > b for a, b in itertools.pairwise(errors))
    assert errors[-1] < 1e-12


def test_energy_rank_on_a_known_spectrum():
    # s^2 = 16, 4, 1, 1 (sum 22): cumulative 0.727, 0.909, 0.955, 1
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])
    assert [energy_rank(s, e) for e in (0.5, 0.7, 0.72, 0.73, 0.9, 0.95, 0.96, 1.0)] == [1, 1, 1, 2, 2, 3, 4, 4]
    w = _known_spectrum([4.0, 2.0, 1.0, 1.0])
    assert svd_factors(w, energy=0.9).rank == 2
    assert svd_factors(w, energy=0.95).rank == 3
    model = nn.Sequential(nn.Linear(6, 8))
    with torch.no_grad():
        model[0].weight.copy_(w)
    result = factorize_(model, SvdConfig(energy=0.95))
    assert result.layers["0"].ranks == (3,)
    assert model[0].rank == 3
    assert result.layers["0"].rel_error == pytest.approx(math.sqrt(1 / 22), rel=1e-5)


def test_param_ratio_rank():
    assert ratio_rank(100 * 50, 150, 0.3, 50) == 10  # 10 * 150 = 1500 = 0.3 * 5000
    model = nn.Sequential(nn.Linear(100, 50))
    factorize_(model, SvdConfig(param_ratio=0.3))
    assert model[0].rank == 10
    assert model[0].first.weight.numel() + model[0].second.weight.numel() <= 0.3 * 5000


def test_lowrank_linear_output_is_the_low_rank_product():
    torch.manual_seed(3)
    lin = nn.Linear(20, 16)
    f = svd_factors(lin.weight, 5)
    m = LowRankLinear.from_linear(lin, f)
    x = torch.randn(7, 20)
    want = x @ (f.u @ f.v).T + lin.bias
    assert torch.allclose(m(x), want, atol=1e-5)
    assert torch.allclose(m.weight_product(), f.u @ f.v, atol=1e-6)
    assert m.netshrink_args() == {"in_features": 20, "out_features": 16, "rank": 5, "bias": True, "fixed": "none"}


def test_factorize_replaces_layers_and_keeps_the_rest():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4, bias=False))
    x = torch.randn(5, 10)
    before = model(x)
    result = factorize_(model, SvdConfig(rank=2, layer_rank={"0": 8}))
    assert isinstance(model[0], LowRankLinear) and isinstance(model[2], LowRankLinear)
    assert model[0].rank == 8 and model[2].rank == 2 and model[2].second.bias is None
    assert result.layers["0"].rel_error < 1e-6
    assert result.params_before == 10 * 8 + 8 + 8 * 4
    assert result.params_after == 8 * 10 + 8 * 8 + 8 + 2 * 8 + 4 * 2
    assert [e["path"] for e in model.netshrink_edits] == ["0", "2"]
    # layer 0 is exact: only layer 2's truncation changes the output
    assert not torch.allclose(model(x), before, atol=1e-3)


@pytest.mark.parametrize("train", ["fixed_identity", "fixed_random"])
def test_denil_fixed_factor_stays_fixed_after_an_optimizer_step(train):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(16, 12))
    factorize_(model, SvdConfig(rank=4, train=train, seed=7))
    layer = model[0]
    names = {n for n, _ in model.named_parameters()}
    assert "0.first.weight" not in names and "0.second.weight" in names
    assert "0.first.weight" in dict(model.named_buffers()) and "0.first.weight" in model.state_dict()
    fixed, trained = layer.first.weight.clone(), layer.second.weight.clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(8, 16)).pow(2).sum().backward()
    opt.step()
    assert torch.equal(layer.first.weight, fixed)
    assert not torch.equal(layer.second.weight, trained)


def test_fixed_identity_picks_the_largest_columns_and_solves_exactly():
    w = torch.randn(6, 9, generator=torch.Generator().manual_seed(6))
    w[:, 2] *= 10
    w[:, 7] *= 5
    f = fixed_basis_factors(w, 2, "identity")
    assert torch.equal(f.v.nonzero()[:, 1], torch.tensor([2, 7]))
    assert torch.equal(f.v.sum(1), torch.ones(2))
    assert torch.equal(f.u, w[:, [2, 7]])


def test_fixed_random_is_seeded_and_least_squares():
    w = torch.randn(10, 14, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    f = fixed_basis_factors(w, 5, "random", seed=3)
    assert torch.equal(f.v, fixed_basis_factors(w, 5, "random", seed=3).v)
    assert not torch.equal(f.v, fixed_basis_factors(w, 5, "random", seed=4).v)
    # normal equations of min ||W - U V||: (W - U V) V^T = 0
    assert torch.allclose((w - f.u @ f.v) @ f.v.T, torch.zeros(10, 5, dtype=torch.float64), atol=1e-10)
    # never better than the SVD of the same rank (Eckart-Young)
    assert _rel(w, f.reconstruct()) >= svd_factors(w, 5).svd_error - 1e-12
