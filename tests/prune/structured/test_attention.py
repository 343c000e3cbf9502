"""Head-wise pruning of attention (issue 3): nn.MultiheadAttention and the grouped-query block.

The pruned model must compute what its masked twin (zeroed heads) computes, within 1e-5, and what an
independent head-masked reference computes; shapes and head bookkeeping shrink; what stays
unsupported is left unpruned with a message (strict mode raises).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from _structured_helpers import n_params, twins
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from netshrink.errors import ConfigError, ModelError
from netshrink.models import build_model
from netshrink.pack.nsk import load, pack
from netshrink.prune import prune_
from netshrink.prune.structured import (
    ChannelConfig,
    DependencyGraph,
    l1_scores,
    plan_removal,
    remove_channels,
    taylor_scores,
    zero_channels,
)
from netshrink.prune.structured.attention import GroupedQueryAttention, HeadAttention, sliced_attention


def gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial biases everywhere (torch initialises MHA's to zero), so a wrong slice shows."""
    g = gen(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


class SelfAttention(nn.Module):
    """inp -> MultiheadAttention(16, 4 heads) -> out, batch first or not."""

    def __init__(self, batch_first: bool = True, need_weights: bool = False, mask3d: bool = False, **mha):
        super().__init__()
        self.batch_first, self.need_weights, self.mask3d = batch_first, need_weights, mask3d
        self.inp = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first, **mha)
        self.out = nn.Linear(16, 3)

    def forward(self, x):  # x: (N, L, 8)
        h = self.inp(x) if self.batch_first else self.inp(x).transpose(0, 1)
        if self.mask3d:
            mask = x.new_zeros(x.shape[0] * 4, x.shape[1], x.shape[1])
            a, _ = self.attn(h, h, h, attn_mask=mask)
        else:
            a, w = self.attn(h, h, h)
            if self.need_weights:
                return self.out(a).mean(-2) + w.sum()
        return self.out(a if self.batch_first else a.transpose(0, 1)).mean(1)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_pruned_head_wise_equals_its_masked_twin(batch_first):
    model = randomize(SelfAttention(batch_first))
    x = torch.randn(3, 5, 8, generator=gen())
    graph, zeroed, pruned, removed, diff = twins(model, x, ratio=0.5)
    assert diff <= 1e-5
    assert [g.kind for g in graph.groups].count("heads") == 1
    attn = pruned.attn
    assert type(attn) is HeadAttention and attn.num_heads == 2 and attn.head_dim == 4 and attn.batch_first == batch_first
    assert attn.q_proj.weight.shape == (8, 8) and attn.out_proj.weight.shape == (8, 8)  # 8 of 16 inputs and outputs kept
    assert pruned.inp.out_features == 8 and pruned.out.in_features == 8
    assert pruned(x).shape == model(x).shape == (3, 3)


