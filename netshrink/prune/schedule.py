"""Automated gradual pruning (Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of
pruning for model compression", ICLR workshop 2018, arXiv 1710.01878).

Sparsity rises from ``s_i`` to ``s_f`` over ``n`` pruning steps taken every ``Δt`` training steps from
step ``t₀``, fast at first and slowly at the end, when fewer weights are left to remove:

    s_t = s_f + (s_i − s_f) (1 − (t − t₀)/(n Δt))³,   t ∈ {t₀, t₀ + Δt, …, t₀ + n Δt}

Between pruning steps the sparsity holds; before ``t₀`` it is ``s_i``, after ``t₀ + nΔt`` it is ``s_f``.
:class:`GradualPruner` applies the schedule with any registered pruning criterion during training.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from ..config import BaseConfig
from ..errors import ConfigError
from ..task import Task
from ..train import Callback


def _check_schedule(final: float, initial: float, begin: int, steps: int, frequency: int) -> None:
    if not (isinstance(final, (int, float)) and 0.0 <= final < 1.0):
        raise ConfigError("sparsity", f"must lie in [0.0, 1.0), got {final!r}")
    if not (isinstance(initial, (int, float)) and 0.0 <= initial <= final):
        raise ConfigError("initial", f"must lie in [0.0, final sparsity {final}], got {initial!r}")
    if not (isinstance(begin, int) and begin >= 0):
        raise ConfigError("begin", f"must be an integer >= 0, got {begin!r}")
    if not (isinstance(steps, int) and steps >= 1):
        raise ConfigError("steps", f"must be an integer >= 1, got {steps!r}")
    if not (isinstance(frequency, int) and frequency >= 1):
        raise ConfigError("frequency", f"must be an integer >= 1, got {frequency!r}")


def agp_sparsity(t: int, final: float, initial: float = 0.0, begin: int = 0, steps: int = 10, frequency: int = 1) -> float:
    """The AGP target sparsity at training step ``t``: ``s_f + (s_i − s_f)(1 − (t_k − t₀)/(nΔt))³``
    with ``t_k`` the last pruning step at or before ``t`` (``t₀ = begin``, ``n = steps``,
    ``Δt = frequency``); ``initial`` before ``t₀``, ``final`` from ``t₀ + nΔt`` on."""
    _check_schedule(final, initial, begin, steps, frequency)
    if t < begin:
        return float(initial)
    k = min(steps, (t - begin) // frequency)
    if k == 0 or k == steps:  # the endpoints exactly, not up to rounding
        return float(initial if k == 0 else final)
    return float(final + (initial - final) * (1.0 - k / steps) ** 3)


def is_pruning_step(t: int, begin: int = 0, steps: int = 10, frequency: int = 1) -> bool:
    """Whether ``t`` is one of ``t₀, t₀ + Δt, …, t₀ + nΔt``."""
    return t >= begin and (t - begin) % frequency == 0 and (t - begin) // frequency <= steps


class GradualPruner(Callback):
    """Prunes ``model`` along the AGP schedule with the criterion that ``config`` names.

    ``config`` is any registered pruning config with a ``sparsity`` (and optionally
    ``layer_sparsity``) field: its values are the final targets ``s_f``; each layer's target follows
    its own AGP curve. Masks accumulate (pruned weights stay pruned and count toward the target), so
    every call of :func:`netshrink.prune.prune_` only tops the sparsity up. ``data`` (and ``task``:
    how its batches are read and the loss; classification when None) is passed on to data-driven
    criteria.

    Call :meth:`step` after every optimizer step of your loop, or pass the pruner to the Trainer as a
    callback (``Trainer(model, cfg, callbacks=[pruner])``): it steps at ``on_step_end``. Step counting
    starts at 0.
    """

    def __init__(
        self,
        model: nn.Module,
        config: BaseConfig,
        *,
        initial: float = 0.0,
        begin: int = 0,
        steps: int = 10,
        frequency: int = 1,
        data: Any = None,
        task: Task | str | None = None,
    ):
        if not hasattr(config, "sparsity") or not dataclasses.is_dataclass(config):
            raise ConfigError("method", f"{type(config).__name__} has no sparsity target for a gradual schedule")
        if getattr(config, "quality", None) is not None or getattr(config, "layer_quality", None):
            raise ConfigError("quality", "a gradual schedule needs sparsity targets, not quality thresholds")
        if getattr(config, "steps", 1) != 1:
            raise ConfigError("steps", "give the criterion steps: 1; the gradual pruner sets the rounds")
        finals = [config.sparsity] if config.sparsity is not None else []
        finals += list(getattr(config, "layer_sparsity", {}).values())
        if not finals:
            raise ConfigError("sparsity", "required: the criterion config needs a final sparsity")
        for f in finals:
            _check_schedule(f, 0.0, begin, steps, frequency)
        if not (isinstance(initial, (int, float)) and 0.0 <= initial <= min(finals)):
            raise ConfigError("initial", f"must lie in [0.0, every final sparsity], got {initial!r}")
        self.model = model
        self.config = config
        self.initial, self.begin, self.steps, self.frequency = float(initial), begin, steps, frequency
        self.data = data
        self.task = task
        self.t = 0
        self.history: list[tuple[int, Any]] = []

    def config_at(self, t: int) -> BaseConfig:
        """The criterion config whose sparsities are the AGP targets of step ``t``."""
        cfg = self.config

        def at(final: float) -> float:
            return agp_sparsity(t, final, self.initial, self.begin, self.steps, self.frequency)

        changes: dict[str, Any] = {}
        if cfg.sparsity is not None:
            changes["sparsity"] = at(cfg.sparsity)
        if getattr(cfg, "layer_sparsity", None):
            changes["layer_sparsity"] = {k: at(v) for k, v in cfg.layer_sparsity.items()}
        return dataclasses.replace(cfg, **changes)

    @property
    def done(self) -> bool:
        """Whether the last pruning step of the schedule has run."""
        return self.t > self.begin + self.steps * self.frequency

    def step(self) -> Any:
        """Advance one training step; at a pruning step prune to the scheduled sparsity and return the
        criterion's result (else None). A target of 0 everywhere is skipped."""
        from .._registry import HandlerContext, handler_for, run_handler
        from ..task import resolve_task

        t = self.t
        self.t += 1
        if not is_pruning_step(t, self.begin, self.steps, self.frequency):
            return None
        cfg = self.config_at(t)
        targets = [cfg.sparsity or 0.0, *getattr(cfg, "layer_sparsity", {}).values()]
        if max(targets) <= 0.0:
            return None
        handler_for(cfg, family="prune")  # a pruning method, or one clear error
        res = run_handler(self.model, cfg, HandlerContext(data=self.data, task=resolve_task(self.task)))
        self.history.append((t, res))
        return res

    def on_step_end(self, trainer: Any, step: int) -> None:
        """Trainer callback: one training step done (prunes at the schedule's pruning steps)."""
        self.step()


__all__ = ["agp_sparsity", "is_pruning_step", "GradualPruner"]
