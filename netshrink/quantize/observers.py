"""Calibration observers: the range ``[lo, hi]`` a quantizer should cover, from weights or activations.

Three rules, as pure functions on a tensor and as observer modules that accumulate over batches:

- ``minmax``:     ``lo = min x``, ``hi = max x`` (Jacob et al., CVPR 2018; no clipping error, but one
  outlier widens every step);
- ``percentile``: ``lo``, ``hi`` = the ``100 - p`` and ``p`` percentiles of ``x`` (e.g. ``p = 99.99``):
  the outliers beyond them are clipped (McKinstry et al., "Discovering Low-Precision Networks Close to
  Full-Precision Networks for Efficient Inference", 2019; Wu et al., "Integer Quantization for Deep
  Learning Inference", NVIDIA 2020, §4.2);
- ``mse``:        ``[lo, hi] = a* [min x, max x]`` with ``a* = argmin_a E[(x - Q_a(x))^2]`` over the grid
  ``a = k / K``, ``k = 1..K``: the clipping range that minimises the quantization mean squared error,
  trading clipping error against rounding error (Banner et al., "Post Training 4-bit Quantization of
  Convolutional Networks for Rapid-Deployment", NeurIPS 2019; Sung et al. 2015). ``a = 1`` is on the
  grid, so the MSE range never does worse than min-max.

Per channel (``axis`` given) every rule is applied to each slice along ``axis`` separately.
Empty data, or data holding NaN or inf, raises :class:`DataError` naming what was observed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..errors import ConfigError, DataError
from .affine import QuantParams, check_bits, choose_qparams, quantization_mse

ObserverKind = Literal["minmax", "percentile", "mse"]
OBSERVERS: tuple[str, ...] = ("minmax", "percentile", "mse")


@dataclass(frozen=True, eq=False)
class ValueRange:
    """An observed range: ``lo``, ``hi`` float32, 0-d per tensor or 1-d per channel along ``axis``."""

    lo: torch.Tensor
    hi: torch.Tensor
    axis: int | None = None

    def qparams(self, bits: int, symmetric: bool = True, signed: bool | None = None) -> QuantParams:
        """The quantizer covering this range (:func:`netshrink.quantize.affine.choose_qparams`)."""
        return choose_qparams(self.lo, self.hi, bits, symmetric, signed, self.axis)


def check_finite(x: torch.Tensor, what: str = "calibration data") -> None:
    """A :class:`DataError` naming ``what`` when ``x`` is empty or holds NaN or inf."""
    if x.numel() == 0:
        raise DataError(f"{what} is empty: nothing to calibrate the quantizer on")
    if not bool(torch.isfinite(x).all()):
        raise DataError(f"{what} holds NaN or inf: cannot calibrate a quantizer on it")


def _rows(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """``x`` as float32 ``(C, n)`` with one row per channel along ``axis``, or ``(1, numel)``."""
    x = x.detach().to(torch.float32)
    if axis is None:
        return x.reshape(1, -1)
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def _finish(lo: torch.Tensor, hi: torch.Tensor, axis: int | None) -> ValueRange:
    return ValueRange(lo[0], hi[0], None) if axis is None else ValueRange(lo, hi, axis)


def minmax_range(x: torch.Tensor, axis: int | None = None, what: str = "calibration data") -> ValueRange:
    """``[min x, max x]``, per tensor or per channel along ``axis``."""
    check_finite(x, what)
    r = _rows(x, axis)
    return _finish(r.amin(dim=1), r.amax(dim=1), axis)


def percentile_range(x: torch.Tensor, percentile: float = 99.99, axis: int | None = None, what: str = "calibration data") -> ValueRange:
    """``[P_(100-p)(x), P_p(x)]`` (linear interpolation between order statistics)."""
    check_percentile(percentile)
    check_finite(x, what)
    r = _rows(x, axis)
    return _finish(_quantile_rows(r, 1.0 - percentile / 100.0), _quantile_rows(r, percentile / 100.0), axis)


def _quantile_rows(r: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q`` quantile of each row, interpolating linearly between order statistics (as
    ``torch.quantile``, which refuses inputs of more than 2^24 values)."""
    n = r.shape[1]
    pos = q * (n - 1)
    below = int(pos)
    above = min(below + 1, n - 1)
    frac = pos - below
    lo = torch.kthvalue(r, below + 1, dim=1).values
    if frac == 0.0 or above == below:
        return lo
    hi = torch.kthvalue(r, above + 1, dim=1).values
    return lo + frac * (hi - lo)


