"""Head-wise structured pruning of attention: the modules a pruned attention layer becomes, and the
per-head views, scores, zeroing and slicing that the dependency graph (:mod:`.graph`) uses.

An attention layer with ``H`` query heads and ``H_kv`` key/value heads of size ``d`` computes, per head
``h`` (query head ``h`` reads key/value head ``⌊h / g⌋``, ``g = H / H_kv``; ``g = 1`` is ordinary
multi-head attention, Vaswani et al. 2017; ``g > 1`` grouped-query attention, Ainslie et al., "GQA:
Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints", EMNLP 2023)::

    A_h = softmax(Q_h K_⌊h/g⌋ᵀ / √d + mask),   y = Σ_h A_h V_⌊h/g⌋ W_o[:, h]ᵀ + b_o

with ``Q_h = x W_q[h]ᵀ + b_q[h]`` (``d`` rows of the query projection), likewise ``K``, ``V``. Removing
head ``h`` removes its ``d`` rows of ``W_q``/``b_q``, its ``d`` columns of ``W_o``, and — when its
key/value head goes with it — the ``d`` rows of ``W_k``, ``W_v``, ``b_k``, ``b_v``; ``d`` and so the
scale ``1/√d`` are unchanged (Michel, Levy & Neubig, "Are Sixteen Heads Really Better than One?",
NeurIPS 2019; Voita et al., ACL 2019). The masked twin zeroes the same entries: a zeroed value (or
output column) makes the head contribute exactly nothing, so the zeroed and the sliced model agree.

``nn.MultiheadAttention`` requires ``embed_dim == num_heads * head_dim``, so a pruned one becomes a
:class:`HeadAttention` (same call, same outputs, any number of heads, input and output widths); the
grouped-query block is :class:`GroupedQueryAttention`. Both are registered module types, so the
resized model packs to .nsk and loads back. Both hold plain ``nn.Linear`` projections ``q_proj``,
``k_proj``, ``v_proj``, ``out_proj``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..._modules import register_module
from ...errors import ModelError


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelError(f"{name} must be a positive integer, got {value!r}")
    return value


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
           key_padding_mask: torch.Tensor | None = None, is_causal: bool = False, dropout: float = 0.0,
           training: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention over heads: ``q`` (N, H, L, d), ``k``/``v`` (N, H_kv, S, d) with
    ``H`` a multiple of ``H_kv`` (query head ``h`` reads key/value head ``h // (H / H_kv)``).
    ``attn_mask``: (L, S) or (N, H, L, S), boolean (True = not allowed) or added to the scores;
    ``key_padding_mask``: (N, S), likewise. Returns (output (N, H, L, d), weights (N, H, L, S))."""
    g = q.shape[1] // k.shape[1]
    if g > 1:
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).triu(1)
    for mask in (attn_mask, None if key_padding_mask is None else key_padding_mask[:, None, None, :]):
        if mask is None:
            continue
        scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    w = torch.softmax(scores, -1)
    if training and dropout > 0:
        w = F.dropout(w, dropout)
    return w @ v, w


