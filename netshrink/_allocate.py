"""Allocators shared by the families: the multiple-choice knapsack and the sweep evaluation.

Pruning (``auto_sparsity``, ``auto_channel``), low rank (``rank_budget``) and quantization
(``mixed_precision``) all choose one option per layer (a sparsity, a ratio, a rank, a bit width) from
a sensitivity sweep: each layer alone is changed to each option on a copy of the model and the task's
loss and metric are measured on a fixed, seeded subset of the validation data; then the options are
chosen under a budget. This module holds those shared parts and imports no family:

- :func:`eval_subset`: the fixed evaluation batches (a seeded subset of a Dataset, or the first
  batches of a DataLoader / iterable), any batch form a :class:`~netshrink.task.Task` splits;
- :func:`evaluate`: ``(metric, loss)`` of a model on them, through the task (error and cross-entropy
  by default; perplexity and token cross-entropy for a language model; MSE for regression);
- :func:`layer_macs`: dense MACs per chosen layer for one example;
- :func:`train_source` / :func:`iter_batches`: a bounded, seeded stream of ``(inputs, target)`` batches
  for the methods that score on training data (criteria, rank budgets, layer-wise fits);
- :func:`knapsack_min`: the exact multiple-choice knapsack (dynamic programming over integer costs).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, Subset, TensorDataset

from .errors import ConfigError, DataError
from .task import DEFAULT_TASK, Inputs, Task, _first_line, resolve_task


def glob_escape(name: str) -> str:
    """``name`` as an fnmatch pattern that matches only itself (``*?[]`` bracketed)."""
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


# ---------------------------------------------------------------------------------- evaluation


@dataclass
class EvalSubset:
    """The fixed batches a sweep evaluates every candidate on, and how many examples they hold."""

    batches: list[Any]
    samples: int

    def example(self, task: Task | None = None, n: int = 1) -> Inputs:
        """The inputs of the first ``n`` examples (for MACs and shapes)."""
        inputs, _ = (task or DEFAULT_TASK).split(self.batches[0])
        return inputs.take(n)


def eval_subset(data: Any, samples: int, seed: int = 0, batch_size: int = 1000, task: Task | None = None) -> EvalSubset:
    """Up to ``samples`` examples of ``data`` as fixed batches: a map-style Dataset drawn in an order
    seeded by ``seed`` (the same examples on every call), or the first batches of a DataLoader or any
    iterable of batches (tuples or dicts, as ``task`` splits them). Empty data is a :class:`DataError`."""
    if samples < 1:
        raise ConfigError("samples", f"must be at least 1, got {samples}")
    task = resolve_task(task)
    out: list[Any] = []
    count = 0
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        try:
            n = len(data)  # type: ignore[arg-type]
        except TypeError:
            raise DataError("evaluation data must have a length (a map-style Dataset) or be a DataLoader") from None
        if n == 0:
            raise DataError("the evaluation split is empty")
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(samples, n)]
        count = len(idx)
        if isinstance(data, TensorDataset):
            picked = [t[idx] for t in data.tensors]
            out = [tuple(t[i : i + batch_size] for t in picked) for i in range(0, count, batch_size)]
        else:
            out = list(DataLoader(Subset(data, idx.tolist()), batch_size=batch_size, shuffle=False))
    elif isinstance(data, (DataLoader, IterableDataset, list, tuple)) or (hasattr(data, "__iter__") and not isinstance(data, (str, bytes, torch.Tensor))):
        for batch in data:
            inputs, target = task.split(batch)
            out.append(batch)
            count += inputs.batch_size
            if count >= samples:
                break
        if not out:
            raise DataError("the evaluation data yielded no batch")
    else:
        raise ConfigError("data", f"evaluation data must be a Dataset, a DataLoader or an iterable of batches, got {type(data).__name__}")
    return EvalSubset(out, count)


def val_source(data: Any, method: str) -> Any:
    """The validation split of a ``Splits`` (its ``val``), or ``data`` itself (a Dataset, DataLoader or
    iterable of batches); a :class:`ConfigError` naming ``data`` when there is none."""
    if data is None:
        raise ConfigError("data", f"{method} measures each layer's sensitivity: pass data=Splits, a Dataset or a DataLoader")
    val = getattr(data, "val", None)
    if val is not None:
        return val
    if hasattr(data, "train") and hasattr(data, "test"):
        raise ConfigError("data", f"{method} needs a validation split: the Splits given has none")
    return data


def train_source(data: Any, method: str) -> Any:
    """The train split of a ``Splits``, or a Dataset / DataLoader / list of batches as given;
    ``ConfigError("data")`` if None."""
    if data is None:
        raise ConfigError("data", f"method {method!r} scores weights on data: pass data=Splits, Dataset or DataLoader")
    train = getattr(data, "train", None)
    if isinstance(train, (Dataset, DataLoader)):
        return train
    if isinstance(data, (Dataset, DataLoader, list, tuple)):
        return data
    raise ConfigError("data", f"expected a Splits, Dataset or DataLoader, got {type(data).__name__}")


def iter_batches(
    data: Any, batches: int, batch_size: int, seed: int, device: torch.device, task: Task | None = None
) -> Iterator[tuple[Inputs, Any]]:
    """At most ``batches`` pairs ``(inputs, target)`` on ``device``, split by ``task`` (tuples, dicts,
    token tensors; classification when None): a user's DataLoader or list of batches as given, a
    Dataset drawn in a random order seeded by ``seed`` (so the batches are the same on every call)."""
    task = resolve_task(task)
    if isinstance(data, Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        gen = torch.Generator().manual_seed(seed)
        data = DataLoader(data, batch_size=batch_size, sampler=RandomSampler(data, generator=gen))
    for i, batch in enumerate(data):
        if i >= batches:
            break
        inputs, target = task.split(batch)
        yield inputs.to(device), (target.to(device) if isinstance(target, torch.Tensor) else target)


def _device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


@torch.no_grad()
def evaluate(model: nn.Module, data: EvalSubset | Iterable[Any] | torch.Tensor, y: torch.Tensor | None = None, *,
             task: Task | None = None, batch_size: int = 1000) -> tuple[float, float]:
    """``(metric, loss)`` of ``model`` in eval mode (each module's mode restored): the task's metric
    (top-1 error by default) over every scored example, and its loss averaged over examples
    (``Σ_batches loss_b · count_b / Σ count_b``). ``data``: an :class:`EvalSubset`, an iterable of
    batches, or an input tensor with targets ``y``. A loss that is not a scalar, or a metric that
    fails, raises one :class:`DataError`."""
    task = resolve_task(task)
    if y is not None:
        x = data
        assert isinstance(x, torch.Tensor)
        batches: Iterable[Any] = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    else:
        batches = data.batches if isinstance(data, EvalSubset) else data  # type: ignore[assignment]
    dev = _device(model)
    metric = task.metric()
    total, count = 0.0, 0
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        for batch in batches:
            inputs, target = task.split(batch)
            target = _to(target, dev)
            out = task.forward(model, inputs.to(dev))
            loss = task.compute_loss(out.float() if out.is_floating_point() else out, target)
            n = task.count(target)
            total += float(loss) * n
            count += n
            try:
                metric.update(out, target)
            except (RuntimeError, ValueError, IndexError, TypeError) as err:
                raise DataError(f"task {task.name!r}: the metric {metric.name!r} failed: {_first_line(err)}") from None
    finally:
        for m, mode in modes:
            m.training = mode
    if count == 0:
        raise DataError("the evaluation data yielded no batch")
    value = metric.compute()
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise DataError(f"task {task.name!r}: the metric {metric.name!r} returned {type(value).__name__}, not a number")
    return float(value), total / count


@torch.no_grad()
def layer_macs(model: nn.Module, layers: dict[str, nn.Module], example: Inputs) -> dict[str, int]:
    """Dense MACs of each of ``layers`` on ``example`` (a batch of one: per example):
    ``positions × numel(weight)`` with ``positions = numel(output) / out_units``, summed over calls;
    0 for a layer the forward pass never calls."""
    found = {n: 0 for n in layers}

    def hook(name: str):
        def fn(module: nn.Module, _args: Any, out: Any) -> None:
            if not isinstance(out, torch.Tensor):
                return
            units = int(module.weight.shape[0])
            if isinstance(module, nn.modules.conv._ConvTransposeNd):
                units = int(module.weight.shape[1]) * module.groups
            found[name] += (out.numel() // max(1, units)) * int(module.weight.numel())

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        example.to(_device(model)).call(model)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return found


# ---------------------------------------------------------------------------------- knapsack


def knapsack_min(costs: Sequence[np.ndarray], values: Sequence[np.ndarray], capacity: float, resolution: int = 1_000_000) -> list[int]:
    """The multiple-choice knapsack: one option ``j_g`` per group ``g``, minimising ``Σ values[g][j_g]``
    subject to ``Σ costs[g][j_g] ≤ capacity``, costs non-negative integers.

    Exact dynamic programming over the costs divided by their gcd; beyond ``resolution`` units, coarser
    units with every cost rounded up (the answer still fits, but may leave up to ``groups/resolution``
    of the capacity unused). Ties keep the lower option index. The caller checks that the cheapest
    option of every group fits; a :class:`ConfigError` naming ``resolution`` when the units are too
    coarse for it. (Kellerer, Pferschy & Pisinger, "Knapsack Problems", Springer 2004, ch. 11.)
    """
    costs = [np.asarray(c, dtype=np.int64) for c in costs]
    g = math.gcd(*[int(v) for c in costs for v in c]) or 1
    units = [c // g for c in costs]
    cap_units = int(math.floor(capacity / g + 1e-9))
    if cap_units > resolution:  # too many units for an exact DP: coarser units, costs rounded up
        unit = capacity / resolution
        units = [np.ceil(c / unit - 1e-9).astype(np.int64) for c in costs]
        cap_units = resolution
    if sum(int(u.min()) for u in units) > cap_units:
        raise ConfigError("resolution", f"too coarse for this budget; raise it above {resolution}")
    inf = math.inf
    dp = np.zeros(cap_units + 1)  # least value with at most c units used, no group placed yet
    choices = []
    for u_g, v_g in zip(units, values):
        new = np.full(cap_units + 1, inf)
        arg = np.full(cap_units + 1, -1, dtype=np.int64)
        for j in range(len(u_g)):  # first options first: ties keep the earlier one
            u = int(u_g[j])
            if u > cap_units:
                continue
            cand = np.full(cap_units + 1, inf)
            cand[u:] = dp[: cap_units + 1 - u] + float(v_g[j])
            better = cand < new
            new[better] = cand[better]
            arg[better] = j
        dp = new
        choices.append(arg)
    c = cap_units
    picked = []
    for u_g, arg in zip(reversed(units), reversed(choices)):
        j = int(arg[c])
        picked.append(j)
        c -= int(u_g[j])
    return picked[::-1]


__all__ = [
    "EvalSubset", "eval_subset", "evaluate", "glob_escape", "iter_batches", "knapsack_min", "layer_macs", "train_source", "val_source",
]
