"""EVBMF rank selection and MACs-budget ranks for Tucker-2."""

import pytest
import torch

from netshrink.errors import ConfigError, ModelError
from netshrink.lowrank import TuckerConfig, factorize_
from netshrink.lowrank.rank_select import evbmf, tucker2_macs, tucker2_macs_ranks, tucker2_vbmf_ranks
from netshrink.models import build_model


@pytest.mark.parametrize("shape,rank,noise", [((60, 80), 5, 0.1), ((40, 200), 8, 0.3), ((100, 100), 20, 0.05)])
def test_evbmf_recovers_the_rank_and_noise_of_a_noisy_low_rank_matrix(shape, rank, noise):
    g = torch.Generator().manual_seed(0)
    L, M = shape
    y = torch.randn(L, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, M, generator=g, dtype=torch.float64)
    y += noise * torch.randn(L, M, generator=g, dtype=torch.float64)
    res = evbmf(torch.linalg.svdvals(y), shape)
    assert res.rank == rank
    assert res.sigma2 == pytest.approx(noise**2, rel=0.2)
    assert evbmf(torch.linalg.svdvals(y.T), (M, L)).rank == rank  # orientation does not matter


def test_evbmf_finds_nothing_in_pure_noise_and_rejects_empty_input():
    g = torch.Generator().manual_seed(1)
    assert evbmf(torch.linalg.svdvals(torch.randn(30, 50, generator=g, dtype=torch.float64)), (30, 50)).rank == 0
    with pytest.raises(ModelError, match="non-empty"):
        evbmf(torch.empty(0), (0, 5))


def test_tucker_vbmf_ranks_follow_the_kernels_channel_ranks():
    g = torch.Generator().manual_seed(2)
    core = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64)
    u_out = torch.randn(32, 6, generator=g, dtype=torch.float64)
    u_in = torch.randn(24, 4, generator=g, dtype=torch.float64)
    kernel = torch.einsum("na,abhw,cb->nchw", u_out, core, u_in)
    kernel += 0.01 * torch.randn(kernel.shape, generator=g, dtype=torch.float64)
    assert tucker2_vbmf_ranks(kernel) == (6, 4)
    conv = torch.nn.Conv2d(24, 32, 3)
    with torch.no_grad():
        conv.weight.copy_(kernel)
    model = torch.nn.Sequential(conv)
    result = factorize_(model, TuckerConfig(rank="vbmf"))
    assert result.layers["0"].ranks == (6, 4) and result.layers["0"].rel_error < 0.05


def test_macs_budget_ranks_meet_the_budget_and_are_the_largest():
    shape = (50, 20, 5, 5)
    for ratio in (0.1, 0.3, 0.6):
        r_out, r_in = tucker2_macs_ranks(shape, ratio)
        dense = 50 * 20 * 25
        assert tucker2_macs(50, 20, 5, 5, r_out, r_in) <= ratio * dense
        bigger = (min(50, r_out + 3), min(20, r_in + 1))
        assert tucker2_macs(50, 20, 5, 5, *bigger) > ratio * dense
    model = build_model("lenet5")
    result = factorize_(model, TuckerConfig(macs_ratio=0.3, layers=["conv2"]))
    assert result.layers["conv2"].ranks == tucker2_macs_ranks((50, 20, 5, 5), 0.3)


def test_bad_tucker_ranks_and_budgets():
    model = build_model("lenet5")
    with pytest.raises(ConfigError, match="macs_ratio.*cannot be met.*'conv1'"):
        factorize_(model, TuckerConfig(macs_ratio=0.001, layers=["conv1"]))
    with pytest.raises(ConfigError, match="macs_ratio"):
        TuckerConfig(macs_ratio=0.0)
    with pytest.raises(ConfigError, match="rank"):
        TuckerConfig(rank=0)
    with pytest.raises(ConfigError, match="rank"):
        TuckerConfig(rank="svd")
    with pytest.raises(ConfigError, match="exactly one"):
        TuckerConfig(rank="vbmf", energy=0.9)
    with pytest.raises(ConfigError, match="above the full rank.*'conv1'"):
        factorize_(model, TuckerConfig(rank=[21, 1], layers=["conv1"]))
    with pytest.raises(ConfigError, match=r"'fc1'.*not a Conv2d"):
        factorize_(model, TuckerConfig(rank="vbmf", layers=["fc1"]))
