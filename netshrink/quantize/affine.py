"""Uniform affine quantization: the pure tensor primitives under PTQ, QAT and int8 export.

A real value ``x`` maps to a ``bits``-bit integer ``q`` through a scale ``s > 0`` and an integer
zero point ``z`` (Jacob et al., "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", CVPR 2018, eq. 1):

    q  = clamp(round(x / s) + z, qmin, qmax)
    x̂ = s (q - z)

- signed:   ``[qmin, qmax] = [-2^(b-1), 2^(b-1) - 1]``;  unsigned: ``[0, 2^b - 1]``.
- symmetric (always signed): ``z = 0``, ``s = max(|lo|, |hi|) / qmax``.
- asymmetric: the range is widened to hold 0, ``lo' = min(lo, 0)``, ``hi' = max(hi, 0)``;
  ``s = (hi' - lo') / (qmax - qmin)``, ``z = clamp(round(qmin - lo' / s), qmin, qmax)``, so that 0 is
  represented exactly (zero padding and pruned weights stay exactly zero).
- per tensor: ``s``, ``z`` are scalars; per channel: one ``s``, ``z`` per index along ``axis``.

Rounding: ``"nearest"`` (round half to even), or ``"stochastic"``: ``round(v) = floor(v) + 1`` with
probability ``v - floor(v)``, else ``floor(v)``, so ``E[round(v)] = v`` (Gupta et al., "Deep Learning
with Limited Numerical Precision", ICML 2015); implemented as ``floor(v + u)``, ``u ~ U[0, 1)`` drawn
from a ``torch.Generator``.

Fake quantization ``x -> x̂`` trains through the straight-through estimator (Bengio et al.,
"Estimating or Propagating Gradients Through Stochastic Neurons", 2013; Jacob et al. 2018 §3):
rounding passes the gradient unchanged and the clamp passes it only where it is inactive, so
``dx̂/dx = 1`` where ``qmin <= round(x / s) + z <= qmax`` -- ``x`` in the clamp range
``[s (qmin - z), s (qmax - z)]``, up to the half step that still rounds into it -- and 0 elsewhere
(as ``torch.fake_quantize_per_tensor_affine``). The largest weight of a min-max range thus keeps
its gradient even when ``x / s`` lands a rounding error above ``qmax``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import ConfigError, DataError

Rounding = Literal["nearest", "stochastic"]

#: the bit widths the uniform quantizer supports
MIN_BITS, MAX_BITS = 2, 8


def check_bits(bits: int, field: str = "bits") -> None:
    """A :class:`ConfigError` naming ``field`` unless ``bits`` is an integer in [2, 8]."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(field, f"the uniform quantizer takes {MIN_BITS} to {MAX_BITS} bits, got {bits!r}")


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """``(qmin, qmax)`` of a ``bits``-bit integer: ``[-2^(b-1), 2^(b-1)-1]`` signed, ``[0, 2^b-1]`` unsigned."""
    check_bits(bits)
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


