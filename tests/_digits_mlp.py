"""A small MLP (64-64-32-10) trained on sklearn digits, shared by the tests of training-time methods."""

from __future__ import annotations

import functools

import torch

from netshrink.data import digits
from netshrink.models import build_model
from netshrink.train import TrainConfig, Trainer


@functools.lru_cache(maxsize=1)
def trained_digits_mlp():
    """(digits splits, state dict) after 8 seeded epochs of SGD; train once per test session."""
    splits = digits()
    torch.manual_seed(0)
    model = build_model("mlp", in_features=64, hidden=[64, 32])
    Trainer(model, TrainConfig(epochs=8, lr=0.05, batch_size=32, schedule="cosine", progress=False, device="cpu")).fit(splits.train)
    return splits, {k: v.clone() for k, v in model.state_dict().items()}


def digits_mlp(state):
    """A fresh MLP holding ``state``."""
    model = build_model("mlp", in_features=64, hidden=[64, 32])
    model.load_state_dict(state)
    return model
