"""Apply a channel decision: physically remove channels (smaller plain layers), or zero them (the twin).

:func:`remove_channels` replaces every affected layer by a plain torch layer of the new size holding
the kept slices of its tensors (recorded as edits, :mod:`netshrink._modules`, so a zoo model packs and
loads). :func:`zero_channels` keeps the shapes and zeroes everything that produces a removed channel —
the rows and bias entries of the producing layers and of depthwise convolutions, and the BatchNorm /
LayerNorm scale and shift, and an attention head's query/key/value rows and output columns
(:mod:`.attention`) — so the masked model computes exactly what the smaller one does whenever
the ops between layers map zero to zero (ReLU, pooling, sums, concatenation).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..._modules import replace_module
from ...errors import ModelError
from .._mask import make_permanent
from .attention import attn_shape, sliced_attention, zero_heads
from .graph import DependencyGraph, LayerUse


def kept_positions(graph: DependencyGraph, atoms: list[int], removed: set[int]) -> list[int]:
    """Positions ``i`` whose atom's class is not in ``removed``."""
    return [i for i, a in enumerate(atoms) if graph.find(a) not in removed]


def _idx(pos: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(pos, dtype=torch.long, device=device)


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    with torch.no_grad():
        dst.copy_(src)


def _conv(m: nn.modules.conv._ConvNd, kind: str, ins: list[int], outs: list[int]) -> nn.Module:
    cls = type(m)
    w = m.weight.detach()
    dev = w.device
    if kind == "convT":
        new = cls(len(ins), len(outs), m.kernel_size, m.stride, m.padding, m.output_padding, 1, m.bias is not None,
                  m.dilation, m.padding_mode, device=dev, dtype=w.dtype)
        _copy(new.weight, w.index_select(0, _idx(ins, dev)).index_select(1, _idx(outs, dev)))
    else:
        if kind == "dwconv":
            groups = len(ins)
            w_new = w.index_select(0, _idx(outs, dev))
        elif kind == "gconv":
            gi = m.in_channels // m.groups
            per_in = [i for i in ins if i < gi]
            if len(ins) != m.groups * len(per_in) or len(outs) % m.groups:
                raise ModelError(f"grouped conv {type(m).__name__} would keep uneven channels per group")
            groups = m.groups
            w_new = w.index_select(0, _idx(outs, dev)).index_select(1, _idx(per_in, dev))
        else:
            groups = 1
            w_new = w.index_select(0, _idx(outs, dev)).index_select(1, _idx(ins, dev))
        new = cls(len(ins), len(outs), m.kernel_size, m.stride, m.padding, m.dilation, groups, m.bias is not None,
                  m.padding_mode, device=dev, dtype=w.dtype)
        _copy(new.weight, w_new)
    if m.bias is not None:
        _copy(new.bias, m.bias.detach().index_select(0, _idx(outs, dev)))
    return new


def _sliced(m: nn.Module, kind: str, ins: list[int], outs: list[int]) -> nn.Module:
    if kind in ("conv", "gconv", "dwconv", "convT"):
        return _conv(m, kind, ins, outs)
    dev = next(iter(list(m.parameters()) + list(m.buffers())), torch.empty(0)).device
    if kind == "linear":
        new = nn.Linear(len(ins), len(outs), m.bias is not None, device=dev, dtype=m.weight.dtype)
        _copy(new.weight, m.weight.detach().index_select(0, _idx(outs, dev)).index_select(1, _idx(ins, dev)))
        if m.bias is not None:
            _copy(new.bias, m.bias.detach().index_select(0, _idx(outs, dev)))
        return new
    i = _idx(outs, dev)
    if kind == "bn":
        new = type(m)(len(outs), m.eps, m.momentum, m.affine, m.track_running_stats, device=dev)
        for name in ("weight", "bias", "running_mean", "running_var"):
            src = getattr(m, name)
            if src is not None:
                _copy(getattr(new, name), src.detach().index_select(0, i))
        if m.num_batches_tracked is not None:
            _copy(new.num_batches_tracked, m.num_batches_tracked)
        return new.to(dtype=m.weight.dtype if m.weight is not None else None)
    if kind == "ln":
        new = nn.LayerNorm(len(outs), m.eps, m.elementwise_affine, bias=m.bias is not None, device=dev)
        for name in ("weight", "bias"):
            if getattr(m, name) is not None:
                _copy(getattr(new, name), getattr(m, name).detach().index_select(0, i))
        return new
    if kind == "prelu":
        new = nn.PReLU(len(outs), device=dev)
        _copy(new.weight, m.weight.detach().index_select(0, i))
        return new
    raise ModelError(f"no slicer for layer kind {kind!r}")


def remove_channels(model: nn.Module, graph: DependencyGraph, removed: Iterable[int]) -> dict[str, tuple[int, int]]:
    """Physically remove the channel classes ``removed`` (union-find roots of ``graph``) from
    ``model`` in place: every affected layer becomes a smaller plain layer. Masks on the layers are
    made permanent first. Returns ``{layer: (channels before, after)}`` for the layers whose output shrank."""
    removed = set(removed)
    make_permanent(model)
    changes: dict[str, tuple[int, int]] = {}
    for name, use in graph.layers.items():
        m = model.get_submodule(name)
        if use.kind == "attn":
            changes.update(_remove_attention(model, m, graph, use, removed))
            continue
        ins = kept_positions(graph, use.in_atoms, removed)
        outs = kept_positions(graph, use.out_atoms, removed)
        if len(ins) == len(use.in_atoms) and len(outs) == len(use.out_atoms):
            continue
        if not outs or not ins:
            raise ModelError(f"structured pruning would remove every channel of {name!r}; lower the ratio")
        new = _sliced(m, use.kind, ins, outs)
        new.train(m.training)
        replace_module(model, name, new)
        if len(outs) != len(use.out_atoms):
            changes[name] = (len(use.out_atoms), len(outs))
    return changes


def _remove_attention(model: nn.Module, m: nn.Module, graph: DependencyGraph, use: LayerUse,
                      removed: set[int]) -> dict[str, tuple[int, int]]:
    """Slice one attention layer (heads, input and output features); its changes, with the heads
    reported as ``"<layer>[heads]"``."""
    keep = [kept_positions(graph, atoms, removed) for atoms in
            (use.in_atoms, use.k_atoms, use.v_atoms, use.heads, use.kv_heads, use.out_atoms)]
    if all(len(k) == len(a) for k, a in zip(keep, (use.in_atoms, use.k_atoms, use.v_atoms, use.heads, use.kv_heads,
                                                    use.out_atoms))):
        return {}
    new = sliced_attention(m, use.name, *keep)
    new.train(m.training)
    replace_module(model, use.name, new)
    changes = {}
    if len(keep[5]) != len(use.out_atoms):
        changes[use.name] = (len(use.out_atoms), len(keep[5]))
    if len(keep[3]) != len(use.heads):
        changes[f"{use.name}[heads]"] = (len(use.heads), len(keep[3]))
    return changes


@torch.no_grad()
def zero_channels(model: nn.Module, graph: DependencyGraph, removed: Iterable[int]) -> None:
    """The masked twin: zero, in place, every parameter entry that produces a removed channel."""
    removed = set(removed)
    for name, use in graph.layers.items():
        m = model.get_submodule(name)
        gone = [i for i, a in enumerate(use.out_atoms) if graph.find(a) in removed]
        if use.kind == "attn":
            q_gone, kv_gone = ([i for i, a in enumerate(atoms) if graph.find(a) in removed] for atoms in (use.heads, use.kv_heads))
            if len(q_gone) == attn_shape(m).heads:
                raise ModelError(f"structured pruning would remove every head of {name!r}; lower the ratio")
            zero_heads(m, q_gone, kv_gone, gone)
            continue
        if not gone:
            continue
        idx = torch.tensor(gone, dtype=torch.long)
        if use.kind == "convT":
            m.weight[:, idx] = 0
        elif use.kind != "prelu" and getattr(m, "weight", None) is not None:
            m.weight[idx] = 0
        if getattr(m, "bias", None) is not None:
            m.bias[idx] = 0


__all__ = ["kept_positions", "remove_channels", "zero_channels"]
