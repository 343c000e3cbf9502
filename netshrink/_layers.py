"""Finding the layers a method acts on, by name or glob pattern, with clear errors."""

from __future__ import annotations

import fnmatch
from typing import Iterable, Mapping, TypeVar

from torch import nn

from .errors import ConfigError

#: the module types whose ``weight`` the pruning and sharing methods compress
WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

V = TypeVar("V")


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Named Linear/Conv modules of ``model``, in definition order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)}


def select_layers(model: nn.Module, patterns: Iterable[str] | None, field: str = "layers") -> dict[str, nn.Module]:
    """The weight layers whose names match any of ``patterns`` (fnmatch globs); all when None.

    A pattern that matches no weight layer raises :class:`ConfigError` naming it and the layers there are.
    """
    layers = weight_layers(model)
    if patterns is None:
        return layers
    chosen: dict[str, nn.Module] = {}
    for i, pat in enumerate(patterns):
        hits = [n for n in layers if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise ConfigError(f"{field}[{i}]", f"no layer named {pat!r} (layers: {', '.join(layers)})")
        for n in hits:
            chosen[n] = layers[n]
    return {n: layers[n] for n in layers if n in chosen}


def per_layer(
    layers: Mapping[str, nn.Module], overrides: Mapping[str, V] | None, default: V, field: str
) -> dict[str, V]:
    """``default`` for every layer, replaced by ``overrides`` (keys are names or globs).

    An override key that matches no layer raises :class:`ConfigError` naming ``field.key``.
    """
    out = {n: default for n in layers}
    for pat, value in (overrides or {}).items():
        hits = [n for n in layers if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise ConfigError(f"{field}.{pat}", f"no layer named {pat!r} (layers: {', '.join(layers)})")
        for n in hits:
            out[n] = value
    return out
