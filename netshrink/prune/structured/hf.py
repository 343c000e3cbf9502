"""Head-wise and channel-wise structured pruning of ``transformers`` models (GPT-2, Llama and its
grouped-query relatives, BERT, ViT), physically removing attention heads and MLP hidden units so that
the pruned model still runs under the library's own forward and ``generate``.

torch.fx cannot trace these models (data-dependent masks, caches, keyword-only calls), so instead of
the dependency graph (:mod:`.graph`) the blocks are recognized by their structure:

| block                         | recognized by                                         | example           |
|-------------------------------|-------------------------------------------------------|-------------------|
| packed q/k/v attention        | ``c_attn`` + ``c_proj`` (``Conv1D``), ``split_size``  | ``GPT2Attention`` |
| q/k/v/o attention (MHA, GQA)  | ``q_proj`` ``k_proj`` ``v_proj`` ``o_proj``, ``head_dim`` | ``LlamaAttention``, ``ViTAttention`` |
| BERT attention                | ``self.{query,key,value}`` + ``output.dense``          | ``BertAttention`` |
| MLP                           | ``c_fc``/``c_proj``; ``gate_proj``/``up_proj``/``down_proj``; ``fc1``/``fc2``; ``intermediate.dense``/``output.dense`` | GPT-2, Llama, ViT, BERT |

An attention block with ``H`` query heads of size ``d`` and ``H_kv`` key/value heads computes
``y = Σ_h softmax(Q_h K_⌊h/g⌋ᵀ·s + mask) V_⌊h/g⌋ W_o[:, h]ᵀ + b_o`` (``g = H / H_kv``); removing head
``h`` removes its ``d`` rows of ``W_q`` (and, with its key/value head, of ``W_k``, ``W_v``) and its
``d`` columns of ``W_o`` (Michel, Levy & Neubig, "Are Sixteen Heads Really Better than One?", NeurIPS
2019). ``d`` and the scale ``s`` stay. Grouped-query attention (Ainslie et al., EMNLP 2023) keeps its
grouping: ``gqa_heads: kv`` removes whole key/value groups with their query heads, ``query`` the same
query heads of every group. An MLP hidden unit ``j`` (``act(x W_1[j]ᵀ)·(x W_up[j]ᵀ)`` for gated MLPs)
goes with row ``j`` of the input projection(s) and column ``j`` of the output projection.

Scores: ``l1`` sums ``|w|`` over a head's (or unit's) rows and columns (Li et al. 2017); ``taylor``
is ``(Σ g·w)²`` over the same entries, averaged over batches (Molchanov et al. 2019), with the loss
of the run's :class:`~netshrink.task.Task`.

The module attributes the library reads in forward are updated (``num_heads``/``split_size`` of
GPT-2, ``num_key_value_groups`` of Llama, ``all_head_size`` of BERT, ...). When every layer keeps the
same counts, the config fields that describe them are updated too where the library rebuilds from
them (Llama/ViT: ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``; all four:
``intermediate_size`` / ``n_inner``), so ``type(model)(model.config)`` builds the pruned shapes. In
every case ``config.netshrink_pruned`` records each block's counts and :func:`apply_pruned_shapes`
resizes a freshly built model to them (to be filled by ``load`` or ``load_state_dict``).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError, DataError, ModelError
from .._mask import make_permanent

log = logging.getLogger(__name__)

#: the config attribute that records every pruned block's counts
PRUNED_ATTR = "netshrink_pruned"


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``transformers`` ``PreTrainedModel`` (without importing transformers)."""
    mod = sys.modules.get("transformers")
    cls = getattr(mod, "PreTrainedModel", None) if mod is not None else None
    return cls is not None and isinstance(model, cls)


# ------------------------------------------------------------------------ Linear / Conv1D plumbing


