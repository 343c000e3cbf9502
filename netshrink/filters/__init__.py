"""Compact and transferred conv filters: equivariant sharing, CReLU, depthwise-separable replacement.

``compact_(model, config, data=None)`` replaces the chosen Conv2d layers in place by registered modules
(:mod:`netshrink._modules`), projected from the dense kernels, so the model still trains, packs and loads::

    compact_(model, EquivariantConfig(group="p4", layers=["conv1"]))   # Cohen & Welling 2016
    compact_(model, CReLUConfig(layers=["conv1"]))                     # Shang et al. 2016
    compact_(model, DepthwiseConfig(steps=200), data=splits)           # mimics each layer on samples
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .._registry import handler_for
from ..config import BaseConfig
from ._common import CompactResult, LayerCompaction
from .crelu import CReLUConv2d
from .depthwise import DepthwiseSeparableConv2d, depthwise_factors
from .equivariant import EquivariantConv2d, channel_permutation, project_equivariant, transform
from .methods import CReLUConfig, DepthwiseConfig, EquivariantConfig


def compact_(model: nn.Module, config: BaseConfig, data: Any = None) -> CompactResult:
    """Replace Conv2d layers of ``model`` in place by the compact filters ``config``'s type names."""
    return handler_for(config, family="filters")(model, config, data=data)


__all__ = [
    "CReLUConfig",
    "CReLUConv2d",
    "CompactResult",
    "DepthwiseConfig",
    "DepthwiseSeparableConv2d",
    "EquivariantConfig",
    "EquivariantConv2d",
    "LayerCompaction",
    "channel_permutation",
    "compact_",
    "depthwise_factors",
    "project_equivariant",
    "transform",
]
