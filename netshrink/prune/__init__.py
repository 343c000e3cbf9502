"""Pruning: importance scores, masks as parametrizations, and the ``prune_`` entry point."""

from __future__ import annotations

from typing import Any

from torch import nn

from .._registry import HandlerContext, handler_for, run_handler
from ..config import BaseConfig
from ._mask import Mask, apply_mask, get_mask, make_permanent
from .magnitude import MagnitudeConfig, PruneResult


def prune_(model: nn.Module, config: BaseConfig, data: Any = None, task: Any = None) -> Any:
    """Prune ``model`` in place by the method that ``config``'s type names, e.g.
    ``prune_(model, MagnitudeConfig(sparsity=0.9))``. Returns the method's typed result."""
    handler_for(config, family="prune")  # checks the family
    return run_handler(model, config, HandlerContext(data=data, task=task))  # data-driven methods read batches through ``task``


__all__ = ["prune_", "MagnitudeConfig", "PruneResult", "Mask", "apply_mask", "get_mask", "make_permanent"]

# the pruning criteria of the survey (issue 3): second-order, first-order, trajectory, merging, schedules
from .hessian import ObdConfig, ObsConfig, hessian_diagonal, obs_prune
from .merge import MergeConfig, MergeDecision, MergePlan, MergeResult, merge_linear_pair, plan_merges
from .regularizers import biased_penalty, biased_weight_decay
from .saliency import KarninConfig, KarninTracker, SkeletonizationConfig, TaylorConfig, skeleton_relevance
from .schedule import GradualPruner, agp_sparsity

__all__ += [
    "ObdConfig",
    "ObsConfig",
    "hessian_diagonal",
    "obs_prune",
    "SkeletonizationConfig",
    "skeleton_relevance",
    "KarninConfig",
    "KarninTracker",
    "TaylorConfig",
    "biased_penalty",
    "biased_weight_decay",
    "agp_sparsity",
    "GradualPruner",
    "MergeConfig",
    "MergeDecision",
    "MergePlan",
    "MergeResult",
    "plan_merges",
    "merge_linear_pair",
]

# the iterative procedure (train → score → delete → fine-tune → repeat) with any criterion
from .iterative import IterativeConfig, IterativeResult, iterative_prune

__all__ += ["IterativeConfig", "IterativeResult", "iterative_prune"]

# sensitivity analysis and automatic per-layer sparsity under a global budget
from .sensitivity import Allocation, AutoSparsityConfig, SensitivityCurves, allocate, sensitivity_sweep

__all__ += ["Allocation", "AutoSparsityConfig", "SensitivityCurves", "allocate", "sensitivity_sweep"]

# sparse (CSR) execution of highly sparse Linear layers
from .sparse_exec import SparseLinear, sparsify_linear_

__all__ += ["SparseLinear", "sparsify_linear_"]

# structured pruning: torch.fx channel dependency graph, L1 / BN-scale / Taylor, physical removal
from .structured import ChannelConfig, ChannelResult, DependencyGraph, structured_prune_

__all__ += ["ChannelConfig", "ChannelResult", "DependencyGraph", "structured_prune_"]

# the OBS line on transformers (issue 15): SparseGPT and Wanda over the sequential calibration
from .sparsegpt import SparseGptConfig
from .wanda import WandaConfig

__all__ += ["SparseGptConfig", "WandaConfig"]

# sparse variational dropout (Molchanov et al. 2017): per-weight log sigma^2, pruned at log alpha > 3
from .variational_dropout import VariationalDropoutConfig, VariationalDropoutResult

__all__ += ["VariationalDropoutConfig", "VariationalDropoutResult"]
