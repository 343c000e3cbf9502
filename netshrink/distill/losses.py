"""Soft-target knowledge distillation (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural
Network", NIPS Deep Learning Workshop 2015).

A small student with logits ``z_s`` learns from the hard labels ``y`` and from a trained teacher's
logits ``z_t`` softened by a temperature ``T``:

    L = (1 - alpha) * CE(z_s, y) + alpha * T^2 * KL( softmax(z_t / T) || softmax(z_s / T) )

The ``T^2`` factor keeps the soft term's gradient on the same scale for every ``T``: the gradient of
``KL`` with respect to ``z_s`` is ``(softmax(z_s/T) - softmax(z_t/T)) / T``, which for ``T`` large
against the logits is about ``(z_s - z_t) / (C T^2)`` for ``C`` classes (zero-mean logits).

Any task: the hard term ``CE(z_s, y)`` is the task's loss (:class:`~netshrink.task.Task`; token
cross-entropy for a language model, MSE for regression), the teacher's output is read through the
task's output adapter (tuples, dicts, ``ModelOutput``), and the soft term is the KL over the last axis
averaged over every position: per example for logits ``(B, C)``, per token for a language model's
``(B, T, V)``.

Example::

    kd = distillation_loss(teacher, DistillConfig(temperature=4.0, alpha=0.9))
    Trainer(student, TrainConfig(epochs=10), loss_fn=kd.hard_loss, extra_loss=kd).fit(train, val)
    # or, in one call:
    result = distill(student, teacher, train, val, TrainConfig(epochs=10), DistillConfig())
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..config import BaseConfig, check_range
from ..errors import ConfigError, ModelError
from ..task import DEFAULT_TASK, Inputs, Task, output_tensor, resolve_task
from ..train import TrainConfig, Trainer, TrainResult


def _check_temperature(temperature: float) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
        math.isfinite(temperature) and temperature > 0
    ):
        raise ConfigError("temperature", f"must be a finite number > 0, got {temperature!r}")


def _check_alpha(alpha: float) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ConfigError("alpha", f"must be a number in [0, 1], got {alpha!r}")
    check_range("alpha", alpha, 0.0, 1.0)


def check_logit_shapes(student: torch.Tensor, teacher: torch.Tensor) -> None:
    """Raise :class:`ModelError` naming both shapes unless the student's and teacher's outputs match."""
    if tuple(student.shape) != tuple(teacher.shape):
        raise ModelError(
            f"the teacher's output shape {tuple(teacher.shape)} does not match the student's output shape "
            f"{tuple(student.shape)}: distillation needs the same classes in the same order"
        )


# ------------------------------------------------------------------------------------- config


@dataclass
class DistillConfig(BaseConfig):
    """Soft-target knowledge distillation (Hinton et al. 2015): temperature ``T`` and soft weight ``alpha``.

    ``L = (1 - alpha) * CE(z_s, y) + alpha * T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``;
    ``temperature`` must be a finite number > 0, ``alpha`` lie in ``[0, 1]`` (0: labels only,
    1: teacher only).
    """

    temperature: float = 4.0
    alpha: float = 0.9

    def validate(self) -> None:
        _check_temperature(self.temperature)
        _check_alpha(self.alpha)


# ------------------------------------------------------------------------------------- losses


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(softmax(z_t/T) || softmax(z_s/T))`` over the last axis, averaged over every other position
    (the batch of ``(B, C)`` logits; every token of a language model's ``(B, T, V)``); no ``T^2`` factor.

    ``= mean_n sum_c p_t[n,c] * (log p_t[n,c] - log p_s[n,c])`` with ``p = softmax(z / T)``, computed
    from log-softmaxes so that no probability underflows to ``log 0``. The teacher's logits get no
    gradient.
    """
    _check_temperature(temperature)
    check_logit_shapes(student_logits, teacher_logits)
    log_ps = F.log_softmax(student_logits / temperature, dim=-1)
    log_pt = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    n = student_logits.numel() // max(1, student_logits.shape[-1]) if student_logits.dim() > 1 else 1
    return (log_pt.exp() * (log_pt - log_ps)).sum() / max(1, n)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor | None,
    temperature: float,
    alpha: float,
    task: Task | None = None,
) -> torch.Tensor:
    """Hinton et al. (2015) distillation loss, averaged over the batch:

    ``L = (1 - alpha) * CE(z_s, y) + alpha * T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``.

    ``CE`` is ``task``'s loss (classification's cross-entropy when None). ``targets`` are what the
    task's loss takes (class indices or probabilities for classification; shifted token ids for a
    language model); they may be None only when ``alpha == 1``. At ``alpha = 0`` this is exactly the
    cross-entropy; at ``alpha = 1, T = 1`` exactly the KL divergence. A bad ``temperature`` or
    ``alpha`` raises :class:`ConfigError` naming it; logits of different shapes a :class:`ModelError`
    naming both shapes.
    """
    _check_temperature(temperature)
    _check_alpha(alpha)
    check_logit_shapes(student_logits, teacher_logits)
    loss = student_logits.new_zeros(())
    if alpha < 1.0:
        if targets is None:
            raise ConfigError("targets", f"labels are needed when alpha < 1 (alpha = {alpha})")
        loss = loss + (1.0 - alpha) * (task or DEFAULT_TASK).compute_loss(student_logits, targets)
    if alpha > 0.0:
        loss = loss + alpha * temperature**2 * soft_target_loss(student_logits, teacher_logits, temperature)
    return loss


# ------------------------------------------------------------------------------ trainer hooks


