"""Fake-quantization modules: uniform weight quantization as a parametrization, and input
(activation) quantization of a Linear/Conv layer. The math is :mod:`netshrink.quantize.affine`.

- :class:`WeightFakeQuant` is a ``torch.nn.utils.parametrize`` parametrization on ``weight``:
  ``weight = s (clamp(round(W / s) + z, qmin, qmax) - z)``, trained through the straight-through
  estimator (Jacob et al., CVPR 2018 §3). ``scale`` and ``zero_point`` are buffers; a static quantizer
  (PTQ) keeps them, a dynamic one (QAT) recomputes them from the current weight in every training
  forward pass, so the range follows the weights as they learn.
- :class:`ActFakeQuant` quantizes a layer's input ``x`` with per-tensor ``s``, ``z``: it first observes
  calibration batches (passing them through), then is frozen; with ``ema > 0`` it keeps tracking the
  range in training as an exponential moving average of the batch min and max (Jacob et al. 2018
  §3.1: ``r <- (1 - ema) r + ema r_batch``).

Input quantization is attached by :func:`attach_input_quant`, which adds the quantizer as the
layer's child ``input_quant`` and gives the layer an instance ``forward`` that quantizes the input and
then runs the class's own forward. Unlike wrapping, the layer keeps its name and parameter names
(``fc1.weight``), its type (``isinstance(m, nn.Linear)``) and its parametrizations; unlike a forward
pre-hook the quantizer is an ordinary submodule in the state dict, and ``deepcopy`` rebinds it.
Together a weight quantizer and an input quantizer are the Q/DQ pair of an int8 ONNX export.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from ..errors import ModelError
from ._common import WeightQuantizer
from .affine import QuantParams, Rounding, check_bits, choose_qparams, fake_quantize
from .observers import (
    ObserverKind,
    check_finite,
    make_observer,
    minmax_range,
    observe_range,
)


class WeightFakeQuant(WeightQuantizer):
    """Parametrization ``W -> fake_quantize(W)``, per tensor or per output channel (``channel_axis``: 0, or 1
    for a weight stored ``(in, out)`` as GPT-2's Conv1D).

    ``observer`` picks the range from the weight (``minmax``, ``percentile``, ``mse``; see
    :mod:`netshrink.quantize.observers`). ``dynamic=True`` (QAT) re-observes the weight at every
    forward pass in training mode; otherwise the range is fixed when the quantizer is built (PTQ)
    or when :meth:`observe` is called.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bits: int = 8,
        symmetric: bool = True,
        per_channel: bool = True,
        observer: ObserverKind = "minmax",
        percentile: float = 99.99,
        dynamic: bool = False,
        rounding: Rounding = "nearest",
        channel_axis: int = 0,
    ):
        super().__init__()
        check_bits(bits)
        self.bits, self.symmetric, self.signed = bits, symmetric, symmetric
        self.axis = channel_axis if per_channel else None
        self.observer, self.percentile, self.dynamic, self.rounding = observer, percentile, dynamic, rounding
        qp = self._observe(weight)
        self.register_buffer("scale", qp.scale.to(weight.device))
        self.register_buffer("zero_point", qp.zero_point.to(weight.device))

    def _observe(self, w: torch.Tensor) -> QuantParams:
        r = observe_range(w.detach(), self.observer, self.bits, self.symmetric, self.signed, self.axis, self.percentile, what="weight")
        return r.qparams(self.bits, self.symmetric, self.signed)

    @torch.no_grad()
    def observe(self, w: torch.Tensor) -> None:
        """Set ``scale`` and ``zero_point`` from the weight ``w``."""
        qp = self._observe(w)
        self.scale.copy_(qp.scale)
        self.zero_point.copy_(qp.zero_point)

    def qparams(self) -> QuantParams:
        return QuantParams(self.scale, self.zero_point, self.bits, self.signed, self.symmetric, self.axis)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.dynamic and self.training:
            self.observe(w)
        return fake_quantize(w, self.qparams(), self.rounding)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}, axis={self.axis}, observer={self.observer!r}, dynamic={self.dynamic}"


