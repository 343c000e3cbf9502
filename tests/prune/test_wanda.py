"""Wanda: |W| x ||X_j|| scores compared per output row, unstructured and N:M."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lm_helpers import calib, perplexity, tiny_lm  # noqa: E402

from netshrink.errors import ConfigError  # noqa: E402
from netshrink.prune import WandaConfig, prune_  # noqa: E402
from netshrink.prune.wanda import wanda_mask, wanda_scores  # noqa: E402


def test_scores_and_per_row_mask_known_answer():
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5], [4.0, 1.0, -1.0, 2.0]])
    norm = torch.tensor([1.0, 0.1, 1.0, 10.0])
    s = wanda_scores(w, norm)
    torch.testing.assert_close(s, torch.tensor([[1.0, 0.2, 3.0, 5.0], [4.0, 0.1, 1.0, 20.0]]))
    keep = wanda_mask(s, 0.5)
    assert keep.tolist() == [[False, False, True, True], [True, False, False, True]]
    assert wanda_mask(s, n=1, m=2).tolist() == [[True, False, False, True], [True, False, False, True]]


def test_bad_configs():
    with pytest.raises(ConfigError, match="n < m"):
        WandaConfig(n=3, m=2)
    with pytest.raises(ConfigError, match="sparsity"):
        WandaConfig(sparsity=1.0)
    with pytest.raises(ConfigError, match="does not divide"):
        wanda_mask(torch.rand(2, 6), n=2, m=4)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_whole_model(nm):
    m = tiny_lm()
    dense = perplexity(m)
    kw = {} if nm is None else {"n": nm[0], "m": nm[1]}
    res = prune_(m, WandaConfig(sparsity=0.5, samples=16, progress=False, **kw), data=calib(16))
    w = m.layers[0].mlp.gate_proj.weight
    assert (w == 0).sum(1).tolist() == [32] * w.shape[0]  # exactly half of every row
    if nm:
        assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all()
    assert len(res.layers) == 14 and perplexity(m) < 2 * dense