def mse_range(
    x: torch.Tensor,
    bits: int,
    symmetric: bool = True,
    signed: bool | None = None,
    axis: int | None = None,
    grid: int = 100,
    what: str = "calibration data",
) -> ValueRange:
    """``a* [min x, max x]`` with ``a*`` minimising ``mean((x - Q_a(x))^2)`` over ``a = k / grid``;
    per channel, each channel picks its own ``a*`` (ties go to the wider range)."""
    check_bits(bits)
    if grid < 1:
        raise ConfigError("grid", f"must be at least 1, got {grid}")
    full = minmax_range(x, axis, what)
    r = _rows(x, axis)
    lo, hi = full.lo.reshape(-1), full.hi.reshape(-1)
    best_err = torch.full_like(lo, float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    for k in range(grid, 0, -1):  # from the full range inward: a strict improvement is needed to shrink
        a = k / grid
        qp = choose_qparams(a * lo, a * hi, bits, symmetric, signed, axis=0)
        err = quantization_mse(r, qp, reduce_axis=0)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, a * lo, best_lo)
        best_hi = torch.where(better, a * hi, best_hi)
    return _finish(best_lo, best_hi, axis)


def check_percentile(percentile: float, field: str = "percentile") -> None:
    if not 50.0 < percentile <= 100.0:
        raise ConfigError(field, f"must lie in (50, 100], got {percentile}")


# ------------------------------------------------------------------------------------ modules


