"""Wanda: pruning by weights and activations, without any weight update.

Sun, Liu, Bair & Kolter, "A Simple and Effective Pruning Approach for Large Language Models", ICLR
2024. The score of weight ``w_ij`` of a Linear layer with inputs ``X`` (``n`` tokens x ``in``) is

    S_ij = |w_ij| * ||X_j||_2

and weights are compared *per output row*: each row keeps its ``1 - sparsity`` highest scores
(unstructured), or the ``m - n`` highest of every ``m`` consecutive inputs (N:M). The statistics come
from the same sequential calibration as SparseGPT (:mod:`netshrink.calibrate`), so each block sees the
outputs of the already-pruned blocks before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._registry import handler, register
from ..calibrate import CalibConfig, OneShotResult, calibration_data, linear_weight, lm_task, run_one_shot
from ..config import check_range
from ..errors import ConfigError
from .sparsegpt import _store, check_nm


def wanda_scores(weight: torch.Tensor, col_norm: torch.Tensor) -> torch.Tensor:
    """``|W| * ||X_j||_2`` (broadcast over rows)."""
    return weight.abs().float() * col_norm.float()[None, :]


def wanda_mask(scores: torch.Tensor, sparsity: float = 0.5, n: int | None = None, m: int | None = None) -> torch.Tensor:
    """Keep-mask: per row, the highest ``1 - sparsity`` scores; or ``m - n`` of every ``m`` consecutive."""
    check_nm(n, m)
    rows, cols = scores.shape
    keep = torch.ones_like(scores, dtype=torch.bool)
    if n is not None:
        if cols % m:
            raise ConfigError("m", f"{m} does not divide the input width {cols}")
        s = scores.reshape(rows, cols // m, m)
        idx = torch.topk(s, n, dim=2, largest=False).indices
        k = keep.reshape(rows, cols // m, m)
        k.scatter_(2, idx, False)
        return k.reshape(rows, cols)
    k = int(cols * sparsity)
    if k > 0:
        idx = torch.topk(scores, k, dim=1, largest=False).indices
        keep.scatter_(1, idx, False)
    return keep


@register("wanda", family="prune")
@dataclass
class WandaConfig(CalibConfig):
    """Wanda: prune by |weight| x input norm per output row, no update (Sun et al. 2024)."""

    sparsity: float = 0.5
    n: int | None = None
    m: int | None = None

    def validate(self) -> None:
        super().validate()
        check_range("sparsity", self.sparsity, 0.0, 1.0, hi_open=True)
        check_nm(self.n, self.m)


@handler(WandaConfig)
@torch.no_grad()
def wanda_(model: nn.Module, config: WandaConfig, data: Any = None, task: Any = None) -> OneShotResult:
    """Prune every Linear in the model's blocks with Wanda (masks as parametrizations)."""

    def layer(name: str, mod: nn.Module, st, _block, _local) -> dict:
        w = linear_weight(mod)
        if config.n is not None and w.shape[1] % config.m:
            raise ConfigError("m", f"{config.m} does not divide the input width {w.shape[1]} of {name}")
        keep = wanda_mask(wanda_scores(w, st.col_norm), config.sparsity, config.n, config.m)
        _store(mod, torch.where(keep, w, torch.zeros_like(w)), keep)
        return {"sparsity": float(1 - keep.float().mean())}

    return run_one_shot(model, config, calibration_data(data, config.seq_len), layer, task=lm_task(task), hessian=False)


__all__ = ["WandaConfig", "wanda_", "wanda_mask", "wanda_scores"]