@dataclass(frozen=True, eq=False)
class QuantParams:
    """The parameters of one affine quantizer.

    ``scale`` (float32) and ``zero_point`` (int32) are 0-d tensors per tensor, or 1-d tensors of one
    entry per channel along ``axis`` per channel. ``symmetric`` implies ``signed`` and ``zero_point == 0``.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    signed: bool
    symmetric: bool
    axis: int | None = None

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.symmetric and not self.signed:
            raise ConfigError("signed", "a symmetric quantizer is signed")
        if self.axis is None and self.scale.dim() != 0:
            raise ConfigError("axis", f"a per-tensor scale is 0-d, got shape {tuple(self.scale.shape)}")
        if self.axis is not None and self.scale.dim() != 1:
            raise ConfigError("axis", f"a per-channel scale is 1-d, got shape {tuple(self.scale.shape)}")
        if self.zero_point.shape != self.scale.shape:
            raise ConfigError("zero_point", "must have the shape of scale")
        if not bool(torch.all(torch.isfinite(self.scale) & (self.scale > 0))):
            raise ConfigError("scale", "must be finite and > 0")

    @property
    def qmin(self) -> int:
        return qrange(self.bits, self.signed)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits, self.signed)[1]

    @property
    def int_dtype(self) -> torch.dtype:
        """``torch.int8`` when signed, ``torch.uint8`` when not (every supported width fits)."""
        return torch.int8 if self.signed else torch.uint8

    def broadcast(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``scale`` and ``zero_point`` (as float) shaped to broadcast against ``x``."""
        s = self.scale.to(device=x.device, dtype=torch.float32)
        z = self.zero_point.to(device=x.device, dtype=torch.float32)
        if self.axis is not None:
            axis = self.axis % x.dim()
            if x.shape[axis] != s.numel():
                raise ValueError(f"per-channel params have {s.numel()} channels, the tensor {x.shape[axis]} on axis {axis}")
            shape = [1] * x.dim()
            shape[axis] = s.numel()
            s, z = s.reshape(shape), z.reshape(shape)
        return s, z

    def clamp_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The real interval ``[s (qmin - z), s (qmax - z)]`` that is represented without clipping."""
        z = self.zero_point.to(torch.float32)
        return self.scale * (self.qmin - z), self.scale * (self.qmax - z)

    def to(self, device: torch.device | str) -> QuantParams:
        return QuantParams(self.scale.to(device), self.zero_point.to(device), self.bits, self.signed, self.symmetric, self.axis)


def choose_qparams(
    lo: torch.Tensor | float,
    hi: torch.Tensor | float,
    bits: int = 8,
    symmetric: bool = True,
    signed: bool | None = None,
    axis: int | None = None,
) -> QuantParams:
    """The quantizer that covers ``[lo, hi]`` (scalars, or 1-d per channel along ``axis``).

    Formulas in the module docstring. ``signed`` defaults to ``symmetric``; a range of width zero
    (an all-zero tensor) gets ``s = 1``. Non-finite bounds or ``lo > hi`` raise :class:`DataError`.
    """
    check_bits(bits)
    if signed is None:
        signed = symmetric
    if symmetric and not signed:
        raise ConfigError("signed", "a symmetric quantizer is signed")
    lo_t = torch.as_tensor(lo, dtype=torch.float32).detach()
    hi_t = torch.as_tensor(hi, dtype=torch.float32).detach().to(lo_t.device)
    if lo_t.shape != hi_t.shape:
        raise ValueError(f"lo and hi differ in shape: {tuple(lo_t.shape)} vs {tuple(hi_t.shape)}")
    if axis is None and lo_t.dim() != 0:
        raise ValueError("per-tensor bounds are scalars; pass axis= for per-channel bounds")
    if axis is not None and lo_t.dim() != 1:
        raise ValueError("per-channel bounds are 1-d")
    if not bool(torch.all(torch.isfinite(lo_t) & torch.isfinite(hi_t))):
        raise DataError("cannot choose a quantization range: the observed range holds NaN or inf")
    if bool(torch.any(lo_t > hi_t)):
        raise ValueError("lo > hi")
    qmin, qmax = qrange(bits, signed)
    if symmetric:
        amax = torch.maximum(lo_t.abs(), hi_t.abs())
        scale = amax / qmax
        zero = torch.zeros_like(scale, dtype=torch.int32)
    else:
        lo_t, hi_t = torch.clamp(lo_t, max=0.0), torch.clamp(hi_t, min=0.0)
        scale = (hi_t - lo_t) / (qmax - qmin)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.clamp(torch.round(qmin - lo_t / safe), qmin, qmax).to(torch.int32)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(torch.float32)
    return QuantParams(scale, zero, bits, signed, symmetric, axis)


def _round(v: torch.Tensor, rounding: Rounding, generator: torch.Generator | None) -> torch.Tensor:
    if rounding == "nearest":
        return torch.round(v)
    if rounding == "stochastic":
        u = torch.rand(v.shape, generator=generator, device=v.device, dtype=v.dtype)
        return torch.floor(v + u)
    raise ConfigError("rounding", f"expected 'nearest' or 'stochastic', got {rounding!r}")


def stochastic_round(v: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``floor(v) + 1`` with probability ``v - floor(v)``, else ``floor(v)``; unbiased (Gupta et al. 2015)."""
    return _round(v, "stochastic", generator)


