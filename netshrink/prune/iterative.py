"""The iterative pruning procedure of the survey: train → score → delete the lowest → fine-tune → repeat.

Starting from a trained model, each round ``k = 1 … n`` prunes the chosen layers to the scheduled
sparsity ``s_k`` with any registered criterion (magnitude, OBD, OBS, Taylor, skeletonization, Karnin,
…; masks accumulate, so a round only tops the sparsity up), then fine-tunes with the one Trainer and
measures the validation error. The schedule reaches the target ``s_f`` in ``n = rounds`` rounds:

- ``geometric``: every round removes the same fraction of the survivors, ``1 − s_k = (1 − s_f)^{k/n}``
  (the iterative pruning of Han et al., "Learning both Weights and Connections for Efficient Neural
  Networks", NeurIPS 2015);
- ``agp``: ``s_k = s_f + (s_i − s_f)(1 − k/n)³`` with ``s_i = 0`` (Zhu & Gupta 2017, arXiv 1710.01878),
  the cubic schedule of :mod:`netshrink.prune.schedule` applied once per round.

The procedure stops at the parameter target ``s_f`` or at the error ceiling, whichever comes first:
a round whose fine-tuned validation error exceeds ``max_error`` (or metric, ``max_metric``) is undone (weights, masks and all)
and the model of the round before is kept. With a :class:`~netshrink.task.Task` the "error" is the
task's metric (top-1 error by default; perplexity for a language model, MSE for regression; lower is
better), the fine-tuning uses its loss and the criterion scores on its batches.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from .._layers import select_layers
from .._registry import HandlerContext, config_type, handler, method_info, register, run_handler
from ..config import BaseConfig, check_range
from ..errors import ConfigError
from ..task import Task, resolve_task
from ..train import TrainConfig, Trainer
from ._mask import remove_parametrization
from ._select import geometric_schedule
from .magnitude import PruneResult
from .schedule import agp_sparsity

log = logging.getLogger(__name__)

#: keys of a criterion's config that the procedure sets itself
_OWNED = ("sparsity", "layer_sparsity", "scope", "layers", "steps")


@register("iterative", family="prune")
@dataclass
class IterativeConfig(BaseConfig):
    """Iterative pruning with any registered criterion until a sparsity target or an error ceiling.

    ``criterion`` names a registered pruning method and ``criterion_args`` its other arguments (not
    its sparsity, scope or layers: those are set here). ``finetune`` is the training of every round
    (``epochs: 0`` to skip). ``max_error`` is the validation error ceiling in [0, 1]; for a task scored
    by another metric (perplexity, MSE) give ``max_metric`` instead, a ceiling >= 0 of that metric.
    """

    sparsity: float = 0.9
    criterion: str = "magnitude"
    criterion_args: dict[str, Any] = field(default_factory=dict)
    rounds: int = 5
    schedule: Literal["geometric", "agp"] = "geometric"
    max_error: float | None = None
    max_metric: float | None = None
    scope: Literal["layer", "global"] = "layer"
    layers: list[str] | None = None
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1, lr=0.01, progress=False))

    def validate(self) -> None:
        check_range("sparsity", self.sparsity, 0.0, 1.0, hi_open=True)
        if self.rounds < 1:
            raise ConfigError("rounds", f"must be at least 1, got {self.rounds}")
        if self.max_error is not None:
            check_range("max_error", self.max_error, 0.0, 1.0)
        if self.max_metric is not None:
            if self.max_error is not None:
                raise ConfigError("max_metric", "give max_error or max_metric, not both")
            check_range("max_metric", self.max_metric, 0.0, float("inf"), hi_open=True)
        if self.criterion == "iterative":
            raise ConfigError("criterion", "an iterative schedule cannot nest another")
        cls = config_type(self.criterion, field="criterion")
        if method_info(self.criterion).family != "prune" or "sparsity" not in cls.__dataclass_fields__:
            raise ConfigError("criterion", f"{self.criterion!r} is not a pruning criterion with a sparsity target")
        for key in self.criterion_args:
            if key in _OWNED:
                raise ConfigError(f"criterion_args.{key}", "set by the iterative procedure; give it at the top level")
        self.round_config(self.sparsity)  # the criterion's own checks, now

    def round_config(self, sparsity: float) -> BaseConfig:
        """The criterion's config for one round, pruning to ``sparsity``."""
        cls = config_type(self.criterion, field="criterion")
        args = {**self.criterion_args, "sparsity": sparsity, "scope": self.scope, "layers": self.layers}
        if self.scope == "layer" and "scope" not in cls.__dataclass_fields__:
            del args["scope"]  # a criterion without a scope (auto_sparsity) prunes the layers as it decides
        return cls.from_dict(args, where="criterion_args")

    def targets(self) -> list[float]:
        """The scheduled sparsity of each round; the last equals ``sparsity``."""
        if self.schedule == "agp":
            return [agp_sparsity(k, self.sparsity, 0.0, 0, self.rounds, 1) for k in range(1, self.rounds + 1)]
        return geometric_schedule(self.sparsity, self.rounds)

    def check_model(self, model: nn.Module) -> None:
        select_layers(model, self.layers)


