"""Plumbing shared by the low-rank methods: rank choice, layer choice, typed results, argument checks."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._layers import ALL_KINDS, CONV, CONV1D_GPT2, LINEAR, LayerPlan, layer_kind, plan_layers, weight_layers
from ..config import check_range
from ..errors import ConfigError, ModelError

# ---------------------------------------------------------------------------------------------- ranks


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest ``r`` with ``sum_{i<=r} s_i^2 >= energy * sum_i s_i^2`` (``s`` sorted descending).

    The retained-energy rule of truncated SVD / PCA; by Eckart & Young (1936) the truncation to ``r``
    leaves a relative Frobenius error of ``sqrt(1 - kept energy)``. At least 1.
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must lie in (0, 1], got {energy}")
    s2 = singular_values.detach().to(torch.float64).flatten() ** 2
    total = float(s2.sum())
    if total == 0.0:
        return 1
    cum = torch.cumsum(s2, 0) / total
    # a tiny slack so that energy=1.0 is not missed by rounding in the last place
    r = int(torch.searchsorted(cum, torch.tensor([energy - 1e-12], dtype=torch.float64))[0]) + 1
    return max(1, min(r, s2.numel()))


def ratio_rank(dense_params: int, params_per_rank: int, ratio: float, full: int) -> int:
    """The largest ``r`` with ``r * params_per_rank <= ratio * dense_params``, clipped to ``[1, full]``."""
    return max(1, min(full, math.floor(ratio * dense_params / params_per_rank + 1e-9)))


def check_rank_fields(config: Any, names: Sequence[str]) -> None:
    """Exactly one of the rank fields ``names`` is set (or none, when ``layer_rank`` names every layer's
    rank: :func:`missing_rank` then checks each layer has one); each in range; ``layer_rank`` >= 1."""
    given = [n for n in names if getattr(config, n) is not None]
    if len(given) > 1 or (not given and not config.layer_rank):
        shown = ", ".join(names)
        raise ConfigError(given[1] if given else names[0], f"give exactly one of {shown}")
    rank = getattr(config, "rank", None)
    if rank is not None and not isinstance(rank, str):  # a string names a rule (Tucker's "vbmf")
        check_positive("rank", rank)
    for key in ("energy", "param_ratio", "macs_ratio"):
        value = getattr(config, key, None)
        if value is not None:
            check_range(key, value, 0.0, 1.0, lo_open=True)
    for pat, r in config.layer_rank.items():
        check_positive(f"layer_rank.{pat}", r)


def missing_rank(name: str, names: Sequence[str]) -> ConfigError:
    """The error for a layer that ``layer_rank`` leaves out when no default rank field is set."""
    return ConfigError("layer_rank", f"no rank for layer {name!r}: add it here or give one of {', '.join(names)}")


def check_positive(field: str, value: Any) -> None:
    """``value`` (an int, or a list of ints) is at least 1; else a :class:`ConfigError` naming ``field``."""
    values = value if isinstance(value, list) else [value]
    for v in values:
        if v < 1:
            raise ConfigError(field, f"must be at least 1, got {value}")


# ---------------------------------------------------------------------------------------------- layers


def _check_not_weightless(model: nn.Module, patterns: list[str] | None, method: str) -> None:
    """A pattern that names no weight layer but some other module (a BatchNorm, a pooling layer) is a
    :class:`ConfigError` that says what that module is (not "no layer named ...": the module exists)."""
    if patterns is None:
        return
    weights = weight_layers(model, ALL_KINDS)
    for i, pat in enumerate(patterns):
        if any(fnmatch.fnmatchcase(n, pat) for n in weights):
            continue
        hit = next(((n, m) for n, m in model.named_modules() if n and fnmatch.fnmatchcase(n, pat)), None)
        if hit is not None:
            raise ConfigError(f"layers[{i}]", f"{method} does not apply to {hit[0]!r}: it is a {type(hit[1]).__name__}, "
                                              "not a Linear or Conv layer")


def target_plan(
    model: nn.Module, patterns: list[str] | None, method: str, reason: Callable[[nn.Module], str | None],
    kinds: tuple[str, ...] = (LINEAR, CONV),
) -> LayerPlan:
    """The layers a module-replacing ``method`` acts on, and why every other layer weight is left alone
    (:func:`netshrink._layers.plan_layers` with ``replaces=True``: a layer whose parent reads its weight,
    a tied weight, the insides of a module already replaced are not replaced).

    ``reason(module)`` says why the method does not apply to a layer of ``kinds`` (None: it does). With
    ``patterns`` (globs) every matched layer must apply, else a :class:`ConfigError` naming it; a pattern
    matching nothing is an error too. No layer to act on at all is a :class:`ConfigError`.
    """
    _check_not_weightless(model, patterns, method)
    plan = plan_layers(model, patterns, method, kinds=kinds, reason=lambda _n, m: reason(m), replaces=True)
    if not plan.layers:
        raise ConfigError("layers", f"the model has no layer that {method} applies to")
    return plan


def target_layers(
    model: nn.Module, patterns: list[str] | None, method: str, reason: Callable[[nn.Module], str | None],
    kinds: tuple[str, ...] = (LINEAR, CONV),
) -> dict[str, nn.Module]:
    """The layers of :func:`target_plan`."""
    return target_plan(model, patterns, method, reason, kinds).layers


def linear_matrix(layer: nn.Module) -> tuple[torch.Tensor, int, int, torch.Tensor | None]:
    """``(W, in, out, bias)`` of a Linear or of GPT-2's ``Conv1D`` as the ``(out, in)`` matrix of
    ``y = W x + b`` (Conv1D stores ``W`` transposed, ``(in, out)``)."""
    w = layer.weight.detach()
    if layer_kind(layer) == CONV1D_GPT2:
        w = w.t()
    bias = getattr(layer, "bias", None)
    return w, int(w.shape[1]), int(w.shape[0]), None if bias is None else bias.detach()


def override_field(name: str, overrides: Mapping[str, Any]) -> str:
    """The config field that sets ``name``'s rank: ``layer_rank.<pattern>`` when overridden, else ``rank``."""
    hits = [p for p in overrides if fnmatch.fnmatchcase(name, p)]
    return f"layer_rank.{hits[-1]}" if hits else "rank"


