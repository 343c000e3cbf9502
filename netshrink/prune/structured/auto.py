"""Per-layer channel ratios chosen for you under a global parameter, MAC or measured-latency budget.

The structured counterpart of :mod:`netshrink.prune.sensitivity`. Each channel group (named by its
first producing layer) alone is pruned to every ratio of a grid on a copy of the model (the rest
dense), and three things are measured: the validation loss on a fixed, seeded subset, the
parameters and MACs, and the forward latency at ``latency_batch`` (median of 20 runs). Under the
additive model of the survey's sensitivity analysis (the savings and the damage of single groups
add), the ratios are the least-loss choice whose predicted saving reaches ``reduction`` of the dense
model's budgeted resource: a multiple-choice knapsack, solved exactly by
:func:`netshrink._allocate.knapsack_min`. The model is then pruned once with those
``layer_ratio`` values by :func:`netshrink.prune.structured.channel_prune`, and the result records the
predicted and the measured resource, because latency does not add exactly (overheads, cache sizes).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ... import metrics
from ..._registry import handler, register
from ...config import BaseConfig, check_range
from ...errors import ConfigError
from ..._allocate import eval_subset, evaluate, knapsack_min
from ...task import resolve_task
from .channel import ChannelConfig, ChannelResult, Criterion, channel_prune, example_inputs
from .graph import DependencyGraph

log = logging.getLogger(__name__)

Budget = Literal["params", "macs", "latency"]


@register("auto_channel", family="prune")
@dataclass
class AutoChannelConfig(BaseConfig):
    """Per-layer channel ratios chosen for you: a structured sweep, then the least-loss ratios meeting a params, MACs or latency budget.

    ``reduction``: the fraction of the dense model's ``budget`` (``params``, ``macs``, or ``latency``
    measured at batch ``latency_batch``) to remove. ``grid``: the channel ratios tried per group.
    ``latency_runtime``: where a latency budget is measured — ``torch`` (eager) or ``onnxruntime`` (the
    deployed fp32 ONNX form, :func:`netshrink.deploy.measured_latency`), so the budget is met in the form
    that ships. ``criterion``: channel scores (``l1``, ``bn_scale``, ``taylor``). ``samples``: validation examples
    behind each loss. ``layers``: the producing layers whose groups may be pruned (default: all).
    """

    reduction: float = 0.5
    budget: Budget = "macs"
    criterion: Criterion = "l1"
    grid: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    samples: int = 1000
    latency_batch: int = 1
    latency_runtime: Literal["torch", "onnxruntime"] = "torch"
    layers: list[str] | None = None
    resolution: int = 100_000
    input_shape: list[int] | None = None

    def validate(self) -> None:
        check_range("reduction", self.reduction, 0.0, 1.0, hi_open=True)
        if not self.grid:
            raise ConfigError("grid", "needs at least one channel ratio")
        for i, r in enumerate(self.grid):
            check_range(f"grid[{i}]", r, 0.0, 1.0, lo_open=True, hi_open=True)
        if self.samples < 1:
            raise ConfigError("samples", f"must be at least 1, got {self.samples}")
        if self.latency_batch < 1:
            raise ConfigError("latency_batch", f"must be at least 1, got {self.latency_batch}")
        if self.resolution < 10:
            raise ConfigError("resolution", f"must be at least 10, got {self.resolution}")

    def check_model(self, model: nn.Module) -> None:
        """Every name in ``layers`` is a convolution, linear or attention layer of ``model``."""
        _channel_config(self, layers=self.layers).check_model(model)


@dataclass
class AutoChannelResult(ChannelResult):
    """:class:`ChannelResult` of the final pruning, with the allocation behind it."""

    layer_ratio: dict[str, float] = field(default_factory=dict)
    budget: str = "macs"
    dense_cost: float = 0.0
    predicted_cost: float = 0.0
    measured_cost: float = 0.0
    predicted_loss_rise: float = 0.0


def _cost(model: nn.Module, example: torch.Tensor, budget: str, batch: int, runtime: str = "torch") -> float:
    if budget == "params":
        return float(metrics.count_params(model))
    if budget == "macs":
        return float(metrics.macs(model, example).dense)
    if runtime == "onnxruntime":
        from ...deploy import measured_latency

        return measured_latency(model, example, batch, "onnxruntime", runs=20)
    return metrics.latency(model, example, batch_sizes=(batch,), runs=20)[batch].median_ms


def _channel_config(config: AutoChannelConfig, **fields: Any) -> ChannelConfig:
    return ChannelConfig(criterion=config.criterion, input_shape=config.input_shape, **fields)


@handler(AutoChannelConfig)
def auto_channel_prune(model: nn.Module, config: AutoChannelConfig, data: Any = None, task: Any = None) -> AutoChannelResult:
    """Sweep every channel group over the grid, allocate the ratios, prune once; see the module docstring.
    ``task``: how batches are read and the loss of the sweep (classification when None)."""
    task = resolve_task(task)
    val = getattr(data, "val", None)
    if val is None:
        raise ConfigError("data", "auto_channel measures each group's loss on validation data: pass data=Splits")
    example = example_inputs(model, _channel_config(config), data, task)[0]
    graph = DependencyGraph.build(model, (example,))
    names = [g.producers[0] for g in graph.groups if g.size > 1 and g.producers
             and (config.layers is None or set(g.producers) & set(config.layers))]
    if not names:
        raise ConfigError("layers", "no prunable channel group among the chosen layers")
    sub = eval_subset(val, config.samples, task=task)
    base_loss = evaluate(model, sub, task=task)[1]
    dense = _cost(model, example, config.budget, config.latency_batch, config.latency_runtime)
    grid = sorted(set(config.grid))
    savings, rises = [], []
    for name in names:
        s, r = [0.0], [0.0]  # option 0: the group stays dense
        for ratio in grid:
            trial = copy.deepcopy(model)
            channel_prune(trial, _channel_config(config, ratio=0.0, layer_ratio={name: ratio}, layers=[name]), data=data, task=task)
            s.append(max(0.0, dense - _cost(trial, example, config.budget, config.latency_batch, config.latency_runtime)))
            r.append(max(0.0, evaluate(trial, sub, task=task)[1] - base_loss))
        savings.append(np.maximum.accumulate(np.asarray(s)))  # a higher ratio never saves less
        rises.append(np.maximum.accumulate(np.asarray(r)))
    need = config.reduction * dense
    most = sum(float(s[-1]) for s in savings)
    if most < need - 1e-9:
        raise ConfigError("reduction", f"{config.reduction} of the {config.budget} cannot be met: the grid's largest ratios "
                                       f"remove {most / dense:.1%} by the sweep; add larger ratios to grid or lower reduction")
    scale = 1e3 if config.budget == "latency" else 1.0  # latency in microseconds for integer costs
    costs = [np.rint((s[-1] - s) * scale).astype(np.int64) for s in savings]  # saving not taken
    target = dense - need
    # group savings do not add exactly (pruning a layer's outputs also shrinks the next layer's inputs,
    # latency has overheads): measure the choice, and ask for the shortfall on top until it fits
    for _ in range(4):
        choice = knapsack_min(costs, rises, float(np.floor(max(0.0, most - need) * scale)), config.resolution)
        layer_ratio = {n: grid[j - 1] for n, j in zip(names, choice) if j > 0}
        trial = copy.deepcopy(model)
        channel_prune(trial, _channel_config(config, ratio=0.0, layer_ratio=layer_ratio, layers=list(layer_ratio) or names[:1]), data=data, task=task)
        measured = _cost(trial, example, config.budget, config.latency_batch, config.latency_runtime)
        if measured <= target * (1 + 1e-9) or need >= most:
            break
        need = min(most, need + measured - target)
    predicted = dense - sum(float(s[j]) for s, j in zip(savings, choice))
    rise = sum(float(r[j]) for r, j in zip(rises, choice))
    pruned = channel_prune(model, _channel_config(config, ratio=0.0, layer_ratio=layer_ratio, layers=list(layer_ratio) or names[:1]),
                           data=data, task=task)
    log.info("auto_channel: %s; %s %.4g -> predicted %.4g, measured %.4g", layer_ratio, config.budget, dense, predicted, measured)
    return AutoChannelResult(pruned.channels, pruned.removed, pruned.groups, pruned.notes, layer_ratio=layer_ratio,
                             budget=config.budget, dense_cost=dense, predicted_cost=predicted, measured_cost=measured,
                             predicted_loss_rise=rise)


__all__ = ["AutoChannelConfig", "AutoChannelResult", "auto_channel_prune"]
