"""Tied weights (an embedding tied to the output layer): counted once, compressed once, packed once, and
still tied after load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from netshrink import metrics
from netshrink._state import tie_groups
from netshrink.lowrank.svd import SvdConfig, svd_factorize
from netshrink.pack import load, pack, read_info
from netshrink.prune.magnitude import MagnitudeConfig, magnitude_prune
from netshrink.quantize.kmeans import KMeansConfig, kmeans_share

VOCAB, DIM = 50, 16


class TiedLM(nn.Module):
    """Embedding -> Linear -> output Linear whose weight IS the embedding's (one Parameter)."""

    def __init__(self, tie: bool = True):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.fc = nn.Linear(DIM, DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        if tie:
            self.lm_head.weight = self.emb.weight

    def forward(self, t):
        return self.lm_head(torch.relu(self.fc(self.emb(t))))


def _tokens():
    return torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(0))


def _storage_of(module: nn.Module) -> torch.Tensor:
    plist = getattr(module, "parametrizations", None)
    return plist["weight"].original if plist is not None else module.weight


def test_a_tie_is_counted_once():
    m = TiedLM()
    unique = VOCAB * DIM + DIM * DIM + DIM
    assert tie_groups(m) == [["emb.weight", "lm_head.weight"]]
    assert metrics.count_params(m) == unique  # counted twice this would be unique + VOCAB * DIM
    assert metrics.fp32_bytes(m) == 4 * unique
    assert metrics.count_nonzeros(m) == unique
    assert metrics.count_params(TiedLM(tie=False)) == unique + VOCAB * DIM


@pytest.mark.parametrize("pruned", [False, True])
def test_compressed_once_packed_once_and_still_tied_after_load(pruned, tmp_path):
    torch.manual_seed(0)
    m = TiedLM()
    if pruned:
        r = magnitude_prune(m, MagnitudeConfig(sparsity=0.5))
        rec = r.coverage.params["emb.weight"]
        assert rec.status == "compressed" and rec.aliases == ("lm_head.weight",)
        assert "lm_head.weight" not in r.coverage.params
        kmeans_share(m, KMeansConfig(bits=3))
        assert torch.equal(m.emb.weight, m.lm_head.weight)  # both layers compute with the one compressed weight
        assert _storage_of(m.emb) is _storage_of(m.lm_head)
    y = m(_tokens())
    path = tmp_path / "lm.nsk"
    stats = pack(m, path)
    info = read_info(path)
    assert [t.name for t in info.tensors if t.name.endswith("weight")] == ["emb.weight", "fc.weight"]  # once
    assert stats.ratio == pytest.approx(metrics.fp32_bytes(m) / stats.total_bytes, rel=1e-6)
    for target in (TiedLM(), TiedLM(tie=False)):  # a model built tied, and one that is not: tied by the file
        back = load(path, target, restore=pruned)
        assert torch.equal(back(_tokens()), y)
        assert _storage_of(back.emb) is _storage_of(back.lm_head)


def test_training_after_sharing_keeps_the_tie():
    torch.manual_seed(0)
    m = TiedLM()
    magnitude_prune(m, MagnitudeConfig(sparsity=0.5))
    kmeans_share(m, KMeansConfig(bits=2))
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    m(_tokens()).logsumexp(-1).sum().backward()
    opt.step()
    assert torch.equal(m.emb.weight, m.lm_head.weight)
    assert m.lm_head.weight.unique().numel() <= 5  # still 4 shared values and the pruned zeros


def test_replacing_a_tied_layer_is_refused_with_the_reason():
    m = TiedLM()
    y = m(_tokens())
    r = svd_factorize(m, SvdConfig(rank=4))
    assert isinstance(m.lm_head, nn.Linear) and m.lm_head.weight is m.emb.weight
    assert "tied to 'emb.weight'" in r.coverage.params["emb.weight"].detail
    assert r.coverage.params["fc.weight"].status == "compressed"
    assert m(_tokens()).shape == y.shape


def test_a_tie_is_compressed_as_one_or_not_at_all():
    m = TiedLM()
    r = magnitude_prune(m, MagnitudeConfig(sparsity=0.5, layers=["lm_head", "fc"]))
    rec = r.coverage.params["emb.weight"]
    assert rec.status == "skipped" and "tied to 'emb.weight'" in rec.detail
    assert not hasattr(m.lm_head, "parametrizations") and m.lm_head.weight is m.emb.weight
    assert float((m.fc.weight == 0).float().mean()) == 0.5