def _is_conv1d(m: nn.Module) -> bool:
    """transformers' ``Conv1D``: ``y = x W + b`` with ``W`` of shape (in, out)."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and isinstance(getattr(m, "weight", None), torch.Tensor)


def _check_layer(m: nn.Module, path: str) -> None:
    if type(m) is not nn.Linear and not _is_conv1d(m):
        raise ModelError(f"structured pruning of {path!r}: expected an nn.Linear or transformers Conv1D, got "
                         f"{type(m).__name__} (apply structured pruning before methods that replace layers)")


def _rows(m: nn.Module) -> torch.Tensor:
    """The weight as (out, in)."""
    return m.weight.t() if _is_conv1d(m) else m.weight


def _outs(m: nn.Module) -> int:
    return _rows(m).shape[0]


@torch.no_grad()
def _slice(m: nn.Module, out_keep: list[int] | None = None, in_keep: list[int] | None = None) -> None:
    """Keep only the given outputs / inputs of ``m`` (in place: new Parameters, same module)."""
    w = _rows(m).detach()
    dev = w.device
    if out_keep is not None:
        w = w.index_select(0, torch.tensor(out_keep, dtype=torch.long, device=dev))
    if in_keep is not None:
        w = w.index_select(1, torch.tensor(in_keep, dtype=torch.long, device=dev))
    grad = m.weight.requires_grad
    m.weight = nn.Parameter((w.t() if _is_conv1d(m) else w).contiguous(), requires_grad=grad)
    if out_keep is not None and getattr(m, "bias", None) is not None:
        b = m.bias.detach().index_select(0, torch.tensor(out_keep, dtype=torch.long, device=dev))
        m.bias = nn.Parameter(b.contiguous(), requires_grad=grad)
    if _is_conv1d(m):
        m.nf = w.shape[0]
        if hasattr(m, "nx"):
            m.nx = w.shape[1]
    else:
        m.out_features, m.in_features = w.shape


@torch.no_grad()
def _zero(m: nn.Module, out_rows: list[int] | None = None, in_cols: list[int] | None = None) -> None:
    """The masked twin: zero the given outputs (rows and bias) / inputs (columns) of ``m``."""
    w = _rows(m)
    if out_rows:
        r = torch.tensor(out_rows, dtype=torch.long, device=w.device)
        w[r] = 0
        if getattr(m, "bias", None) is not None:
            m.bias[r] = 0
    if in_cols:
        w[:, torch.tensor(in_cols, dtype=torch.long, device=w.device)] = 0


# ----------------------------------------------------------------------------------- the blocks


@dataclass
class _Part:
    """``count`` output rows of ``layer`` from ``start`` (one of q, k, v of a packed projection)."""

    layer: nn.Module
    start: int
    count: int


@dataclass
class AttnBlock:
    """One recognized attention block: where its q/k/v rows and output columns live, its head counts."""

    path: str
    module: nn.Module
    kind: str  # "packed" (GPT-2), "qkvo" (Llama, ViT, ...), "bert"
    q: _Part
    k: _Part
    v: _Part
    o: nn.Module
    heads: int
    kv_heads: int
    head_dim: int

    def layers(self) -> list[nn.Module]:
        out: list[nn.Module] = []
        for m in (self.q.layer, self.k.layer, self.v.layer, self.o):
            if all(m is not x for x in out):
                out.append(m)
        return out


@dataclass
class MlpBlock:
    """One recognized MLP: input projection(s) whose rows are the hidden units, the output projection."""

    path: str
    module: nn.Module
    ins: list[nn.Module]
    out: nn.Module
    hidden: int


def _attn_block(path: str, m: nn.Module) -> AttnBlock | str | None:
    """The attention block of ``m``, a string saying why a recognized block is not supported, or None."""
    if hasattr(m, "c_attn") and hasattr(m, "c_proj") and hasattr(m, "split_size") and hasattr(m, "head_dim"):
        if getattr(m, "is_cross_attention", False) or hasattr(m, "q_attn"):
            return f"{path}: cross-attention (q_attn + packed k/v) is not pruned head-wise"
        s, d = int(m.split_size), int(m.head_dim)
        if _outs(m.c_attn) != 3 * s or s % d:
            return f"{path}: c_attn has {_outs(m.c_attn)} outputs, not 3 x split_size ({s}) in heads of {d}"
        return AttnBlock(path, m, "packed", _Part(m.c_attn, 0, s), _Part(m.c_attn, s, s), _Part(m.c_attn, 2 * s, s),
                         m.c_proj, s // d, s // d, d)
    if all(isinstance(getattr(m, a, None), nn.Module) for a in ("q_proj", "k_proj", "v_proj", "o_proj")) \
            and isinstance(getattr(m, "head_dim", None), int):
        d = m.head_dim
        nq, nk = _outs(m.q_proj), _outs(m.k_proj)
        if nq % d or nk % d or _outs(m.v_proj) != nk or (nq // d) % (nk // d):
            return f"{path}: q/k/v projections ({nq}, {nk}, {_outs(m.v_proj)} outputs) do not form heads of {d}"
        return AttnBlock(path, m, "qkvo", _Part(m.q_proj, 0, nq), _Part(m.k_proj, 0, nk), _Part(m.v_proj, 0, nk),
                         m.o_proj, nq // d, nk // d, d)
    sa, so = getattr(m, "self", None), getattr(m, "output", None)
    if isinstance(sa, nn.Module) and isinstance(so, nn.Module) and hasattr(so, "dense") \
            and all(isinstance(getattr(sa, a, None), nn.Module) for a in ("query", "key", "value")) \
            and hasattr(sa, "attention_head_size"):
        if getattr(m, "is_cross_attention", False):
            return f"{path}: cross-attention is not pruned head-wise"
        d, n = int(sa.attention_head_size), _outs(sa.query)
        if n % d or _outs(sa.key) != n or _outs(sa.value) != n:
            return f"{path}: query/key/value projections do not form heads of {d}"
        return AttnBlock(path, m, "bert", _Part(sa.query, 0, n), _Part(sa.key, 0, n), _Part(sa.value, 0, n), so.dense,
                         n // d, n // d, d)
    return None


def _mlp_block(path: str, m: nn.Module) -> MlpBlock | None:
    if isinstance(getattr(m, "c_fc", None), nn.Module) and isinstance(getattr(m, "c_proj", None), nn.Module) \
            and not hasattr(m, "c_attn"):
        ins, out = [m.c_fc], m.c_proj
    elif all(isinstance(getattr(m, a, None), nn.Module) for a in ("gate_proj", "up_proj", "down_proj")):
        ins, out = [m.gate_proj, m.up_proj], m.down_proj
    elif all(isinstance(getattr(m, a, None), nn.Module) for a in ("fc1", "fc2")) and type(m).__name__.endswith("MLP"):
        ins, out = [m.fc1], m.fc2
    elif isinstance(getattr(getattr(m, "intermediate", None), "dense", None), nn.Module) \
            and isinstance(getattr(getattr(m, "output", None), "dense", None), nn.Module):
        ins, out = [m.intermediate.dense], m.output.dense
    else:
        return None
    return MlpBlock(path, m, ins, out, _outs(ins[0]))


def find_blocks(model: nn.Module) -> tuple[list[AttnBlock], list[MlpBlock], list[str]]:
    """Every attention block and MLP of ``model`` this module recognizes, and notes on the ones it
    recognizes but cannot prune. Layers are checked to be plain Linear / Conv1D."""
    attn: list[AttnBlock] = []
    mlp: list[MlpBlock] = []
    notes: list[str] = []
    for path, m in model.named_modules():
        a = _attn_block(path, m)
        if isinstance(a, str):
            notes.append(a)
            continue
        if a is not None:
            for layer in a.layers():
                _check_layer(layer, path)
            attn.append(a)
            continue
        b = _mlp_block(path, m)
        if b is not None:
            for layer in b.ins + [b.out]:
                _check_layer(layer, path)
            if any(_outs(x) != b.hidden for x in b.ins) or _rows(b.out).shape[1] != b.hidden:
                notes.append(f"{path}: MLP projections disagree on the hidden width; left unpruned")
                continue
            mlp.append(b)
    return attn, mlp, notes


# ------------------------------------------------------------------------------------------ scores


def _head_rows(part: _Part, h: int, d: int) -> slice:
    return slice(part.start + h * d, part.start + (h + 1) * d)


def _head_scores(b: AttnBlock, f: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query head and per key/value head: the sum of ``f(tensor)`` over its entries, where ``f``
    maps a parameter to a same-shaped tensor (``|w|``, or ``g·w``)."""
    d = b.head_dim
    q, kv = torch.zeros(b.heads, dtype=torch.float64), torch.zeros(b.kv_heads, dtype=torch.float64)
    for part, scores, n in ((b.q, q, b.heads), (b.k, kv, b.kv_heads), (b.v, kv, b.kv_heads)):
        w, bias = f(part.layer, "weight"), f(part.layer, "bias")
        w = w.t() if _is_conv1d(part.layer) else w
        for h in range(n):
            r = _head_rows(part, h, d)
            scores[h] += float(w[r].sum()) + (float(bias[r].sum()) if bias is not None else 0.0)
    wo = f(b.o, "weight")
    wo = wo.t() if _is_conv1d(b.o) else wo
    for h in range(b.heads):
        q[h] += float(wo[:, h * d:(h + 1) * d].sum())
    return q, kv


