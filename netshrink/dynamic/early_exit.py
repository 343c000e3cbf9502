"""Early exits (BranchyNet: Teerapittayanon, McDanel & Kung, "BranchyNet: Fast Inference via Early
Exiting from Deep Neural Networks", ICPR 2016).

A backbone split into stages ``s_1 .. s_S`` gets small classifiers (*exits*) after some stages; the
last stage's output is the final exit. Training minimises the weighted sum of the exits' losses,

    L = sum_k w_k * CE(z_k, y),

and inference lets a sample leave at the first exit ``k`` whose softmax entropy is below that exit's
threshold,

    H(z_k) = - sum_c p_c log p_c,   p = softmax(z_k),   leave at k  iff  H(z_k) < T_k,

the remaining samples continuing through the backbone (the final exit takes everyone left). Entropy
is in nats (at most ``log C`` for ``C`` classes): ``T = 0`` sends every sample to the final exit,
``T > log C`` makes every sample leave at the first exit.

Any task (:class:`~netshrink.task.Task`): ``CE`` above is the task's loss (token cross-entropy for a
language model), batches may be tuples or dicts (the network takes one input tensor: the batch's
only input), and the measured "error" of a routing is the task's metric (perplexity for a language
model). For logits with positions, ``(B, T, V)``, a sequence's entropy is the mean of its tokens'
entropies and the whole sequence leaves together. Entropy routing needs class logits: a regression
task is refused with a :class:`ConfigError`.

Cost: a sample that leaves at exit ``k`` (placed after stage ``j_k``) has paid for stages
``1 .. j_k`` and exit heads ``1 .. k``; the final exit pays for every stage and every early head.
MACs per stage and head come from :func:`netshrink.metrics.macs` on a batch of one.

Example::

    net = EarlyExitNet.from_sequential(build_model("mlp", in_features=64, hidden=[64, 64]), ["relu1"], x[:1])
    train_early_exit(net, train, val, TrainConfig(epochs=10))
    curve = sweep_thresholds(net, test, [0.0, 0.05, 0.1, 0.2, 0.5, 1.0])
    curve.avg_macs, curve.errors
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError, DataError, ModelError
from ..metrics import macs
from ..task import DEFAULT_TASK, Task, _first_line, batches, resolve_task
from ..train import TrainConfig, Trainer, TrainResult

# ---------------------------------------------------------------------------------- network


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Softmax entropy in nats per row: ``H = -sum_c p_c log p_c``, ``p = softmax(z)`` (from a
    log-softmax, so no ``log 0`` appears)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def sample_entropy(logits: torch.Tensor) -> torch.Tensor:
    """One entropy per sample: :func:`entropy` of ``(B, C)`` logits; for ``(B, T, ..., V)`` the mean
    over the sample's positions."""
    h = entropy(logits)
    return h.reshape(h.shape[0], -1).mean(1) if h.dim() > 1 else h


def _single_input(args: Sequence[Any], kwargs: Mapping[str, Any]) -> torch.Tensor:
    """The one input tensor of a batch (positional or keyword): an :class:`EarlyExitNet` takes one."""
    found = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
    if len(found) != 1:
        names = [f"#{i}" for i in range(len(args))] + list(kwargs)
        raise DataError(f"an early-exit network takes one input tensor; the batch has {len(found)} inputs ({', '.join(names)})")
    return found[0]


def _routing_task(task: Task | str | None) -> Task:
    task = resolve_task(task)
    if task.metric_name == "mse":
        raise ConfigError("task", f"early exits route by the softmax entropy of class logits; task {task.name!r} is a regression")
    return task