class ActFakeQuant(nn.Module):
    """Per-tensor fake quantization of an activation, calibrated by an observer.

    States: observing (:meth:`start_observing` ... :meth:`finish_observing`; the input passes through
    unchanged), then quantizing with the frozen ``scale``/``zero_point``. With ``ema > 0`` the range
    also follows an exponential moving average of batch min/max in training mode (QAT); such a
    quantizer may start uncalibrated and takes its first range from its first training batch.
    """

    def __init__(
        self,
        bits: int = 8,
        symmetric: bool = False,
        observer: ObserverKind = "minmax",
        percentile: float = 99.99,
        ema: float = 0.0,
        what: str = "activation",
        seed: int = 0,
    ):
        super().__init__()
        check_bits(bits)
        if not 0.0 <= ema <= 1.0:
            raise ValueError(f"ema must lie in [0, 1], got {ema}")
        self.bits, self.symmetric, self.signed = bits, symmetric, symmetric
        self.observer_kind, self.percentile, self.ema, self.what, self.seed = observer, percentile, ema, what, seed
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        self._set_observer(None)

    def _set_observer(self, obs: Any) -> None:
        # an Observer while observing, kept out of the module tree (never a child, never in the state dict)
        object.__setattr__(self, "_observer", obs)

    @property
    def observing(self) -> bool:
        return self._observer is not None

    @property
    def seen(self) -> int:
        """How many values the current observer has seen (0 when not observing)."""
        return int(self._observer.seen) if self._observer is not None else 0

    def start_observing(self) -> None:
        self._set_observer(make_observer(self.observer_kind, self.bits, self.symmetric, self.signed, None, self.percentile, self.what, self.seed))

    def stop_observing(self) -> None:
        """Drop the observer without changing the range."""
        self._set_observer(None)

    @torch.no_grad()
    def finish_observing(self) -> QuantParams:
        """Freeze the range the observer saw; a :class:`DataError` when it saw nothing."""
        obs = self._observer
        self._set_observer(None)
        if obs is None:
            raise ModelError(f"{self.what}: finish_observing() without start_observing()")
        r = obs.range()
        self._set_range(r.lo, r.hi)
        return self.qparams()

    def _set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self.lo.copy_(lo)
        self.hi.copy_(hi)
        qp = choose_qparams(self.lo, self.hi, self.bits, self.symmetric, self.signed)
        self.scale.copy_(qp.scale)
        self.zero_point.copy_(qp.zero_point)
        self.calibrated.fill_(True)

    def qparams(self) -> QuantParams:
        return QuantParams(self.scale, self.zero_point, self.bits, self.signed, self.symmetric, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._observer is not None:
            self._observer.update(x)
            return x
        if self.training and self.ema > 0:
            with torch.no_grad():
                check_finite(x, self.what)
                r = minmax_range(x, None, self.what)
                if bool(self.calibrated):
                    r_lo, r_hi = (1 - self.ema) * self.lo + self.ema * r.lo, (1 - self.ema) * self.hi + self.ema * r.hi
                else:
                    r_lo, r_hi = r.lo, r.hi
                self._set_range(r_lo, r_hi)
        if not bool(self.calibrated):
            raise ModelError(f"{self.what}: the activation quantizer is not calibrated (calibrate with data, or train with ema > 0)")
        return fake_quantize(x, self.qparams())

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}, observer={self.observer_kind!r}, ema={self.ema}"


def _forward_with_input_quant(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return type(self).forward(self, self.input_quant(x), *args, **kwargs)


def attach_input_quant(layer: nn.Module, quantizer: ActFakeQuant) -> None:
    """Quantize every input of ``layer`` by ``quantizer`` (a child named ``input_quant``)."""
    if input_quant_of(layer) is not None:
        raise ModelError(f"{type(layer).__name__} already has an input quantizer")
    layer.input_quant = quantizer
    layer.forward = types.MethodType(_forward_with_input_quant, layer)


def input_quant_of(layer: nn.Module) -> ActFakeQuant | None:
    q = layer._modules.get("input_quant")
    return q if isinstance(q, ActFakeQuant) else None


def remove_input_quant(layer: nn.Module) -> None:
    """Undo :func:`attach_input_quant` (no-op when the layer has none)."""
    if input_quant_of(layer) is None:
        return
    del layer._modules["input_quant"]
    layer.__dict__.pop("forward", None)


__all__ = ["ActFakeQuant", "WeightFakeQuant", "attach_input_quant", "input_quant_of", "remove_input_quant"]
