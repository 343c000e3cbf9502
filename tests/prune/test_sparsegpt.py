"""SparseGPT: exact sparsity and N:M patterns, OBS error compensation beats magnitude, joint 4-bit, bad input."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lm_helpers import calib, perplexity, tiny_lm  # noqa: E402

from netshrink.errors import ConfigError  # noqa: E402
from netshrink.prune import SparseGptConfig, prune_  # noqa: E402
from netshrink.prune._mask import get_mask  # noqa: E402
from netshrink.prune.sparsegpt import sparsegpt_prune  # noqa: E402


def _layer(seed=0, rows=48, cols=64, n=512):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.3 + torch.randn(cols, generator=g)
    w = torch.randn(rows, cols, generator=g)
    return w, x, (x.double().t() @ x.double()) / n


def _out_err(w, w2, x):
    return float(((x @ (w - w2).t()) ** 2).mean())


def test_unstructured_half_beats_magnitude_on_the_layer_output():
    w, x, h = _layer()
    new, keep, gq = sparsegpt_prune(w, h, 0.5, block_size=16)
    assert gq is None and float((new == 0).float().mean()) == pytest.approx(0.5, abs=1 / w.numel())
    assert torch.equal(new == 0, ~keep)
    mag = torch.where(w.abs() > w.abs().flatten().kthvalue(w.numel() // 2).values, w, torch.zeros_like(w))
    assert _out_err(w, new, x) < 0.8 * _out_err(w, mag, x)


def test_two_four_pattern():
    w, x, h = _layer(1)
    new, keep, _ = sparsegpt_prune(w, h, n=2, m=4, block_size=32)
    assert (keep.reshape(48, 16, 4).sum(-1) == 2).all()
    assert torch.isfinite(new).all()


def test_joint_four_bit_codes_reproduce_the_weights():
    w, x, h = _layer(2)
    new, keep, gq = sparsegpt_prune(w, h, 0.5, bits=4, group_size=16)
    assert gq.q.max() <= 15 and torch.equal(gq.dequantize(), new)
    assert (new[~keep] == 0).all() and float(keep.float().mean()) == pytest.approx(0.5, abs=0.01)
    assert all(len(torch.unique(new[r, :16])) <= 16 for r in range(4))


def test_dead_input_column_and_singular_hessian_give_no_nan():
    w, x, _ = _layer(3)
    x[:, 5] = 0
    h = (x.double().t() @ x.double()) / x.shape[0]
    new, keep, _ = sparsegpt_prune(w, h, 0.5)
    assert torch.isfinite(new).all() and not keep[:, 5].any()
    new, _, _ = sparsegpt_prune(w, torch.zeros(64, 64, dtype=torch.float64), 0.5)
    assert torch.isfinite(new).all()


def test_bad_configs_are_one_line_errors():
    with pytest.raises(ConfigError, match="n < m"):
        SparseGptConfig(n=4, m=4)
    with pytest.raises(ConfigError, match="both n and m"):
        SparseGptConfig(n=2)
    with pytest.raises(ConfigError, match="from 2 to 8"):
        SparseGptConfig(bits=9)
    w, _, h = _layer(4, cols=64)
    with pytest.raises(ConfigError, match="does not divide"):
        sparsegpt_prune(w, h, n=2, m=3)


def test_whole_model_one_shot():
    m = tiny_lm()
    dense = perplexity(m)
    res = prune_(m, SparseGptConfig(sparsity=0.5, samples=16, batch_size=8, progress=False), data=calib(16))
    assert len(res.layers) == 14 and all(abs(v["sparsity"] - 0.5) < 0.01 for v in res.layers.values())
    assert get_mask(m.layers[1].mlp.down_proj) is not None
    assert "embed" not in res.layers and "lm_head" in res.skipped
    assert dense <= perplexity(m) < 1.5 * dense
