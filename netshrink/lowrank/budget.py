"""Global rank allocation: per-layer ranks that meet a parameter or MACs budget with the least loss.

Like a global pruning budget, the ranks are chosen jointly. Each chosen layer has candidates: dense (no
change) and low-rank versions at ``levels`` (fractions ``f`` of its full rank: SVD rank
``ceil(f min(out, in))`` for a Linear, Tucker-2 ranks ``(ceil(f N), ceil(f C))`` for a Conv2d), each
with a cost (parameters, or MACs per example) and a damage ``d``:

- ``criterion="loss"``: the increase of the training loss (the task's: cross-entropy by default, token
  cross-entropy for a language model, MSE for regression), on a few fixed batches, when only that
  layer is replaced by that candidate (a sensitivity analysis, as for pruning: Li et al., ICLR 2017);
- ``criterion="error"``: the squared relative Frobenius error of the layer's weight (data-free).

Allocation (greedy, a marginal-cost rule for the multiple-choice knapsack): start every layer dense; while
the model costs more than ``ratio`` times its dense cost, move the one layer whose next cheaper candidate
adds the least damage per unit of cost saved, ``(d_next - d_now) / (c_now - c_next)``. Candidates that cost
more than the dense layer are dropped. If even every layer at its cheapest candidate misses the budget,
a :class:`ConfigError` says by how much.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from .._registry import handler, register
from ..config import BaseConfig, check_range
from ..errors import ConfigError
from .._allocate import iter_batches, train_source
from ..task import Inputs, Task, resolve_task
from ._common import FactorizeResult, conv2d_reason, rel_error, target_layers
from .conv import tucker2_factors
from .conv_methods import TuckerConfig, conv_decompose
from .rank_select import tucker2_macs
from .svd import SvdConfig, svd_factorize, svd_factors

log = logging.getLogger(__name__)


def _reason(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return None
    return conv2d_reason(module)


@dataclass(frozen=True)
class Candidate:
    """One choice for a layer: ``ranks`` (None: dense), its ``cost`` and ``damage``."""

    ranks: tuple[int, ...] | None
    cost: float
    damage: float


@register("rank_budget", family="lowrank")
@dataclass
class RankBudgetConfig(BaseConfig):
    """Global rank allocation (SVD for Linear, Tucker-2 for Conv2d) to meet a params or MACs budget."""

    replaces_modules: ClassVar[bool] = True

    params_ratio: float | None = None  # the whole model's parameters after / before
    macs_ratio: float | None = None  # or its MACs per example after / before
    layers: list[str] | None = None
    levels: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75])
    criterion: Literal["loss", "error"] = "loss"
    input_shape: list[int] | None = None  # one example's shape, for MACs without data (e.g. [1, 28, 28])
    batches: int = 4
    batch_size: int = 128
    seed: int = 0
    n_iter_max: int = 20  # HOOI iterations of the Tucker candidates

    def validate(self) -> None:
        if (self.params_ratio is None) == (self.macs_ratio is None):
            raise ConfigError("params_ratio", "give exactly one of params_ratio and macs_ratio")
        for name in ("params_ratio", "macs_ratio"):
            if getattr(self, name) is not None:
                check_range(name, getattr(self, name), 0.0, 1.0, lo_open=True)
        if not self.levels:
            raise ConfigError("levels", "give at least one fraction of the full rank")
        for i, f in enumerate(self.levels):
            check_range(f"levels[{i}]", f, 0.0, 1.0, lo_open=True)
        for name in ("batches", "batch_size", "n_iter_max"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be at least 1, got {getattr(self, name)}")
        if self.input_shape is not None and (not self.input_shape or min(self.input_shape) < 1):
            raise ConfigError("input_shape", f"expected positive sizes, got {self.input_shape}")

    @property
    def budget_field(self) -> str:
        return "params_ratio" if self.params_ratio is not None else "macs_ratio"

    def targets(self, model: nn.Module) -> dict[str, nn.Module]:
        return target_layers(model, self.layers, "rank_budget", _reason)

    def check_model(self, model: nn.Module) -> None:
        self.targets(model)


def _example(config: RankBudgetConfig, data: Any, device: torch.device, task: Task) -> Inputs | None:
    if config.input_shape is not None:
        return Inputs((torch.zeros(1, *config.input_shape, device=device),))
    if data is None:
        return None
    x, _ = next(iter_batches(train_source(data, "rank_budget"), 1, 1, config.seed, device, task))
    return x.take(1)


def _positions(model: nn.Module, layers: dict[str, nn.Module], x: Inputs) -> dict[str, tuple[float, float]]:
    """Per layer and example: (input positions, output positions) -- spatial sizes, or rows for a Linear."""
    found: dict[str, tuple[float, float]] = {}

    def hook(name: str):
        def fn(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            c_in = module.in_features if isinstance(module, nn.Linear) else module.in_channels
            c_out = module.out_features if isinstance(module, nn.Linear) else module.out_channels
            found[name] = (args[0].numel() / c_in, out.numel() / c_out)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x.call(model)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    missing = [n for n in layers if n not in found]
    if missing:
        raise ConfigError("layers", f"layer {missing[0]!r} does not run in the model's forward pass")
    return found


def _bias(layer: nn.Module) -> int:
    return 0 if layer.bias is None else layer.bias.numel()


def _candidate_module(layer: nn.Module, ranks: tuple[int, ...], n_iter_max: int, seed: int) -> tuple[nn.Module, torch.Tensor]:
    """A model-free replacement for scoring: the approximated layer as a plain Linear/Conv2d of the
    reconstructed weight (same function as the factorized module), and that weight."""
    if isinstance(layer, nn.Linear):
        w = svd_factors(layer.weight.detach(), ranks[0]).reconstruct()
    else:
        w = tucker2_factors(layer.weight.detach(), ranks, seed=seed, n_iter_max=n_iter_max).reconstruct()
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.weight.copy_(w.reshape(twin.weight.shape))
    return twin, w


def _candidates(layer: nn.Module, levels: list[float], pos: tuple[float, float], use_macs: bool) -> list[tuple[tuple[int, ...] | None, float]]:
    """(ranks, cost) for dense and each level, sorted by cost descending; none costlier than dense."""
    p_in, p_out = pos
    if isinstance(layer, nn.Linear):
        n_out, n_in = layer.weight.shape
        dense = (n_out * n_in * p_out) if use_macs else n_out * n_in + _bias(layer)
        out: list[tuple[tuple[int, ...] | None, float]] = [(None, dense)]
        for f in sorted(set(levels), reverse=True):
            r = max(1, math.ceil(f * min(n_out, n_in)))
            cost = r * (n_in + n_out) * p_out if use_macs else r * (n_in + n_out) + _bias(layer)
            out.append(((r,), cost))
    else:
        n, c, kh, kw = layer.weight.shape
        dense = n * c * kh * kw * p_out if use_macs else n * c * kh * kw + _bias(layer)
        out = [(None, dense)]
        for f in sorted(set(levels), reverse=True):
            r_out, r_in = max(1, math.ceil(f * n)), max(1, math.ceil(f * c))
            if use_macs:
                cost = tucker2_macs(n, c, kh, kw, r_out, r_in, p_in, p_out)
            else:
                cost = c * r_in + r_in * r_out * kh * kw + r_out * n + _bias(layer)
            out.append(((r_out, r_in), cost))
    seen, kept = set(), []
    for ranks, cost in out:
        if (ranks is None or cost < dense) and ranks not in seen:
            seen.add(ranks)
            kept.append((ranks, cost))
    return sorted(kept, key=lambda rc: -rc[1])


def _loss(model: nn.Module, batches: list[tuple[Inputs, Any]], task: Task) -> float:
    """The task's mean batch loss in eval mode (scoring must not move BatchNorm's running statistics)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return sum(float(task.compute_loss(task.forward(model, x), y)) for x, y in batches) / len(batches)
    finally:
        model.train(was_training)


