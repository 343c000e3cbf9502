"""FitNets hints (Romero, Ballas, Kahou, Chassang, Gatta & Bengio, "FitNets: Hints for Thin Deep
Nets", ICLR 2015).

A *hint* is the output ``u_h(x)`` of a chosen teacher layer; the student's *guided* layer ``v_g(x)``
learns to predict it through a learned regressor ``r``:

    L_HT(W_guided, W_r) = 1/2 * || u_h(x; W_hint) - r(v_g(x; W_guided); W_r) ||^2

(summed over the features of one example, averaged over the batch). Training runs in two stages:

1. the student *up to the guided layer* and the regressor minimise ``L_HT`` (the teacher is frozen;
   the forward pass stops at the guided layer, so later student layers are not touched);
2. the whole student is trained by soft-target distillation (:func:`~netshrink.distill.losses.distill`).

The regressor is a convolution for convolutional features, as in the paper: ``C_s -> C_t`` channels
with kernel ``(H_s - H_t + 1, W_s - W_t + 1)`` (a 1x1 convolution when the spatial sizes agree), so
its output has the hint's spatial size; otherwise a Linear map of the flattened features.

Example::

    cfg = HintConfig(teacher_layer="relu2", student_layer="relu1")
    result = fitnets(student, teacher, train, val, cfg, TrainConfig(epochs=3, optimizer="adam", lr=1e-3),
                     TrainConfig(epochs=10), DistillConfig(temperature=4))
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..config import BaseConfig
from ..errors import ConfigError, DataError, ModelError
from ..task import DEFAULT_TASK, Inputs, Task, resolve_task
from ..train import TrainConfig, Trainer, TrainResult
from ._taps import capture, find_layer
from .losses import DistillConfig, DistillResult, distill

# ------------------------------------------------------------------------------------- config


@dataclass
class HintConfig(BaseConfig):
    """A FitNets hint (Romero et al. 2015): teacher layer ``teacher_layer`` guides student layer
    ``student_layer`` through a regressor.

    ``regressor``: ``"auto"`` (a convolution when both features are 4-D, else a Linear on the
    flattened features), ``"conv"`` or ``"linear"``. Layer names are ``named_modules`` names
    (``"fc1"``, ``"features.3"``); :meth:`check_layers` checks them against the two models.
    """

    teacher_layer: str
    student_layer: str
    regressor: Literal["auto", "conv", "linear"] = "auto"

    def validate(self) -> None:
        for name in ("teacher_layer", "student_layer"):
            if not getattr(self, name):
                raise ConfigError(name, "must name a layer")

    def check_layers(self, teacher: nn.Module, student: nn.Module) -> tuple[nn.Module, nn.Module]:
        """The (hint, guided) layers; a missing name is a :class:`ConfigError` naming it and listing the layers."""
        hint = find_layer(teacher, self.teacher_layer, "teacher_layer", "teacher")
        guided = find_layer(student, self.student_layer, "student_layer", "student")
        return hint, guided


# ------------------------------------------------------------------------------- loss and regressor


def hint_loss(hint: torch.Tensor, regressed: torch.Tensor) -> torch.Tensor:
    """``1/2 * ||u - r||^2`` per example (summed over its features), averaged over the batch.

    ``hint`` (the teacher's ``u_h(x)``) gets no gradient. Both are compared flattened per example;
    a different number of features is a :class:`ModelError` naming both shapes.
    """
    n = hint.shape[0]
    u = hint.detach().reshape(n, -1)
    r = regressed.reshape(regressed.shape[0], -1)
    if u.shape != r.shape:
        raise ModelError(
            f"the regressed student feature {tuple(regressed.shape)} does not match the teacher's hint {tuple(hint.shape)}"
        )
    return 0.5 * (u - r).pow(2).sum() / max(n, 1)


def make_regressor(
    student_shape: Sequence[int], teacher_shape: Sequence[int], kind: Literal["auto", "conv", "linear"] = "auto"
) -> nn.Module:
    """The FitNets regressor from a guided feature of ``student_shape`` to a hint of ``teacher_shape``
    (both with the batch dimension first).

    ``conv`` (``auto`` for two 4-D shapes): ``Conv2d(C_s, C_t, kernel=(H_s - H_t + 1, W_s - W_t + 1))``,
    a 1x1 convolution when the spatial sizes agree; the student's map must be at least as large as
    the teacher's. ``linear``: ``Flatten`` then ``Linear(prod(student), prod(teacher))``.
    """
    s, t = tuple(int(d) for d in student_shape[1:]), tuple(int(d) for d in teacher_shape[1:])
    both_maps = len(s) == 3 and len(t) == 3
    if kind == "conv" or (kind == "auto" and both_maps):
        if not both_maps:
            raise ModelError(f"a conv regressor needs 4-D features on both sides, got student {tuple(student_shape)} "
                             f"and teacher {tuple(teacher_shape)}")
        kh, kw = s[1] - t[1] + 1, s[2] - t[2] + 1
        if kh < 1 or kw < 1:
            raise ModelError(f"the student's feature map {tuple(student_shape)} is smaller than the teacher's "
                             f"{tuple(teacher_shape)}: a conv regressor cannot grow it (use regressor='linear')")
        return nn.Conv2d(s[0], t[0], kernel_size=(kh, kw))
    if kind not in ("auto", "linear"):
        raise ConfigError("regressor", f"expected 'auto', 'conv' or 'linear', got {kind!r}")
    return nn.Sequential(nn.Flatten(1), nn.Linear(math.prod(s), math.prod(t)))


class GuidedStudent(nn.Module):
    """Stage 1 of FitNets: ``r(v_g(x))``, the student up to its guided layer followed by the regressor.

    The forward pass of the student stops right after the guided layer, so only the parameters up
    to it (``W_guided``) and the regressor's (``W_r``) get gradients; an optimizer skips the rest.
    """

    def __init__(self, student: nn.Module, student_layer: str, regressor: nn.Module):
        super().__init__()
        self.student = student
        self.regressor = regressor
        self.student_layer = student_layer
        self._guided = find_layer(student, student_layer, "student_layer", "student")

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        v = capture(self.student, self._guided, Inputs(args, kwargs), f"student layer {self.student_layer!r}")
        return self.regressor(v)


# ------------------------------------------------------------------------------------- training


def _first_batch(data: Dataset | DataLoader, task: Task | None = None) -> Inputs:
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=2, shuffle=False)
    for batch in loader:
        if isinstance(batch, torch.Tensor) and not (task is not None and task.shift):
            return Inputs((batch,))
        return (task or DEFAULT_TASK).split(batch)[0]
    raise DataError("train_data is empty")


@torch.no_grad()
def feature_shape(model: nn.Module, layer: nn.Module, x: Any, what: str) -> tuple[int, ...]:
    """The shape of ``layer``'s output for input ``x`` (a tensor or :class:`~netshrink.task.Inputs`;
    model in eval mode, its mode restored)."""
    param = next(model.parameters(), None)
    x = Inputs.of(x)
    if param is not None:
        x = x.to(param.device)
    was_training = model.training
    model.eval()
    try:
        return tuple(capture(model, layer, x, what).shape)
    finally:
        model.train(was_training)


class HintLoss:
    """Trainer ``extra_loss`` of stage 1: ``L_HT`` between the frozen teacher's hint on ``x`` (eval
    mode, ``no_grad``) and the :class:`GuidedStudent`'s output."""

    def __init__(self, teacher: nn.Module, teacher_layer: str):
        self.teacher = teacher
        self.teacher_layer = teacher_layer
        self._hint = find_layer(teacher, teacher_layer, "teacher_layer", "teacher")

    @torch.no_grad()
    def hint(self, x: Any) -> torch.Tensor:
        tensors = Inputs.of(x).tensors()
        param = next(self.teacher.parameters(), None)
        if param is not None and tensors and param.device != tensors[0].device:
            self.teacher.to(tensors[0].device)
        was_training = self.teacher.training
        self.teacher.eval()
        try:
            return capture(self.teacher, self._hint, x, f"teacher layer {self.teacher_layer!r}")
        finally:
            self.teacher.train(was_training)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return hint_loss(self.hint(x), out)


