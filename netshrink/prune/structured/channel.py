"""Structured (channel) pruning that returns a smaller plain model: ``prune_(model, ChannelConfig(...))``.

The dependency graph (:mod:`.graph`) groups coupled channels; a criterion scores each class of
coupled channels; in every group the ``ratio`` lowest-scored classes are removed, and the layers are
physically sliced (:mod:`.slicing`). Criteria, each summed over every layer that produces the
class's channels:

- ``l1``: the L1 norm of the filter, ``s_c = Σ_l ‖W_l[c]‖₁`` (Li, Kadav, Durdanovic, Samet & Graf,
  "Pruning Filters for Efficient ConvNets", ICLR 2017);
- ``bn_scale``: the BatchNorm scaling factor, ``s_c = Σ_l |γ_l[c]|`` (Liu, Li, Shen, Huang, Yan &
  Zhang, "Learning Efficient Convolutional Networks through Network Slimming", ICCV 2017); a group
  with no BatchNorm falls back to ``l1`` (logged);
- ``taylor``: the first-order Taylor estimate of the loss change when the channel is removed,
  ``s_c = mean_batches (Σ_{k∈c} g_k w_k)²`` over the weights, biases and BN scales/shifts of the
  channel (Molchanov, Mallya, Tyree, Frosio & Kautz, "Importance Estimation for Neural Network
  Pruning", CVPR 2019).

Attention heads (:mod:`.attention`) are classes too, one group per attention layer, scored by the
same criteria over every entry removed with the head — its rows of ``W_q, b_q, W_k, b_k, W_v, b_v``
and its columns of ``W_o``: ``l1`` ``s_h = Σ |w|`` over them, ``taylor`` ``(Σ g w)²`` over them
(Molchanov et al. 2019 score heads this way too; Michel et al. 2019 use ``|Σ g w|`` over the head
mask); ``bn_scale`` falls back to ``l1``. ``head_ratio`` (default ``ratio``) is the fraction of each
layer's heads removed, always per layer (``scope: global`` and ``threshold`` rank channels only),
keeping at least one head.
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..._registry import handler, register
from ...config import BaseConfig, check_range
from ...errors import ConfigError
from ...task import Inputs, resolve_task
from .._criteria import at_least, device_of, eval_mode, iter_batches
from .attention import ATTENTION_TYPES, head_sums
from .graph import DependencyGraph
from .reconstruct import reconstruct_
from .slicing import remove_channels, zero_channels

log = logging.getLogger(__name__)

Criterion = Literal["l1", "bn_scale", "taylor"]


@register("channel", family="prune")
@dataclass
class ChannelConfig(BaseConfig):
    """Structured channel pruning: remove whole filters/channels/neurons and shrink the layers (L1, BN scale or Taylor).

    ``ratio``: fraction of each group's channels removed (``layer_ratio`` per producing layer;
    ``scope: global`` ranks all channels together); ``threshold``: remove every channel scored below
    it instead. ``mode: zero`` zeroes the channels and keeps the shapes (the masked twin).
    ``reconstruct``: refit the layers that lost inputs by least squares on ``batches`` batches of
    data (He et al. 2017; :mod:`.reconstruct`). ``strict``: an op the graph does not handle raises
    instead of leaving its channels unpruned. ``input_shape``: one example's shape for tracing when
    no data is given. ``head_ratio``: fraction of each attention layer's heads removed (default
    ``ratio``); ``gqa_heads``: a grouped-query layer loses whole key/value groups (``kv``) or the same
    query heads of every group (``query``).
    """

    ratio: float = 0.5
    criterion: Criterion = "l1"
    layer_ratio: dict[str, float] = field(default_factory=dict)
    layers: list[str] | None = None
    input_shape: list[int] | None = None
    batches: int = 4
    batch_size: int = 64
    seed: int = 0
    strict: bool = False
    approximate_layernorm: bool = False
    mode: Literal["remove", "zero"] = "remove"
    scope: Literal["group", "global"] = "group"
    threshold: float | None = None
    reconstruct: bool = False
    ridge: float = 1e-4
    head_ratio: float | None = None
    gqa_heads: Literal["kv", "query"] = "kv"

    def validate(self) -> None:
        check_range("ratio", self.ratio, 0.0, 1.0, hi_open=True)
        if self.head_ratio is not None:
            check_range("head_ratio", self.head_ratio, 0.0, 1.0, hi_open=True)
        for name, r in self.layer_ratio.items():
            check_range(f"layer_ratio.{name}", r, 0.0, 1.0, hi_open=True)
        if self.scope == "global" and self.layer_ratio:
            raise ConfigError("scope", "scope 'global' ranks all channels together and takes no layer_ratio")
        if self.threshold is not None and (self.threshold < 0 or self.layer_ratio):
            raise ConfigError("threshold", f"must be >= 0 and replaces ratio and layer_ratio, got {self.threshold}")
        check_range("ridge", self.ridge, 0.0, 1e6)
        at_least("batches", self.batches, 1)
        at_least("batch_size", self.batch_size, 1)
        if self.input_shape is not None and (not self.input_shape or any(s < 1 for s in self.input_shape)):
            raise ConfigError("input_shape", f"must be a list of positive sizes (one example, no batch), got {self.input_shape}")

    def check_model(self, model: nn.Module) -> None:
        from .hf import find_blocks, is_hf_model

        if is_hf_model(model):  # transformers models: keys name attention blocks and MLPs
            attn, mlp, _ = find_blocks(model)
            names = {b.path for b in attn} | {b.path for b in mlp}
        else:
            names = {n for n, m in model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear) + ATTENTION_TYPES)}
        for key, where in [(n, "layer_ratio") for n in self.layer_ratio] + [(n, "layers") for n in self.layers or []]:
            if key not in names:
                raise ConfigError(f"{where}.{key}", f"no convolution, linear or attention layer {key!r} in the model")


@dataclass
class ChannelResult:
    """What a structured pruning call did: channels per layer before and after, the classes removed,
    and the graph's notes (ops it left unpruned)."""

    channels: dict[str, tuple[int, int]]
    removed: int
    groups: int
    notes: list[str]

    @property
    def sparsity(self) -> dict[str, float]:
        return {n: 1.0 - after / before for n, (before, after) in self.channels.items()}