def _unit_scores(b: MlpBlock, f: Any) -> torch.Tensor:
    s = torch.zeros(b.hidden, dtype=torch.float64)
    for layer in b.ins:
        w = f(layer, "weight")
        w = w.t() if _is_conv1d(layer) else w
        s += w.sum(1).double()
        bias = f(layer, "bias")
        if bias is not None:
            s += bias.double()
    wo = f(b.out, "weight")
    wo = wo.t() if _is_conv1d(b.out) else wo
    return s + wo.sum(0).double()


def _l1(layer: nn.Module, name: str) -> torch.Tensor | None:
    p = getattr(layer, name, None)
    return None if p is None else p.detach().abs()


def _taylor_grads(model: nn.Module, attn: list[AttnBlock], mlp: list[MlpBlock], data: Any, task: Any,
                  batches: int, batch_size: int) -> list[dict[int, dict[str, torch.Tensor]]]:
    """Per batch: ``{id(layer): {"weight": g·w, "bias": g·b}}`` for every layer of the blocks."""
    from ...task import batches as task_batches, resolve_task

    task = resolve_task(task)
    layers = {id(x): x for blk in attn for x in blk.layers()}
    layers.update({id(x): x for blk in mlp for x in blk.ins + [blk.out]})
    params = [(lid, name, getattr(x, name)) for lid, x in layers.items() for name in ("weight", "bias")
              if isinstance(getattr(x, name, None), torch.Tensor)]
    source = getattr(data, "train", data)
    if source is None:
        raise ConfigError("data", "criterion 'taylor' scores heads and units on data: pass data=")
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    out: list[dict[int, dict[str, torch.Tensor]]] = []
    was = model.training
    model.eval()
    try:
        for i, batch in enumerate(task_batches(source, batch_size)):
            if i >= batches:
                break
            inputs, target = task.split(batch)
            target = target.to(dev) if isinstance(target, torch.Tensor) else target
            loss = task.compute_loss(task.forward(model, inputs.to(dev)), target)
            grads = torch.autograd.grad(loss, [p for _, _, p in params], allow_unused=True)
            acc: dict[int, dict[str, torch.Tensor]] = {}
            for (lid, name, p), g in zip(params, grads):
                acc.setdefault(lid, {})[name] = torch.zeros_like(p) if g is None else (g * p).detach()
            out.append(acc)
    finally:
        model.train(was)
    if not out:
        raise DataError("criterion 'taylor': the data yielded no batch")
    return out


