"""Sensitivity analysis and automatic per-layer sparsity under a global budget.

**Sensitivity sweep** (the per-layer analysis of Han et al., "Learning both Weights and Connections
for Efficient Neural Networks", NeurIPS 2015, Fig. 5; Li et al., "Pruning Filters for Efficient
ConvNets", ICLR 2017, Fig. 2). Each layer ``l`` alone is pruned to every sparsity ``s`` of a grid
(the rest of the network dense) with any registered criterion, and the task's validation metric
``e_l(s)`` (top-1 error by default; perplexity for a language model, MSE for regression) and loss
``L_l(s)`` are measured on a fixed, seeded subset of the validation split
(:func:`netshrink._allocate.evaluate`; batches as tuples or dicts, read through the task). The
curves are written as CSV and plotted as PNG (:meth:`SensitivityCurves.to_csv`, :meth:`plot`).

**Allocation.** Per-layer sparsities ``s_l`` are chosen to meet a global budget with the least
predicted loss, under the usual additive model of layer damage (the curves of single layers add):

    minimise  Σ_l Δ_l(s_l),   Δ_l(s) = m_l(s) − m_base   (m = loss or error; made non-decreasing in s)
    subject to Σ_l c_l · keep_l(s_l) ≤ (1 − target) · Σ_l c_l · n_l

with ``n_l`` the layer's weights, ``keep_l(s) = n_l − round(s n_l)``, and ``c_l = 1`` for a parameter
budget or ``c_l = MACs_l / n_l`` (MACs per weight of one example) for a MAC budget. This is a
multiple-choice knapsack, solved exactly by dynamic programming over the integer costs (divided by
their gcd; :func:`netshrink._allocate.knapsack_min`, shared with ``mixed_precision`` and ``auto_channel``). Where that needs more than ``resolution`` units, the budget is cut into ``resolution``
units and every cost rounded *up* — the answer still meets the true budget, but may leave up to
``layers/resolution`` of it unused. A budget that even the
sparsest grid point of every layer misses raises :class:`ConfigError`. Measured latency is not a
budget here: a masked (unstructured) model runs at dense speed; see :mod:`netshrink.prune.sparse_exec`.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from torch import nn

from .._extras import require
from .._allocate import eval_subset, evaluate, glob_escape, knapsack_min, layer_macs, val_source
from .._layers import select_layers
from .._registry import HandlerContext, config_type, handler, method_info, register, run_handler
from ..config import BaseConfig, check_range
from ..errors import ConfigError
from ..task import Task, resolve_task
from ._select import keep_count
from .magnitude import PruneResult

log = logging.getLogger(__name__)

#: the default sparsity grid: coarse where layers rarely break, fine near the top where they do
DEFAULT_GRID: tuple[float, ...] = (0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)

Metric = Literal["loss", "error"]

# ------------------------------------------------------------------------------------- curves


@dataclass
class SensitivityCurves:
    """Per-layer curves: ``error[l][i]`` and ``loss[l][i]`` with layer ``l`` alone at ``sparsities[i]``;
    ``params[l]`` weights and ``macs[l]`` dense MACs of one example per layer."""

    sparsities: list[float]
    base_error: float
    base_loss: float
    error: dict[str, list[float]]
    loss: dict[str, list[float]]
    params: dict[str, int]
    macs: dict[str, int]
    criterion: str = "magnitude"
    samples: int = 0
    #: what ``error`` holds: the task's metric (``error``, ``perplexity``, ``mse``)
    metric_name: str = "error"

    @property
    def layers(self) -> list[str]:
        return list(self.error)

    def rise(self, layer: str, metric: Metric = "loss") -> np.ndarray:
        """``m_l(s) − m_base`` along the grid, made non-decreasing (a sparser layer is assumed no
        better: this removes the noise of a finite validation subset)."""
        values = np.asarray(self.loss[layer] if metric == "loss" else self.error[layer], dtype=np.float64)
        base = self.base_loss if metric == "loss" else self.base_error
        return np.maximum.accumulate(values - base)

    def to_csv(self, path: str | os.PathLike[str]) -> Path:
        """One row per (layer, sparsity): ``layer, params, macs, sparsity, error, loss``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["layer", "params", "macs", "sparsity", "error", "loss"])
            for n in self.layers:
                for s, e, lo in zip(self.sparsities, self.error[n], self.loss[n]):
                    w.writerow([n, self.params[n], self.macs[n], f"{s:.4f}", f"{e:.6f}", f"{lo:.6f}"])
        return path

    def plot(self, path: str | os.PathLike[str], metric: Metric = "error") -> Path:
        """PNG of ``metric`` against each layer's sparsity, the dense value dashed."""
        matplotlib = require("matplotlib", "plot")

        matplotlib.use("Agg")
        from matplotlib.figure import Figure

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig = Figure(figsize=(6.4, 4.2), dpi=110)
        ax = fig.subplots()
        scale = 100.0 if metric == "error" and self.metric_name == "error" else 1.0
        for n in self.layers:
            values = self.error[n] if metric == "error" else self.loss[n]
            ax.plot(self.sparsities, [v * scale for v in values], marker="o", markersize=3, label=f"{n} ({self.params[n]:,} w)")
        ax.axhline((self.base_error if metric == "error" else self.base_loss) * scale, color="gray", linestyle="--", linewidth=1, label="dense")
        ax.set_xlabel("sparsity of the layer (others dense)")
        label = "validation error (%)" if self.metric_name == "error" else f"validation {self.metric_name}"
        ax.set_ylabel(label if metric == "error" else "validation loss")
        ax.set_title(f"sensitivity ({self.criterion}, {self.samples} validation samples)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
        return path


def _criterion_config(criterion: str, args: dict[str, Any], **fields: Any) -> BaseConfig:
    return config_type(criterion, field="criterion").from_dict({**args, **fields}, where="criterion_args")


def _check_criterion(criterion: str, args: dict[str, Any]) -> None:
    if criterion in ("auto_sparsity", "iterative"):
        raise ConfigError("criterion", f"{criterion!r} is a procedure, not a criterion")
    cls = config_type(criterion, field="criterion")
    fields = cls.__dataclass_fields__
    if method_info(criterion).family != "prune" or "layer_sparsity" not in fields or "layers" not in fields:
        raise ConfigError("criterion", f"{criterion!r} is not a pruning criterion with per-layer sparsity")
    for key in ("sparsity", "layer_sparsity", "layers", "scope", "steps"):
        if key in args:
            raise ConfigError(f"criterion_args.{key}", "set by the sensitivity analysis")


def sensitivity_sweep(
    model: nn.Module,
    data: Any,
    layers: Sequence[str] | None = None,
    grid: Sequence[float] = DEFAULT_GRID,
    criterion: str = "magnitude",
    criterion_args: dict[str, Any] | None = None,
    samples: int = 2000,
    seed: int = 0,
    task: Task | str | None = None,
) -> SensitivityCurves:
    """Prune each chosen layer alone to every sparsity of ``grid`` (on a copy of ``model``) with
    ``criterion`` and measure the task's metric and loss on ``samples`` seeded examples of the
    validation split (``data.val`` of a ``Splits``, or a Dataset / DataLoader of batches in any form
    ``task`` splits). ``data`` itself (and ``task``) go to data-driven criteria."""
    task = resolve_task(task)
    args = dict(criterion_args or {})
    _check_criterion(criterion, args)
    grid = sorted({float(s) for s in grid})
    for s in grid:
        check_range("grid", s, 0.0, 1.0, hi_open=True)
    subset = eval_subset(val_source(data, "the sensitivity sweep"), samples, seed, task=task)
    chosen = select_layers(model, layers)
    macs = layer_macs(model, chosen, subset.example(task))
    base_error, base_loss = evaluate(model, subset, task=task)
    errors: dict[str, list[float]] = {}
    losses: dict[str, list[float]] = {}
    ctx = HandlerContext(data=data, task=task)
    for n in chosen:
        errors[n], losses[n] = [], []
        for s in grid:
            if s == 0.0:
                e, lo = base_error, base_loss
            else:
                clone = copy.deepcopy(model)
                cfg = _criterion_config(criterion, args, sparsity=s, layers=[glob_escape(n)])
                run_handler(clone, cfg, ctx)
                e, lo = evaluate(clone, subset, task=task)
            errors[n].append(e)
            losses[n].append(lo)
        log.info("sensitivity %s: %s %s", n, task.metric_name, ", ".join(f"{s:.2f}:{e:.4f}" for s, e in zip(grid, errors[n])))
    params = {n: int(m.weight.numel()) for n, m in chosen.items()}
    return SensitivityCurves(list(grid), base_error, base_loss, errors, losses, params, macs, criterion, subset.samples,
                             task.metric_name)


# ---------------------------------------------------------------------------------- allocation


@dataclass
class Allocation:
    """Chosen ``layer_sparsity``; the predicted rise of the metric (additive model); the resource
    ``kept`` against the ``budget`` (both in weights, or MACs of one example) and the dense ``total``."""

    layer_sparsity: dict[str, float]
    predicted_rise: float
    kept: float
    budget: float
    total: float
    kind: str
    metric: str

    @property
    def reduction(self) -> float:
        """``1 − kept/total``: the fraction of the budgeted resource removed."""
        return 1.0 - self.kept / self.total if self.total else 0.0


def allocate(
    curves: SensitivityCurves,
    sparsity: float,
    budget: Literal["params", "macs"] = "params",
    metric: Metric = "loss",
    resolution: int = 1_000_000,
) -> Allocation:
    """Per-layer sparsities from the grid of ``curves`` that remove at least ``sparsity`` of the
    budgeted resource with the least predicted rise of ``metric`` (exact DP; see the module docstring)."""
    check_range("sparsity", sparsity, 0.0, 1.0, hi_open=True)
    if resolution < 10:
        raise ConfigError("resolution", f"must be at least 10, got {resolution}")
    names = curves.layers
    # integer costs: weights kept, or MACs of one example (positions × weights kept)
    per_weight = {n: (curves.macs[n] // max(1, curves.params[n]) if budget == "macs" else 1) for n in names}
    cost = {n: np.array([per_weight[n] * keep_count(curves.params[n], s) for s in curves.sparsities], dtype=np.int64) for n in names}
    rise = {n: curves.rise(n, metric) for n in names}
    total = int(sum(per_weight[n] * curves.params[n] for n in names))
    if total <= 0:
        raise ConfigError("budget", f"the chosen layers have no {budget} to budget")
    cap = (1.0 - sparsity) * total
    least = int(sum(int(c.min()) for c in cost.values()))
    if least > cap:
        top = 1.0 - least / total
        raise ConfigError("sparsity", f"budget cannot be met: the sparsest grid point of every layer removes {top:.4f} of the {budget}, "
                          f"less than {sparsity}; extend the grid or lower the target")
    choice = knapsack_min([cost[n] for n in names], [rise[n] for n in names], cap, resolution)
    picked = dict(zip(names, choice))
    layer_sparsity = {n: curves.sparsities[picked[n]] for n in names}
    kept = float(sum(int(cost[n][picked[n]]) for n in names))
    predicted = float(sum(rise[n][picked[n]] for n in names))
    return Allocation(layer_sparsity, predicted, kept, cap, float(total), budget, metric)


# ------------------------------------------------------------------------------------- method


@register("auto_sparsity", family="prune")
@dataclass
class AutoSparsityConfig(BaseConfig):
    """Per-layer sparsity chosen for you: sensitivity sweep, then the least-loss allocation meeting a global budget.

    ``sparsity``: the fraction of the budgeted resource (``budget: params`` — weights of the chosen
    layers — or ``macs``) to remove. ``criterion`` (+ ``criterion_args``) scores the weights in the
    sweep and in the final pruning. ``report_dir``: where ``sensitivity.csv``, ``sensitivity.png``
    and ``allocation.json`` go (nothing written when None).
    """

    sparsity: float = 0.9
    budget: Literal["params", "macs"] = "params"
    criterion: str = "magnitude"
    criterion_args: dict[str, Any] = field(default_factory=dict)
    grid: list[float] = field(default_factory=lambda: list(DEFAULT_GRID))
    metric: Metric = "loss"
    samples: int = 2000
    resolution: int = 1_000_000
    layers: list[str] | None = None
    report_dir: str | None = None

    def validate(self) -> None:
        check_range("sparsity", self.sparsity, 0.0, 1.0, hi_open=True)
        if not self.grid:
            raise ConfigError("grid", "needs at least one sparsity")
        for i, s in enumerate(self.grid):
            check_range(f"grid[{i}]", s, 0.0, 1.0, hi_open=True)
        if self.samples < 1:
            raise ConfigError("samples", f"must be at least 1, got {self.samples}")
        if self.resolution < 10:
            raise ConfigError("resolution", f"must be at least 10, got {self.resolution}")
        _check_criterion(self.criterion, self.criterion_args)
        _criterion_config(self.criterion, self.criterion_args, sparsity=0.5)  # the criterion's own checks

    def check_model(self, model: nn.Module) -> None:
        select_layers(model, self.layers)


@dataclass
class AutoSparsityResult(PruneResult):
    """Per-layer sparsity reached, with the :class:`Allocation` and the :class:`SensitivityCurves` behind it."""

    allocation: Allocation | None = None
    curves: SensitivityCurves | None = None


@handler(AutoSparsityConfig)
def auto_sparsity_prune(model: nn.Module, config: AutoSparsityConfig, data: Any = None, task: Task | None = None) -> AutoSparsityResult:
    """Sweep, allocate, then prune every chosen layer to its allocated sparsity with the criterion
    (sweep and criterion both on ``task``'s batches, loss and metric; classification when None)."""
    if data is None:
        raise ConfigError("data", "auto_sparsity measures each layer's sensitivity: pass data=Splits or a Dataset")
    task = resolve_task(task)
    curves = sensitivity_sweep(model, data, config.layers, config.grid, config.criterion, config.criterion_args, config.samples,
                               task=task)
    alloc = allocate(curves, config.sparsity, config.budget, config.metric, config.resolution)
    log.info("auto_sparsity: %s (predicted %s rise %.4f)", alloc.layer_sparsity, config.metric, alloc.predicted_rise)
    names = list(alloc.layer_sparsity)
    cfg = _criterion_config(
        config.criterion, config.criterion_args,
        layer_sparsity={glob_escape(n): s for n, s in alloc.layer_sparsity.items()},
        layers=[glob_escape(n) for n in names],
    )
    run_handler(model, cfg, HandlerContext(data=data, task=task))
    if config.report_dir is not None:
        out = Path(config.report_dir)
        curves.to_csv(out / "sensitivity.csv")
        curves.plot(out / "sensitivity.png")
        (out / "allocation.json").write_text(json.dumps(asdict(alloc), indent=2))
    chosen = select_layers(model, config.layers)
    sparsity = {n: 1.0 - float((m.weight != 0).float().mean()) for n, m in chosen.items()}
    return AutoSparsityResult(sparsity, alloc, curves)


__all__ = [
    "DEFAULT_GRID",
    "SensitivityCurves",
    "sensitivity_sweep",
    "evaluate",
    "Allocation",
    "allocate",
    "knapsack_min",
    "AutoSparsityConfig",
    "AutoSparsityResult",
    "auto_sparsity_prune",
]
