"""Fitting a replacement layer to the layer it replaces, on the inputs that layer sees in the model.

The layer-wise reconstruction objective of Jaderberg et al. (BMVC 2014) and Zhang et al. (TPAMI 2016):
``min ||L(x) - L_hat(x)||^2`` over sample inputs ``x`` of the layer, here by Adam on ``L_hat``'s
parameters (the survey's Figure 2: a layer replaced by its low-rank approximation, then fitted).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..task import Inputs


def layer_inputs(model: nn.Module, layer: nn.Module, batches: list[Any]) -> list[torch.Tensor]:
    """The inputs ``layer`` sees when ``model`` runs (in eval mode, no grad) on ``batches`` (each an
    input tensor, a tuple of positional inputs, a dict of keyword inputs or an :class:`Inputs`)."""
    seen: list[torch.Tensor] = []
    hook = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x in batches:
                Inputs.of(x).call(model)
    finally:
        hook.remove()
        model.train(was_training)
    return seen


def relative_output_error(reference: nn.Module, approx: nn.Module, inputs: list[torch.Tensor]) -> float:
    """``sqrt(sum ||ref(x) - approx(x)||^2 / sum ||ref(x)||^2)`` over the batches ``inputs``."""
    num = den = 0.0
    with torch.no_grad():
        for x in inputs:
            y = reference(x)
            num += float((y - approx(x)).pow(2).sum())
            den += float(y.pow(2).sum())
    return (num / den) ** 0.5 if den > 0 else 0.0


def mimic_(module: nn.Module, reference: nn.Module, inputs: list[torch.Tensor], steps: int, lr: float, seed: int = 0) -> None:
    """Train ``module``'s parameters for ``steps`` Adam steps to minimise ``mean (reference(x) - module(x))^2``,
    cycling over the batches ``inputs`` in a seeded order. ``reference`` is not changed."""
    if steps <= 0 or not inputs:
        return
    with torch.no_grad():
        targets = [reference(x) for x in inputs]
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        return
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    was_training = module.training
    module.train()
    order: list[int] = []
    for step in range(steps):
        if step % len(inputs) == 0:
            order = torch.randperm(len(inputs), generator=gen).tolist()
        i = order[step % len(inputs)]
        opt.zero_grad()
        loss = (module(inputs[i]) - targets[i]).pow(2).mean()
        loss.backward()
        opt.step()
    module.train(was_training)


__all__ = ["layer_inputs", "mimic_", "relative_output_error"]
