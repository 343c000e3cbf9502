"""Layer selection in one place: Conv1D (GPT-2, transposed weight), ConvTranspose, Embedding, parents that
read a child's weight, per-parameter coverage and strict."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from netshrink import metrics
from netshrink._layers import (CONV, CONV1D_GPT2, CONV_TRANSPOSE, EMBEDDING, LINEAR, layer_kind, parent_reads,
                               select_layers, weight_layers)
from netshrink.errors import ConfigError, ModelError
from netshrink.lowrank.conv_methods import TuckerConfig, conv_decompose
from netshrink.lowrank.svd import LowRankLinear, SvdConfig, svd_factorize
from netshrink.pack import load, pack
from netshrink.prune.magnitude import MagnitudeConfig, magnitude_prune
from netshrink.quantize.binary import BinaryConfig, binary_quantize
from netshrink.quantize.kmeans import KMeansConfig, kmeans_share
from netshrink.run_report import coverage_sections


class Conv1D(nn.Module):
    """The semantics of transformers' GPT-2 Conv1D: ``y = x @ W + b`` with ``W`` of shape (nx, nf)."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)


class GPT2Style(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(40, 12)
        self.c_fc, self.c_proj = Conv1D(24, 12), Conv1D(12, 24)
        self.out = nn.Linear(12, 5)

    def forward(self, t):
        x = self.wte(t)
        return self.out(x + self.c_proj(F.gelu(self.c_fc(x))))


class Decoder(nn.Module):
    """A model with ConvTranspose (an upsampling decoder)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2)
        self.out = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        return self.out(torch.relu(self.up(torch.relu(self.conv(x)))))


class ReadsChild(nn.Module):
    """A parent that reads its child's weight itself (as nn.MultiheadAttention does with out_proj)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return F.linear(x, self.proj.weight, self.proj.bias)


def _tokens(seed=0):
    return torch.randint(0, 40, (3, 5), generator=torch.Generator().manual_seed(seed))


def test_layer_kinds_and_the_default_selection_unchanged():
    m = nn.ModuleDict({"l": nn.Linear(2, 3), "c": nn.Conv1d(2, 3, 1), "t": nn.ConvTranspose3d(2, 3, 1),
                       "e": nn.Embedding(4, 2), "g": Conv1D(3, 2), "n": nn.LayerNorm(2)})
    assert {n: layer_kind(x) for n, x in m.items()} == {"l": LINEAR, "c": CONV, "t": CONV_TRANSPOSE, "e": EMBEDDING,
                                                        "g": CONV1D_GPT2, "n": None}
    assert list(weight_layers(m)) == ["l", "c"]  # other helpers' callers keep Linear/ConvNd
    assert list(select_layers(m, None, kinds=(EMBEDDING, CONV1D_GPT2))) == ["e", "g"]
    with pytest.raises(ConfigError, match="'t' is a ConvTranspose3d"):
        select_layers(m, ["t"])


def test_magnitude_and_kmeans_cover_conv1d_embedding_and_say_what_they_did(tmp_path):
    torch.manual_seed(0)
    m = GPT2Style().eval()
    r = magnitude_prune(m, MagnitudeConfig(sparsity=0.5))
    for n in ("wte.weight", "c_fc.weight", "c_proj.weight", "out.weight"):
        assert r.coverage.params[n].status == "compressed", n
        assert abs(float((m.get_submodule(n[:-7]).weight == 0).float().mean()) - 0.5) < 0.02
    assert r.coverage.params["c_fc.bias"].status == "kept" and not r.coverage.skipped
    s = kmeans_share(m, KMeansConfig(bits=2))
    assert set(s.clusters) == {"wte", "c_fc", "c_proj", "out"}
    assert m.c_fc.weight.unique().numel() <= 5  # 4 centroids and the pruned zeros
    y = m(_tokens())
    pack(m, tmp_path / "g.nsk")
    assert torch.equal(load(tmp_path / "g.nsk", GPT2Style()).eval()(_tokens()), y)


def test_svd_factorizes_conv1d_through_its_transposed_weight():
    torch.manual_seed(0)
    m = GPT2Style().eval()
    t = _tokens()
    y = m(t)
    r = svd_factorize(m, SvdConfig(rank=12, layers=["c_*"]))  # full rank: the same function
    assert isinstance(m.c_fc, LowRankLinear) and (m.c_fc.in_features, m.c_fc.out_features) == (12, 24)
    assert r.coverage.params["c_fc.weight"].status == "compressed"
    assert r.coverage.params["wte.weight"].status == "excluded"
    assert torch.allclose(m(t), y, atol=1e-5)
    wte = svd_factorize(m, SvdConfig(rank=2)).coverage.params["wte.weight"]
    assert wte.status == "kept" and wte.detail == "it is a Embedding, not a Linear (or GPT-2 Conv1D)"


def test_convtranspose_is_pruned_shared_and_counted_in_macs():
    torch.manual_seed(0)
    m = Decoder().eval()
    x = torch.randn(2, 2, 5, 5)
    rep = metrics.macs(m, x)
    # ConvTranspose: every weight once per input position (2 x 5 x 5)
    assert rep["up"].dense == 2 * 25 * 6 * 4 * 2 * 2
    magnitude_prune(m, MagnitudeConfig(sparsity=0.75))
    assert float((m.up.weight == 0).float().mean()) == pytest.approx(0.75, abs=0.02)
    assert metrics.macs(m, x)["up"].effective == 2 * 25 * int((m.up.weight != 0).sum())
    kmeans_share(m, KMeansConfig(bits=2))
    assert m.up.weight.unique().numel() <= 5
    t = conv_decompose(m, TuckerConfig(rank=1))  # Tucker is for Conv2d: the ConvTranspose is reported, not replaced
    assert isinstance(m.up, nn.ConvTranspose2d) and t.coverage.params["up.weight"].status == "kept"


def test_per_channel_binary_skips_axis1_kinds_with_the_reason_and_strict_refuses():
    m = GPT2Style()
    r = binary_quantize(m, BinaryConfig())
    assert r.coverage.params["c_fc.weight"].status == "skipped" and "axis 1" in r.coverage.params["c_fc.weight"].detail
    assert r.coverage.params["out.weight"].status == "compressed"
    fresh = GPT2Style()
    with pytest.raises(ModelError, match="strict: parameter 'c_fc.weight'.*axis 1"):
        binary_quantize(fresh, BinaryConfig(strict=True))
    assert not hasattr(fresh.out, "parametrizations")  # refused before anything changed
    ok = binary_quantize(GPT2Style(), BinaryConfig(per_channel=False, strict=True))
    assert not ok.coverage.skipped


def test_a_layer_its_parent_reads_is_not_replaced():
    m = nn.Sequential(nn.Linear(8, 8), ReadsChild(), nn.Linear(8, 4))
    assert "1.proj" in parent_reads(m)
    assert "0.out_proj" in parent_reads(nn.Sequential(nn.MultiheadAttention(8, 2)))
    x = torch.randn(3, 8)
    r = svd_factorize(m, SvdConfig(rank=2))
    assert isinstance(m[1].proj, nn.Linear) and isinstance(m[0], LowRankLinear)
    rec = r.coverage.params["1.proj.weight"]
    assert rec.status == "skipped" and "reads proj.weight itself" in rec.detail
    assert m(x).shape == (3, 4)
    with pytest.raises(ConfigError, match="'1.proj'.*reads proj.weight"):
        svd_factorize(nn.Sequential(nn.Linear(8, 8), ReadsChild()), SvdConfig(rank=2, layers=["1.proj"]))
    with pytest.raises(ModelError, match="strict: parameter '1.proj.weight'"):
        svd_factorize(nn.Sequential(nn.Linear(8, 8), ReadsChild()), SvdConfig(rank=2, strict=True))


def test_unknown_weight_layer_is_reported_and_strict_names_it():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return x @ self.weight

    m = nn.Sequential(nn.Linear(4, 4), Odd())
    r = magnitude_prune(m, MagnitudeConfig(sparsity=0.5))
    assert r.coverage.params["1.weight"].status == "skipped" and "Odd" in r.coverage.params["1.weight"].detail
    with pytest.raises(ModelError, match="'1.weight'.*Odd"):
        magnitude_prune(nn.Sequential(nn.Linear(4, 4), Odd()), MagnitudeConfig(sparsity=0.5, strict=True))


def test_run_report_shows_the_coverage():
    m = GPT2Style()
    magnitude_prune(m, MagnitudeConfig(sparsity=0.5))
    binary_quantize(m, BinaryConfig())
    text = coverage_sections(types.SimpleNamespace(model=m))
    assert "1. magnitude:" in text and "2. binary:" in text
    assert "| c_fc.weight |" in text and "skipped" in text and "axis 1" in text


def test_real_gpt2_conv1d_is_recognised_and_pruned():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D as HFConv1D

    torch.manual_seed(0)
    layer = HFConv1D(6, 4)
    assert layer_kind(layer) == CONV1D_GPT2
    m = nn.Sequential(layer, nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(3, 4)
    r = magnitude_prune(m, MagnitudeConfig(sparsity=0.5))
    assert r.coverage.params["0.weight"].status == "compressed" and float((m[0].weight == 0).float().mean()) == 0.5
    y = m(x)
    svd_factorize(m, SvdConfig(rank=4, layers=["0"]))
    assert torch.allclose(m(x), y, atol=1e-5)  # rank 4 = full rank of the pruned 4x6 weight


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x)


class ReadsGrandchild(nn.Module):
    """An ancestor that reads a deeper layer's weight (as transformers' ViTModel reads
    ``embeddings.patch_embeddings.projection.weight.dtype``)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Module()
        self.emb.inner = _Inner()
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.emb.inner(x.to(self.emb.inner.proj.weight.dtype)))


def test_a_layer_an_ancestor_reads_is_not_replaced():
    m = ReadsGrandchild()
    assert "emb.inner.proj" in parent_reads(m) and "ancestor" in parent_reads(m)["emb.inner.proj"]
    r = svd_factorize(m, SvdConfig(rank=2))
    assert isinstance(m.emb.inner.proj, nn.Linear) and isinstance(m.head, LowRankLinear)
    assert r.coverage.params["emb.inner.proj.weight"].status == "skipped"
    assert m(torch.randn(3, 8)).shape == (3, 4)  # still runs: the read layer was left in place