def _inputs(item: Any) -> Inputs:
    """What a batch stream yields as model inputs, as an :class:`Inputs` (a bare tensor too)."""
    return item if isinstance(item, Inputs) else Inputs.of(item)


def positional(model: nn.Module, inputs: Inputs) -> tuple[Any, ...]:
    """``inputs`` as the positional arguments of ``model.forward`` (keyword inputs placed by name,
    skipped parameters given their defaults), for tracing and shape propagation."""
    if not inputs.kwargs:
        return tuple(inputs.args)
    params = list(inspect.signature(model.forward).parameters.values())
    try:
        bound = inspect.signature(model.forward).bind_partial(*inputs.args, **inputs.kwargs).arguments
    except TypeError as exc:
        raise ConfigError("data", f"the example inputs do not fit {type(model).__name__}.forward: {exc}") from None
    last = max(i for i, p in enumerate(params) if p.name in bound)
    out = []
    for p in params[:last + 1]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise ConfigError("data", f"structured pruning traces {type(model).__name__}.forward, whose *args/**kwargs "
                                      "take the keyword inputs: give positional inputs")
        out.append(bound[p.name] if p.name in bound else p.default)
    return tuple(out)


def example_inputs(model: nn.Module, config: ChannelConfig, data: Any, task: Any = None) -> tuple[Any, ...]:
    """One example, as positional inputs of ``model.forward``: the first of ``data`` (a Splits,
    Dataset or DataLoader; batches read by ``task``) or a zero tensor of ``config.input_shape``; a
    :class:`ConfigError` when there is neither."""
    dev = device_of(model)
    if config.input_shape is not None:
        return (torch.zeros(1, *config.input_shape, device=dev),)
    source = getattr(data, "train", data)
    if source is None:
        raise ConfigError("input_shape", "structured pruning traces the model on one example: pass data= or input_shape")
    try:
        first = next(iter(iter_batches(source, 1, 1, 0, dev, task=resolve_task(task))))[0]
    except StopIteration:
        raise ConfigError("data", "the data yielded no batch") from None
    return positional(model, _inputs(first).take(1))


def _rows(graph: DependencyGraph, tensors: dict[str, dict[str, torch.Tensor]], kinds: set[str]) -> dict[int, torch.Tensor]:
    """Sum per class of ``f(tensor row)`` already reduced to one value per output position."""
    out: dict[int, torch.Tensor] = {}
    for name, use in graph.layers.items():
        if use.kind not in kinds or name not in tensors:
            continue
        if use.kind == "attn":  # per query head, per key/value head, per output feature
            q, kv, o = head_sums(graph.model.get_submodule(name), tensors[name])
            for atoms, per in ((use.heads, q), (use.kv_heads, kv), (use.out_atoms, o)):
                for i, a in enumerate(atoms):
                    r = graph.find(a)
                    out[r] = out.get(r, 0) + per[i]
            continue
        for per_pos in tensors[name].values():
            for i, a in enumerate(use.out_atoms):
                r = graph.find(a)
                out[r] = out.get(r, 0) + per_pos[i]
    return out


