"""Equivariant filter sharing: each stored filter also acts through a group of flips and 90° rotations.

A layer with ``F`` stored filters ``phi_f`` and a group ``G`` of transforms of the square grid applies
the ``|G| F`` filters ``g phi_f`` (output channel ``i * F + f`` for the ``i``-th element ``g_i``): the
"lifting" layer of group-equivariant CNNs (Cohen & Welling, "Group Equivariant Convolutional Networks",
ICML 2016; the transferred-filter family of Cheng et al.'s survey, 2017). Groups: ``flip`` (identity,
horizontal flip), ``p4`` (the four 90° rotations), ``p4m`` (rotations and flips, 8 elements).

Equivariance: for ``t`` in ``G`` acting on the plane (about its centre), cross-correlation obeys
``corr(t x, w) = t corr(x, t^{-1} w)``, so the layer ``phi`` satisfies ``phi(t x) = T'_t phi(x)`` with
``(T'_t y)[g] = t (y[t^{-1} g])``: rotate every map and permute the group channels. Exact with a
square odd kernel, stride 1, and symmetric padding (``k // 2``, zeros) on a square input.

The layer stores ``F C k k`` weights (``|G|`` times fewer than a dense conv of ``|G| F`` outputs) and ``F``
biases, shared by a filter's transforms. Projection from a dense weight ``W`` (least squares, each
``g`` being an orthogonal permutation of the kernel entries): ``phi_f = mean_i g_i^{-1} W[i F + f]``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._modules import register_module
from ..errors import ModelError
from ._common import conv_kwargs, json_geometry

#: group name -> its elements as (flip, quarter turns): the transform is rot90^r after flip^m
GROUPS: dict[str, tuple[tuple[int, int], ...]] = {
    "flip": ((0, 0), (1, 0)),
    "p4": ((0, 0), (0, 1), (0, 2), (0, 3)),
    "p4m": tuple((m, r) for m in (0, 1) for r in range(4)),
}


def _quarter_turns(x: torch.Tensor, r: int) -> torch.Tensor:
    """``torch.rot90(x, r, dims=(-2, -1))`` written with flips and transposes (which ONNX exports)."""
    for _ in range(r % 4):
        x = torch.flip(x, dims=(-1,)).transpose(-2, -1)
    return x


def transform(x: torch.Tensor, element: tuple[int, int]) -> torch.Tensor:
    """Apply the grid transform ``rot90^r ∘ flip^m`` to the last two (spatial) dims of ``x``."""
    m, r = element
    if m:
        x = torch.flip(x, dims=(-1,))
    return _quarter_turns(x, r)


def inverse_transform(x: torch.Tensor, element: tuple[int, int]) -> torch.Tensor:
    """Undo :func:`transform`: ``flip^m ∘ rot90^{-r}``."""
    m, r = element
    x = _quarter_turns(x, -r)
    return torch.flip(x, dims=(-1,)) if m else x


def group_elements(group: str) -> tuple[tuple[int, int], ...]:
    if group not in GROUPS:
        raise ModelError(f"group must be one of {', '.join(GROUPS)}, got {group!r}")
    return GROUPS[group]


def channel_permutation(group: str, t: tuple[int, int]) -> list[int]:
    """``perm`` with ``perm[i] = index of t^{-1} g_i`` in the group's element list (found by acting on a
    generic 3x3 kernel, so no multiplication table is hard-coded)."""
    elements = group_elements(group)
    if t not in elements:
        raise ModelError(f"{t} is not an element of group {group!r} ({list(elements)})")
    probe = torch.arange(9, dtype=torch.float64).reshape(3, 3)
    images = [transform(probe, g) for g in elements]
    perm = []
    for g in elements:
        target = inverse_transform(transform(probe, g), t)
        perm.append(next(j for j, im in enumerate(images) if torch.equal(im, target)))
    return perm


def project_equivariant(weight: torch.Tensor, group: str) -> torch.Tensor:
    """Least-squares stored filters ``phi_f = mean_i g_i^{-1} W[i F + f]`` from a dense weight."""
    elements = group_elements(group)
    n = len(elements)
    if weight.shape[0] % n:
        raise ModelError(f"{weight.shape[0]} output channels are not a multiple of the {n} elements of {group!r}")
    chunks = weight.detach().reshape(n, weight.shape[0] // n, *weight.shape[1:])
    return torch.stack([inverse_transform(chunks[i], g) for i, g in enumerate(elements)]).mean(0)


@register_module("equivariant_conv")
class EquivariantConv2d(nn.Module):
    """A Conv2d whose ``out_channels = |G| F`` filters are the ``|G|`` transforms of ``F`` stored ones."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
                 dilation: Any = 1, bias: bool = True, padding_mode: str = "zeros", group: str = "p4"):
        super().__init__()
        self.kw = conv_kwargs(in_channels, out_channels, kernel_size, stride, padding, dilation, bias, padding_mode)
        self.group = group
        self.elements = group_elements(group)
        n = len(self.elements)
        kh, kw = self.kw["kernel_size"]
        if kh != kw and any(r % 2 for _, r in self.elements):
            raise ModelError(f"group {group!r} rotates filters by 90 degrees: the kernel must be square, got {kh}x{kw}")
        if out_channels % n:
            raise ModelError(f"out_channels must be a multiple of {n} (the elements of {group!r}), got {out_channels}")
        self.stored = out_channels // n
        bound = 1 / math.sqrt(in_channels * kh * kw)
        self.weight = nn.Parameter(torch.empty(self.stored, in_channels, kh, kw).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(self.stored)) if bias else None
        self.in_channels, self.out_channels = in_channels, out_channels

    def netshrink_args(self) -> dict:
        return dict(json_geometry(self.kw), group=self.group)

    def dense_weight(self) -> torch.Tensor:
        """The ``(|G| F, C, k, k)`` kernel applied: ``[g_0 phi, g_1 phi, ...]``."""
        return torch.cat([transform(self.weight, g) for g in self.elements])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.repeat(len(self.elements))
        kw = self.kw
        if kw["padding_mode"] != "zeros":
            pad = kw["padding"]
            if isinstance(pad, str):
                raise ModelError("padding_mode other than zeros needs numeric padding")
            x = F.pad(x, (pad[1], pad[1], pad[0], pad[0]), mode=kw["padding_mode"])
            pad = 0
        else:
            pad = kw["padding"]
        return F.conv2d(x, self.dense_weight(), bias, kw["stride"], pad, kw["dilation"])

    def transform_output(self, y: torch.Tensor, t: tuple[int, int]) -> torch.Tensor:
        """``T'_t y``: ``(T'_t y)[g] = t(y[t^{-1} g])``, so that ``phi(t x) = T'_t phi(x)``."""
        n = len(self.elements)
        blocks = y.unflatten(1, (n, self.stored))
        perm = channel_permutation(self.group, t)
        return transform(blocks[:, perm], t).flatten(1, 2)

    @torch.no_grad()
    def set_from_dense(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> EquivariantConv2d:
        if tuple(weight.shape) != (self.out_channels, self.in_channels, *self.kw["kernel_size"]):
            raise ModelError(f"a kernel of shape {list(weight.shape)} does not fit this EquivariantConv2d")
        self.weight.copy_(project_equivariant(weight, self.group))
        if bias is not None and self.bias is not None:
            self.bias.copy_(bias.detach().reshape(len(self.elements), self.stored).mean(0))
        return self


__all__ = ["GROUPS", "EquivariantConv2d", "channel_permutation", "inverse_transform", "project_equivariant", "transform"]
