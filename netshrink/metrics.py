"""Measurements: error, parameters, non-zeros, MACs, bytes, latency, SQNR (rules in DESIGN.md)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


@torch.no_grad()
def error_rate(model: nn.Module, data: Dataset | DataLoader, batch_size: int = 1000, device: str | torch.device | None = None) -> float:
    """Top-1 error in [0, 1] of ``model`` on ``data`` (a Dataset of (x, y) or a DataLoader)."""
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size, shuffle=False)
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    wrong = total = 0
    try:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            wrong += int((model(x).argmax(dim=1) != y).sum())
            total += int(y.numel())
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("error_rate: the data set is empty")
    return wrong / total
