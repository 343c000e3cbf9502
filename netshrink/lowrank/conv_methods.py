"""The conv decomposition methods of the ``lowrank`` family: ``tucker``, ``cp`` and ``separable``.

Each config chooses Conv2d layers (``groups=1``; ``layers`` globs, default every such layer not already
inside a replaced module) and their ranks, and its handler replaces every chosen layer in place by the
module of :mod:`netshrink.lowrank.conv` that holds the decomposition. A named layer the method does not
apply to (a Linear, a grouped conv, a 1x1 conv for ``separable``) or a rank above a layer's full rank is
a :class:`ConfigError` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from .._coverage import plan_coverage
from .._layers import CONV, LayerPlan, per_layer
from .._state import unique_parameters
from .._modules import replace_module
from .._registry import handler, register
from ..config import BaseConfig
from ..errors import ConfigError
from ._common import (
    FactorizeResult,
    LayerFactorization,
    check_rank_fields,
    conv2d_reason,
    conv_geometry,
    layer_params,
    missing_rank,
    module_params,
    override_field,
    ratio_rank,
    rel_error,
    target_plan,
)
from .conv import (
    CPConv,
    SeparableConv,
    Tucker2Conv,
    cp_factors,
    separable_factors,
    tucker2_energy_ranks,
    tucker2_factors,
)
from .rank_select import tucker2_macs_ranks, tucker2_vbmf_ranks


def _shape(conv: nn.Conv2d) -> str:
    return "x".join(str(d) for d in conv.weight.shape)


class _ConvMethod(BaseConfig):
    """What the three conv configs share: layer choice, per-layer ranks, the replacing loop."""

    replaces_modules: ClassVar[bool] = True

    #: the config fields that set a default rank; exactly one is given (or ``layer_rank`` covers every layer)
    rank_fields: ClassVar[tuple[str, ...]] = ("rank",)

    def reason(self, module: nn.Module) -> str | None:
        return conv2d_reason(module)

    def plan(self, model: nn.Module) -> LayerPlan:
        """The Conv2d layers decomposed and why any other layer weight is not."""
        return target_plan(model, self.layers, self.method, self.reason, (CONV,))

    def targets(self, model: nn.Module) -> dict[str, nn.Conv2d]:
        return self.plan(model).layers

    def layer_rank_for(self, name: str, conv: nn.Conv2d, rank: Any) -> Any:
        """``rank`` (a config value, or None: chosen from the kernel) checked against ``conv``."""
        raise NotImplementedError

    def explicit_ranks(self, layers: dict[str, nn.Conv2d]) -> dict[str, Any]:
        """Each layer's rank from ``layer_rank`` / ``rank`` / ``param_ratio`` (None: chosen from the kernel)."""
        overrides = per_layer(layers, self.layer_rank, None, "layer_rank")
        out = {}
        for n, m in layers.items():
            if overrides[n] is None and all(getattr(self, f) is None for f in self.rank_fields):
                raise missing_rank(n, self.rank_fields)
            out[n] = self.layer_rank_for(n, m, overrides[n] if overrides[n] is not None else self.rank)
        return out

    def check_model(self, model: nn.Module) -> None:
        self.explicit_ranks(self.targets(model))

    def decompose(self, conv: nn.Conv2d, rank: Any, seed: int) -> tuple[nn.Module, Any]:
        """The replacement module (holding the factors) and the typed factors."""
        raise NotImplementedError

    def _too_big(self, name: str, conv: nn.Conv2d, what: str, rank: Any, full: Any) -> ConfigError:
        return ConfigError(override_field(name, self.layer_rank),
                           f"{what} {rank} is above the full rank {full} of layer {name!r} ({_shape(conv)})")