class EarlyExitNet(nn.Module):
    """A backbone of ordered ``stages`` with exit heads after some of them (BranchyNet, 2016).

    ``exits`` maps a 0-based stage index ``i`` (``0 <= i < len(stages) - 1``) to a classifier that
    takes stage ``i``'s output; the last stage's output is the final exit. ``forward(x)`` runs the
    whole backbone (the network without exits); :meth:`exit_logits` returns every exit's logits from
    one pass; :meth:`route` does entropy-thresholded early exiting.
    """

    def __init__(self, stages: Sequence[nn.Module], exits: Mapping[int, nn.Module]):
        super().__init__()
        if len(stages) < 2:
            raise ModelError(f"an early-exit network needs at least 2 stages, got {len(stages)}")
        if not exits:
            raise ConfigError("exits", "give at least one early exit")
        for i in exits:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(stages) - 1:
                raise ConfigError("exits", f"exit positions are stage indices in [0, {len(stages) - 1}), got {i!r}")
        order = sorted(exits)
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList([exits[i] for i in order])
        self.exit_after: tuple[int, ...] = tuple(order)

    @property
    def num_exits(self) -> int:
        """Early exits plus the final one."""
        return len(self.heads) + 1

    @classmethod
    def from_sequential(
        cls, model: nn.Sequential, exits_after: Sequence[str], example_input: torch.Tensor, num_classes: int | None = None
    ) -> EarlyExitNet:
        """Split ``model`` after each named child in ``exits_after`` and put a ``Flatten -> Linear`` head
        there (its input size from ``example_input``, its classes those of the model's output). The
        stages share the model's modules (no copy)."""
        if not isinstance(model, nn.Sequential):
            raise ModelError(f"from_sequential needs an nn.Sequential, got {type(model).__name__}")
        names = [n for n, _ in model.named_children()]
        if isinstance(exits_after, str) or not exits_after:
            raise ConfigError("exits_after", f"give a list of child names to put exits after (children: {', '.join(names)})")
        cuts = []
        for i, name in enumerate(exits_after):
            if name not in names:
                raise ConfigError(f"exits_after[{i}]", f"no child named {name!r} (children: {', '.join(names)})")
            cuts.append(names.index(name))
        cuts = sorted(set(cuts))
        if cuts[-1] >= len(names) - 1:
            raise ConfigError("exits_after", f"{names[cuts[-1]]!r} is the last layer: the final exit is already there")
        children = list(model.children())
        bounds = [0, *(c + 1 for c in cuts), len(children)]
        stages = [nn.Sequential(*children[a:b]) for a, b in itertools.pairwise(bounds)]
        heads: dict[int, nn.Module] = {}
        with torch.no_grad():
            was_training = model.training
            model.eval()
            h = example_input[:1]
            feats = []
            try:
                for stage in stages:
                    h = stage(h)
                    feats.append(h)
            finally:
                model.train(was_training)
        classes = num_classes if num_classes is not None else int(feats[-1].shape[-1])
        for k in range(len(cuts)):
            heads[k] = nn.Sequential(nn.Flatten(1), nn.Linear(feats[k][0].numel(), classes))
        return cls(stages, heads)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The full network (the final exit): ``net(x)``, or ``net(input_ids=x)`` for a dict batch's one input."""
        x = _single_input(args, kwargs)
        for stage in self.stages:
            x = stage(x)
        return x

    def exit_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every exit's logits, early exits first, the final exit last, from one backbone pass."""
        out = []
        k = 0
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if k < len(self.heads) and self.exit_after[k] == i:
                out.append(self.heads[k](x))
                k += 1
        out.append(x)
        return out

    @torch.no_grad()
    def route(self, x: torch.Tensor, thresholds: float | Sequence[float]) -> ExitDecision:
        """Entropy-thresholded inference on the batch ``x``: after each early exit ``k`` the samples with
        ``H(z_k) < T_k`` leave with ``z_k``; the rest continue (only they run the later stages). The
        network is used as it is (call ``eval()`` first for inference)."""
        thr = exit_thresholds(thresholds, len(self.heads))
        n = x.shape[0]
        exit_index = torch.full((n,), self.num_exits - 1, dtype=torch.long, device=x.device)
        ent = torch.empty(n, device=x.device)
        logits: torch.Tensor | None = None
        active = torch.arange(n, device=x.device)
        h, k = x, 0
        for i, stage in enumerate(self.stages):
            h = stage(h)
            if k < len(self.heads) and self.exit_after[k] == i:
                z = self.heads[k](h)
                if logits is None:
                    logits = z.new_empty((n, *z.shape[1:]))
                hk = sample_entropy(z)
                leave = hk < thr[k]
                idx = active[leave]
                logits[idx], exit_index[idx], ent[idx] = z[leave], k, hk[leave]
                if bool(leave.any()):
                    keep = ~leave
                    active, h = active[keep], h[keep]
                k += 1
                if active.numel() == 0:
                    break
        assert logits is not None
        if active.numel():
            logits[active], ent[active] = h.to(logits.dtype), sample_entropy(h)
        return ExitDecision(logits, exit_index, ent)