def allocate(candidates: dict[str, list[Candidate]], fixed_cost: float, budget: float) -> dict[str, Candidate] | None:
    """The greedy allocation of the module doc: per layer one candidate, total cost ``<= budget``, or None
    when even the cheapest candidates miss it. ``candidates[name]`` is sorted by cost, dense first."""
    if fixed_cost + sum(c[-1].cost for c in candidates.values()) > budget + 1e-9:
        return None
    at = {n: 0 for n in candidates}
    total = fixed_cost + sum(c[0].cost for c in candidates.values())
    while total > budget + 1e-9:
        best, best_rate = None, math.inf
        for n, cands in candidates.items():
            i = at[n]
            if i + 1 < len(cands):
                now, nxt = cands[i], cands[i + 1]
                rate = (nxt.damage - now.damage) / max(now.cost - nxt.cost, 1e-12)
                if rate < best_rate:
                    best, best_rate = n, rate
        assert best is not None  # the feasibility check above guarantees a move
        i = at[best]
        total -= candidates[best][i].cost - candidates[best][i + 1].cost
        at[best] = i + 1
    return {n: candidates[n][i] for n, i in at.items()}


@handler(RankBudgetConfig)
def rank_budget_factorize(model: nn.Module, config: RankBudgetConfig, data: Any = None, task: Task | None = None) -> FactorizeResult:
    """Choose per-layer ranks by :func:`allocate` and factorize ``model`` in place with them; the
    ``loss`` criterion scores on ``task``'s batches and loss (classification when None)."""
    task = resolve_task(task)
    layers = config.targets(model)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    use_macs = config.macs_ratio is not None
    if config.criterion == "loss" and data is None:
        raise ConfigError("data", "criterion 'loss' scores ranks on data: pass data=, or use criterion: error")
    x = _example(config, data, device, task)
    if x is None and use_macs:
        raise ConfigError("input_shape", "a MACs budget needs an example input: pass data= or give input_shape")
    positions = _positions(model, layers, x) if x is not None else {n: (1.0, 1.0) for n in layers}
    if use_macs:
        total = 0.0
        all_convs = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))}
        pos_all = _positions(model, all_convs, x)
        for n, m in all_convs.items():
            total += m.weight.numel() * pos_all[n][1]
    else:
        total = float(sum(p.numel() for p in model.parameters()))
    batches = list(iter_batches(train_source(data, "rank_budget"), config.batches, config.batch_size, config.seed,
                                device, task)) if config.criterion == "loss" else []
    base = _loss(model, batches, task) if batches else 0.0
    cands: dict[str, list[Candidate]] = {}
    for name, layer in layers.items():
        parent_path, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_path)
        scored = []
        for ranks, cost in _candidates(layer, config.levels, positions[name], use_macs):
            if ranks is None:
                scored.append(Candidate(None, cost, 0.0))
                continue
            twin, w = _candidate_module(layer, ranks, config.n_iter_max, config.seed)
            if batches:
                setattr(parent, attr, twin)
                try:
                    damage = _loss(model, batches, task) - base
                finally:
                    setattr(parent, attr, layer)
            else:
                damage = rel_error(layer.weight, w) ** 2
            scored.append(Candidate(ranks, cost, damage))
        cands[name] = scored
    fixed = total - sum(c[0].cost for c in cands.values())
    budget = getattr(config, config.budget_field) * total
    chosen = allocate(cands, fixed, budget)
    if chosen is None:
        least = fixed + sum(c[-1].cost for c in cands.values())
        raise ConfigError(config.budget_field, f"a budget of {getattr(config, config.budget_field):g} cannot be met: "
                                               f"the smallest ranks at these levels reach {least / total:.4f} of the dense "
                                               f"{'MACs' if use_macs else 'parameters'} (the layers left out cost {fixed / total:.4f})")
    done = {}
    for name, cand in chosen.items():
        log.info("rank_budget %s: ranks %s, cost %.0f, damage %.4g", name, cand.ranks, cand.cost, cand.damage)
        if cand.ranks is None:
            continue
        layer = model.get_submodule(name)
        if isinstance(layer, nn.Linear):
            res = svd_factorize(model, SvdConfig(rank=cand.ranks[0], layers=[name]))
        else:
            res = conv_decompose(model, TuckerConfig(rank=list(cand.ranks), layers=[name], seed=config.seed))
        done.update(res.layers)
    return FactorizeResult(done)


__all__ = ["Candidate", "RankBudgetConfig", "allocate", "rank_budget_factorize"]