# --------------------------------------------------------------------------------------- decisions


def _n_remove(ratio: float, n: int) -> int:
    return max(0, min(int(ratio * n + 1e-9), n - 1))


def _keep_heads(b: AttnBlock, q: torch.Tensor, kv: torch.Tensor, ratio: float, gqa: str) -> tuple[list[int], list[int]]:
    """Kept (query heads, key/value heads), both ascending. Ties broken by index (lowest goes first)."""
    g = b.heads // b.kv_heads
    if b.kv_heads == b.heads:  # ordinary multi-head attention: one score per head
        s = q + kv
        drop = set(sorted(range(b.heads), key=lambda h: (float(s[h]), h))[:_n_remove(ratio, b.heads)])
        keep = [h for h in range(b.heads) if h not in drop]
        return keep, keep
    if gqa == "kv":  # whole key/value groups with their query heads
        s = kv + q.reshape(b.kv_heads, g).sum(1)
        drop = set(sorted(range(b.kv_heads), key=lambda j: (float(s[j]), j))[:_n_remove(ratio, b.kv_heads)])
        kv_keep = [j for j in range(b.kv_heads) if j not in drop]
        return [j * g + i for j in kv_keep for i in range(g)], kv_keep
    s = q.reshape(b.kv_heads, g).sum(0)  # the same query positions of every group
    drop = set(sorted(range(g), key=lambda i: (float(s[i]), i))[:_n_remove(ratio, g)])
    return [j * g + i for j in range(b.kv_heads) for i in range(g) if i not in drop], list(range(b.kv_heads))