def conv2d_reason(module: nn.Module) -> str | None:
    """Why a Tucker / CP / separable decomposition does not apply to ``module`` (None: it does)."""
    if not isinstance(module, nn.Conv2d):
        return f"it is a {type(module).__name__}, not a Conv2d"
    if module.groups != 1:
        return f"it is a grouped conv (groups={module.groups})"
    return None


# ---------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class LayerFactorization:
    """One replaced layer: its ``ranks``, weight parameters before and after, and the relative
    Frobenius error ``||W - W_hat|| / ||W||`` of the approximated weight (or kernel). Where the layer was
    fitted to the original's outputs on data (``layerwise``), ``output_error`` is the relative output
    error ``||y - y_hat|| / ||y||`` after fitting and ``fit_from`` the same before fitting."""

    name: str
    method: str
    module_type: str
    ranks: tuple[int, ...]
    params_before: int
    params_after: int
    rel_error: float
    output_error: float | None = None
    fit_from: float | None = None


@dataclass(frozen=True)
class FactorizeResult:
    """What ``factorize_`` returns: one :class:`LayerFactorization` per replaced layer, by name."""

    layers: dict[str, LayerFactorization]
    coverage: Any = field(default=None, kw_only=True)  # a netshrink._coverage.Coverage

    @property
    def params_before(self) -> int:
        return sum(f.params_before for f in self.layers.values())

    @property
    def params_after(self) -> int:
        return sum(f.params_after for f in self.layers.values())


def rel_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """``||reference - approx||_F / ||reference||_F`` in float64 (0 for a zero reference equal to approx)."""
    ref = reference.detach().to(torch.float64)
    diff = float(torch.linalg.vector_norm(ref - approx.detach().to(torch.float64)))
    norm = float(torch.linalg.vector_norm(ref))
    return diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)


def layer_params(layer: nn.Module) -> int:
    """Weight and bias elements of a Linear / Conv layer (masked or shared weights count densely)."""
    bias = getattr(layer, "bias", None)
    return layer.weight.numel() + (bias.numel() if bias is not None else 0)


def module_params(module: nn.Module) -> int:
    """Parameters and persistent buffers' elements of a module (a fixed factor counts: it is stored)."""
    return sum(t.numel() for t in module.state_dict().values())


# ---------------------------------------------------------------------------------------------- module args


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelError(f"{name} must be a positive integer, got {value!r}")
    return value


def int_pair(name: str, value: Any, lo: int = 1) -> tuple[int, int]:
    """An int or a pair of ints, each at least ``lo``, as a pair."""
    pair = [value, value] if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(pair, (list, tuple))
        or len(pair) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) or v < lo for v in pair)
    ):
        raise ModelError(f"{name} must be an integer or a pair of integers of at least {lo}, got {value!r}")
    return int(pair[0]), int(pair[1])


def padding_arg(value: Any) -> tuple[int, int] | str:
    if isinstance(value, str):
        if value not in ("same", "valid"):
            raise ModelError(f"padding must be 'same', 'valid' or a pair of integers, got {value!r}")
        return value
    return int_pair("padding", value, lo=0)


def padding_mode_arg(value: Any) -> str:
    if value not in ("zeros", "reflect", "replicate", "circular"):
        raise ModelError(f"padding_mode must be zeros, reflect, replicate or circular, got {value!r}")
    return value


def bool_arg(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ModelError(f"{name} must be true or false, got {value!r}")
    return value


def conv_geometry(conv: nn.Conv2d) -> dict[str, Any]:
    """The JSON-able shape arguments of a Conv2d that a decomposed replacement keeps."""
    padding = conv.padding if isinstance(conv.padding, str) else list(conv.padding)
    return {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": list(conv.kernel_size),
        "stride": list(conv.stride),
        "padding": padding,
        "dilation": list(conv.dilation),
        "padding_mode": conv.padding_mode,
        "bias": conv.bias is not None,
    }


def split_padding(padding: tuple[int, int] | str, axis: int) -> tuple[int, int] | str:
    """The padding of a conv that spans only ``axis`` (0: height, 1: width) of the original kernel."""
    if isinstance(padding, str):
        return padding
    return (padding[0], 0) if axis == 0 else (0, padding[1])


def only_axis(pair: tuple[int, int], axis: int) -> tuple[int, int]:
    """``pair`` kept on ``axis`` and 1 on the other (strides, dilations of a one-axis conv)."""
    return (pair[0], 1) if axis == 0 else (1, pair[1])


@torch.no_grad()
def copy_into(target: torch.Tensor, value: torch.Tensor) -> None:
    target.copy_(value.reshape(target.shape).to(dtype=target.dtype, device=target.device))
