"""Quantization: weight sharing and the ``quantize_`` entry point."""

from __future__ import annotations

from typing import Any

from torch import nn

from .._registry import handler_for
from ..config import BaseConfig
from ._sharing import SharedWeights, apply_sharing, get_sharing
from .kmeans import Codebook, KMeansConfig, ShareResult, kmeans_1d


def quantize_(model: nn.Module, config: BaseConfig, data: Any = None) -> Any:
    """Quantize ``model`` in place by the method that ``config``'s type names, e.g.
    ``quantize_(model, KMeansConfig(bits=5))``. Returns the method's typed result."""
    return handler_for(config, family="quantize")(model, config, data=data)


__all__ = ["quantize_", "KMeansConfig", "ShareResult", "Codebook", "kmeans_1d", "SharedWeights", "apply_sharing", "get_sharing"]
