"""Distillation as the fine-tuning loss after any other compression method.

After a stage compresses a model (pruning, sharing, quantization, low rank, ...), the model as it was
*before* compression is a ready teacher: the compressed student is fine-tuned on

    L = (1 - alpha) * CE(z_s, y) + alpha * T^2 * KL(softmax(z_t/T) || softmax(z_s/T))
        + beta * sum_h 1/2 * || u_h(x) - v_h(x) ||^2

— Hinton, Vinyals & Dean's soft targets ("Distilling the Knowledge in a Neural Network", 2015) plus,
optionally, FitNets-style hints (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015)
between a teacher layer ``u_h`` and a student layer ``v_h``. The student here has the teacher's own
architecture (compressed), so a hint compares the two features directly: FitNets' regressor is the
identity, and the two features must have the same shape.

In a recipe::

    distill: {temperature: 4, alpha: 0.9}          # optional default for every stage's fine-tuning
    stages:
      - method: magnitude
        sparsity: 0.99
        finetune:
          epochs: 5
          lr: 0.01
          distill:
            temperature: 4
            alpha: 0.9
            teacher: baseline       # or "previous": the model right before this stage
            hints: [{teacher_layer: fc1, student_layer: fc1}]
            hint_weight: 0.1

``teacher: baseline`` (the default) is the trained baseline of the recipe, before any stage;
``teacher: previous`` is the model as it was just before this stage's method ran (after the earlier
stages and their fine-tuning). The teacher is frozen: eval mode, ``no_grad``, not in the optimizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..config import BaseConfig
from ..errors import ConfigError, ModelError
from ..task import Inputs, Task, resolve_task
from ._taps import find_layer
from .losses import DistillationLoss, DistillConfig, _check_alpha, _check_temperature, teacher_logits


@dataclass
class HintPair(BaseConfig):
    """One hint of distillation fine-tuning: teacher layer ``teacher_layer`` guides student layer
    ``student_layer`` (``named_modules`` names; the two outputs must have the same shape)."""

    teacher_layer: str
    student_layer: str

    def validate(self) -> None:
        for name in ("teacher_layer", "student_layer"):
            if not getattr(self, name):
                raise ConfigError(name, "must name a layer")


@dataclass
class FinetuneDistillConfig(BaseConfig):
    """The ``distill:`` block of a fine-tuning: soft targets (``temperature`` > 0, ``alpha`` in
    [0, 1]) from ``teacher`` (``"baseline"`` or ``"previous"``), plus ``hint_weight * L_HT`` for each
    of ``hints`` (see the module docstring for the loss)."""

    temperature: float = 4.0
    alpha: float = 0.9
    teacher: Literal["baseline", "previous"] = "baseline"
    hints: list[HintPair] = field(default_factory=list)
    hint_weight: float = 1.0

    def validate(self) -> None:
        _check_temperature(self.temperature)
        _check_alpha(self.alpha)
        if not (self.hint_weight >= 0 and self.hint_weight < float("inf")):
            raise ConfigError("hint_weight", f"must be a finite number >= 0, got {self.hint_weight}")

    def kd(self) -> DistillConfig:
        return DistillConfig(temperature=self.temperature, alpha=self.alpha)

    def check_layers(self, teacher: nn.Module, student: nn.Module) -> None:
        """Every hint layer exists: a missing one is a :class:`ConfigError` naming ``hints[i].<field>``."""
        for i, h in enumerate(self.hints):
            try:
                find_layer(teacher, h.teacher_layer, "teacher_layer", "teacher")
                find_layer(student, h.student_layer, "student_layer", "student")
            except ConfigError as err:
                raise err.under(f"hints[{i}]") from None


def as_finetune_distill(value: FinetuneDistillConfig | Mapping[str, Any], where: str = "distill") -> FinetuneDistillConfig:
    if isinstance(value, FinetuneDistillConfig):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(where, f"expected a mapping, got {value!r}")
    return FinetuneDistillConfig.from_dict(dict(value), where=where)  # type: ignore[return-value]


class _Recorder:
    """A forward hook that keeps the latest output of one layer (with its graph)."""

    def __init__(self, layer: nn.Module):
        self.out: torch.Tensor | None = None
        self.handle = layer.register_forward_hook(self._hook)

    def _hook(self, _m: nn.Module, _inp: Any, out: Any) -> None:
        self.out = out if isinstance(out, torch.Tensor) else None


class DistillFinetuneLoss(DistillationLoss):
    """Trainer hooks for distillation fine-tuning: soft targets (the parent class) plus hints.

    Hints record the student layer's output during the Trainer's own forward pass (a forward hook;
    call :meth:`close` to remove it) and the teacher layer's output in the teacher's pass.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, config: FinetuneDistillConfig, task: Task | str | None = None):
        super().__init__(teacher, config.kd(), task)
        self.ft = config
        config.check_layers(teacher, student)
        self._student_rec = [_Recorder(find_layer(student, h.student_layer, "student_layer", "student")) for h in config.hints]
        self._teacher_rec = [_Recorder(find_layer(teacher, h.teacher_layer, "teacher_layer", "teacher")) for h in config.hints]

    def close(self) -> None:
        for rec in self._student_rec + self._teacher_rec:
            rec.handle.remove()

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        cfg = self.ft
        if not self.ft.hints:
            return super().__call__(model, x, y, logits)
        t = self._teacher(x, logits)  # also fills the teacher recorders
        loss = cfg.alpha * cfg.temperature**2 * _soft(logits, t, cfg.temperature) if cfg.alpha > 0 else logits.new_zeros(())
        for h, s_rec, t_rec in zip(cfg.hints, self._student_rec, self._teacher_rec):
            u, v = t_rec.out, s_rec.out
            if u is None or v is None:
                raise ModelError(f"hint layer {h.teacher_layer!r} / {h.student_layer!r} gave no tensor output")
            if u.shape != v.shape:
                raise ModelError(
                    f"hint teacher layer {h.teacher_layer!r} gives shape {tuple(u.shape)} but student layer "
                    f"{h.student_layer!r} gives {tuple(v.shape)}: fine-tuning hints need equal shapes"
                )
            n = max(int(v.shape[0]), 1)
            loss = loss + cfg.hint_weight * 0.5 * (u.detach() - v).pow(2).sum() / n
        return loss


def _soft(logits: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    from .losses import soft_target_loss

    return soft_target_loss(logits, t, temperature)


def check_teacher_fits(teacher: nn.Module, student: nn.Module, example: Any, where: str = "distill",
                       task: Task | str | None = None) -> None:
    """One forward pass of both models on ``example`` (a tensor, a tuple or dict of inputs, or
    :class:`~netshrink.task.Inputs`), outputs read through ``task``: different output shapes are a
    :class:`ConfigError` naming ``where`` and both shapes."""
    task = resolve_task(task)
    example = Inputs.of(example)
    was = student.training
    student.eval()
    try:
        with torch.no_grad():
            s = task.forward(student, example)
        t = teacher_logits(teacher, example, task)
    finally:
        student.train(was)
    if tuple(s.shape) != tuple(t.shape):
        raise ConfigError(
            where, f"the teacher's output shape {tuple(t.shape)} does not match the student's {tuple(s.shape)}"
        )


def freeze_teacher(model: nn.Module) -> nn.Module:
    """A frozen copy-in-place: every parameter stops requiring grad; eval mode."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


__all__ = [
    "DistillFinetuneLoss",
    "FinetuneDistillConfig",
    "HintPair",
    "as_finetune_distill",
    "check_teacher_fits",
    "freeze_teacher",
]
