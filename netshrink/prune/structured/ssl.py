"""Training regularizers that make whole structures zero, to be removed by structured pruning.

**Structured Sparsity Learning** (Wen, Wu, Wang, Chen & Li, "Learning Structured Sparsity in Deep
Neural Networks", NeurIPS 2016): the loss gains a group lasso ``λ Σ_l Σ_g ‖W_l^(g)‖₂`` whose groups
are, for a weight ``W`` of shape ``(N, C, kh, kw)`` (a Linear layer is ``(N, C)``):

- ``filter``: ``W[n, :, :, :]`` — one group per output filter / neuron;
- ``channel``: ``W[:, c, :, :]`` — one group per input channel / neuron;
- ``shape``: ``W[:, c, i, j]`` — one group per position of the filter shape (for a Linear layer the
  same as ``channel``).

The L2 norm of a group has a gradient of constant length ``w/‖w‖`` that drives whole groups to zero
together; after training, :class:`~.channel.ChannelConfig` with a ``threshold`` removes them.

**Network slimming** (Liu, Li, Shen, Huang, Yan & Zhang, "Learning Efficient Convolutional Networks
through Network Slimming", ICCV 2017): an L1 penalty ``λ Σ |γ|`` on the BatchNorm scales, so channels
with a small ``γ`` can be removed (``criterion: bn_scale``, ``scope: global``).

Both return an ``extra_loss(model, x, y, logits)`` for :class:`netshrink.train.Trainer`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn

from ..._layers import select_layers
from ...errors import ConfigError

ExtraLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
GroupKind = Literal["filter", "channel", "shape"]
_KINDS = ("filter", "channel", "shape")


def group_norms(weight: torch.Tensor, kind: GroupKind) -> torch.Tensor:
    """The L2 norm of every group of ``weight`` (``(N, C, ...)``): ``(N,)`` for ``filter``, ``(C,)``
    for ``channel``, ``(C, kh, kw)`` for ``shape`` (``(C,)`` for a Linear weight)."""
    if kind == "filter":
        return weight.reshape(weight.shape[0], -1).pow(2).sum(1).sqrt()
    if kind == "channel":
        return weight.transpose(0, 1).reshape(weight.shape[1], -1).pow(2).sum(1).sqrt()
    if kind == "shape":
        return weight.pow(2).sum(0).sqrt()
    raise ConfigError("kinds", f"unknown group kind {kind!r} (known: {', '.join(_KINDS)})")


def group_lasso(weight: torch.Tensor, kind: GroupKind) -> torch.Tensor:
    """``Σ_g ‖W^(g)‖₂`` over the groups of ``kind`` (Wen et al. 2016). A tiny ``1e-12`` inside the
    square root keeps the gradient finite at an all-zero group."""
    if kind == "filter":
        sq = weight.reshape(weight.shape[0], -1).pow(2).sum(1)
    elif kind == "channel":
        sq = weight.transpose(0, 1).reshape(weight.shape[1], -1).pow(2).sum(1)
    elif kind == "shape":
        sq = weight.pow(2).sum(0)
    else:
        raise ConfigError("kinds", f"unknown group kind {kind!r} (known: {', '.join(_KINDS)})")
    return (sq + 1e-12).sqrt().sum()


def _strength(value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError("strength", f"must be a finite number >= 0, got {value!r}")


def ssl_regularizer(strength: float, kinds: Sequence[GroupKind] = ("filter", "channel"), layers: list[str] | None = None) -> ExtraLoss:
    """``extra_loss`` adding ``strength · Σ_layers Σ_kinds group_lasso(W, kind)`` over the
    Linear/Conv layers ``layers`` (fnmatch patterns; all when None)."""
    _strength(strength)
    if isinstance(kinds, str) or not kinds or any(k not in _KINDS for k in kinds):
        raise ConfigError("kinds", f"must be a non-empty list of {', '.join(_KINDS)}, got {kinds!r}")

    def extra_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        total = logits.new_zeros(())
        for m in select_layers(model, layers).values():
            for k in kinds:
                total = total + group_lasso(m.weight, k)
        return strength * total

    return extra_loss


def slimming_regularizer(strength: float) -> ExtraLoss:
    """``extra_loss`` adding ``strength · Σ |γ|`` over every BatchNorm scale (Liu et al. 2017)."""
    _strength(strength)

    def extra_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        total = logits.new_zeros(())
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                total = total + m.weight.abs().sum()
        return strength * total

    return extra_loss


__all__ = ["GroupKind", "group_lasso", "group_norms", "slimming_regularizer", "ssl_regularizer"]
