"""``nn.MultiheadAttention`` as plain layers: converted to an equivalent module with separate q/k/v/out
``nn.Linear`` projections, so every per-layer method sees four ordinary Linear layers.

``nn.MultiheadAttention`` packs the query, key and value projections into one ``in_proj_weight`` of shape
``(3E, E)`` (rows ``[0, E)`` = W_q, ``[E, 2E)`` = W_k, ``[2E, 3E)`` = W_v; separate ``q/k/v_proj_weight``
when ``kdim``/``vdim`` differ from ``E``) and reads ``out_proj.weight`` itself, never calling ``out_proj``.
A method that masks, shares or replaces "every Linear" therefore misses the packed projections and breaks
the module when it replaces ``out_proj``. :func:`convert_attention_` swaps each one for a
:class:`~netshrink.prune.structured.attention.HeadAttention` holding the same values::

    head h:  A_h = softmax(Q_h K_hᵀ / √d + mask),  Q_h = x W_q[h]ᵀ + b_q[h]  (likewise K, V)
    y = concat_h(A_h V_h) W_oᵀ + b_o                         (Vaswani et al., NeurIPS 2017)

called like ``nn.MultiheadAttention`` (``query, key, value, key_padding_mask, need_weights, attn_mask,
average_attn_weights, is_causal``; ``batch_first``; dropout on the attention weights in training), with
outputs equal to the original's within float rounding. The swap is recorded as a module edit
(:func:`netshrink._modules.replace_module`), so the converted model packs to .nsk and loads back.
"""

from __future__ import annotations

import fnmatch
from typing import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._modules import replace_module
from .errors import ModelError

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def attention_modules(model: nn.Module) -> dict[str, nn.MultiheadAttention]:
    """Every ``nn.MultiheadAttention`` of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}


def in_scope(model: nn.Module, patterns: Iterable[str] | None) -> list[str]:
    """The attention modules whose projections ``patterns`` may name (all when None): a pattern matches
    ``NAME.q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj`` (the names after conversion) or ``NAME``."""
    names = list(attention_modules(model))
    if patterns is None:
        return names
    pats = list(patterns)
    return [n for n in names if any(fnmatch.fnmatchcase(c, p) for p in pats for c in (n, *(f"{n}.{q}" for q in PROJECTIONS)))]


def why_not_convertible(m: nn.MultiheadAttention) -> str | None:
    """Why ``m`` cannot be converted (None: it can)."""
    if m.bias_k is not None or m.add_zero_attn:
        return "it uses add_bias_kv or add_zero_attn, which the converted module does not have"
    if parametrize.is_parametrized(m) or parametrize.is_parametrized(m.out_proj):
        return "its weights are already masked, shared or quantized in place; convert it before compressing"
    return None


@torch.no_grad()
def to_head_attention(m: nn.MultiheadAttention) -> nn.Module:
    """A :class:`HeadAttention` computing what ``m`` computes (``m`` unchanged)."""
    from .prune.structured.attention import HeadAttention, parts  # lazy: the prune family imports late

    why = why_not_convertible(m)
    if why is not None:
        raise ModelError(f"cannot convert nn.MultiheadAttention: {why}")
    bias = m.in_proj_bias is not None
    new = HeadAttention(m.embed_dim, m.num_heads, m.head_dim, m.out_proj.out_features, m.kdim, m.vdim, bias,
                        m.batch_first, m.dropout)
    ref = m.out_proj.weight
    new.to(device=ref.device, dtype=ref.dtype)
    s = parts(m, {n: p.detach() for n, p in m.named_parameters()})
    for lin, w, b in ((new.q_proj, s["wq"], s["bq"]), (new.k_proj, s["wk"], s["bk"]), (new.v_proj, s["wv"], s["bv"]),
                      (new.out_proj, s["wo"], s["bo"])):
        lin.weight.copy_(w)
        if lin.bias is not None:
            lin.bias.copy_(b if b is not None else torch.zeros_like(lin.bias))
    # out_proj.bias exists in nn.MultiheadAttention exactly when in_proj_bias does (its `bias` argument)
    new.train(m.training)
    return new


def convert_attention_(model: nn.Module, patterns: Iterable[str] | None = None) -> list[str]:
    """Replace, in place, each ``nn.MultiheadAttention`` of ``model`` (those ``patterns`` may name, see
    :func:`in_scope`; all when None) by an equivalent module with separate ``q_proj``, ``k_proj``,
    ``v_proj`` and ``out_proj`` Linear layers. Returns the converted module names.

    Every module is checked before any is replaced: one that cannot be converted (``add_bias_kv``,
    ``add_zero_attn``, weights already compressed in place) is a :class:`ModelError` naming it, and the
    model is left as it was. A model that is itself an ``nn.MultiheadAttention`` cannot be converted in place.
    """
    names = in_scope(model, patterns)
    mods = attention_modules(model)
    for n in names:
        if n == "":
            raise ModelError("the model is itself an nn.MultiheadAttention: wrap it in a module to convert it")
        why = why_not_convertible(mods[n])
        if why is not None:
            raise ModelError(f"cannot convert nn.MultiheadAttention {n!r}: {why}")
    for n in names:
        replace_module(model, n, to_head_attention(mods[n]))
    return names


def prepare(model: nn.Module, patterns: Iterable[str] | None, method: str) -> list[str]:
    """What a per-layer method calls first: convert the attention modules in its scope, and return the
    coverage notes that say so."""
    done = convert_attention_(model, patterns)
    return [f"{method}: converted nn.MultiheadAttention {n!r} to separate q/k/v/out projections (HeadAttention) first"
            for n in done]


def converted_copy(model: nn.Module, patterns: Iterable[str] | None = None) -> nn.Module:
    """``model`` itself when it has no attention in scope, else a deep copy with it converted (for checks
    that must see the layer names the method will see)."""
    if not in_scope(model, patterns):
        return model
    import copy

    twin = copy.deepcopy(model)
    convert_attention_(twin, patterns)
    return twin


__all__ = ["PROJECTIONS", "attention_modules", "convert_attention_", "converted_copy", "in_scope", "prepare",
           "to_head_attention", "why_not_convertible"]
