"""Pruning masks as ``torch.nn.utils.parametrize`` parametrizations.

A masked layer computes with ``weight = original * mask``: the pruned entries stay exactly zero in
the forward pass and receive zero gradient, so fine-tuning in the Trainer respects them without any
hook. :func:`make_permanent` bakes the masks in (the weight becomes a plain zero-filled Parameter).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize


class Mask(nn.Module):
    """Parametrization ``w -> w * mask`` with a boolean ``mask`` buffer of the weight's shape."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.detach().to(torch.bool).clone())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, w, torch.zeros((), dtype=w.dtype, device=w.device))


def parametrization_of(module: nn.Module, name: str = "weight") -> nn.Module | None:
    """The (single) netshrink parametrization on ``module.name``, or None."""
    if not parametrize.is_parametrized(module, name):
        return None
    plist = module.parametrizations[name]
    return plist[0] if len(plist) else None


def get_mask(module: nn.Module, name: str = "weight") -> torch.Tensor | None:
    """The boolean keep-mask of ``module.name``: from a Mask or a shared-weight parametrization."""
    p = parametrization_of(module, name)
    return getattr(p, "mask", None) if p is not None else None


def apply_mask(module: nn.Module, mask: torch.Tensor, name: str = "weight") -> None:
    """Mask ``module.name`` with ``mask`` (True = keep), combined with any mask already there."""
    weight = getattr(module, name)
    if mask.shape != weight.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match {name} shape {tuple(weight.shape)}")
    p = parametrization_of(module, name)
    if p is None:
        parametrize.register_parametrization(module, name, Mask(mask), unsafe=True)
    elif isinstance(p, Mask):
        p.mask &= mask.to(p.mask.device, torch.bool)
    else:
        raise ValueError(f"{type(module).__name__}.{name} is already weight-shared; prune before sharing")


def remove_parametrization(module: nn.Module, name: str = "weight", leave_parametrized: bool = True) -> None:
    """``parametrize.remove_parametrizations``, safe on deep copies.

    torch gives a parametrized module a generated class that holds the parametrized property, and a
    ``copy.deepcopy`` of the model shares that class with the original. Removing the parametrization
    deletes the property from the class, which would break every other module of the class. The module
    gets a class of its own first, so only it changes.
    """
    cls = type(module)
    own = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, own)
    parametrize.remove_parametrizations(module, name, leave_parametrized=leave_parametrized)


def make_permanent(model: nn.Module) -> nn.Module:
    """Remove every parametrization, leaving plain Parameters that hold the masked/shared values."""
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                remove_parametrization(module, name, leave_parametrized=True)
    return model


def follow_parametrization(source: nn.Module, follower: nn.Module, name: str = "weight") -> None:
    """Make ``follower.name`` (a weight tied to ``source.name``: one storage) use the same
    parametrizations as ``source.name``, so the tie holds for the compressed value too: both modules
    then compute with the one masked / shared weight, and training updates it once.

    A parametrization already on ``follower`` is removed first without baking it in (the stored
    weight is the source's, already updated).
    """
    if parametrization_of(follower, name) is not None:
        remove_parametrization(follower, name, leave_parametrized=False)
    for p in source.parametrizations[name]:
        parametrize.register_parametrization(follower, name, p, unsafe=True)