def _unclamped(x: torch.Tensor, qp: QuantParams, rounding: Rounding, generator: torch.Generator | None) -> torch.Tensor:
    """``round(x / s) + z`` as float32."""
    s, z = qp.broadcast(x)
    return _round(x.to(torch.float32) / s, rounding, generator) + z


def _codes(x: torch.Tensor, qp: QuantParams, rounding: Rounding, generator: torch.Generator | None) -> torch.Tensor:
    """``clamp(round(x / s) + z, qmin, qmax)`` as float32."""
    return torch.clamp(_unclamped(x, qp, rounding, generator), qp.qmin, qp.qmax)


def quantize(
    x: torch.Tensor, qp: QuantParams, rounding: Rounding = "nearest", generator: torch.Generator | None = None
) -> torch.Tensor:
    """``q = clamp(round(x / s) + z, qmin, qmax)`` as ``int8`` (signed) or ``uint8`` (unsigned)."""
    return _codes(x.detach(), qp, rounding, generator).to(qp.int_dtype)


def dequantize(q: torch.Tensor, qp: QuantParams) -> torch.Tensor:
    """``x̂ = s (q - z)`` as float32."""
    s, z = qp.broadcast(q)
    return s * (q.to(torch.float32) - z)


def fake_quantize(
    x: torch.Tensor, qp: QuantParams, rounding: Rounding = "nearest", generator: torch.Generator | None = None
) -> torch.Tensor:
    """``x̂ = s (clamp(round(x / s) + z, qmin, qmax) - z)`` in float, with the straight-through estimator:
    the gradient is passed unchanged where the clamp is inactive, ``qmin <= round(x / s) + z <= qmax``,
    and is 0 elsewhere (Bengio et al. 2013; Jacob et al. 2018).
    """
    s, z = qp.broadcast(x)
    xf = x.to(torch.float32)
    with torch.no_grad():
        v = _unclamped(xf, qp, rounding, generator)
        inside = (v >= qp.qmin) & (v <= qp.qmax)
        xq = s * (torch.clamp(v, qp.qmin, qp.qmax) - z)
    if not xf.requires_grad:
        return xq.to(x.dtype)
    gated = torch.where(inside, xf, torch.zeros((), dtype=xf.dtype, device=xf.device))
    # (gated - gated.detach()) is exactly 0 with gradient 1 inside: the value stays exactly x̂
    return (xq + (gated - gated.detach())).to(x.dtype)


def quantization_mse(x: torch.Tensor, qp: QuantParams, reduce_axis: int | None = None) -> torch.Tensor:
    """Mean squared error ``mean((x - x̂)^2)`` of nearest rounding: a scalar, or one value per index of
    ``reduce_axis`` (the per-channel axis) when given."""
    with torch.no_grad():
        err = (fake_quantize(x.detach(), qp) - x.detach().to(torch.float32)) ** 2
        if reduce_axis is None:
            return err.mean()
        return err.transpose(0, reduce_axis).reshape(err.shape[reduce_axis], -1).mean(dim=1)


__all__ = [
    "MAX_BITS",
    "MIN_BITS",
    "QuantParams",
    "Rounding",
    "check_bits",
    "choose_qparams",
    "dequantize",
    "fake_quantize",
    "qrange",
    "quantization_mse",
    "quantize",
    "stochastic_round",
]
