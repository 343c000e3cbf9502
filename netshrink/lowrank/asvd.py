"""Activation-aware low rank: SVD-LLM's truncation-aware whitening and ASVD's activation scaling.

Both factor a Linear ``W`` (out x in) as ``W ≈ U_r Σ_r V_r^T T^-1`` from the SVD of ``W T``, where ``T``
makes the truncation error track the *output* error on the calibration inputs ``X``:

- ``whitening: cholesky`` (SVD-LLM; Wang, Zheng, Wang & Zhang, "SVD-LLM: Truncation-aware Singular Value
  Decomposition for Large Language Model Compression", ICLR 2025): ``T = L``, the Cholesky factor of
  ``X^T X = L L^T`` (damped). Then ``||(W - W_r) X^T||_F^2 = Σ_{i>r} σ_i^2`` of ``W L``: truncating the
  smallest singular values is optimal for the layer's outputs.
- ``whitening: abs_mean`` (ASVD; Yuan et al., "ASVD: Activation-aware Singular Value Decomposition for
  Compressing Large Language Models", arXiv 2312.05821, 2023): ``T = diag(mean|X_j|^α)``.

The layer becomes a :class:`~netshrink.lowrank.svd.LowRankLinear` (``first`` = ``V_r^T T^-1``,
``second`` = ``U_r Σ_r``) with rank ``r = floor(ratio * out * in / (out + in))``, i.e. ``ratio`` of the
layer's weights. ``ratio: 0.8`` removes 20% of the weights of every factored layer. transformers' GPT-2
``Conv1D`` (``y = x @ W + b``, ``W`` stored ``(in, out)``) is factored from its ``(out, in)`` matrix ``W^T``
and becomes the same LowRankLinear.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .._modules import replace_module
from .._registry import handler, register
from ..calibrate import CalibConfig, OneShotResult, calibration_data, damped_hessian, linear_weight, lm_task, run_one_shot
from ..config import check_range
from ..quantize.smoothquant import replace_reason
from .svd import LinearFactors, LowRankLinear


def whitened_factors(weight: torch.Tensor, rank: int, *, hessian: torch.Tensor | None = None, abs_mean: torch.Tensor | None = None,
                     alpha: float = 0.5, damp: float = 0.01) -> LinearFactors:
    """``W ≈ u @ v`` of rank ``rank`` from the SVD of ``W T`` (see the module docstring)."""
    w = weight.detach().double()
    if hessian is not None:
        h, _ = damped_hessian(hessian.double(), damp)
        t = torch.linalg.cholesky(h)  # lower: H = L L^T
        u_, s, vh = torch.linalg.svd(w @ t, full_matrices=False)
        v = torch.linalg.solve_triangular(t, vh[:rank], upper=False, left=False)  # V_r^T L^-1
    else:
        assert abs_mean is not None
        a = abs_mean.double().clamp_min(1e-6).pow(alpha)
        u_, s, vh = torch.linalg.svd(w * a[None, :], full_matrices=False)
        v = vh[:rank] / a[None, :]
    u = u_[:, :rank] * s[:rank][None, :]
    return LinearFactors(u.float(), v.float(), s)


def rank_for(out_f: int, in_f: int, ratio: float) -> int:
    return max(1, int(ratio * out_f * in_f / (out_f + in_f)))


@register("asvd", family="lowrank")
@dataclass
class AsvdConfig(CalibConfig):
    """Activation-aware SVD of the blocks' Linears: SVD-LLM whitening (cholesky) or ASVD scaling (abs_mean)."""

    ratio: float = 0.8
    whitening: Literal["cholesky", "abs_mean"] = "cholesky"
    alpha: float = 0.5
    damp: float = 0.01

    replaces_modules = True

    def validate(self) -> None:
        super().validate()
        check_range("ratio", self.ratio, 0.0, 1.0, lo_open=True, hi_open=True)
        check_range("alpha", self.alpha, 0.0, 2.0)
        check_range("damp", self.damp, 0.0, 1.0, lo_open=True)


@handler(AsvdConfig)
@torch.no_grad()
def asvd_(model: nn.Module, config: AsvdConfig, data: Any = None, task: Any = None) -> OneShotResult:
    """Factor every nn.Linear (and GPT-2 Conv1D) in the model's blocks (others are skipped, said so)."""
    other: dict[str, str] = {}

    def layer(name: str, mod: nn.Module, st, _block, _local) -> dict:
        why = replace_reason(mod)
        if why is not None:
            other[name] = why
            return {}
        w = linear_weight(mod)  # (out, in); a Conv1D's stored (in, out) weight transposed
        r = rank_for(w.shape[0], w.shape[1], config.ratio)
        if config.whitening == "cholesky":
            f = whitened_factors(w, r, hessian=st.hessian, damp=config.damp)
        else:
            f = whitened_factors(w, r, abs_mean=st.abs_mean, alpha=config.alpha)
        bias = None if mod.bias is None else mod.bias.detach()
        new = LowRankLinear(w.shape[1], w.shape[0], r, bias is not None).to(device=w.device, dtype=w.dtype)
        new.set_factors(f, bias)
        replace_module(model, name, new)
        return {"rank": r, "params_before": w.numel(), "params_after": r * (w.shape[0] + w.shape[1])}

    res = run_one_shot(model, config, calibration_data(data, config.seq_len), layer, task=lm_task(task),
                       hessian=config.whitening == "cholesky")
    for n in other:
        res.layers.pop(n, None)
    res.skipped.update(other)
    return res


__all__ = ["AsvdConfig", "asvd_", "whitened_factors", "rank_for"]
