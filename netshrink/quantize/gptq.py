"""GPTQ and round-to-nearest (RTN) group quantization of Linear weights to 2-8 bits.

Quantizer (per output row, per group of ``group_size`` input columns, or per row when ``group_size``
is None; asymmetric min-max with 0 in the range, as in the GPTQ reference)::

    s = (max(w, 0) - min(w, 0)) / (2^b - 1),  z = round(-min(w, 0) / s),
    q = clamp(round(w / s) + z, 0, 2^b - 1),  w_hat = s (q - z)

RTN applies it to every weight at once. GPTQ (Frantar, Ashkboos, Hoefler & Alistarh, "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers", ICLR 2023; from Optimal Brain
Quantization, Frantar & Alistarh, NeurIPS 2022, itself from OBS, Hassibi & Stork 1993) quantizes the
columns of ``W`` one at a time and spreads each column's error over the columns not yet quantized, by
the inverse of the layer Hessian ``H = X^T X`` (damped: ``H + λ mean(diag H) I``)::

    err_i = (w_i - w_hat_i) / [H^-1]_ii,     W[:, j>i] -= err_i [H^-1]_{i, j>i}

using the upper Cholesky factor of ``H^-1`` for ``[H^-1]`` rows, and *lazy batches*: the update
inside a block of ``block_size`` columns is applied at once to the columns after it. ``act_order``
quantizes columns in order of decreasing ``H_jj``; with groups, the group parameters are then taken
up front from the natural column order ("static groups"), so each stored group is contiguous.
Dead inputs (``H_jj = 0``) get ``H_jj = 1`` and their weights are set to zero (they never matter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._registry import handler, register
from ..calibrate import CalibConfig, OneShotResult, inverse_cholesky_upper, lm_task, linear_weight, run_one_shot, set_linear_weight
from ..config import BaseConfig, check_range
from ..errors import ConfigError


@dataclass
class GroupQuant:
    """Group-quantized ``(out, in)`` weights: codes ``q`` (uint8, in ``[0, 2^bits)``), and per row and
    group the scale ``s`` and integer zero point ``z`` (``(out, in / group_size)``): ``w = s (q - z)``."""

    bits: int
    group_size: int
    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    #: AWQ's per-input-channel scale ``a`` (the codes quantize ``W diag(a)``): ``w_ij = s (q - z) / a_j``
    in_scale: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        w = dequantize_groups(self.q, self.scale, self.zero, self.group_size)
        return w if self.in_scale is None else w / self.in_scale.float()[None, :]


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """``s (q - z)`` in float32, the scale and zero point repeated over each group's columns."""
    s = scale.float().repeat_interleave(group_size, dim=1)
    z = zero.float().repeat_interleave(group_size, dim=1)
    return s * (q.float() - z)


def check_bits(bits: Any, field: str = "bits") -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ConfigError(field, f"must be an integer from 2 to 8, got {bits!r}")


def check_group(group_size: int | None, width: int, name: str = "layer") -> int:
    """The group size to use for an input width: ``width`` when None; a :class:`ConfigError` unless it divides."""
    if group_size is None:
        return width
    if width % group_size:
        raise ConfigError("group_size", f"{group_size} does not divide the input width {width} of {name}")
    return group_size