@dataclass(frozen=True, eq=False)
class ExitDecision:
    """The outcome of :meth:`EarlyExitNet.route` for a batch: each sample's ``logits`` (from the exit
    it took), its ``exit_index`` (0-based; ``num_exits - 1`` is the final exit) and the softmax
    ``entropy`` of those logits."""

    logits: torch.Tensor
    exit_index: torch.Tensor
    entropy: torch.Tensor


def exit_thresholds(thresholds: float | Sequence[float], num_early: int) -> tuple[float, ...]:
    """One entropy threshold per early exit: a number is used at every exit; a sequence must have one
    per early exit. Each must be >= 0 (``math.inf`` allowed); a bad one is a :class:`ConfigError`."""
    if isinstance(thresholds, (int, float)) and not isinstance(thresholds, bool):
        values = [float(thresholds)] * num_early
        names = ["thresholds"] * num_early
    else:
        values = list(thresholds)  # type: ignore[arg-type]
        names = [f"thresholds[{i}]" for i in range(len(values))]
        if len(values) != num_early:
            raise ConfigError("thresholds", f"expected one threshold per early exit ({num_early}), got {len(values)}")
    for name, v in zip(names, values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v < 0:
            raise ConfigError(name, f"an entropy threshold must be a number >= 0, got {v!r}")
    return tuple(float(v) for v in values)


# ---------------------------------------------------------------------------------- training


def early_exit_loss(logits: Sequence[torch.Tensor], targets: Any, weights: Sequence[float] | None = None,
                    task: Task | None = None) -> torch.Tensor:
    """BranchyNet's joint loss ``L = sum_k w_k * CE(z_k, y)`` over the exits' logits (``w_k = 1`` by
    default); ``CE`` is ``task``'s loss (classification's cross-entropy when None)."""
    task = task or DEFAULT_TASK
    w = [1.0] * len(logits) if weights is None else list(weights)
    if len(w) != len(logits):
        raise ConfigError("weights", f"expected one weight per exit ({len(logits)}), got {len(w)}")
    return sum((wk * task.compute_loss(z, targets) for wk, z in zip(w, logits)), logits[0].new_zeros(()))


class _JointExits(nn.Module):
    """Trainer adapter: in training mode the exits' logits stacked ``(K, N, ...)`` for the joint loss;
    in eval mode the final exit's logits, so the Trainer's validation metric is the full net's."""

    def __init__(self, net: EarlyExitNet):
        super().__init__()
        self.net = net

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        x = _single_input(args, kwargs)
        if not self.training:
            return self.net(x)
        return torch.stack(self.net.exit_logits(x), dim=0)


class _JointLoss:
    def __init__(self, weights: Sequence[float], num_exits: int, task: Task):
        self.weights = list(weights)
        self.num_exits = num_exits
        self.task = task

    def __call__(self, stacked: torch.Tensor, y: Any) -> torch.Tensor:
        return early_exit_loss(list(stacked.unbind(0)), y, self.weights, self.task)


def train_early_exit(
    net: EarlyExitNet,
    train_data: Dataset | DataLoader,
    val_data: Dataset | DataLoader | None = None,
    train_config: TrainConfig | Mapping[str, Any] | None = None,
    weights: Sequence[float] | None = None,
    *,
    task: Task | str | None = None,
) -> TrainResult:
    """Train the backbone and all exits jointly on ``sum_k w_k CE(z_k, y)`` (BranchyNet) with the one
    Trainer, ``CE`` the task's loss; the validation metric it reports is the final exit's. Every exit
    must give logits of the same shape."""
    task = _routing_task(task)
    w = [1.0] * net.num_exits if weights is None else [float(v) for v in weights]
    if len(w) != net.num_exits:
        raise ConfigError("weights", f"expected one weight per exit ({net.num_exits}), got {len(w)}")
    for i, v in enumerate(w):
        if not (math.isfinite(v) and v >= 0):
            raise ConfigError(f"weights[{i}]", f"must be a finite number >= 0, got {v}")
    return Trainer(_JointExits(net), train_config, task=task, loss_fn=_JointLoss(w, net.num_exits, task)).fit(train_data, val_data)


# ---------------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class ExitCosts:
    """MACs per example of each backbone stage and each exit head (:func:`netshrink.metrics.macs`)."""

    stage_macs: tuple[int, ...]
    head_macs: tuple[int, ...]
    exit_after: tuple[int, ...]

    @property
    def backbone_macs(self) -> int:
        """The network without exits: ``sum`` of the stages."""
        return sum(self.stage_macs)

    @property
    def per_exit(self) -> tuple[int, ...]:
        """MACs paid by a sample leaving at each exit: stages up to the exit plus heads up to it; the
        final exit pays every stage and every early head."""
        out = [sum(self.stage_macs[: j + 1]) + sum(self.head_macs[: k + 1]) for k, j in enumerate(self.exit_after)]
        return (*out, self.backbone_macs + sum(self.head_macs))


def exit_costs(net: EarlyExitNet, example_input: torch.Tensor, count: Literal["dense", "effective"] = "dense") -> ExitCosts:
    """Per-example MACs of every stage and head, from ``macs`` on the first example of ``example_input``
    (``count="effective"`` counts only non-zero weights)."""
    if count not in ("dense", "effective"):
        raise ConfigError("count", f"expected 'dense' or 'effective', got {count!r}")
    param = next(net.parameters(), None)
    h = example_input[:1].to(param.device) if param is not None else example_input[:1]
    stage_macs, head_macs = [], []
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            k = 0
            for i, stage in enumerate(net.stages):
                stage_macs.append(getattr(macs(stage, h), count))
                h = stage(h)
                if k < len(net.heads) and net.exit_after[k] == i:
                    head_macs.append(getattr(macs(net.heads[k], h), count))
                    k += 1
    finally:
        net.train(was_training)
    return ExitCosts(tuple(stage_macs), tuple(head_macs), net.exit_after)


@dataclass(frozen=True, eq=False)
class ExitPoint:
    """Early-exit inference on a data set at one setting of the thresholds.

    ``error``: the task's metric of the routed predictions (top-1 error by default, perplexity for a
    language model); ``avg_macs``: mean MACs per example;
    ``exit_counts``: examples per exit; ``exit_index``: the exit each example took (in data order).
    """

    thresholds: tuple[float, ...]
    error: float
    avg_macs: float
    exit_counts: tuple[int, ...]
    exit_index: torch.Tensor
    backbone_macs: int

    @property
    def exit_fractions(self) -> tuple[float, ...]:
        n = sum(self.exit_counts)
        return tuple(c / n for c in self.exit_counts)

    @property
    def mac_reduction(self) -> float:
        """``backbone_macs / avg_macs``: the MAC ratio against the network without exits."""
        return self.backbone_macs / self.avg_macs if self.avg_macs else math.inf


@dataclass(frozen=True, eq=False)
class ExitCurve:
    """:func:`sweep_thresholds`'s result: one :class:`ExitPoint` per threshold setting, in the order given."""

    points: tuple[ExitPoint, ...]
    costs: ExitCosts

    @property
    def thresholds(self) -> tuple[tuple[float, ...], ...]:
        return tuple(p.thresholds for p in self.points)

    @property
    def errors(self) -> tuple[float, ...]:
        return tuple(p.error for p in self.points)

    @property
    def avg_macs(self) -> tuple[float, ...]:
        return tuple(p.avg_macs for p in self.points)


def _split(task: Task, batch: Any) -> tuple[torch.Tensor, Any]:
    inputs, y = task.split(batch)
    return _single_input(inputs.args, inputs.kwargs), y


@torch.no_grad()
def evaluate_early_exit(
    net: EarlyExitNet,
    data: Dataset | DataLoader,
    thresholds: float | Sequence[float],
    costs: ExitCosts | None = None,
    batch_size: int = 1000,
    task: Task | str | None = None,
) -> ExitPoint:
    """Route every example of ``data`` (eval mode) with the entropy ``thresholds``; measure the task's
    metric (top-1 error by default), mean MACs per example (``costs.per_exit`` weighted by the exits
    taken) and the exit of each example."""
    task = _routing_task(task)
    thr = exit_thresholds(thresholds, len(net.heads))
    param = next(net.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = net.training
    net.eval()
    metric = task.metric()
    total = 0
    taken = []
    try:
        for batch in batches(data, batch_size):
            x, y = _split(task, batch)
            x, y = x.to(device), (y.to(device) if isinstance(y, torch.Tensor) else y)
            if costs is None:
                costs = exit_costs(net, x)
            decision = net.route(x, thr)
            try:
                metric.update(decision.logits, y)
            except (RuntimeError, ValueError, IndexError, TypeError) as err:
                raise DataError(f"task {task.name!r}: the metric {metric.name!r} failed: {_first_line(err)}") from None
            total += int(x.shape[0])
            taken.append(decision.exit_index.cpu())
    finally:
        net.train(was_training)
    if total == 0 or costs is None:
        raise DataError("evaluate_early_exit: the data set is empty")
    exit_index = torch.cat(taken)
    counts = torch.bincount(exit_index, minlength=net.num_exits)
    per_exit = torch.tensor(costs.per_exit, dtype=torch.float64)
    avg = float((counts.to(torch.float64) * per_exit).sum()) / total
    return ExitPoint(thr, float(metric.compute()), avg, tuple(int(c) for c in counts), exit_index, costs.backbone_macs)


def sweep_thresholds(
    net: EarlyExitNet,
    data: Dataset | DataLoader,
    thresholds: Sequence[float | Sequence[float]],
    costs: ExitCosts | None = None,
    batch_size: int = 1000,
    task: Task | str | None = None,
) -> ExitCurve:
    """The metric / MACs trade-off curve: :func:`evaluate_early_exit` at each threshold setting (a
    number for every exit, or one per early exit). With one shared threshold, a larger threshold lets
    each example leave no later, so mean MACs never grow with it."""
    task = _routing_task(task)
    if not thresholds:
        raise ConfigError("thresholds", "give at least one threshold setting")
    if costs is None:
        for batch in batches(data, 1):
            costs = exit_costs(net, _split(task, batch)[0])
            break
        else:
            raise DataError("sweep_thresholds: the data set is empty")
    points = tuple(evaluate_early_exit(net, data, t, costs, batch_size, task) for t in thresholds)
    return ExitCurve(points, costs)


__all__ = [
    "EarlyExitNet",
    "ExitCosts",
    "ExitCurve",
    "ExitDecision",
    "ExitPoint",
    "early_exit_loss",
    "entropy",
    "sample_entropy",
    "evaluate_early_exit",
    "exit_costs",
    "exit_thresholds",
    "sweep_thresholds",
    "train_early_exit",
]
