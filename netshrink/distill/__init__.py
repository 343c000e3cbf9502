"""Knowledge distillation: soft targets (Hinton et al. 2015), FitNets hints (Romero et al. 2015), and
model compression with MUNGE pseudo-data (Buciluǎ et al. 2006).

    result = distill(student, teacher, train, val, TrainConfig(epochs=10), DistillConfig(temperature=4, alpha=0.9))
    fitnets(student, teacher, train, val, HintConfig(teacher_layer="relu2", student_layer="relu1"))
    compress_with_pseudo_data(student, teacher, train, val, MungeConfig(multiplier=5))
"""

from __future__ import annotations

from .finetune import DistillFinetuneLoss, FinetuneDistillConfig, HintPair
from .hints import (
    FitNetsResult,
    GuidedStudent,
    HintConfig,
    HintLoss,
    HintResult,
    feature_shape,
    fitnets,
    hint_loss,
    make_regressor,
    train_hint,
)
from .losses import (
    DistillationLoss,
    DistillConfig,
    DistillResult,
    check_logit_shapes,
    distill,
    distillation_loss,
    kd_loss,
    soft_target_loss,
    teacher_logits,
)
from .pseudo import (
    MungeConfig,
    MungeSample,
    PseudoDataResult,
    compress_with_pseudo_data,
    munge,
    nearest_neighbours,
    pseudo_dataset,
    teacher_labels,
)

__all__ = [
    "DistillConfig",
    "DistillFinetuneLoss",
    "DistillResult",
    "FinetuneDistillConfig",
    "DistillationLoss",
    "FitNetsResult",
    "GuidedStudent",
    "HintConfig",
    "HintLoss",
    "HintPair",
    "HintResult",
    "MungeConfig",
    "MungeSample",
    "PseudoDataResult",
    "check_logit_shapes",
    "compress_with_pseudo_data",
    "distill",
    "distillation_loss",
    "feature_shape",
    "fitnets",
    "hint_loss",
    "kd_loss",
    "make_regressor",
    "munge",
    "nearest_neighbours",
    "pseudo_dataset",
    "soft_target_loss",
    "teacher_labels",
    "teacher_logits",
    "train_hint",
]
