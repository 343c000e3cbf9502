"""Plumbing: find a named layer and capture its output in one forward pass (a forward hook on
activations; weights are never touched)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, ModelError
from ..task import Inputs


def find_layer(model: nn.Module, name: str, field: str, owner: str) -> nn.Module:
    """The submodule ``name`` of ``model``; a :class:`ConfigError` naming ``field`` and listing the layers."""
    modules = dict(model.named_modules())
    if name and name in modules:
        return modules[name]
    layers = [n for n in modules if n]
    shown = ", ".join(layers[:40]) + (f", ... ({len(layers)} in all)" if len(layers) > 40 else "")
    raise ConfigError(field, f"no layer named {name!r} in the {owner} (layers: {shown or 'none'})")


class _Stop(Exception):
    """Raised by the capture hook to end a forward pass once the wanted layer has run."""


def capture(model: nn.Module, layer: nn.Module, x: Any, what: str) -> torch.Tensor:
    """The output of ``layer`` when ``model(x)`` runs (``x`` a tensor or an :class:`~netshrink.task.Inputs`);
    the pass stops right after that layer.

    Stopping there spares the later layers' work (and keeps their batch-norm statistics untouched).
    The hook is removed afterwards. A layer that is not called, or that returns something other than
    a tensor, is a :class:`ModelError`.
    """
    box: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inp: Any, out: Any) -> None:
        if not isinstance(out, torch.Tensor):
            raise ModelError(f"{what} returns {type(out).__name__}, not a tensor: it cannot give a hint")
        box.append(out)
        raise _Stop

    handle = layer.register_forward_hook(hook)
    try:
        Inputs.of(x).call(model)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not box:
        raise ModelError(f"{what} was not called in the forward pass")
    return box[0]
