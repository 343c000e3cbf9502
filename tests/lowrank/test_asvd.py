"""Activation-aware low rank: whitened SVD minimises the layer's output error; 20% fewer weights."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lm_helpers import calib, perplexity, tiny_lm  # noqa: E402

from netshrink.errors import ConfigError  # noqa: E402
from netshrink.lowrank import AsvdConfig, factorize_  # noqa: E402
from netshrink.lowrank.asvd import rank_for, whitened_factors  # noqa: E402
from netshrink.lowrank.svd import LowRankLinear, svd_factors  # noqa: E402


def test_whitening_beats_plain_svd_on_the_output():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(800, 48, generator=g) @ torch.randn(48, 48, generator=g)
    x[:, :3] *= 10
    w = torch.randn(40, 48, generator=g)
    h = (x.double().t() @ x.double()) / 800

    def err(f):
        return float(((x @ (w - f.u @ f.v).t()) ** 2).sum())

    plain = err(svd_factors(w, 12))
    white = whitened_factors(w, 12, hessian=h, damp=1e-6)
    assert err(white) < 0.7 * plain
    # truncation-aware: the output error equals the discarded singular values of W L (squared)
    assert err(white) == pytest.approx(float((white.singular_values[12:] ** 2).sum()) * 800, rel=1e-3)
    assert err(whitened_factors(w, 12, abs_mean=x.abs().mean(0))) < plain


def test_rank_gives_the_parameter_ratio():
    r = rank_for(256, 768, 0.8)
    assert r * (256 + 768) <= 0.8 * 256 * 768 < (r + 1) * (256 + 768)
    with pytest.raises(ConfigError, match="ratio"):
        AsvdConfig(ratio=1.0)


def test_whole_model():
    m = tiny_lm()
    dense = perplexity(m)
    n0 = sum(p.numel() for p in m.layers.parameters())
    res = factorize_(m, AsvdConfig(ratio=0.8, samples=16, progress=False), data=calib(16))
    assert isinstance(m.layers[1].mlp.up_proj, LowRankLinear) and len(res.layers) == 14
    n1 = sum(p.numel() for p in m.layers.parameters())
    assert n1 < 0.82 * n0
    assert perplexity(m) < 1.5 * dense