def _head_positions(part: _Part, keep: list[int], d: int) -> list[int]:
    return [part.start + h * d + i for h in keep for i in range(d)]


def _apply_heads(b: AttnBlock, q_keep: list[int], kv_keep: list[int], zero: bool) -> None:
    d = b.head_dim
    q_gone = [h for h in range(b.heads) if h not in q_keep]
    kv_gone = [h for h in range(b.kv_heads) if h not in kv_keep]
    if zero:
        _zero(b.q.layer, _head_positions(b.q, q_gone, d))
        _zero(b.k.layer, _head_positions(b.k, kv_gone, d))
        _zero(b.v.layer, _head_positions(b.v, kv_gone, d))
        _zero(b.o, in_cols=[h * d + i for h in q_gone for i in range(d)])
        return
    rows: dict[int, list[int]] = {}
    for part, keep in ((b.q, q_keep), (b.k, kv_keep), (b.v, kv_keep)):
        rows.setdefault(id(part.layer), []).extend(_head_positions(part, keep, d))
    for layer in (b.q.layer, b.k.layer, b.v.layer):
        if id(layer) in rows:
            _slice(layer, out_keep=rows.pop(id(layer)))
    _slice(b.o, in_keep=[h * d + i for h in q_keep for i in range(d)])
    _set_counts(b, len(q_keep), len(kv_keep))


