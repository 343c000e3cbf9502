"""AWQ: activation-aware weight-only quantization by a per-input-channel scale search.

Lin, Tang, Tang, Yang, Dang, Gan & Han, "AWQ: Activation-aware Weight Quantization for LLM Compression
and Acceleration", MLSys 2024. Weights that see large activations matter more; scaling input channel
``j`` of ``W`` up by ``a_j`` (and the input down by ``a_j``) shrinks its relative rounding error. With
``m_j = mean |x_j|`` over the calibration tokens, AWQ searches one exponent ``α`` per layer::

    a = m^α / sqrt(max(m^α) min(m^α)),    α* = argmin_{α in {0, 1/N, ..., (N-1)/N}} || X (Q(W diag(a)) diag(a)^-1 - W)^T ||^2

``Q`` is the group min-max round-to-nearest quantizer of :mod:`netshrink.quantize.gptq` (``α = 0`` is
plain RTN, so the search never does worse than RTN on the calibration rows). The layer keeps
``Q(W diag(a)) diag(a)^-1`` (fp32, exact from the stored codes) and the codes, group parameters and
``a`` (``GroupQuant.in_scale``); the exported graph divides the input by ``a`` before the int4 MatMul.

Departures from the paper, said plainly: the scale is searched per layer, not shared by the layers
that read one input, and is not folded into the preceding norm (so the exporter keeps one
element-wise multiply per layer); the paper's weight-clipping search is not done.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._registry import handler, register
from ..calibrate import CalibConfig, OneShotResult, calibration_data, linear_weight, lm_task, run_one_shot
from ..errors import ConfigError
from .gptq import GroupQuant, _check_quant_fields, check_group, rtn_quantize, set_group_quant


def awq_search(weight: torch.Tensor, x: torch.Tensor, abs_mean: torch.Tensor, bits: int, group_size: int | None,
               grid: int = 20) -> tuple[GroupQuant, float, float, float]:
    """The best ``α`` on the input rows ``x``: ``(GroupQuant with in_scale, α, its error, RTN's error)``
    (errors are mean squared output errors on ``x``)."""
    w = weight.detach().float()
    x = x.float()
    ref = x @ w.t()
    m = abs_mean.float().clamp_min(1e-8)
    best = None
    rtn_err = None
    for k in range(grid):
        alpha = k / grid
        a = m.pow(alpha)
        a = a / (a.max() * a.min()).sqrt()
        gq = rtn_quantize(w * a[None, :], bits, group_size)
        gq.in_scale = a
        err = float((x @ gq.dequantize().t() - ref).pow(2).mean())
        if k == 0:
            rtn_err = err
        if best is None or err < best[2]:
            best = (gq, alpha, err)
    assert best is not None and rtn_err is not None
    return best[0], best[1], best[2], rtn_err


@register("awq", family="quantize")
@dataclass
class AwqConfig(CalibConfig):
    """AWQ: activation-aware per-channel scale search for weight-only int-k (Lin et al. 2024)."""

    bits: int = 4
    group_size: int | None = 128
    grid: int = 20
    rows: int = 4096
    sym: bool = False

    def validate(self) -> None:
        super().validate()
        _check_quant_fields(self)
        if self.sym:
            raise ConfigError("sym", "AWQ here uses the asymmetric (zero-point) quantizer of the paper")
        if self.grid < 1:
            raise ConfigError("grid", f"must be a positive integer, got {self.grid}")
        if self.rows < 1:
            raise ConfigError("rows", f"must be a positive integer, got {self.rows}")


@handler(AwqConfig)
@torch.no_grad()
def awq_(model: nn.Module, config: AwqConfig, data: Any = None, task: Any = None) -> OneShotResult:
    """Quantize every Linear in the model's blocks with AWQ's scale search, block by block."""

    def layer(name: str, mod: nn.Module, st, _block, _local) -> dict:
        w = linear_weight(mod)
        check_group(config.group_size, w.shape[1], name)
        x = torch.cat(st.inputs)[: config.rows]
        gq, alpha, err, rtn_err = awq_search(w, x, st.abs_mean, config.bits, config.group_size, config.grid)
        set_group_quant(mod, gq)
        return {"bits": config.bits, "alpha": alpha, "out_mse": err, "rtn_out_mse": rtn_err}

    return run_one_shot(model, config, calibration_data(data, config.seq_len), layer, task=lm_task(task), hessian=False,
                        min_group=config.group_size, keep_rows=config.rows)


__all__ = ["AwqConfig", "awq_", "awq_search"]