def head_masked_reference(mha: nn.MultiheadAttention, x: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Batch-first self-attention computed from ``mha``'s parameters by hand, the heads not in ``keep``
    multiplied by zero before the output projection."""
    e, h = mha.embed_dim, mha.num_heads
    d = e // h
    q, k, v = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1)
    n, t = x.shape[:2]
    q, k, v = (z.reshape(n, t, h, d).transpose(1, 2) for z in (q, k, v))
    att = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, -1) @ v  # (n, h, t, d)
    mask = torch.zeros(h)
    mask[keep] = 1
    att = att * mask.view(1, h, 1, 1)
    return mha.out_proj(att.transpose(1, 2).reshape(n, t, e))


def test_pruned_heads_match_an_independent_head_masked_reference():
    torch.manual_seed(0)
    mha = randomize(nn.MultiheadAttention(24, 6, batch_first=True)).eval()
    x = torch.randn(2, 7, 24, generator=gen())

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = copy.deepcopy(mha)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0] + x  # the residual pins the features: heads only

    w = Wrap().eval()
    result = prune_(w, ChannelConfig(ratio=0.5, input_shape=[7, 24]))
    assert result.channels == {"attn[heads]": (6, 3)} and w.attn.num_heads == 3
    q_rows = mha.in_proj_weight[:24]  # which heads were kept: match the sliced query rows
    keep = [hd for hd in range(6) if any(torch.equal(w.attn.q_proj.weight[4 * i:4 * i + 4], q_rows[4 * hd:4 * hd + 4]) for i in range(3))]
    assert len(keep) == 3
    with torch.no_grad():
        ref = head_masked_reference(mha, x, keep) + x
        assert (w(x) - ref).abs().max() <= 1e-5
        # the kept heads are those of the largest L1 norm of their q/k/v rows and out_proj columns
        l1 = [float(sum(mha.in_proj_weight[j * 24 + 4 * hd: j * 24 + 4 * hd + 4].abs().sum() for j in range(3))
                    + sum(mha.in_proj_bias[j * 24 + 4 * hd: j * 24 + 4 * hd + 4].abs().sum() for j in range(3))
                    + mha.out_proj.weight[:, 4 * hd:4 * hd + 4].abs().sum()) for hd in range(6)]
        assert sorted(keep) == sorted(sorted(range(6), key=lambda i: -l1[i])[:3])


class CrossAttention(nn.Module):
    """Queries from one stream, keys and values from another of other widths (kdim, vdim != embed_dim)."""

    def __init__(self):
        super().__init__()
        self.qin, self.kin, self.vin = nn.Linear(5, 12), nn.Linear(5, 6), nn.Linear(5, 10)
        self.attn = nn.MultiheadAttention(12, 3, kdim=6, vdim=10)  # sequence first
        self.out = nn.Linear(12, 2)

    def forward(self, x):  # x: (L, N, 5)
        a, _ = self.attn(self.qin(x), torch.relu(self.kin(x)), torch.relu(self.vin(x)), need_weights=False)
        return self.out(a).sum(0)


def test_cross_attention_with_kdim_and_vdim():
    model = randomize(CrossAttention())
    x = torch.randn(6, 2, 5, generator=gen())
    _, _, pruned, _, diff = twins(model, x, ratio=0.5)
    assert diff <= 1e-5
    a = pruned.attn
    assert (a.num_heads, a.q_proj.in_features, a.k_proj.in_features, a.v_proj.in_features) == (2, 6, 3, 5)
    assert pruned.kin.out_features == 3 and pruned.vin.out_features == 5


class GQANet(nn.Module):
    def __init__(self, heads: int = 8, kv_heads: int = 4):
        super().__init__()
        self.inp = nn.Linear(6, 32)
        self.attn = GroupedQueryAttention(32, heads, kv_heads, head_dim=4, out_features=20)
        self.out = nn.Linear(20, 3)

    def forward(self, x):
        return self.out(F.gelu(self.attn(torch.tanh(self.inp(x))))).mean(1)


@pytest.mark.parametrize("mode, heads, kv_heads", [("kv", 4, 2), ("query", 4, 4)])
def test_grouped_query_attention_keeps_the_groups_consistent(mode, heads, kv_heads):
    model = randomize(GQANet())
    x = torch.randn(3, 5, 6, generator=gen())
    graph, _, pruned, removed, diff = twins(model, x, ratio=0.5, gqa_heads=mode)
    assert diff <= 1e-5
    head_group = [g for g in graph.groups if g.kind == "heads"]
    assert [g.size for g in head_group] == [4 if mode == "kv" else 2]  # 4 kv groups, or 2 query heads per group
    a = pruned.attn
    assert type(a) is GroupedQueryAttention and (a.num_heads, a.num_kv_heads, a.head_dim) == (heads, kv_heads, 4)
    assert a.k_proj.out_features == 4 * kv_heads and a.out_proj.in_features == 4 * heads
    assert a.out_proj.out_features == 10 and a.q_proj.in_features == 16


def test_gqa_removing_a_kv_head_removes_its_query_heads():
    model = GQANet().eval()
    with torch.no_grad():  # kv head 1 (query heads 2, 3) is by far the weakest
        model.attn.k_proj.weight[4:8] *= 1e-3
        model.attn.v_proj.weight[4:8] *= 1e-3
        model.attn.q_proj.weight[8:16] *= 1e-3
        model.attn.out_proj.weight[:, 8:16] *= 1e-3
    ref = copy.deepcopy(model)
    prune_(model, ChannelConfig(ratio=0.25, layer_ratio={"inp": 0.0, "attn": 0.25}, input_shape=[5, 6]))
    a = model.attn
    assert (a.num_heads, a.num_kv_heads) == (6, 3)
    keep_q = [r for h in (0, 1, 4, 5, 6, 7) for r in range(4 * h, 4 * h + 4)]
    assert torch.equal(a.q_proj.weight, ref.attn.q_proj.weight[keep_q])
    assert torch.equal(a.k_proj.weight, ref.attn.k_proj.weight[[0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15]])


def test_taylor_scores_of_heads_match_a_hand_computed_gradient():
    torch.manual_seed(0)
    model = randomize(SelfAttention()).eval()
    x, y = torch.randn(4, 5, 8, generator=gen()), torch.randint(0, 3, (4,), generator=gen())
    graph = DependencyGraph.build(model, (x[:1],))
    scores = taylor_scores(model, graph, [(x, y)])
    mha = model.attn
    gi, gb, go = torch.autograd.grad(F.cross_entropy(model(x), y), [mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight])
    use = graph.layers["attn"]
    for h in range(4):
        rows = [j * 16 + 4 * h + i for j in range(3) for i in range(4)]
        s = (gi * mha.in_proj_weight)[rows].sum() + (gb * mha.in_proj_bias)[rows].sum() + (go * mha.out_proj.weight)[:, 4 * h:4 * h + 4].sum()
        assert scores[graph.find(use.heads[h])] == pytest.approx(float(s.detach()) ** 2, rel=1e-4, abs=1e-12)
    prune_(model, ChannelConfig(ratio=0.5, criterion="taylor", batches=1, batch_size=4), data=TensorDataset(x, y))
    assert model.attn.num_heads == 2


def test_removing_every_head_is_a_clear_error():
    model = SelfAttention().eval()
    graph = DependencyGraph.build(model, (torch.zeros(1, 5, 8),))
    every_head = {graph.find(a) for a in graph.layers["attn"].heads}
    with pytest.raises(ModelError, match="every head of 'attn'"):
        remove_channels(copy.deepcopy(model), graph, every_head)
    with pytest.raises(ModelError, match="every head of 'attn'"):
        zero_channels(copy.deepcopy(model), graph, every_head)
    with pytest.raises(ConfigError, match="head_ratio"):
        ChannelConfig(head_ratio=1.0)
    with pytest.raises(ConfigError, match="gqa_heads"):
        ChannelConfig.from_dict({"gqa_heads": "value"})
    # a ratio just below one keeps the best head, as channel groups keep their best channel
    removed = plan_removal(graph, l1_scores(model, graph), ChannelConfig(ratio=0.0, head_ratio=0.99))
    assert len(removed & every_head) == 3


def test_head_ratio_and_layer_ratio_name_the_attention_layer():
    model = SelfAttention().eval()
    res = prune_(model, ChannelConfig(ratio=0.0, head_ratio=0.75, input_shape=[5, 8]))
    assert res.channels == {"attn[heads]": (4, 1)} and model.attn.q_proj.in_features == 16
    model = SelfAttention().eval()
    prune_(model, ChannelConfig(ratio=0.5, layer_ratio={"attn": 0.25}, input_shape=[5, 8]))
    assert model.attn.num_heads == 3 and model.attn.out_proj.out_features == 12 and model.inp.out_features == 8
    with pytest.raises(ConfigError, match="layer_ratio.atn"):
        ChannelConfig(layer_ratio={"atn": 0.5}).check_model(model)


@pytest.mark.parametrize("kw, reason", [({"need_weights": True}, "attention weights are used"),
                                        ({"mask3d": True}, "per-head")])
def test_used_weights_or_a_per_head_mask_leave_the_heads_unpruned(kw, reason, caplog):
    model = SelfAttention(**kw).eval()
    x = torch.randn(2, 5, 8, generator=gen())
    with caplog.at_level(logging.WARNING):
        graph, _, pruned, _, diff = twins(model, x)
    assert any(reason in m for m in graph.messages) and reason in caplog.text
    assert not [g for g in graph.groups if g.kind == "heads"] and diff <= 1e-5
    assert pruned.attn.num_heads == 4  # the features around it may still shrink


def test_add_bias_kv_is_left_unpruned_and_strict_mode_raises(caplog):
    model = SelfAttention(add_bias_kv=True).eval()
    with caplog.at_level(logging.WARNING):
        graph = DependencyGraph.build(model, (torch.zeros(1, 5, 8),))
    assert not [g for g in graph.groups if "attn" in g.producers or "inp" in g.producers]
    assert "add_bias_kv" in caplog.text and "stay unpruned" in caplog.text
    with pytest.raises(ModelError, match=r"add_bias_kv.*'attn'"):
        DependencyGraph.build(model, (torch.zeros(1, 5, 8),), strict=True)


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        h = self.inp(x)
        h = torch.relu(self.attn(h, h, h, need_weights=False)[0])
        return self.out(self.attn(h, h, h, need_weights=False)[0]).mean(1)


def test_attention_called_twice_and_pruned_again():
    model = randomize(Shared())
    x = torch.randn(2, 6, 4, generator=gen())
    _, _, pruned, _, diff = twins(model, x)
    assert diff <= 1e-5 and pruned.attn.num_heads == 2 and pruned.attn.out_proj.out_features == 8
    _, _, again, _, diff2 = twins(pruned, x)  # a HeadAttention is a leaf of the trace, pruned the same way
    assert diff2 <= 1e-5 and again.attn.num_heads == 1 and type(again.attn) is HeadAttention


def test_head_attention_computes_what_multihead_attention_computes():
    torch.manual_seed(0)
    for batch_first in (True, False):
        mha = randomize(nn.MultiheadAttention(12, 3, batch_first=batch_first)).eval()
        full = list(range(12))
        ha = sliced_attention(mha, "attn", full, full, full, [0, 1, 2], [0, 1, 2], full).eval()
        q = torch.randn(2, 5, 12, generator=gen()) if batch_first else torch.randn(5, 2, 12, generator=gen())
        kv = torch.randn(2, 4, 12, generator=gen()) if batch_first else torch.randn(4, 2, 12, generator=gen())
        pad = torch.tensor([[False, False, True, False], [False, False, False, False]])
        bool_mask = torch.rand(5, 4, generator=gen()) > 0.7
        bool_mask[:, 0] = False
        cases = [{}, {"key_padding_mask": pad}, {"attn_mask": bool_mask}, {"attn_mask": torch.randn(5, 4, generator=gen())},
                 {"attn_mask": torch.randn(6, 5, 4, generator=gen())}, {"average_attn_weights": False}]
        with torch.no_grad():
            for kw in cases:
                (a, wa), (b, wb) = mha(q, kv, kv, **kw), ha(q, kv, kv, **kw)
                assert (a - b).abs().max() <= 1e-5 and (wa - wb).abs().max() <= 1e-5, kw
            a, _ = mha(q[:, 0] if batch_first else q[:, 0], kv[:, 0], kv[:, 0], need_weights=False)
            b, w = ha(q[:, 0], kv[:, 0], kv[:, 0], need_weights=False)
            assert w is None and (a - b).abs().max() <= 1e-5  # unbatched


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_pruned_vit_tiny_packs_and_loads(kv_heads, tmp_path):
    torch.manual_seed(0)
    model = randomize(build_model("vit_tiny", dim=32, heads=4, kv_heads=kv_heads, mlp=64)).eval()
    x = torch.randn(3, 1, 28, 28, generator=gen())
    before = n_params(model)
    res = prune_(model, ChannelConfig(ratio=0.5, input_shape=[1, 28, 28]))
    assert res.channels["blocks.0.attn[heads]"] == (4, 2)  # GQA: one of the two key/value groups removed
    assert n_params(model) < 0.7 * before
    pack(model, tmp_path / "m.nsk")
    loaded = load(tmp_path / "m.nsk").eval()
    assert torch.equal(model(x), loaded(x))
    kind = HeadAttention if kv_heads is None else GroupedQueryAttention
    assert type(loaded.blocks[1].attn) is kind and loaded.blocks[1].attn.num_heads == 2
    assert kv_heads is None or loaded.blocks[1].attn.num_kv_heads == 1


def test_pruned_attention_exports_to_onnx(tmp_path):
    from netshrink.export import export_onnx, ort_predict, ort_session

    torch.manual_seed(0)
    model = randomize(build_model("vit_tiny", dim=32, heads=4, kv_heads=2, mlp=64)).eval()
    prune_(model, ChannelConfig(ratio=0.5, gqa_heads="query", input_shape=[1, 28, 28]))
    assert (model.blocks[0].attn.num_heads, model.blocks[0].attn.num_kv_heads) == (2, 2)
    export_onnx(model, tmp_path / "m.onnx", (1, 28, 28))
    x = torch.randn(3, 1, 28, 28, generator=gen())
    with torch.no_grad():
        assert abs(ort_predict(ort_session(tmp_path / "m.onnx"), x.numpy()) - model(x).numpy()).max() <= 1e-5
