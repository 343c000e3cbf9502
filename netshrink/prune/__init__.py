"""Pruning: importance scores, masks as parametrizations, and the ``prune_`` entry point."""

from __future__ import annotations

from typing import Any

from torch import nn

from .._registry import handler_for
from ..config import BaseConfig
from ._mask import Mask, apply_mask, get_mask, make_permanent
from .magnitude import MagnitudeConfig, PruneResult


def prune_(model: nn.Module, config: BaseConfig, data: Any = None) -> Any:
    """Prune ``model`` in place by the method that ``config``'s type names, e.g.
    ``prune_(model, MagnitudeConfig(sparsity=0.9))``. Returns the method's typed result."""
    return handler_for(config, family="prune")(model, config, data=data)


__all__ = ["prune_", "MagnitudeConfig", "PruneResult", "Mask", "apply_mask", "get_mask", "make_permanent"]