@register_module("head_attention")
class HeadAttention(nn.Module):
    """Multi-head attention with ``num_heads`` heads of size ``head_dim``, query/key/value inputs of
    ``q_in``/``k_in``/``v_in`` features and ``out_features`` outputs: what a head-pruned (or resized)
    ``nn.MultiheadAttention`` becomes. Called like it — ``(query, key, value, key_padding_mask,
    need_weights, attn_mask, average_attn_weights, is_causal)`` — and returns ``(output, weights)``
    (weights averaged over the remaining heads, or per head); ``batch_first`` and unbatched inputs as
    in torch. The scale is ``1/√head_dim``, as in the module it replaces."""

    def __init__(self, q_in: int, num_heads: int, head_dim: int, out_features: int, k_in: int | None = None,
                 v_in: int | None = None, bias: bool = True, batch_first: bool = False, dropout: float = 0.0):
        super().__init__()
        self.num_heads, self.head_dim = _positive("num_heads", num_heads), _positive("head_dim", head_dim)
        self.batch_first, self.dropout = bool(batch_first), float(dropout)
        inner = num_heads * head_dim
        q_in, out_features = _positive("q_in", q_in), _positive("out_features", out_features)
        k_in, v_in = _positive("k_in", k_in or q_in), _positive("v_in", v_in or q_in)
        self.q_proj, self.k_proj = nn.Linear(q_in, inner, bias), nn.Linear(k_in, inner, bias)
        self.v_proj, self.out_proj = nn.Linear(v_in, inner, bias), nn.Linear(inner, out_features, bias)

    def netshrink_args(self) -> dict[str, Any]:
        return {"q_in": self.q_proj.in_features, "num_heads": self.num_heads, "head_dim": self.head_dim,
                "out_features": self.out_proj.out_features, "k_in": self.k_proj.in_features,
                "v_in": self.v_proj.in_features, "bias": self.q_proj.bias is not None,
                "batch_first": self.batch_first, "dropout": self.dropout}

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, tq, ts, h, d = query.shape[0], query.shape[1], key.shape[1], self.num_heads, self.head_dim
        q = self.q_proj(query).reshape(n, tq, h, d).transpose(1, 2)
        k = self.k_proj(key).reshape(n, ts, h, d).transpose(1, 2)
        v = self.v_proj(value).reshape(n, ts, h, d).transpose(1, 2)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.reshape(n, h, tq, ts)
        y, w = attend(q, k, v, attn_mask, key_padding_mask, is_causal, self.dropout, self.training)
        out = self.out_proj(y.transpose(1, 2).reshape(n, tq, h * d))
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        w = w.mean(1) if average_attn_weights else w
        return out, w.squeeze(0) if unbatched else w


