"""nn.MultiheadAttention as plain layers: conversion equal to the original, handled by every per-layer
method, packed and loaded, and counted fully in MACs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from netshrink import metrics
from netshrink._attention import convert_attention_
from netshrink._state import effective_parameters
from netshrink.errors import ModelError
from netshrink.lowrank.svd import SvdConfig, svd_factorize
from netshrink.matrices.methods import HashedConfig, structure_layers
from netshrink.pack import load, pack
from netshrink.prune.magnitude import MagnitudeConfig, magnitude_prune
from netshrink.prune.structured.attention import HeadAttention
from netshrink.quantize.binary import BinaryConfig, binary_quantize
from netshrink.quantize.kmeans import KMeansConfig, kmeans_share


class Wrap(nn.Module):
    def __init__(self, attn: nn.MultiheadAttention):
        super().__init__()
        self.attn = attn

    def forward(self, q, k, v, **kw):
        return self.attn(q, k, v, **kw)


class TinyTransformer(nn.Module):
    """A pre-LN transformer classifier on nn.MultiheadAttention (token ids in, logits out)."""

    def __init__(self, vocab=30, dim=16, heads=4, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens, pad=None):
        x = self.emb(tokens)
        h = self.norm1(x)
        x = x + self.attn(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        x = x + self.fc2(torch.relu(self.fc1(self.norm2(x))))
        return self.head(x.mean(1))


def _tokens(n=4, t=6, vocab=30, seed=0):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [None, 12])
def test_converted_attention_equals_the_original(batch_first, kdim):
    torch.manual_seed(0)
    m = Wrap(nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim, vdim=kdim)).eval()
    c = copy.deepcopy(m)
    assert convert_attention_(c) == ["attn"] and isinstance(c.attn, HeadAttention)
    n, lq, lk, e = 2, 5, 7, kdim or 16
    q = torch.randn(n, lq, 16) if batch_first else torch.randn(lq, n, 16)
    k = torch.randn(n, lk, e) if batch_first else torch.randn(lk, n, e)
    pad = torch.zeros(n, lk, dtype=torch.bool)
    pad[0, -2:] = True
    causal = torch.ones(lq, lk, dtype=torch.bool).triu(1)
    per_head = torch.randn(n * 4, lq, lk)
    cases = [{}, {"key_padding_mask": pad}, {"attn_mask": causal}, {"attn_mask": per_head, "need_weights": False},
             {"average_attn_weights": False, "key_padding_mask": pad}]
    with torch.no_grad():
        for kw in cases:
            (a, wa), (b, wb) = m(q, k, k, **kw), c(q, k, k, **kw)
            assert torch.allclose(a, b, atol=1e-6), kw
            assert (wa is None) == (wb is None) and (wa is None or torch.allclose(wa, wb, atol=1e-6)), kw


def test_converted_attention_trains_like_the_original():
    torch.manual_seed(0)
    m = Wrap(nn.MultiheadAttention(8, 2, batch_first=True)).train()
    c = copy.deepcopy(m)
    convert_attention_(c)
    x = torch.randn(3, 4, 8)
    m(x, x, x)[0].pow(2).sum().backward()
    c(x, x, x)[0].pow(2).sum().backward()
    g_in = m.attn.in_proj_weight.grad
    g = torch.cat([c.attn.q_proj.weight.grad, c.attn.k_proj.weight.grad, c.attn.v_proj.weight.grad])
    assert torch.allclose(g_in, g, atol=1e-5)
    assert torch.allclose(m.attn.out_proj.weight.grad, c.attn.out_proj.weight.grad, atol=1e-5)


def test_unconvertible_attention_is_refused_and_the_model_left_as_it_was():
    m = nn.Sequential()
    m.add_module("a", Wrap(nn.MultiheadAttention(8, 2, add_bias_kv=True)))
    with pytest.raises(ModelError, match="'a.attn'.*add_bias_kv"):
        convert_attention_(m)
    assert isinstance(m.a.attn, nn.MultiheadAttention)


def test_converted_model_packs_and_loads_equal(tmp_path):
    torch.manual_seed(0)
    m = TinyTransformer().eval()
    tokens = _tokens()
    y = m(tokens)
    convert_attention_(m)
    assert torch.allclose(m(tokens), y, atol=1e-6)
    pack(m, tmp_path / "m.nsk")
    back = load(tmp_path / "m.nsk", TinyTransformer()).eval()
    assert isinstance(back.attn, HeadAttention)
    assert torch.equal(back(tokens), m(tokens))


def test_magnitude_on_mha_delivers_the_sparsity_asked_and_says_it_converted():
    torch.manual_seed(0)
    m = TinyTransformer().eval()
    r = magnitude_prune(m, MagnitudeConfig(sparsity=0.5))
    assert any("converted nn.MultiheadAttention 'attn'" in n for n in r.coverage.notes)
    weights = {n: t for n, t in effective_parameters(m).items() if n.endswith("weight") and t.dim() == 2}
    zeros = sum(int((t == 0).sum()) for t in weights.values())
    total = sum(t.numel() for t in weights.values())
    # every matrix weight (embedding, q/k/v/out, MLP, head): 50% asked, 50% delivered
    assert abs(zeros / total - 0.5) < 1e-3
    assert {"attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight", "attn.out_proj.weight"} <= set(r.coverage.compressed)
    assert not r.coverage.skipped


@pytest.mark.parametrize("config, fn", [
    (SvdConfig(rank=2), svd_factorize),
    (HashedConfig(ratio=0.5), structure_layers),
    (KMeansConfig(bits=3), kmeans_share),
    (BinaryConfig(), binary_quantize),
])
def test_every_per_layer_method_leaves_an_mha_model_running(config, fn, tmp_path):
    torch.manual_seed(0)
    m = TinyTransformer().eval()
    tokens = _tokens()
    r = fn(m, config)
    assert r.coverage is not None and any("converted" in n for n in r.coverage.notes)
    assert "attn.out_proj.weight" in r.coverage.compressed
    y = m(tokens)  # the next forward runs (out_proj was read by nn.MultiheadAttention itself before)
    assert y.shape == (4, 3) and torch.isfinite(y).all()
    pack(m, tmp_path / "m.nsk")
    assert torch.allclose(load(tmp_path / "m.nsk", TinyTransformer()).eval()(tokens), y, atol=1e-5)


def test_macs_count_projections_and_attention_matmuls():
    torch.manual_seed(0)
    m = TinyTransformer().eval()
    tokens = _tokens(n=2, t=6)
    n, t, e, h = 2, 6, 16, 4
    expected = n * t * (4 * e * e + 2 * e * 2 * e) + 2 * n * h * t * t * (e // h) + n * e * 3
    assert metrics.macs(m, tokens).dense == expected
    c = copy.deepcopy(m)
    convert_attention_(c)
    rep = metrics.macs(c, tokens)
    assert rep.dense == expected
    assert rep["attn.attention"].dense == 2 * n * h * t * t * (e // h)
    # a pruned projection lowers the effective count
    magnitude_prune(c, MagnitudeConfig(sparsity=0.5, layers=["attn.q_proj"]))
    assert metrics.macs(c, tokens)["attn.q_proj"].effective == n * t * e * e // 2


class HandWrittenAttention(nn.Module):
    """q/k/v Linear layers and softmax(QKᵀ/√d)V written with torch.matmul (as BERT-style code does)."""

    def __init__(self, dim=16):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        a = torch.softmax(torch.matmul(self.q(x), self.k(x).transpose(-2, -1)) / 4.0, -1)
        return a @ self.v(x) + torch.nn.functional.scaled_dot_product_attention(x, x, x)


def test_macs_count_hand_written_attention_matmuls():
    m = HandWrittenAttention()
    x = torch.randn(2, 5, 16)
    rep = metrics.macs(m, x)
    assert rep["(functional matmul)"].dense == 2 * (2 * 5 * 16 * 5)  # QKᵀ and AV
    assert rep["(functional attention)"].dense == 2 * 5 * 5 * (16 + 16)
    assert rep.dense == 3 * 2 * 5 * 16 * 16 + 2 * 2 * 5 * 16 * 5 + 2 * 5 * 5 * 32


def test_converted_attention_without_bias_and_unbatched():
    torch.manual_seed(0)
    m = Wrap(nn.MultiheadAttention(8, 2, bias=False)).eval()
    c = copy.deepcopy(m)
    convert_attention_(c)
    assert c.attn.q_proj.bias is None and c.attn.out_proj.bias is None
    q, k = torch.randn(3, 8), torch.randn(4, 8)  # unbatched (L, E), (S, E)
    with torch.no_grad():
        (a, wa), (b, wb) = m(q, k, k), c(q, k, k)
    assert a.shape == b.shape == (3, 8) and torch.allclose(a, b, atol=1e-6) and torch.allclose(wa, wb, atol=1e-6)
