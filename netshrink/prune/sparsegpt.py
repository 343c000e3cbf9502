"""SparseGPT: one-shot OBS pruning of each Linear in a transformer's blocks, unstructured or N:M,
optionally with joint quantization.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot", ICML
2023; from Optimal Brain Surgeon (Hassibi & Stork, NIPS 1993). For a layer ``W`` with input Hessian
``H = X^T X`` (damped: ``H + λ mean(diag H) I``) the columns are processed left to right in lazy
blocks of ``block_size``. At the start of each block the mask is chosen from the OBS saliency

    ε_ij = w_ij^2 / [H^-1]_jj^2            (upper Cholesky factor of H^-1, as in the paper)

(the ``sparsity`` fraction of smallest ``ε`` in the block; with ``n:m``, the ``n`` smallest of every
``m`` consecutive columns in each row). Then column ``j``'s pruned (and, with ``bits``, quantized)
values replace it and the error is spread over the columns after it::

    err_j = (w_j - w_hat_j) / [H^-1]_jj,   W[:, k>j] -= err_j [H^-1]_{j, k>j}

Joint quantization (the paper's section 3.5, "SparseGPT + GPTQ"): the surviving weights of a column are
quantized to ``bits`` with per-row (or per-group) min-max parameters in the same sweep, so the error of
pruning and of rounding are compensated together. Dead inputs (``H_jj = 0``) are pruned first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._registry import handler, register
from ..calibrate import CalibConfig, OneShotResult, calibration_data, inverse_cholesky_upper, linear_weight, lm_task, run_one_shot
from ..config import check_range
from ..errors import ConfigError
from ._mask import apply_mask


def check_nm(n: int | None, m: int | None) -> None:
    """``n`` zeros in every ``m`` consecutive weights: both given, ``0 < n < m``."""
    if (n is None) != (m is None):
        raise ConfigError("n" if n is None else "m", "give both n and m for N:M sparsity")
    if n is not None and m is not None:
        if n < 1 or m < 2:
            raise ConfigError("n", f"N:M needs n >= 1 and m >= 2, got {n}:{m}")
        if n >= m:
            raise ConfigError("n", f"N:M needs n < m (n zeros of every m weights), got {n}:{m}")


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float = 0.5, *, n: int | None = None, m: int | None = None,
                    block_size: int = 128, damp: float = 0.01, bits: int | None = None, group_size: int | None = None,
                    name: str = "layer") -> tuple[torch.Tensor, torch.Tensor, Any]:
    """SparseGPT on an ``(out, in)`` matrix; returns ``(new weights, keep mask, GroupQuant or None)``."""
    check_nm(n, m)
    w = weight.detach().float().clone()
    rows, cols = w.shape
    if n is not None and cols % m:
        raise ConfigError("m", f"{m} does not divide the input width {cols} of {name}")
    h = hessian.double()
    dead = torch.diag(h) == 0
    w[:, dead] = 0
    u, _ = inverse_cholesky_upper(h, damp, name)
    u = u.float()
    keep = torch.ones(rows, cols, dtype=torch.bool)
    quant = None
    codes = None
    if bits is not None:
        from ..quantize.gptq import _ColumnQuantizer, check_bits, check_group

        check_bits(bits)
        g = check_group(group_size, cols, name)
        quant = _ColumnQuantizer(bits, g, rows, cols, False, w.clone() if g == cols else None)
        codes = torch.zeros(rows, cols)
    if n is not None:
        block_size = max(m, block_size - block_size % m)

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        u1 = u[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        d = torch.diag(u1)
        mask1 = torch.zeros_like(w1, dtype=torch.bool)  # True = prune
        if n is None:
            sal = w1.pow(2) / d.pow(2)[None, :]
            k = int(sal.numel() * sparsity)
            if k > 0:
                thresh = torch.kthvalue(sal.flatten(), k).values
                mask1 = sal <= thresh
                # ties at the threshold: keep exactly k pruned
                extra = int(mask1.sum()) - k
                if extra > 0:
                    tie = (sal == thresh) & mask1
                    idx = tie.flatten().nonzero().flatten()[:extra]
                    mask1.view(-1)[idx] = False
        for i in range(i2 - i1):
            col = w1[:, i]
            if n is not None and i % m == 0:
                sal = w1[:, i : i + m].pow(2) / d[i : i + m].pow(2)[None, :]
                mask1.scatter_(1, i + torch.topk(sal, n, dim=1, largest=False).indices, True)
            new = col.clone()
            new[mask1[:, i]] = 0
            if quant is not None:
                j = i1 + i
                if not quant.static and j % quant.group == 0:
                    from ..quantize.gptq import _next_columns

                    quant.start(j, _next_columns(w1, w, i, i2, quant.group))
                deq, q = quant(j, new)
                new = torch.where(mask1[:, i], torch.zeros_like(deq), deq)
                codes[:, j] = q
            e = (col - new) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            w1[:, i] = new
            err1[:, i] = e
        w[:, i1:i2] = w1
        keep[:, i1:i2] = ~mask1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    w[~keep] = 0
    gq = None
    if quant is not None:
        from ..quantize.gptq import GroupQuant

        # a pruned weight keeps the code of zero, so that s (q - z) = 0 exactly
        zero_codes = quant.zero.repeat_interleave(quant.group, dim=1)
        codes = torch.where(keep, codes, zero_codes)
        gq = GroupQuant(bits, quant.group, codes.to(torch.uint8), quant.scale, quant.zero.to(torch.uint8))
        w = gq.dequantize()
    return w, keep, gq


@register("sparsegpt", family="prune")
@dataclass
class SparseGptConfig(CalibConfig):
    """SparseGPT: one-shot OBS pruning with Hessian error feedback, unstructured or N:M (Frantar & Alistarh 2023)."""

    sparsity: float = 0.5
    n: int | None = None
    m: int | None = None
    block_size: int = 128
    damp: float = 0.01
    bits: int | None = None
    group_size: int | None = None

    def validate(self) -> None:
        super().validate()
        check_range("sparsity", self.sparsity, 0.0, 1.0, hi_open=True)
        check_nm(self.n, self.m)
        if self.block_size < 1:
            raise ConfigError("block_size", f"must be a positive integer, got {self.block_size}")
        check_range("damp", self.damp, 0.0, 1.0, lo_open=True)
        if self.bits is not None:
            from ..quantize.gptq import check_bits

            check_bits(self.bits)
        if self.group_size is not None and (self.group_size < 1 or self.bits is None):
            raise ConfigError("group_size", "a positive group size, and only with bits")


@handler(SparseGptConfig)
@torch.no_grad()
def sparsegpt_(model: nn.Module, config: SparseGptConfig, data: Any = None, task: Any = None) -> OneShotResult:
    """Prune every Linear in the model's blocks with SparseGPT; the masks are parametrizations (kept through fine-tuning)."""

    def layer(name: str, mod: nn.Module, st, _block, _local) -> dict:
        w = linear_weight(mod)
        new, keep, gq = sparsegpt_prune(w, st.hessian, config.sparsity, n=config.n, m=config.m, block_size=config.block_size,
                                        damp=config.damp, bits=config.bits, group_size=config.group_size, name=name)
        _store(mod, new, keep)
        if gq is not None:
            mod.netshrink_groupq = gq
        return {"sparsity": float(1 - keep.float().mean()), "bits": config.bits, "nm": None if config.n is None else f"{config.n}:{config.m}"}

    return run_one_shot(model, config, calibration_data(data, config.seq_len), layer, task=lm_task(task), min_group=config.group_size)


def _store(mod: nn.Module, new: torch.Tensor, keep: torch.Tensor) -> None:
    """Write the new weights, and the mask as a parametrization (on Linear; Conv1D gets zeros only)."""
    from ..calibrate import set_linear_weight

    set_linear_weight(mod, new.to(mod.weight.dtype))
    if isinstance(mod, nn.Linear):
        apply_mask(mod, keep.to(mod.weight.device))


__all__ = ["SparseGptConfig", "sparsegpt_prune", "sparsegpt_", "check_nm"]