@register_module("grouped_query_attention")
class GroupedQueryAttention(nn.Module):
    """A grouped-query self-attention block (Ainslie et al. 2023): ``num_heads`` query heads share
    ``num_kv_heads`` key/value heads (query head ``h`` reads key/value head ``h // (num_heads /
    num_kv_heads)``), heads of ``head_dim`` (default ``in_features // num_heads``), computed with
    matmuls and a softmax (:func:`attend`); ``causal`` masks future positions. Input and output
    (N, L, features)."""

    def __init__(self, in_features: int, num_heads: int, num_kv_heads: int, head_dim: int | None = None,
                 out_features: int | None = None, bias: bool = True, causal: bool = False):
        super().__init__()
        in_features, num_heads = _positive("in_features", in_features), _positive("num_heads", num_heads)
        self.num_heads, self.num_kv_heads = num_heads, _positive("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ModelError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if head_dim is None and in_features % num_heads:
            raise ModelError(f"in_features ({in_features}) is not a multiple of num_heads ({num_heads}): give head_dim")
        self.head_dim = _positive("head_dim", head_dim if head_dim is not None else in_features // num_heads)
        self.causal = bool(causal)
        d = self.head_dim
        self.q_proj = nn.Linear(in_features, num_heads * d, bias)
        self.k_proj = nn.Linear(in_features, num_kv_heads * d, bias)
        self.v_proj = nn.Linear(in_features, num_kv_heads * d, bias)
        self.out_proj = nn.Linear(num_heads * d, _positive("out_features", out_features or in_features), bias)

    def netshrink_args(self) -> dict[str, Any]:
        return {"in_features": self.q_proj.in_features, "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "out_features": self.out_proj.out_features,
                "bias": self.q_proj.bias is not None, "causal": self.causal}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape[0], x.shape[1], self.head_dim
        q = self.q_proj(x).reshape(n, t, self.num_heads, d).transpose(1, 2)
        k = self.k_proj(x).reshape(n, t, self.num_kv_heads, d).transpose(1, 2)
        v = self.v_proj(x).reshape(n, t, self.num_kv_heads, d).transpose(1, 2)
        y, _ = attend(q, k, v, is_causal=self.causal)
        return self.out_proj(y.transpose(1, 2).reshape(n, t, self.num_heads * d))


#: the attention modules the dependency graph prunes head-wise (leaves of the torch.fx trace)
ATTENTION_TYPES = (nn.MultiheadAttention, HeadAttention, GroupedQueryAttention)


@dataclass
class AttnShape:
    """Head bookkeeping of an attention module: query heads, key/value heads, head size, widths."""

    heads: int
    kv_heads: int
    head_dim: int
    q_in: int
    k_in: int
    v_in: int
    out: int


def attn_shape(m: nn.Module) -> AttnShape:
    if isinstance(m, nn.MultiheadAttention):
        return AttnShape(m.num_heads, m.num_heads, m.head_dim, m.embed_dim, m.kdim, m.vdim, m.out_proj.out_features)
    kv = m.num_kv_heads if isinstance(m, GroupedQueryAttention) else m.num_heads
    return AttnShape(m.num_heads, kv, m.head_dim, m.q_proj.in_features, m.k_proj.in_features, m.v_proj.in_features,
                     m.out_proj.out_features)


def unsupported(m: nn.Module) -> str | None:
    """Why ``m``'s heads and channels cannot be pruned (None when they can)."""
    if isinstance(m, nn.MultiheadAttention) and (m.bias_k is not None or m.add_zero_attn):
        return "nn.MultiheadAttention with add_bias_kv or add_zero_attn"
    return None


def parts(m: nn.Module, tensors: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    """``wq, bq, wk, bk, wv, bv, wo, bo`` of ``m`` taken from ``tensors`` (keyed like
    ``m.named_parameters()``, e.g. the parameters themselves, their magnitudes or ``g * w``); the
    query/key/value pieces of a packed ``in_proj_weight`` are views, so writing to them writes through."""
    if isinstance(m, nn.MultiheadAttention):
        e = m.embed_dim
        if m._qkv_same_embed_dim:
            w = tensors["in_proj_weight"]
            wq, wk, wv = w[:e], w[e:2 * e], w[2 * e:]
        else:
            wq, wk, wv = tensors["q_proj_weight"], tensors["k_proj_weight"], tensors["v_proj_weight"]
        b = tensors.get("in_proj_bias")
        bq, bk, bv = (None, None, None) if b is None else (b[:e], b[e:2 * e], b[2 * e:])
        return {"wq": wq, "bq": bq, "wk": wk, "bk": bk, "wv": wv, "bv": bv, "wo": tensors["out_proj.weight"],
                "bo": tensors.get("out_proj.bias")}
    out = {}
    for short, name in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
        out["w" + short], out["b" + short] = tensors[f"{name}.weight"], tensors.get(f"{name}.bias")
    return out


def head_sums(m: nn.Module, tensors: dict[str, torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query head, per key/value head and per output feature: the sum of ``tensors`` over the
    entries removed with it (query head: its rows of W_q, b_q and columns of W_o; key/value head: its
    rows of W_k, b_k, W_v, b_v; output feature: its row of W_o and b_o)."""
    s, p = parts(m, tensors), attn_shape(m)
    d = p.head_dim

    def rows(w: torch.Tensor | None, n: int) -> torch.Tensor:
        return 0 if w is None else w.reshape(n, d, -1).sum((1, 2))

    q = rows(s["wq"], p.heads) + rows(s["bq"], p.heads) + s["wo"].reshape(p.out, p.heads, d).sum((0, 2))
    kv = rows(s["wk"], p.kv_heads) + rows(s["bk"], p.kv_heads) + rows(s["wv"], p.kv_heads) + rows(s["bv"], p.kv_heads)
    out = s["wo"].sum(1) + (0 if s["bo"] is None else s["bo"])
    return q, kv, out


def _rows_of(heads: list[int], d: int) -> list[int]:
    return [h * d + i for h in heads for i in range(d)]


def check_heads(name: str, shape: AttnShape, q_keep: list[int], kv_keep: list[int]) -> None:
    """A :class:`ModelError` unless the kept heads form a valid (grouped-query) layout."""
    if not q_keep or not kv_keep:
        raise ModelError(f"structured pruning would remove every head of {name!r} ({shape.heads} query heads); lower the ratio")
    g_old, g_new = shape.heads // shape.kv_heads, len(q_keep) // len(kv_keep)
    where = {h: i for i, h in enumerate(kv_keep)}
    if len(q_keep) != g_new * len(kv_keep) or any(where.get(h // g_old) != i // g_new for i, h in enumerate(q_keep)):
        raise ModelError(f"pruning {name!r} would leave query heads {q_keep} on key/value heads {kv_keep}: "
                         "not an even grouping; remove whole key/value groups or the same query heads of every group")


@torch.no_grad()
def zero_heads(m: nn.Module, q_gone: list[int], kv_gone: list[int], out_gone: list[int]) -> None:
    """The masked twin: zero, in place, the entries of the removed query heads, key/value heads and
    output features (shapes unchanged)."""
    s, d = parts(m, dict(m.named_parameters())), attn_shape(m).head_dim
    if q_gone:
        r = torch.tensor(_rows_of(q_gone, d), dtype=torch.long)
        s["wq"][r] = 0
        s["wo"][:, r] = 0
        if s["bq"] is not None:
            s["bq"][r] = 0
    if kv_gone:
        r = torch.tensor(_rows_of(kv_gone, d), dtype=torch.long)
        for key in ("wk", "bk", "wv", "bv"):
            if s[key] is not None:
                s[key][r] = 0
    if out_gone:
        r = torch.tensor(out_gone, dtype=torch.long)
        s["wo"][r] = 0
        if s["bo"] is not None:
            s["bo"][r] = 0


@torch.no_grad()
def sliced_attention(m: nn.Module, name: str, q_in: list[int], k_in: list[int], v_in: list[int], q_keep: list[int],
                     kv_keep: list[int], out_keep: list[int]) -> nn.Module:
    """A new, smaller attention module holding the kept slices of ``m``: a :class:`HeadAttention`
    for ``nn.MultiheadAttention`` / :class:`HeadAttention`, a :class:`GroupedQueryAttention` for one."""
    shape = attn_shape(m)
    check_heads(name, shape, q_keep, kv_keep)
    if not (q_in and k_in and v_in and out_keep):
        raise ModelError(f"structured pruning would remove every input or output feature of {name!r}; lower the ratio")
    s = parts(m, {n: p.detach() for n, p in m.named_parameters()})
    d, bias = shape.head_dim, s["bq"] is not None
    dev, dtype = s["wq"].device, s["wq"].dtype
    if isinstance(m, GroupedQueryAttention):
        new = GroupedQueryAttention(len(q_in), len(q_keep), len(kv_keep), d, len(out_keep), bias, m.causal)
    else:
        new = HeadAttention(len(q_in), len(q_keep), d, len(out_keep), len(k_in), len(v_in), bias, m.batch_first,
                            m.dropout)
    new.to(device=dev, dtype=dtype)

    def idx(pos: list[int]) -> torch.Tensor:
        return torch.tensor(pos, dtype=torch.long, device=dev)

    qr, kvr, o = idx(_rows_of(q_keep, d)), idx(_rows_of(kv_keep, d)), idx(out_keep)
    for lin, w, b, rows, cols in ((new.q_proj, s["wq"], s["bq"], qr, idx(q_in)), (new.k_proj, s["wk"], s["bk"], kvr, idx(k_in)),
                                  (new.v_proj, s["wv"], s["bv"], kvr, idx(v_in)), (new.out_proj, s["wo"], s["bo"], o, qr)):
        lin.weight.copy_(w.index_select(0, rows).index_select(1, cols))
        if b is not None:
            lin.bias.copy_(b.index_select(0, rows))
    return new


def call_args(m: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments of a call of ``m`` by name (``query``, ``key``, ``value``, masks, flags)."""
    if isinstance(m, GroupedQueryAttention):
        names = ["x"]
    else:
        names = ["query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal"]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    if "x" in bound:
        bound["query"] = bound["key"] = bound["value"] = bound.pop("x")
    return bound


__all__ = [
    "ATTENTION_TYPES",
    "AttnShape",
    "GroupedQueryAttention",
    "HeadAttention",
    "attend",
    "attn_shape",
    "call_args",
    "check_heads",
    "head_sums",
    "parts",
    "sliced_attention",
    "unsupported",
    "zero_heads",
]
