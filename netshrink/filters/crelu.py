"""CReLU: a filter and its negation share storage (Shang et al., "Understanding and Improving
Convolutional Neural Networks via Concatenated Rectified Linear Units", ICML 2016).

Shang et al. observe that the first layers of a CNN learn pairs of filters of opposite phase, and
replace them by ``CReLU(z) = [relu(z), relu(-z)]`` of ``z = phi * x + b``: half the filters give the
same number of output channels. With ``relu=False`` the layer outputs ``[z, -z]`` (the linear sharing
alone; a following ReLU then gives CReLU exactly).

Projection from a dense ``W`` of ``2F`` filters (least squares for the linear part, pairing filter
``f`` with ``F + f``): ``phi_f = (W_f - W_{F+f}) / 2`` and ``b_f = (b_f - b_{F+f}) / 2``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._modules import register_module
from ..errors import ModelError
from ..lowrank._common import bool_arg
from ._common import check_divisible, conv_kwargs, json_geometry


@register_module("crelu_conv")
class CReLUConv2d(nn.Module):
    """``[relu(z), relu(-z)]`` (or ``[z, -z]``) with ``z = conv(x, phi) + b``, ``out_channels / 2`` stored filters."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
                 dilation: Any = 1, bias: bool = True, padding_mode: str = "zeros", relu: bool = True):
        super().__init__()
        self.kw = conv_kwargs(in_channels, out_channels, kernel_size, stride, padding, dilation, bias, padding_mode)
        check_divisible("out_channels", out_channels, 2, "CReLU outputs a filter and its negation")
        self.relu = bool_arg("relu", relu)
        kh, kw = self.kw["kernel_size"]
        self.conv = nn.Conv2d(in_channels, out_channels // 2, (kh, kw), self.kw["stride"], self.kw["padding"],
                              self.kw["dilation"], bias=bias, padding_mode=padding_mode)
        bound = 1 / math.sqrt(in_channels * kh * kw)
        nn.init.uniform_(self.conv.weight, -bound, bound)
        self.in_channels, self.out_channels = in_channels, out_channels

    def netshrink_args(self) -> dict:
        return dict(json_geometry(self.kw), relu=self.relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x)
        both = torch.cat([z, -z], dim=1)
        return F.relu(both) if self.relu else both

    def dense_weight(self) -> torch.Tensor:
        """The ``(2F, C, kh, kw)`` kernel of the linear part: ``[phi, -phi]``."""
        return torch.cat([self.conv.weight, -self.conv.weight])

    @torch.no_grad()
    def set_from_dense(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> CReLUConv2d:
        if tuple(weight.shape) != (self.out_channels, self.in_channels, *self.kw["kernel_size"]):
            raise ModelError(f"a kernel of shape {list(weight.shape)} does not fit this CReLUConv2d")
        half = self.out_channels // 2
        self.conv.weight.copy_((weight[:half] - weight[half:]) / 2)
        if bias is not None and self.conv.bias is not None:
            self.conv.bias.copy_((bias[:half] - bias[half:]) / 2)
        return self


__all__ = ["CReLUConv2d"]
