"""Structured matrices: circulant (FFT), Toeplitz and hashed (HashedNets) Linear layers.

``structure_(model, config)`` replaces the chosen Linear layers in place by registered modules
(:mod:`netshrink._modules`), initialised by least-squares projection of the dense weight, so the model
still fine-tunes, packs into .nsk and loads::

    structure_(model, CirculantConfig(layers=["fc1"]))     # Cheng et al. 2015
    structure_(model, ToeplitzConfig(layers=["fc1"]))
    structure_(model, HashedConfig(ratio=1 / 8))           # Chen et al. 2015
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .._registry import handler_for
from ..config import BaseConfig
from .methods import CirculantConfig, HashedConfig, LayerStructure, StructureResult, ToeplitzConfig
from .structured import (
    CirculantLinear,
    HashedLinear,
    ToeplitzLinear,
    circulant_blocks_matmul,
    circulant_matrix,
    circulant_project,
    hashed_project,
    toeplitz_matrix,
    toeplitz_project,
)


def structure_(model: nn.Module, config: BaseConfig, data: Any = None) -> StructureResult:
    """Replace Linear layers of ``model`` in place by the structured kind ``config``'s type names."""
    return handler_for(config, family="matrices")(model, config, data=data)


__all__ = [
    "CirculantConfig",
    "CirculantLinear",
    "HashedConfig",
    "HashedLinear",
    "LayerStructure",
    "StructureResult",
    "ToeplitzConfig",
    "ToeplitzLinear",
    "circulant_blocks_matmul",
    "circulant_matrix",
    "circulant_project",
    "hashed_project",
    "structure_",
    "toeplitz_matrix",
    "toeplitz_project",
]
