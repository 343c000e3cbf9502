"""Plumbing shared by the compact-filter methods: results, conv geometry checks, layer choice."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import ModelError
from ..lowrank._common import bool_arg, int_pair, padding_arg, padding_mode_arg, positive_int


@dataclass(frozen=True)
class LayerCompaction:
    """One replaced conv: parameters before and after, the relative Frobenius error of the weight the
    new layer applies at init (``||W - W_hat|| / ||W||``; for CReLU the linear part), and, where the
    method fits outputs on data, the relative output error ``||y - y_hat|| / ||y||`` after fitting."""

    name: str
    method: str
    module_type: str
    params_before: int
    params_after: int
    rel_error: float
    output_error: float | None = None


@dataclass(frozen=True)
class CompactResult:
    """What ``compact_`` returns: one :class:`LayerCompaction` per replaced layer."""

    layers: dict[str, LayerCompaction]
    coverage: Any = field(default=None, kw_only=True)  # a netshrink._coverage.Coverage

    @property
    def params_before(self) -> int:
        return sum(s.params_before for s in self.layers.values())

    @property
    def params_after(self) -> int:
        return sum(s.params_after for s in self.layers.values())


def conv_kwargs(in_channels: Any, out_channels: Any, kernel_size: Any, stride: Any, padding: Any, dilation: Any,
                bias: Any, padding_mode: Any) -> dict[str, Any]:
    """Checked keyword arguments for an ``nn.Conv2d`` (a bad one is a one-line :class:`ModelError`)."""
    return {
        "in_channels": positive_int("in_channels", in_channels),
        "out_channels": positive_int("out_channels", out_channels),
        "kernel_size": int_pair("kernel_size", kernel_size),
        "stride": int_pair("stride", stride),
        "padding": padding_arg(padding),
        "dilation": int_pair("dilation", dilation),
        "bias": bool_arg("bias", bias),
        "padding_mode": padding_mode_arg(padding_mode),
    }


def json_geometry(kw: dict[str, Any]) -> dict[str, Any]:
    """``kw`` from :func:`conv_kwargs` as JSON (tuples to lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}


def check_divisible(name: str, value: int, by: int, what: str) -> None:
    if value % by:
        raise ModelError(f"{name} must be a multiple of {by} ({what}), got {value}")


def plain_conv_reason(module: nn.Module) -> str | None:
    if not isinstance(module, nn.Conv2d):
        return f"it is a {type(module).__name__}, not a Conv2d"
    if module.groups != 1:
        return f"it is a grouped conv (groups={module.groups})"
    return None