@torch.no_grad()
def teacher_logits(teacher: nn.Module, x: "torch.Tensor | Inputs", task: Task | None = None) -> torch.Tensor:
    """The frozen teacher's output on ``x`` (a tensor or the batch's :class:`~netshrink.task.Inputs`):
    eval mode, no grad, on the inputs' device; its mode is restored. A tuple/dict/ModelOutput is read
    through the task's output adapter (:meth:`netshrink.task.Task.output`: its logits)."""
    inputs = Inputs.of(x)
    tensors = inputs.tensors()
    param = next(teacher.parameters(), None)
    if param is not None and tensors and param.device != tensors[0].device:
        teacher.to(tensors[0].device)
    was_training = teacher.training
    teacher.eval()
    try:
        out = inputs.call(teacher)
    finally:
        teacher.train(was_training)
    return task.output(out) if task is not None else output_tensor(out)


class DistillationLoss:
    """The two Trainer hooks of soft-target distillation, for ``teacher`` and ``config``.

    - called as ``extra_loss(model, inputs, y, logits)``: runs the frozen teacher on the batch's inputs (eval mode,
      ``no_grad``) and returns the soft term ``alpha * T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``;
    - :meth:`hard_loss` is the matching ``loss_fn(logits, y) = (1 - alpha) * CE(logits, y)``, ``CE`` the
      task's loss (classification's cross-entropy when ``task`` is None).

    Together (``Trainer(student, cfg, loss_fn=kd.hard_loss, extra_loss=kd)``) the Trainer minimises
    exactly :func:`kd_loss`. :meth:`full` computes the whole loss in one call. The first batch checks
    that the teacher's output shape equals the student's (a :class:`ModelError` naming both).
    """

    def __init__(self, teacher: nn.Module, config: DistillConfig, task: Task | str | None = None):
        if not isinstance(config, DistillConfig):
            raise ConfigError("distill", f"expected a DistillConfig, got {type(config).__name__}")
        self.teacher = teacher
        self.config = config
        self.task = resolve_task(task)
        self._checked = False

    def _teacher(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        out = teacher_logits(self.teacher, x, self.task)
        if not self._checked:
            check_logit_shapes(logits, out)
            self._checked = True
        return out

    def hard_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``(1 - alpha) * CE(logits, y)``, ``CE`` the task's loss (a Trainer ``loss_fn``)."""
        alpha = self.config.alpha
        return (1.0 - alpha) * self.task.compute_loss(logits, y) if alpha < 1.0 else logits.new_zeros(())

    def __call__(self, model: nn.Module, x: "torch.Tensor | Inputs", y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``alpha * T^2 * KL(softmax(z_t/T) || softmax(z_s/T))`` (a Trainer ``extra_loss``)."""
        cfg = self.config
        if cfg.alpha == 0.0:
            return logits.new_zeros(())
        t = self._teacher(x, logits)
        return cfg.alpha * cfg.temperature**2 * soft_target_loss(logits, t, cfg.temperature)

    def full(self, x: torch.Tensor, y: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
        """:func:`kd_loss` of the student's ``logits`` against the teacher's on ``x``."""
        return kd_loss(logits, self._teacher(x, logits), y, self.config.temperature, self.config.alpha, self.task)


def distillation_loss(teacher: nn.Module, config: DistillConfig | Mapping[str, Any] | None = None,
                      task: Task | str | None = None) -> DistillationLoss:
    """The Trainer hooks of soft-target distillation from ``teacher`` (see :class:`DistillationLoss`)."""
    return DistillationLoss(teacher, _distill_config(config), task)


def _distill_config(config: DistillConfig | Mapping[str, Any] | None) -> DistillConfig:
    if config is None:
        return DistillConfig()
    if isinstance(config, Mapping):
        return DistillConfig.from_dict(dict(config))  # type: ignore[return-value]
    if not isinstance(config, DistillConfig):
        raise ConfigError("distill", f"expected a DistillConfig or a mapping, got {type(config).__name__}")
    return config


# ------------------------------------------------------------------------------------- helper


@dataclass
class DistillResult:
    """What :func:`distill` did: the Trainer's result and the validation errors of teacher and student
    (None without validation data)."""

    train: TrainResult
    teacher_val_error: float | None
    student_val_error: float | None


def distill(
    student: nn.Module,
    teacher: nn.Module,
    train_data: Dataset | DataLoader,
    val_data: Dataset | DataLoader | None = None,
    train_config: TrainConfig | Mapping[str, Any] | None = None,
    distill_config: DistillConfig | Mapping[str, Any] | None = None,
    *,
    checkpoint_dir: Any = None,
    resume: bool = False,
    task: Task | str | None = None,
) -> DistillResult:
    """Train ``student`` in place on ``train_data`` with the soft-target loss of :func:`kd_loss` from the
    frozen ``teacher`` (Hinton et al. 2015), through the one :class:`~netshrink.train.Trainer`.

    The teacher is never updated (it runs in eval mode under ``no_grad``; its parameters are not
    given to the optimizer). A checkpoint's fingerprint covers ``train_config`` only: resume with
    the same teacher and ``distill_config``. ``task``: how batches are read, the hard loss and the
    validation metric (classification when None); the "errors" of the result are its metric.
    """
    task = resolve_task(task)
    kd = distillation_loss(teacher, distill_config, task)
    trainer = Trainer(student, train_config, task=task, loss_fn=kd.hard_loss, extra_loss=kd)
    result = trainer.fit(train_data, val_data, checkpoint_dir=checkpoint_dir, resume=resume)
    teacher_err = task.evaluate(teacher, val_data) if val_data is not None else None
    return DistillResult(result, teacher_err, result.final_val_error)


__all__ = [
    "DistillConfig",
    "DistillResult",
    "DistillationLoss",
    "check_logit_shapes",
    "distill",
    "distillation_loss",
    "kd_loss",
    "soft_target_loss",
    "teacher_logits",
]
