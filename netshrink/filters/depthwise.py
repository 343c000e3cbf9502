"""Depthwise-separable replacement of a k x k convolution, trained to mimic the original layer.

A dense ``W`` of shape ``(N, C, k, k)`` becomes a depthwise ``k x k`` conv with ``m`` filters per input
channel (``groups = C``) and a pointwise ``1 x 1`` conv: ``W[n, c] ≈ sum_{i<m} P[n, c m + i] D[c m + i]``,
``C m k^2 + N C m`` weights instead of ``N C k^2`` (Sifre 2014; Howard et al., MobileNets, 2017; the
compact-filter family of Cheng et al.'s survey).

Initialisation: for each input channel ``c``, the ``N x k^2`` matrix ``W[:, c]`` truncated to rank ``m``
by SVD, the best such fit in Frobenius norm (Eckart & Young 1936). Mimicking: on sample inputs ``x``
of the layer (captured from the model on data), minimise ``||conv_W(x) - dws(x)||^2`` by Adam for
``steps`` steps, as the layer-wise reconstruction of Jaderberg et al. (BMVC 2014) does for its factors.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from .._modules import register_module
from ..errors import ModelError
from ..lowrank._common import positive_int
from ..lowrank._fit import mimic_, relative_output_error  # noqa: F401  (re-exported)
from ._common import conv_kwargs, json_geometry


def depthwise_factors(weight: torch.Tensor, multiplier: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(depthwise (C m, 1, kh, kw), pointwise (N, C m, 1, 1))`` from per-channel truncated SVDs of ``W``."""
    n, c, kh, kw = weight.shape
    m = multiplier
    if not 1 <= m <= min(n, kh * kw):
        raise ModelError(f"multiplier must lie in [1, {min(n, kh * kw)}] (min(out channels, kh*kw)), got {m}")
    w = weight.detach().to(torch.float64).permute(1, 0, 2, 3).reshape(c, n, kh * kw)  # per input channel
    u, s, vh = torch.linalg.svd(w, full_matrices=False)  # (c, n, r), (c, r), (c, r, k2)
    root = s[:, :m].sqrt()
    depth = (root[:, :, None] * vh[:, :m]).reshape(c * m, 1, kh, kw)
    point = (u[:, :, :m] * root[:, None, :]).permute(1, 0, 2).reshape(n, c * m, 1, 1)
    return depth.to(weight.dtype), point.to(weight.dtype)


@register_module("depthwise_separable_conv")
class DepthwiseSeparableConv2d(nn.Sequential):
    """``pointwise(depthwise(x))``: a ``groups=C`` k x k conv with ``multiplier`` filters per channel,
    then a 1x1 conv holding the bias."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
                 dilation: Any = 1, bias: bool = True, padding_mode: str = "zeros", multiplier: int = 1):
        kw = conv_kwargs(in_channels, out_channels, kernel_size, stride, padding, dilation, bias, padding_mode)
        m = positive_int("multiplier", multiplier)
        super().__init__(OrderedDict(
            depthwise=nn.Conv2d(in_channels, in_channels * m, kw["kernel_size"], kw["stride"], kw["padding"],
                                kw["dilation"], groups=in_channels, bias=False, padding_mode=padding_mode),
            pointwise=nn.Conv2d(in_channels * m, out_channels, 1, bias=bias),
        ))
        self.kw, self.multiplier = kw, m

    def netshrink_args(self) -> dict:
        return dict(json_geometry(self.kw), multiplier=self.multiplier)

    def dense_weight(self) -> torch.Tensor:
        """The ``(N, C, kh, kw)`` kernel this module applies."""
        d = self.depthwise.weight  # (C m, 1, kh, kw)
        p = self.pointwise.weight[:, :, 0, 0]  # (N, C m)
        c, m = self.kw["in_channels"], self.multiplier
        return torch.einsum("ncm,cmhw->nchw", p.reshape(-1, c, m), d.reshape(c, m, *d.shape[2:]))

    @torch.no_grad()
    def set_from_dense(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> DepthwiseSeparableConv2d:
        want = (self.kw["out_channels"], self.kw["in_channels"], *self.kw["kernel_size"])
        if tuple(weight.shape) != want:
            raise ModelError(f"a kernel of shape {list(weight.shape)} does not fit this DepthwiseSeparableConv2d {list(want)}")
        depth, point = depthwise_factors(weight, self.multiplier)
        self.depthwise.weight.copy_(depth)
        self.pointwise.weight.copy_(point)
        if bias is not None and self.pointwise.bias is not None:
            self.pointwise.bias.copy_(bias)
        return self


__all__ = ["DepthwiseSeparableConv2d", "depthwise_factors", "mimic_", "relative_output_error"]