def _no_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return out.new_zeros(())


@dataclass
class HintResult:
    """Stage 1 of FitNets: the Trainer's result (its ``train_loss`` is ``L_HT``) and the trained regressor."""

    train: TrainResult
    regressor: nn.Module


@dataclass
class FitNetsResult:
    """Both stages of FitNets: the hint stage and the distillation stage."""

    hint: HintResult
    kd: DistillResult


def train_hint(
    student: nn.Module,
    teacher: nn.Module,
    train_data: Dataset | DataLoader,
    config: HintConfig | Mapping[str, Any],
    train_config: TrainConfig | Mapping[str, Any] | None = None,
    *,
    regressor: nn.Module | None = None,
    task: Task | str | None = None,
) -> HintResult:
    """Stage 1 of FitNets (Romero et al. 2015): train the student up to ``config.student_layer`` and a
    regressor (built by :func:`make_regressor` from one batch unless given) to minimise
    ``1/2 ||u_h(x) - r(v_g(x))||^2`` against the frozen teacher's ``config.teacher_layer``.

    The student is updated in place; the regressor is returned (it is not part of the student).
    ``task`` says how batches split into inputs (tuples, dicts); the targets are not used here.
    """
    task = resolve_task(task)
    if isinstance(config, Mapping):
        config = HintConfig.from_dict(dict(config))  # type: ignore[assignment]
    if not isinstance(config, HintConfig):
        raise ConfigError("hint", f"expected a HintConfig or a mapping, got {type(config).__name__}")
    hint_layer, guided_layer = config.check_layers(teacher, student)
    if regressor is None:
        x = _first_batch(train_data, task)
        t_shape = feature_shape(teacher, hint_layer, x, f"teacher layer {config.teacher_layer!r}")
        s_shape = feature_shape(student, guided_layer, x, f"student layer {config.student_layer!r}")
        regressor = make_regressor(s_shape, t_shape, config.regressor)
    guided = GuidedStudent(student, config.student_layer, regressor)
    trainer = Trainer(guided, train_config, task=task, loss_fn=_no_loss, extra_loss=HintLoss(teacher, config.teacher_layer))
    result = trainer.fit(train_data, None)
    return HintResult(result, regressor)


def fitnets(
    student: nn.Module,
    teacher: nn.Module,
    train_data: Dataset | DataLoader,
    val_data: Dataset | DataLoader | None,
    hint_config: HintConfig | Mapping[str, Any],
    hint_train_config: TrainConfig | Mapping[str, Any] | None = None,
    train_config: TrainConfig | Mapping[str, Any] | None = None,
    distill_config: DistillConfig | Mapping[str, Any] | None = None,
    *,
    task: Task | str | None = None,
) -> FitNetsResult:
    """FitNets (Romero et al. 2015): hint training (:func:`train_hint`), then soft-target distillation
    of the whole student (:func:`~netshrink.distill.losses.distill`), both on ``task``'s batches (its
    loss and metric in the second stage). The student is trained in place."""
    hint = train_hint(student, teacher, train_data, hint_config, hint_train_config, task=task)
    kd = distill(student, teacher, train_data, val_data, train_config, distill_config, task=task)
    return FitNetsResult(hint, kd)


__all__ = [
    "FitNetsResult",
    "GuidedStudent",
    "HintConfig",
    "HintLoss",
    "HintResult",
    "feature_shape",
    "fitnets",
    "hint_loss",
    "make_regressor",
    "train_hint",
]
