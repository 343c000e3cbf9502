"""Biased weight decay (Hanson & Pratt, "Comparing Biases for Minimal Network Construction with
Back-Propagation", NeurIPS 1988, published 1989).

Plain weight decay adds ``λ Σ w²``: it pulls every weight toward zero in proportion to its size, so
the weights a task needs shrink as much as the useless ones. Hanson & Pratt bias the decay so that it
saturates for large weights — small weights are driven to zero while large ones are left nearly free:

- ``hyperbolic``: ``B(w) = w² / (1 + w²/w₀²)``, gradient ``2w / (1 + w²/w₀²)²``;
- ``exponential``: ``B(w) = w₀² (1 − exp(−w²/w₀²))``, gradient ``2w exp(−w²/w₀²)``.

Both equal ``w²`` near zero (so a strength ``λ`` pulls small weights exactly as L2 of strength ``λ``
does) and tend to the constant ``w₀²`` for ``|w| ≫ w₀``; ``w₀`` (``scale``) sets where the bias
turns. With ``w₀ = 1`` the hyperbolic form is the paper's ``w²/(1 + w²)``. The result feeds the
Trainer's ``extra_loss`` hook: ``Trainer(model, cfg, extra_loss=biased_weight_decay(1e-3))``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal

import torch
from torch import nn

from .._layers import select_layers
from ..errors import ConfigError

#: the Trainer's ``extra_loss(model, inputs, target, output)`` (``inputs``: the batch's :class:`~netshrink.task.Inputs`)
ExtraLoss = Callable[[nn.Module, Any, Any, torch.Tensor], torch.Tensor]
BiasKind = Literal["hyperbolic", "exponential"]


def biased_penalty(weight: torch.Tensor, kind: BiasKind = "hyperbolic", scale: float = 1.0) -> torch.Tensor:
    """``Σ_k B(w_k)`` for the bias ``kind`` with knee ``scale = w₀`` (see the module docstring)."""
    u = (weight / scale).pow(2)
    if kind == "exponential":
        return scale**2 * (-torch.expm1(-u)).sum()
    return (weight.pow(2) / (1.0 + u)).sum()


def biased_weight_decay(
    strength: float, layers: list[str] | None = None, kind: BiasKind = "hyperbolic", scale: float = 1.0
) -> ExtraLoss:
    """An ``extra_loss(model, inputs, target, output)`` for :class:`netshrink.Trainer` (any task: the
    penalty reads only the weights) that adds
    ``strength · Σ_layers Σ_k B(w_k)`` over the (effective, masked) ``weight`` of ``layers`` (fnmatch
    patterns; every Linear/Conv layer when None). Bad arguments raise :class:`ConfigError`."""
    if not (isinstance(strength, (int, float)) and math.isfinite(strength) and strength >= 0):
        raise ConfigError("strength", f"must be a finite number >= 0, got {strength!r}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ConfigError("scale", f"must be a finite number > 0, got {scale!r}")
    if kind not in ("hyperbolic", "exponential"):
        raise ConfigError("kind", f"expected 'hyperbolic' or 'exponential', got {kind!r}")

    def extra_loss(model: nn.Module, inputs: Any, target: Any, output: torch.Tensor) -> torch.Tensor:
        chosen = select_layers(model, layers)
        total = output.new_zeros((), dtype=torch.float32)
        for m in chosen.values():
            total = total + biased_penalty(m.weight, kind, scale)
        return strength * total

    return extra_loss


__all__ = ["BiasKind", "biased_penalty", "biased_weight_decay"]