@torch.no_grad()
def conv_decompose(model: nn.Module, config: _ConvMethod, data: Any = None) -> FactorizeResult:
    """Replace each chosen Conv2d of ``model`` in place by the module holding its decomposition
    (``strict``: a layer weight skipped, say a grouped conv, is an error before anything changes)."""
    plan = config.plan(model)
    plan.check_strict(config.method, config.strict)
    layers = plan.layers
    ranks = config.explicit_ranks(layers)
    params = unique_parameters(model)
    done = {}
    for i, (name, conv) in enumerate(layers.items()):
        new, factors = config.decompose(conv, ranks[name], config.seed + i)
        new.to(device=conv.weight.device, dtype=conv.weight.dtype)
        new.set_factors(factors, None if conv.bias is None else conv.bias.detach())
        r = new.rank if isinstance(new.rank, tuple) else (new.rank,)
        err = rel_error(conv.weight, factors.reconstruct())
        before = layer_params(conv)
        replace_module(model, name, new)
        done[name] = LayerFactorization(name, config.method, new.netshrink_type, r, before, module_params(new), err)
    how = {f"{n}.weight": f"decomposed by {config.method}, ranks {list(f.ranks)} ({f.params_before:,} -> {f.params_after:,} parameters)"
           for n, f in done.items()}
    return FactorizeResult(done, coverage=plan_coverage(model, config.method, how, plan, params=params))


def _check_pair(field_name: str, value: Any) -> None:
    if isinstance(value, list) and len(value) != 2:
        raise ConfigError(field_name, f"expected one rank or a pair [r_out, r_in], got {value}")


@register("tucker", family="lowrank")
@dataclass
class TuckerConfig(_ConvMethod):
    """Tucker-2 decomposition of Conv2d layers: 1x1, kxk core, 1x1 conv (Kim et al. 2016).

    Ranks: ``rank`` (one for both channel modes, ``[r_out, r_in]``, or ``"vbmf"``: EVBMF on the two
    channel unfoldings, Nakajima et al. 2013, as Kim et al. 2016 do), ``energy`` (HOSVD energy per
    mode), or ``macs_ratio`` (the largest ranks in the kernel's channel proportion whose MACs per
    output position are at most that fraction of the dense layer's; see
    :func:`~netshrink.lowrank.rank_select.tucker2_macs_ranks`).
    """

    rank_fields: ClassVar[tuple[str, ...]] = ("rank", "energy", "macs_ratio")

    rank: int | list[int] | Literal["vbmf"] | None = None  # one rank for both channel modes, or [r_out, r_in]
    energy: float | None = None
    macs_ratio: float | None = None
    layer_rank: dict[str, int | list[int]] = field(default_factory=dict)
    layers: list[str] | None = None
    seed: int = 0
    n_iter_max: int = 100

    def validate(self) -> None:
        check_rank_fields(self, self.rank_fields)
        _check_pair("rank", self.rank)
        for pat, r in self.layer_rank.items():
            _check_pair(f"layer_rank.{pat}", r)
        if self.n_iter_max < 1:
            raise ConfigError("n_iter_max", f"must be at least 1, got {self.n_iter_max}")

    def layer_rank_for(self, name: str, conv: nn.Conv2d, rank: Any) -> tuple[int, int] | None:
        if rank is None and self.macs_ratio is not None:
            pair = tucker2_macs_ranks(tuple(conv.weight.shape), self.macs_ratio)
            if pair is None:
                raise ConfigError("macs_ratio", f"a budget of {self.macs_ratio} of the MACs cannot be met for layer "
                                                f"{name!r} ({_shape(conv)}): even ranks [1, 1] cost more")
            return pair
        if rank is None or rank == "vbmf":
            return None
        pair = (rank, rank) if isinstance(rank, int) else tuple(rank)
        full = (conv.out_channels, conv.in_channels)
        if pair[0] > full[0] or pair[1] > full[1]:
            raise self._too_big(name, conv, "rank [r_out, r_in] =", list(pair), f"[{full[0]}, {full[1]}] (out, in channels)")
        return pair

    def decompose(self, conv: nn.Conv2d, rank: Any, seed: int) -> tuple[nn.Module, Any]:
        if rank is not None:
            ranks = rank
        elif self.energy is not None:
            ranks = tucker2_energy_ranks(conv.weight, self.energy)
        else:
            ranks = tucker2_vbmf_ranks(conv.weight)
        factors = tucker2_factors(conv.weight, ranks, seed=seed, n_iter_max=self.n_iter_max)
        return Tucker2Conv(**dict(conv_geometry(conv), rank=list(ranks))), factors