def quant_params(w: torch.Tensor, bits: int, sym: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(scale, zero)`` of the min-max quantizer for ``w`` ``(rows, cols)`` (see the module docstring)."""
    maxq = (1 << bits) - 1
    lo = torch.clamp(w.min(dim=1).values, max=0)
    hi = torch.clamp(w.max(dim=1).values, min=0)
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = -hi
    flat = (lo == 0) & (hi == 0)
    lo, hi = torch.where(flat, -1.0, lo), torch.where(flat, 1.0, hi)
    scale = ((hi - lo) / maxq).float()
    zero = torch.full_like(scale, (maxq + 1) // 2) if sym else torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero.float()


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """``clamp(round(w / s) + z, 0, 2^b - 1)`` for per-row ``s, z`` (broadcast over columns)."""
    maxq = (1 << bits) - 1
    return torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, maxq)


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int | None = None, sym: bool = False) -> GroupQuant:
    """Round-to-nearest group quantization of an ``(out, in)`` matrix."""
    check_bits(bits)
    w = weight.detach().float()
    rows, cols = w.shape
    g = check_group(group_size, cols)
    wg = w.reshape(rows * (cols // g), g)
    scale, zero = quant_params(wg, bits, sym)
    q = quantize_codes(wg, scale, zero, bits).reshape(rows, cols)
    return GroupQuant(bits, g, q.to(torch.uint8), scale.reshape(rows, -1), zero.reshape(rows, -1).to(torch.uint8))


class _ColumnQuantizer:
    """Quantizes column ``j`` with its group's parameters (taken when the group starts, or up front)."""

    def __init__(self, bits: int, group: int, rows: int, cols: int, sym: bool, static: torch.Tensor | None):
        self.bits, self.group, self.sym = bits, group, sym
        self.scale = torch.zeros(rows, cols // group)
        self.zero = torch.zeros(rows, cols // group)
        if static is not None:  # parameters of the natural-order groups of the original weights
            for k in range(cols // group):
                self.scale[:, k], self.zero[:, k] = quant_params(static[:, k * group : (k + 1) * group], bits, sym)
        self.static = static is not None

    def start(self, col: int, w_from_col: torch.Tensor) -> None:
        if not self.static and col % self.group == 0:
            k = col // self.group
            self.scale[:, k], self.zero[:, k] = quant_params(w_from_col[:, : self.group], self.bits, self.sym)

    def __call__(self, col: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = col // self.group
        s, z = self.scale[:, k], self.zero[:, k]
        q = torch.clamp(torch.round(w / s) + z, 0, (1 << self.bits) - 1)
        return s * (q - z), q


def obs_sweep(w: torch.Tensor, u: torch.Tensor, block_size: int, column_fn, mask_fn=None) -> torch.Tensor:
    """The OBS column sweep shared by GPTQ and SparseGPT with lazy batches.

    ``u``: upper Cholesky factor of the damped ``H^-1``. ``column_fn(j, w_j, W_rest) -> new w_j`` (the
    quantized / pruned column; ``W_rest`` = the current columns ``j..``); ``mask_fn(i1, i2, W1, U1)``:
    called at the start of each lazy block (SparseGPT's adaptive mask selection). Returns the new ``W``.
    """
    w = w.clone()
    cols = w.shape[1]
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        u1 = u[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        if mask_fn is not None:
            mask_fn(i1, i2, w1, u1)
        for i in range(i2 - i1):
            col = w1[:, i]
            d = u1[i, i]
            new = column_fn(i1 + i, col, w1[:, i:], None)
            e = (col - new) / d
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            w1[:, i] = new
            err1[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return w


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None = None, *, act_order: bool = False,
                  block_size: int = 128, damp: float = 0.01, sym: bool = False, name: str = "layer") -> GroupQuant:
    """GPTQ of an ``(out, in)`` matrix with the Hessian ``X^T X / n`` of its inputs (module docstring)."""
    check_bits(bits)
    w = weight.detach().float().clone()
    rows, cols = w.shape
    g = check_group(group_size, cols, name)
    h = hessian.double()
    dead = torch.diag(h) == 0
    w[:, dead] = 0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols)
    u, _ = inverse_cholesky_upper(h[perm][:, perm], damp, name)
    u = u.float()
    static = w.clone() if (act_order and g < cols) or g == cols else None
    quant = _ColumnQuantizer(bits, g, rows, cols, sym, static)
    codes = torch.zeros(rows, cols)

    def column(j: int, col: torch.Tensor, _w1_rest: torch.Tensor, w_rest: torch.Tensor) -> torch.Tensor:
        nat = int(perm[j])
        if not quant.static and nat % quant.group == 0:  # natural order: w_rest() starts at this column
            quant.start(nat, w_rest())
        deq, q = quant(nat, col)
        codes[:, nat] = q
        return deq

    if quant.static:
        obs_sweep(w[:, perm], u, block_size, column)
    else:
        _sweep_natural(w, u, block_size, column, g)
    return GroupQuant(bits, g, codes.to(torch.uint8), quant.scale, quant.zero.to(torch.uint8))


def _next_columns(w1: torch.Tensor, w: torch.Tensor, i: int, i2: int, n: int) -> torch.Tensor:
    """The current values of the ``n`` columns from lazy-block column ``i`` on (this block's updated ones, then W's)."""
    head = w1[:, i : i + n]
    return head if head.shape[1] >= n else torch.cat([head, w[:, i2 : i2 + n - head.shape[1]]], dim=1)


def _sweep_natural(w: torch.Tensor, u: torch.Tensor, block_size: int, column, group: int) -> None:
    """:func:`obs_sweep` in natural order, where a group's parameters come from the updated columns."""
    cols = w.shape[1]
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        u1 = u[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = w1[:, i]
            # the group's parameters see this lazy block's updated columns and the rest of W
            new = column(i1 + i, col, w1[:, i:], lambda: _next_columns(w1, w, i, i2, group))
            e = (col - new) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            w1[:, i] = new
            err1[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]


# --------------------------------------------------------------------------------------- methods


def set_group_quant(module: nn.Module, gq: GroupQuant) -> None:
    """Write the dequantized weights into ``module`` and keep the codes as ``module.netshrink_groupq``
    (read by the .nsk packer and the ONNX int4 exporter)."""
    set_linear_weight(module, gq.dequantize().to(module.weight.dtype))
    module.netshrink_groupq = gq


def _check_quant_fields(cfg: Any) -> None:
    check_bits(cfg.bits)
    if cfg.group_size is not None and cfg.group_size < 1:
        raise ConfigError("group_size", f"must be a positive integer or null, got {cfg.group_size}")


@register("gptq", family="quantize")
@dataclass
class GptqConfig(CalibConfig):
    """GPTQ: OBS-style column-by-column quantization with Hessian error feedback (Frantar et al. 2023)."""

    bits: int = 4
    group_size: int | None = 128
    act_order: bool = False
    sym: bool = False
    block_size: int = 128
    damp: float = 0.01

    def validate(self) -> None:
        super().validate()
        _check_quant_fields(self)
        if self.block_size < 1:
            raise ConfigError("block_size", f"must be a positive integer, got {self.block_size}")
        check_range("damp", self.damp, 0.0, 1.0, lo_open=True)


@register("rtn", family="quantize")
@dataclass
class RtnConfig(BaseConfig):
    """Round-to-nearest group quantization (the baseline of GPTQ and AWQ); needs no data.

    ``extra_layers``: name patterns of Linear or Embedding layers *outside* the blocks to round as well
    (``[embed, lm_head]``: the token table and the head, which GPTQ's block-by-block calibration does not
    reach; with ``layers: []`` after a GPTQ stage, this stage rounds only them).
    """

    bits: int = 4
    group_size: int | None = 128
    sym: bool = False
    layers: list[str] | None = None
    blocks: str | None = None
    extra_layers: list[str] | None = None

    def validate(self) -> None:
        _check_quant_fields(self)
        if self.extra_layers is not None and (not isinstance(self.extra_layers, list) or not all(isinstance(p, str) and p for p in self.extra_layers)):
            raise ConfigError("extra_layers", f"must be a list of layer name patterns, got {self.extra_layers!r}")


@handler(GptqConfig)
@torch.no_grad()
def gptq_(model: nn.Module, config: GptqConfig, data: Any = None, task: Any = None) -> OneShotResult:
    """Quantize every Linear in the model's blocks with GPTQ, block by block (see :mod:`netshrink.calibrate`)."""

    def layer(name: str, m: nn.Module, st, _block, _local) -> dict:
        w = linear_weight(m)
        check_group(config.group_size, w.shape[1], name)
        gq = gptq_quantize(w, st.hessian, config.bits, config.group_size, act_order=config.act_order,
                           block_size=config.block_size, damp=config.damp, sym=config.sym, name=name)
        before = w.clone()
        set_group_quant(m, gq)
        return {"bits": config.bits, "group_size": gq.group_size, "weight_rel_change": float((linear_weight(m) - before).norm() / before.norm().clamp_min(1e-12))}

    from ..calibrate import calibration_data

    return run_one_shot(model, config, calibration_data(data, config.seq_len), layer, task=lm_task(task), min_group=config.group_size)


@handler(RtnConfig)
@torch.no_grad()
def rtn_(model: nn.Module, config: RtnConfig, data: Any = None, task: Any = None) -> dict[str, dict]:
    """Round-to-nearest on every Linear in the model's blocks (the same layers GPTQ would take)."""
    import fnmatch

    from ..calibrate import block_layers, find_blocks

    path, mods = find_blocks(model, config.blocks)
    out = {}
    for b, block in enumerate(mods):
        for local, m in block_layers(block).items():
            name = f"{path}.{b}.{local}"
            if config.layers is not None and not any(fnmatch.fnmatchcase(name, p) for p in config.layers):
                continue
            w = linear_weight(m)
            check_group(config.group_size, w.shape[1], name)
            set_group_quant(m, rtn_quantize(w, config.bits, config.group_size, config.sym))
            out[name] = {"bits": config.bits, "group_size": config.group_size or w.shape[1]}
    out.update(_rtn_outside(model, config, {id(m) for m in mods.modules()}))
    return out


def _rtn_outside(model: nn.Module, config: RtnConfig, inside: set[int]) -> dict[str, dict]:
    """RTN on the ``extra_layers`` (Linear / Embedding outside the blocks); a tied weight is quantized once
    and its codes shared by every layer that holds it."""
    import fnmatch

    if not config.extra_layers:
        return {}
    out: dict[str, dict] = {}
    done: dict[int, GroupQuant] = {}
    matched = set()
    for name, m in model.named_modules():
        hits = [p for p in config.extra_layers if fnmatch.fnmatchcase(name, p)]
        if not hits or id(m) in inside:
            continue
        if not isinstance(m, (nn.Linear, nn.Embedding)):
            raise ConfigError("extra_layers", f"{name} is a {type(m).__name__}; only Linear and Embedding layers outside the blocks can be rounded")
        matched.update(hits)
        key = id(m.weight)
        if key not in done:
            w = linear_weight(m)
            check_group(config.group_size, w.shape[1], name)
            done[key] = rtn_quantize(w, config.bits, config.group_size, config.sym)
            set_group_quant(m, done[key])
        else:
            m.netshrink_groupq = done[key]
        out[name] = {"bits": config.bits, "group_size": config.group_size or m.weight.shape[1], "outside_blocks": True}
    missing = [p for p in config.extra_layers if p not in matched]
    if missing:
        raise ConfigError("extra_layers", f"no Linear or Embedding layer outside the blocks matches {missing[0]!r}")
    return out


__all__ = ["GptqConfig", "RtnConfig", "GroupQuant", "gptq_quantize", "rtn_quantize", "dequantize_groups", "obs_sweep", "quant_params", "gptq_", "rtn_"]