class Observer(nn.Module):
    """Accumulates calibration data batch by batch; :meth:`range` gives the observed :class:`ValueRange`.

    As a module it passes its input through unchanged, so it can sit in a forward pass. ``bits``,
    ``symmetric`` and ``signed`` describe the quantizer the range is for (the MSE rule needs them).
    ``what`` names the data in error messages (``"input of fc1"``).
    """

    kind: str = ""

    def __init__(self, bits: int = 8, symmetric: bool = True, signed: bool | None = None, axis: int | None = None, what: str = "calibration data"):
        super().__init__()
        check_bits(bits)
        self.bits, self.symmetric, self.signed, self.axis, self.what = bits, symmetric, signed, axis, what

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.update(x)
        return x

    def update(self, x: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def reset(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def seen(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def range(self) -> ValueRange:  # pragma: no cover - abstract
        raise NotImplementedError

    def qparams(self) -> QuantParams:
        """The quantizer for the observed range."""
        return self.range().qparams(self.bits, self.symmetric, self.signed)

    def _empty(self) -> DataError:
        return DataError(f"{self.what} is empty: the {self.kind} observer saw no value")

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}, axis={self.axis}"


class MinMaxObserver(Observer):
    """Running ``[min, max]`` over every batch seen (exact; constant memory)."""

    kind = "minmax"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self._seen = 0

    def update(self, x: torch.Tensor) -> None:
        r = minmax_range(x, self.axis, self.what)
        self._seen += int(x.numel())
        self.lo = r.lo if self.lo is None else torch.minimum(self.lo, r.lo)
        self.hi = r.hi if self.hi is None else torch.maximum(self.hi, r.hi)

    def reset(self) -> None:
        self.lo = self.hi = None
        self._seen = 0

    @property
    def seen(self) -> int:
        return self._seen

    def range(self) -> ValueRange:
        if self.lo is None or self.hi is None:
            raise self._empty()
        return ValueRange(self.lo, self.hi, self.axis)


class _SampleObserver(Observer):
    """Keeps a uniform random sample of at most ``max_samples`` values per channel over all batches
    (each kept value stands for ``seen / kept`` values; merging draws by those weights), seeded by ``seed``."""

    def __init__(self, *args, max_samples: int = 2**18, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        if max_samples < 1:
            raise ConfigError("max_samples", f"must be at least 1, got {max_samples}")
        self.max_samples = max_samples
        self.generator = torch.Generator().manual_seed(seed)
        self.samples: torch.Tensor | None = None  # (C, k)
        self._seen_cols = 0
        self._seen = 0

    def update(self, x: torch.Tensor) -> None:
        check_finite(x, self.what)
        rows = _rows(x, self.axis)
        if self.samples is not None and rows.shape[0] != self.samples.shape[0]:
            raise DataError(f"{self.what}: {rows.shape[0]} channels now, {self.samples.shape[0]} before")
        self._seen += int(x.numel())
        if self.samples is None:
            merged, weights = rows, None
        else:
            merged = torch.cat([self.samples, rows.to(self.samples.device)], dim=1)
            kept = self.samples.shape[1]
            weights = torch.cat([torch.full((kept,), self._seen_cols / kept), torch.ones(rows.shape[1])])
        self._seen_cols += rows.shape[1]
        if merged.shape[1] > self.max_samples:
            if weights is None:
                idx = torch.randperm(merged.shape[1], generator=self.generator)[: self.max_samples]
            else:
                idx = torch.multinomial(weights, self.max_samples, replacement=False, generator=self.generator)
            merged = merged[:, idx.to(merged.device)]
        self.samples = merged

    def reset(self) -> None:
        self.samples = None
        self._seen_cols = self._seen = 0

    @property
    def seen(self) -> int:
        return self._seen

    def _sample_tensor(self) -> torch.Tensor:
        """The kept sample with the channel axis at 0 (``(C, k)``), or flat (``(k,)``) per tensor."""
        if self.samples is None:
            raise self._empty()
        return self.samples if self.axis is not None else self.samples[0]


class PercentileObserver(_SampleObserver):
    """``[P_(100-p), P_p]`` of the values seen (see :func:`percentile_range`)."""

    kind = "percentile"

    def __init__(self, *args, percentile: float = 99.99, **kwargs):
        super().__init__(*args, **kwargs)
        check_percentile(percentile)
        self.percentile = percentile

    def range(self) -> ValueRange:
        r = percentile_range(self._sample_tensor(), self.percentile, 0 if self.axis is not None else None, self.what)
        return ValueRange(r.lo, r.hi, self.axis)


class MSEObserver(_SampleObserver):
    """The MSE-optimal clipping range of the values seen (see :func:`mse_range`)."""

    kind = "mse"

    def __init__(self, *args, grid: int = 100, **kwargs):
        super().__init__(*args, **kwargs)
        self.grid = grid

    def range(self) -> ValueRange:
        r = mse_range(self._sample_tensor(), self.bits, self.symmetric, self.signed, 0 if self.axis is not None else None, self.grid, self.what)
        return ValueRange(r.lo, r.hi, self.axis)


def make_observer(
    kind: ObserverKind,
    bits: int = 8,
    symmetric: bool = True,
    signed: bool | None = None,
    axis: int | None = None,
    percentile: float = 99.99,
    what: str = "calibration data",
    seed: int = 0,
) -> Observer:
    """An observer of the given ``kind`` (``"minmax"``, ``"percentile"``, ``"mse"``)."""
    if kind == "minmax":
        return MinMaxObserver(bits, symmetric, signed, axis, what)
    if kind == "percentile":
        return PercentileObserver(bits, symmetric, signed, axis, what, percentile=percentile, seed=seed)
    if kind == "mse":
        return MSEObserver(bits, symmetric, signed, axis, what, seed=seed)
    raise ConfigError("observer", f"unknown observer {kind!r} (known: {', '.join(OBSERVERS)})")


def observe_range(
    x: torch.Tensor,
    kind: ObserverKind,
    bits: int = 8,
    symmetric: bool = True,
    signed: bool | None = None,
    axis: int | None = None,
    percentile: float = 99.99,
    what: str = "calibration data",
) -> ValueRange:
    """The range that rule ``kind`` picks for the whole tensor ``x`` at once (weights, one batch)."""
    if kind == "minmax":
        return minmax_range(x, axis, what)
    if kind == "percentile":
        return percentile_range(x, percentile, axis, what)
    if kind == "mse":
        return mse_range(x, bits, symmetric, signed, axis, what=what)
    raise ConfigError("observer", f"unknown observer {kind!r} (known: {', '.join(OBSERVERS)})")


__all__ = [
    "OBSERVERS",
    "MSEObserver",
    "MinMaxObserver",
    "Observer",
    "ObserverKind",
    "PercentileObserver",
    "ValueRange",
    "check_finite",
    "make_observer",
    "minmax_range",
    "mse_range",
    "observe_range",
    "percentile_range",
]