@register("cp", family="lowrank")
@dataclass
class CPConfig(_ConvMethod):
    """CP decomposition of Conv2d layers: 1x1, kx1, 1xk depthwise, 1x1 conv (Lebedev et al. 2015)."""

    rank_fields: ClassVar[tuple[str, ...]] = ("rank", "param_ratio")

    rank: int | None = None
    param_ratio: float | None = None
    layer_rank: dict[str, int] = field(default_factory=dict)
    layers: list[str] | None = None
    seed: int = 0
    n_iter_max: int = 200

    def validate(self) -> None:
        check_rank_fields(self, self.rank_fields)
        if self.n_iter_max < 1:
            raise ConfigError("n_iter_max", f"must be at least 1, got {self.n_iter_max}")

    def layer_rank_for(self, name: str, conv: nn.Conv2d, rank: Any) -> int:
        n, c, kh, kw = conv.weight.shape
        dense, per_rank = n * c * kh * kw, n + c + kh + kw
        if rank is None:
            return ratio_rank(dense, per_rank, float(self.param_ratio), max(1, dense // per_rank))
        # every 4-way tensor is a sum of (product of its dimensions but the largest) rank-1 terms
        bound = dense // max(n, c, kh, kw)
        if rank > bound:
            raise self._too_big(name, conv, "rank", rank, f"{bound} (the largest CP rank a kernel of this shape needs)")
        return rank

    def decompose(self, conv: nn.Conv2d, rank: Any, seed: int) -> tuple[nn.Module, Any]:
        factors = cp_factors(conv.weight, rank, seed=seed, n_iter_max=self.n_iter_max)
        return CPConv(**dict(conv_geometry(conv), rank=rank)), factors


@register("separable", family="lowrank")
@dataclass
class SeparableConfig(_ConvMethod):
    """Spatially separable Conv2d layers: kx1 then 1xk conv (Jaderberg et al. 2014, scheme 2)."""

    rank_fields: ClassVar[tuple[str, ...]] = ("rank", "energy", "param_ratio")

    rank: int | None = None
    energy: float | None = None
    param_ratio: float | None = None
    layer_rank: dict[str, int] = field(default_factory=dict)
    layers: list[str] | None = None
    seed: int = 0  # unused (the SVD is deterministic); kept so every lowrank config takes a seed

    def validate(self) -> None:
        check_rank_fields(self, self.rank_fields)

    def reason(self, module: nn.Module) -> str | None:
        why = conv2d_reason(module)
        if why is None and tuple(module.kernel_size) == (1, 1):
            return "it is a 1x1 conv (nothing to separate)"
        return why

    def layer_rank_for(self, name: str, conv: nn.Conv2d, rank: Any) -> int | None:
        n, c, kh, kw = conv.weight.shape
        full = min(c * kh, n * kw)
        if rank is None and self.param_ratio is not None:
            return ratio_rank(n * c * kh * kw, c * kh + n * kw, self.param_ratio, full)
        if rank is not None and rank > full:
            raise self._too_big(name, conv, "rank", rank, f"{full} (min(C*kh, N*kw))")
        return rank

    def decompose(self, conv: nn.Conv2d, rank: Any, seed: int) -> tuple[nn.Module, Any]:
        factors = separable_factors(conv.weight, rank, energy=self.energy if rank is None else None)
        return SeparableConv(**dict(conv_geometry(conv), rank=factors.rank)), factors


for _cfg in (TuckerConfig, CPConfig, SeparableConfig):
    handler(_cfg)(conv_decompose)

__all__ = ["CPConfig", "SeparableConfig", "TuckerConfig", "conv_decompose"]