def _attn_tensors(model: nn.Module, graph: DependencyGraph, f: Any) -> dict[str, dict[str, torch.Tensor]]:
    """``{attention layer: {parameter name: f(parameter)}}``."""
    return {n: {pn: f(p) for pn, p in model.get_submodule(n).named_parameters()} for n, u in graph.layers.items()
            if u.kind == "attn"}


def _per_position(m: nn.Module, kind: str, t: torch.Tensor) -> torch.Tensor:
    if kind == "convT" and t.dim() > 1:
        return t.transpose(0, 1).reshape(t.shape[1], -1).sum(1)
    return t.reshape(t.shape[0], -1).sum(1)


def l1_scores(model: nn.Module, graph: DependencyGraph) -> dict[int, float]:
    """``s_c = Σ_l ‖W_l[c]‖₁`` over the layers that produce class ``c`` (Li et al. 2017)."""
    tensors = {n: {"w": _per_position(model.get_submodule(n), u.kind, model.get_submodule(n).weight.detach().abs())}
               for n, u in graph.layers.items() if u.kind in ("conv", "gconv", "convT", "linear")}
    tensors.update(_attn_tensors(model, graph, lambda p: p.detach().abs()))
    return {r: float(v) for r, v in _rows(graph, tensors, {"conv", "gconv", "convT", "linear", "attn"}).items()}


def bn_scores(model: nn.Module, graph: DependencyGraph) -> dict[int, float]:
    """``s_c = Σ_l |γ_l[c]|`` over the BatchNorm layers of class ``c`` (Liu et al. 2017); classes
    without BatchNorm get their L1 filter norm (and the fallback is logged)."""
    tensors = {n: {"g": model.get_submodule(n).weight.detach().abs()} for n, u in graph.layers.items()
               if u.kind == "bn" and model.get_submodule(n).weight is not None}
    scores = {r: float(v) for r, v in _rows(graph, tensors, {"bn"}).items()}
    missing = [g for g in graph.groups if not all(c in scores for c in g.classes)]
    if missing:
        l1 = l1_scores(model, graph)
        log.info("bn_scale: %d channel groups have no BatchNorm (%s); scored by L1 filter norm",
                 len(missing), ", ".join(g.producers[0] for g in missing[:5]))
        for g in missing:
            for c in g.classes:
                scores.setdefault(c, l1[c])
    return scores


def taylor_scores(model: nn.Module, graph: DependencyGraph, batches: Any, task: Any = None) -> dict[int, float]:
    """``s_c = mean_batches (Σ_{k∈c} g_k w_k)²`` over weights, biases and BN scale/shift (Molchanov
    2019), with the loss of ``task`` (classification by default); ``batches`` yields ``(inputs, target)``."""
    task = resolve_task(task)
    params: list[tuple[str, str, torch.Tensor]] = []
    for name, use in graph.layers.items():
        m = model.get_submodule(name)
        if use.kind == "attn":
            params += [(name, pname, p) for pname, p in m.named_parameters() if p.requires_grad]
            continue
        for pname in ("weight", "bias"):
            p = getattr(m, pname, None)
            if isinstance(p, torch.Tensor) and p.requires_grad and use.kind != "prelu":
                params.append((name, pname, p))
    sums: dict[int, float] = {}
    count = 0
    with eval_mode(model):
        for x, y in batches:
            loss = task.compute_loss(task.forward(model, _inputs(x)), y)
            grads = torch.autograd.grad(loss, [p for _, _, p in params], allow_unused=True)
            acc: dict[str, dict[str, torch.Tensor]] = {}
            for (name, pname, p), g in zip(params, grads):
                if g is None:
                    continue
                kind = graph.layers[name].kind
                gw = (g * p).detach()
                acc.setdefault(name, {})[pname] = gw if kind == "attn" else _per_position(None, kind, gw)
            for name, use in graph.layers.items():  # an unused bias (no gradient) contributes zero
                if use.kind == "attn" and name in acc:
                    for pname, p in model.get_submodule(name).named_parameters():
                        acc[name].setdefault(pname, torch.zeros_like(p))
            per_class = _rows(graph, acc, {"conv", "gconv", "dwconv", "convT", "linear", "bn", "ln", "attn"})
            for r, v in per_class.items():
                sums[r] = sums.get(r, 0.0) + float(v) ** 2
            count += 1
    if count == 0:
        raise ConfigError("data", "the data yielded no batch")
    return {r: v / count for r, v in sums.items()}


