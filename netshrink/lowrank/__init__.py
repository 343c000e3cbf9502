"""Low-rank factorization: SVD of Linear layers, Tucker-2 / CP / spatially separable Conv2d layers.

``factorize_(model, config)`` replaces the chosen layers in place by registered modules that hold the
factors (:mod:`netshrink._modules`), so the model still trains, packs and loads:

    factorize_(model, SvdConfig(energy=0.9))            # Linear W ≈ U V (Denil et al. 2013)
    factorize_(model, TuckerConfig(rank=[16, 8]))       # Kim et al. 2016
    factorize_(model, CPConfig(rank=16))                # Lebedev et al. 2015
    factorize_(model, SeparableConfig(rank=8))          # Jaderberg et al. 2014, scheme 2
    factorize_(model, TuckerConfig(rank="vbmf"))        # EVBMF ranks (Nakajima 2013), as Kim 2016
    factorize_(model, RankBudgetConfig(macs_ratio=0.3), data=splits)   # global rank allocation
    factorize_(model, LayerwiseConfig(method="tucker", args={"energy": 0.8}), data=splits)  # Figure 2
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .._registry import HandlerContext, handler_for, run_handler
from ..config import BaseConfig
from ._common import FactorizeResult, LayerFactorization, energy_rank, ratio_rank
from .conv import (
    CPConv,
    CPFactors,
    SeparableConv,
    SeparableFactors,
    Tucker2Conv,
    TuckerFactors,
    cp_factors,
    separable_factors,
    tucker2_energy_ranks,
    tucker2_factors,
)
from .budget import RankBudgetConfig, allocate
from .conv_methods import CPConfig, SeparableConfig, TuckerConfig
from .layerwise import LayerwiseConfig
from .rank_select import EvbmfResult, evbmf, tucker2_macs_ranks, tucker2_vbmf_ranks
from .svd import (
    LinearFactors,
    LowRankLinear,
    SvdConfig,
    fixed_basis_factors,
    svd_factors,
)


def factorize_(model: nn.Module, config: BaseConfig, data: Any = None, task: Any = None) -> FactorizeResult:
    """Factorize ``model`` in place by the method that ``config``'s type names, e.g.
    ``factorize_(model, SvdConfig(rank=32))``. Returns a :class:`FactorizeResult` (one entry per layer)."""
    handler_for(config, family="lowrank")  # checks the family
    return run_handler(model, config, HandlerContext(data=data, task=task))  # data-driven methods read batches through ``task``


__all__ = [
    "CPConfig",
    "CPConv",
    "CPFactors",
    "EvbmfResult",
    "FactorizeResult",
    "LayerFactorization",
    "LayerwiseConfig",
    "LinearFactors",
    "LowRankLinear",
    "RankBudgetConfig",
    "SeparableConfig",
    "SeparableConv",
    "SeparableFactors",
    "SvdConfig",
    "Tucker2Conv",
    "TuckerConfig",
    "TuckerFactors",
    "allocate",
    "cp_factors",
    "energy_rank",
    "evbmf",
    "factorize_",
    "fixed_basis_factors",
    "ratio_rank",
    "separable_factors",
    "svd_factors",
    "tucker2_energy_ranks",
    "tucker2_factors",
    "tucker2_macs_ranks",
    "tucker2_vbmf_ranks",
]

# activation-aware low rank on transformers (issue 15): SVD-LLM whitening and ASVD scaling
from .asvd import AsvdConfig

__all__ += ["AsvdConfig"]