def _set_counts(b: AttnBlock, heads: int, kv_heads: int) -> None:
    """Update the attributes the library reads in forward to the new head counts."""
    m, d = b.module, b.head_dim
    if b.kind == "packed":
        m.num_heads, m.split_size = heads, heads * d
    elif b.kind == "bert":
        m.self.num_attention_heads, m.self.all_head_size = heads, heads * d
    else:
        for attr, value in (("num_heads", heads), ("num_attention_heads", heads), ("num_key_value_heads", kv_heads),
                            ("num_key_value_groups", heads // kv_heads)):
            if hasattr(m, attr):
                setattr(m, attr, value)
    b.heads, b.kv_heads = heads, kv_heads
    b.q.count = heads * d
    if b.kind == "packed":
        b.k.start, b.v.start = heads * d, 2 * heads * d
    b.k.count = b.v.count = kv_heads * d


def _apply_units(b: MlpBlock, keep: list[int], zero: bool) -> None:
    if zero:
        gone = [j for j in range(b.hidden) if j not in set(keep)]
        for layer in b.ins:
            _zero(layer, gone)
        _zero(b.out, in_cols=gone)
        return
    for layer in b.ins:
        _slice(layer, out_keep=keep)
    _slice(b.out, in_keep=keep)
    if hasattr(b.module, "intermediate_size"):
        b.module.intermediate_size = len(keep)
    b.hidden = len(keep)


def _update_config(model: nn.Module, attn: list[AttnBlock], mlp: list[MlpBlock]) -> None:
    """Record every block's counts in ``config.netshrink_pruned``; update the standard fields where
    every layer agrees and the library rebuilds from them."""
    config = getattr(model, "config", None)
    if config is None:
        return
    record = dict(getattr(config, PRUNED_ATTR, None) or {})
    for b in attn:
        record.setdefault(b.path, {}).update({"heads": b.heads, "kv_heads": b.kv_heads, "head_dim": b.head_dim})
    for b in mlp:
        record.setdefault(b.path, {}).update({"hidden": b.hidden})
    setattr(config, PRUNED_ATTR, record)
    counts = {(b.heads, b.kv_heads, b.head_dim) for b in attn}
    if len(counts) == 1 and all(b.kind == "qkvo" for b in attn):
        h, hkv, d = counts.pop()
        if hasattr(config, "num_attention_heads"):
            config.num_attention_heads = h
            if hasattr(config, "num_key_value_heads"):
                config.num_key_value_heads = hkv
            config.head_dim = d
    hidden = {b.hidden for b in mlp}
    if len(hidden) == 1:
        n = hidden.pop()
        for attr in ("intermediate_size", "n_inner", "ffn_dim"):
            if hasattr(config, attr):
                setattr(config, attr, n)
                break


def apply_pruned_shapes(model: nn.Module) -> nn.Module:
    """Resize a freshly built ``model`` to the counts recorded in ``model.config.netshrink_pruned``
    (the first heads / units are kept: the values are meant to be overwritten by ``load`` or
    ``load_state_dict``). Blocks already at their recorded size are left as they are. Returns ``model``."""
    record = getattr(getattr(model, "config", None), PRUNED_ATTR, None) or {}
    if not isinstance(record, dict):
        raise ModelError(f"config.{PRUNED_ATTR} must be a mapping of block paths to counts, got {type(record).__name__}")
    attn, mlp, _ = find_blocks(model)
    by_path = {b.path: b for b in attn}
    mlp_by_path = {b.path: b for b in mlp}
    for path, counts in record.items():
        if not isinstance(counts, dict) or (path not in by_path and path not in mlp_by_path):
            raise ModelError(f"config.{PRUNED_ATTR}: no prunable block {path!r} in {type(model).__name__}")
        if "heads" in counts and path in by_path:
            b = by_path[path]
            h, hkv = int(counts["heads"]), int(counts["kv_heads"])
            if (h, hkv) != (b.heads, b.kv_heads):
                if h > b.heads or hkv > b.kv_heads or h % hkv:
                    raise ModelError(f"config.{PRUNED_ATTR}.{path}: {h}/{hkv} heads do not fit a block of {b.heads}/{b.kv_heads}")
                g = b.heads // b.kv_heads
                _apply_heads(b, [j * g + i for j in range(hkv) for i in range(h // hkv)], list(range(hkv)), zero=False)
        if "hidden" in counts and path in mlp_by_path:
            b = mlp_by_path[path]
            n = int(counts["hidden"])
            if n != b.hidden:
                if n > b.hidden or n < 1:
                    raise ModelError(f"config.{PRUNED_ATTR}.{path}: {n} hidden units do not fit a block of {b.hidden}")
                _apply_units(b, list(range(n)), zero=False)
    return model


# ----------------------------------------------------------------------------------------- handler


_UNSUPPORTED = {"scope": "global", "threshold": None, "reconstruct": False, "approximate_layernorm": False}


def prune_hf(model: nn.Module, config: Any, data: Any = None, task: Any = None) -> Any:
    """Structured pruning of a ``transformers`` model by a :class:`~.channel.ChannelConfig`: ``head_ratio``
    (default ``ratio``) of every attention block's heads and ``ratio`` of every MLP's hidden units
    removed (``layer_ratio`` per block path; ``layers`` limits the blocks), scored by ``l1`` or
    ``taylor``; ``mode: zero`` zeroes them instead (the masked twin). Returns a ``ChannelResult``."""
    from .channel import ChannelResult

    if config.criterion not in ("l1", "taylor"):
        raise ConfigError("criterion", f"{config.criterion!r} is not available for transformers models (no BatchNorm): use l1 or taylor")
    if config.scope == "global" or config.threshold is not None or config.reconstruct:
        raise ConfigError("scope", "transformers models are pruned per block by ratio / head_ratio / layer_ratio; "
                                   "scope global, threshold and reconstruct are not available for them")
    attn, mlp, notes = find_blocks(model)
    if not attn and not mlp:
        raise ModelError(f"structured pruning: no attention block or MLP of {type(model).__name__} is recognized "
                         "(supported: GPT-2, Llama-style q/k/v/o, BERT, ViT blocks)")
    paths = {b.path for b in attn} | {b.path for b in mlp}
    for key, where in [(n, "layer_ratio") for n in config.layer_ratio] + [(n, "layers") for n in config.layers or []]:
        if key not in paths:
            raise ConfigError(f"{where}.{key}", f"no attention block or MLP {key!r} in the model "
                                                f"(blocks: {', '.join(sorted(paths)[:6])}, ...)")
    if config.layers is not None:
        attn = [b for b in attn if b.path in config.layers]
        mlp = [b for b in mlp if b.path in config.layers]
    for note in notes:
        if config.strict:
            raise ModelError(f"structured pruning (strict): {note}")
        log.warning("structured pruning left a block unpruned: %s", note)
    make_permanent(model)
    if config.criterion == "l1":
        head_s = [_head_scores(b, _l1) for b in attn]
        unit_s = [_unit_scores(b, _l1) for b in mlp]
    else:
        per_batch = _taylor_grads(model, attn, mlp, data, task, config.batches, config.batch_size)
        head_s = [(torch.zeros(b.heads, dtype=torch.float64), torch.zeros(b.kv_heads, dtype=torch.float64)) for b in attn]
        unit_s = [torch.zeros(b.hidden, dtype=torch.float64) for b in mlp]
        for acc in per_batch:
            f = lambda layer, name: acc[id(layer)].get(name)  # noqa: E731
            for i, b in enumerate(attn):
                q, kv = _head_scores(b, f)
                head_s[i] = (head_s[i][0] + q ** 2 / len(per_batch), head_s[i][1] + kv ** 2 / len(per_batch))
            for i, b in enumerate(mlp):
                unit_s[i] = unit_s[i] + _unit_scores(b, f) ** 2 / len(per_batch)
    zero = config.mode == "zero"
    channels: dict[str, tuple[int, int]] = {}
    removed = 0
    head_ratio = config.ratio if config.head_ratio is None else config.head_ratio
    for b, (q, kv) in zip(attn, head_s):
        q_keep, kv_keep = _keep_heads(b, q, kv, config.layer_ratio.get(b.path, head_ratio), config.gqa_heads)
        before = b.heads
        if len(q_keep) < before:
            _apply_heads(b, q_keep, kv_keep, zero)
            channels[f"{b.path}[heads]"] = (before, len(q_keep))
            removed += before - len(q_keep)
    for b, s in zip(mlp, unit_s):
        k = _n_remove(config.layer_ratio.get(b.path, config.ratio), b.hidden)
        if k:
            drop = set(sorted(range(b.hidden), key=lambda j: (float(s[j]), j))[:k])
            before = b.hidden
            _apply_units(b, [j for j in range(b.hidden) if j not in drop], zero)
            channels[b.path] = (before, before - k)
            removed += k
    if not zero:
        _update_config(model, attn, mlp)
    log.info("structured pruning of %s: %d heads and units removed in %d blocks", type(model).__name__, removed,
             len(attn) + len(mlp))
    return ChannelResult(channels if not zero else {}, removed, len(attn) + len(mlp), notes)


__all__ = ["AttnBlock", "MlpBlock", "PRUNED_ATTR", "apply_pruned_shapes", "find_blocks", "is_hf_model", "prune_hf"]