def plan_removal(graph: DependencyGraph, scores: dict[int, float], config: ChannelConfig) -> set[int]:
    """The classes to remove. ``scope: group``: in each group the ``ratio`` (or ``layer_ratio`` of
    one of its layers) lowest-scored classes. ``scope: global``: the ``ratio`` lowest-scored of all
    chosen classes together (scores must be comparable across layers, as BN scales after slimming
    are). ``threshold``: every class scored below it. Each group keeps at least one class (its best);
    groups none of whose producers is in ``layers`` are left alone. Head groups (attention) always
    lose their ``layer_ratio`` / ``head_ratio`` / ``ratio`` lowest-scored heads, per layer."""
    removed: set[int] = set()
    groups = [g for g in graph.groups if config.layers is None or set(g.producers) & set(config.layers)]
    for g in [g for g in groups if g.kind == "heads"]:  # heads: always per layer, head_ratio
        ratio = next((config.layer_ratio[p] for p in g.producers if p in config.layer_ratio),
                     config.ratio if config.head_ratio is None else config.head_ratio)
        k = min(int(ratio * g.size + 1e-9), g.size - 1)
        removed.update(sorted(g.classes, key=lambda c: (scores.get(c, 0.0), c))[:max(k, 0)])
    groups = [g for g in groups if g.kind != "heads"]
    if config.threshold is not None or config.scope == "global":
        pool = [(scores.get(c, 0.0), c) for g in groups for c in g.classes]
        if config.threshold is not None:
            cut = {c for s, c in pool if s < config.threshold}
        else:
            cut = {c for _, c in sorted(pool)[: int(config.ratio * len(pool) + 1e-9)]}
        for g in groups:
            best = max(g.classes, key=lambda c: (scores.get(c, 0.0), -c))
            removed.update(c for c in g.classes if c in cut and c != best)
        return removed
    for g in groups:
        ratio = next((config.layer_ratio[p] for p in g.producers if p in config.layer_ratio), config.ratio)
        k = min(int(ratio * g.size + 1e-9), g.size - 1)
        if k <= 0:
            continue
        order = sorted(g.classes, key=lambda c: (scores.get(c, 0.0), c))
        removed.update(order[:k])
    return removed


@handler(ChannelConfig)
def channel_prune(model: nn.Module, config: ChannelConfig, data: Any = None, task: Any = None) -> ChannelResult:
    """Build the dependency graph of ``model``, score, and remove (or, with ``mode: zero``, zero) the
    lowest-scored channels in place. Returns a :class:`ChannelResult`. A ``transformers`` model is
    pruned block by block instead (heads and MLP units, :mod:`.hf`)."""
    from .hf import is_hf_model, prune_hf

    if is_hf_model(model):
        return prune_hf(model, config, data, task)
    graph = DependencyGraph.build(model, example_inputs(model, config, data, task), strict=config.strict,
                                  approximate_layernorm=config.approximate_layernorm, gqa_heads=config.gqa_heads)
    if config.criterion == "l1":
        scores = l1_scores(model, graph)
    elif config.criterion == "bn_scale":
        scores = bn_scores(model, graph)
    else:
        if data is None:
            raise ConfigError("data", "criterion 'taylor' scores channels on data: pass data=Splits, Dataset or DataLoader")
        batches = iter_batches(getattr(data, "train", data), config.batches, config.batch_size, config.seed, device_of(model),
                               task=resolve_task(task))
        scores = taylor_scores(model, graph, batches, task)
    removed = plan_removal(graph, scores, config)
    dense = copy.deepcopy(model) if config.reconstruct and config.mode == "remove" else None
    if config.mode == "zero":
        zero_channels(model, graph, removed)
        channels = {}
    else:
        channels = remove_channels(model, graph, removed)
    if dense is not None:
        if data is None:
            raise ConfigError("data", "reconstruct: true refits layers on data: pass data=Splits, Dataset or DataLoader")
        batches = iter_batches(getattr(data, "train", data), config.batches, config.batch_size, config.seed + 1, device_of(model),
                               task=resolve_task(task))
        refit = reconstruct_(model, dense, graph, removed, batches, config.ridge)
        log.info("least-squares reconstruction refit %d layers", len(refit))
    log.info("structured pruning removed %d channel classes in %d groups", len(removed), len(graph.groups))
    return ChannelResult(channels, len(removed), len(graph.groups), list(graph.messages))


def structured_prune_(model: nn.Module, ratio: float = 0.5, criterion: Criterion = "l1", data: Any = None, **kwargs: Any) -> ChannelResult:
    """Shorthand for ``prune_(model, ChannelConfig(ratio=..., criterion=..., **kwargs), data=data)``."""
    return channel_prune(model, ChannelConfig(ratio=ratio, criterion=criterion, **kwargs), data=data)


__all__ = [
    "ChannelConfig",
    "ChannelResult",
    "bn_scores",
    "channel_prune",
    "example_inputs",
    "l1_scores",
    "plan_removal",
    "structured_prune_",
    "taylor_scores",
]
