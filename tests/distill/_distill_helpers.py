"""Shared by the distillation tests: the digits splits and one trained teacher (trained once per run)."""

from __future__ import annotations

import copy
import functools

import torch

from netshrink.data import Splits, digits
from netshrink.models import build_model
from netshrink.train import TrainConfig, Trainer


def fast(epochs: int, lr: float = 0.05, **kw) -> TrainConfig:
    """A quick CPU training config for the 8x8 digits."""
    args = {"batch_size": 32, "schedule": "cosine", "device": "cpu", "progress": False, **kw}
    return TrainConfig(epochs=epochs, lr=lr, **args)


@functools.cache
def splits() -> Splits:
    return digits(seed=0)


@functools.cache
def _teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("mlp", in_features=64, hidden=[96, 48])
    Trainer(model, fast(12)).fit(splits().train)
    return model.eval()


def teacher() -> torch.nn.Module:
    """A copy of the trained teacher (64-96-48-10 MLP, about 3% test error on digits)."""
    return copy.deepcopy(_teacher())