@dataclass
class RoundRecord:
    """One round: its target, the sparsity reached, and the validation error before/after fine-tuning."""

    round: int
    target: float
    sparsity: float
    error_pruned: float | None
    error_finetuned: float | None
    kept: bool


@dataclass
class IterativeResult(PruneResult):
    """Per-layer sparsity of the kept model, the rounds run, and why the procedure stopped
    (``target``: the sparsity target was met; ``error``: the next round broke the ceiling)."""

    rounds: list[RoundRecord] = field(default_factory=list)
    stopped_by: str = "target"


def _splits(data: Any) -> tuple[Any, Any]:
    train, val = getattr(data, "train", None), getattr(data, "val", None)
    if train is None:
        raise ConfigError("data", "iterative pruning fine-tunes: pass a Splits (train and val)")
    return train, val


def _overall(layers: dict[str, nn.Module]) -> float:
    zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
    return zeros / max(1, sum(m.weight.numel() for m in layers.values()))


def _parametrized(model: nn.Module) -> set[tuple[str, str]]:
    return {(n, t) for n, m in model.named_modules() if parametrize.is_parametrized(m) for t in m.parametrizations}


def _snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], set[tuple[str, str]]]:
    return copy.deepcopy(model.state_dict()), _parametrized(model)


def _restore(model: nn.Module, snap: tuple[dict[str, torch.Tensor], set[tuple[str, str]]]) -> None:
    """Undo a round: drop parametrizations it added, then load the saved state (masks included)."""
    state, before = snap
    modules = dict(model.named_modules())
    for name, tensor in _parametrized(model) - before:
        remove_parametrization(modules[name], tensor, leave_parametrized=False)
    model.load_state_dict(state, strict=True)


@handler(IterativeConfig)
def iterative_prune(model: nn.Module, config: IterativeConfig, data: Any = None, task: Task | None = None) -> IterativeResult:
    """Run the rounds of ``config`` on ``model`` in place with ``data`` (a ``Splits``); see the module
    docstring. The criterion gets ``data`` and ``task`` as a recipe stage would; the fine-tuning and
    the validation metric are the task's (classification when None)."""
    task = resolve_task(task)
    train, val = _splits(data)
    ceiling = config.max_error if config.max_error is not None else config.max_metric
    field_name = "max_error" if config.max_error is not None else "max_metric"
    if ceiling is not None and val is None:
        raise ConfigError(field_name, "a ceiling needs a validation split in data")
    if config.max_error is not None and task.metric_name != "error":
        raise ConfigError("max_error", f"the task {task.name!r} is scored by {task.metric_name}, not an error: give max_metric")
    layers = select_layers(model, config.layers)
    ctx = HandlerContext(data=data, task=task)
    records: list[RoundRecord] = []
    stopped = "target"
    for k, target in enumerate(config.targets(), start=1):
        snap = _snapshot(model) if ceiling is not None else None
        run_handler(model, config.round_config(target), ctx)
        pruned_err = task.evaluate(model, val) if val is not None else None
        if config.finetune.epochs > 0:
            tc = copy.copy(config.finetune)
            tc.seed = config.finetune.seed + k
            Trainer(model, tc, task=task).fit(train)
        err = task.evaluate(model, val) if val is not None else None
        reached = _overall(layers)
        ok = ceiling is None or err is None or err <= ceiling
        records.append(RoundRecord(k, target, reached, pruned_err, err, ok))
        log.info("iterative %s round %d: sparsity %.4f, val %s %s -> %s", config.criterion, k, reached, task.metric_name, pruned_err, err)
        if not ok:
            assert snap is not None
            _restore(model, snap)
            stopped = "error"
            log.info("round %d broke the %s ceiling %.4f (%.4f): undone, stopping", k, task.metric_name, ceiling, err)
            break
    sparsity = {n: 1.0 - float((m.weight != 0).float().mean()) for n, m in layers.items()}
    return IterativeResult(sparsity, records, stopped)


__all__ = ["IterativeConfig", "IterativeResult", "RoundRecord", "iterative_prune"]
