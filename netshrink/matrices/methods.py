"""The structured-matrix methods: ``circulant``, ``toeplitz`` and ``hashed`` replace chosen Linear layers.

Each config picks Linear layers (``layers`` globs; default every Linear not already inside a replaced
module) and its handler swaps each for the structured module of :mod:`netshrink.matrices.structured`,
initialised by the least-squares projection of the dense weight (fine-tune afterwards). A named layer
that is not a Linear, or a name matching no layer, is a :class:`ConfigError` naming it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .._modules import replace_module
from .._registry import handler, register
from ..config import BaseConfig, check_range
from ..errors import ConfigError
from .._attention import converted_copy, prepare
from .._coverage import plan_coverage
from .._layers import LINEAR, LayerPlan
from .._state import unique_parameters
from ..lowrank._common import layer_params, module_params, rel_error, target_plan
from .structured import CirculantLinear, HashedLinear, ToeplitzLinear


@dataclass(frozen=True)
class LayerStructure:
    """One replaced layer: parameters before and after, and ``||W - W_hat||_F / ||W||_F`` at init."""

    name: str
    method: str
    module_type: str
    params_before: int
    params_after: int
    rel_error: float


@dataclass(frozen=True)
class StructureResult:
    """What ``structure_`` returns: one :class:`LayerStructure` per replaced layer."""

    layers: dict[str, LayerStructure]
    coverage: Any = field(default=None, kw_only=True)  # a netshrink._coverage.Coverage

    @property
    def params_before(self) -> int:
        return sum(s.params_before for s in self.layers.values())

    @property
    def params_after(self) -> int:
        return sum(s.params_after for s in self.layers.values())


def _linear_reason(module: nn.Module) -> str | None:
    return None if isinstance(module, nn.Linear) else f"it is a {type(module).__name__}, not a Linear"


class _StructuredMethod(BaseConfig):
    replaces_modules: ClassVar[bool] = True

    def plan(self, model: nn.Module) -> LayerPlan:
        """The Linear layers replaced and why any other layer weight is not."""
        return target_plan(model, self.layers, self.method, _linear_reason, (LINEAR,))

    def targets(self, model: nn.Module) -> dict[str, nn.Linear]:
        return self.plan(model).layers

    def check_model(self, model: nn.Module) -> None:
        for name, lin in self.targets(converted_copy(model, self.layers)).items():
            self.build(name, lin, 0)

    def build(self, name: str, lin: nn.Linear, index: int) -> nn.Module:
        raise NotImplementedError


@register("circulant", family="matrices")
@dataclass
class CirculantConfig(_StructuredMethod):
    """Block-circulant Linear layers applied by FFT (Cheng et al. 2015)."""

    layers: list[str] | None = None
    block: int | None = None  # circulant block size; default min(in, out) of each layer
    signs: bool = False  # a fixed random sign flip of the input (Cheng 2015's D)
    seed: int = 0

    def validate(self) -> None:
        if self.block is not None and self.block < 1:
            raise ConfigError("block", f"must be at least 1, got {self.block}")
        if not 0 <= self.seed < 2**31:
            raise ConfigError("seed", f"must lie in [0, 2^31), got {self.seed}")

    def build(self, name: str, lin: nn.Linear, index: int) -> nn.Module:
        block = self.block if self.block is not None else min(lin.in_features, lin.out_features)
        if block > max(lin.in_features, lin.out_features):
            raise ConfigError("block", f"block {block} is above both sides of layer {name!r} "
                                       f"({lin.out_features}x{lin.in_features})")
        return CirculantLinear(lin.in_features, lin.out_features, block, lin.bias is not None, self.signs, self.seed + index)


@register("toeplitz", family="matrices")
@dataclass
class ToeplitzConfig(_StructuredMethod):
    """Toeplitz Linear layers: out + in - 1 weights, applied by FFT."""

    layers: list[str] | None = None

    def build(self, name: str, lin: nn.Linear, index: int) -> nn.Module:
        return ToeplitzLinear(lin.in_features, lin.out_features, lin.bias is not None)


@register("hashed", family="matrices")
@dataclass
class HashedConfig(_StructuredMethod):
    """HashedNets: virtual weights shared through a seeded hash into K buckets (Chen et al. 2015)."""

    layers: list[str] | None = None
    buckets: int | None = None  # K per layer
    ratio: float | None = None  # or K = ceil(ratio * out * in)
    sign_hash: bool = True
    seed: int = 0

    def validate(self) -> None:
        if (self.buckets is None) == (self.ratio is None):
            raise ConfigError("buckets", "give exactly one of buckets and ratio")
        if self.buckets is not None and self.buckets < 1:
            raise ConfigError("buckets", f"must be at least 1, got {self.buckets}")
        if self.ratio is not None:
            check_range("ratio", self.ratio, 0.0, 1.0, lo_open=True)
        if not 0 <= self.seed < 2**31:
            raise ConfigError("seed", f"must lie in [0, 2^31), got {self.seed}")

    def build(self, name: str, lin: nn.Linear, index: int) -> nn.Module:
        n = lin.in_features * lin.out_features
        k = self.buckets if self.buckets is not None else max(1, math.ceil(self.ratio * n))
        if k > n:
            raise ConfigError("buckets", f"{k} buckets exceed the {n} weights of layer {name!r}")
        return HashedLinear(lin.in_features, lin.out_features, k, lin.bias is not None, self.sign_hash, self.seed + index)


@torch.no_grad()
def structure_layers(model: nn.Module, config: _StructuredMethod, data: Any = None) -> StructureResult:
    """Replace each chosen Linear of ``model`` in place by its structured module, projected from ``W``.

    ``nn.MultiheadAttention`` in scope is converted to separate projections first (``result.coverage.notes``);
    ``strict``: a skipped layer weight is an error before any layer is replaced.
    """
    notes = prepare(model, config.layers, config.method)
    plan = config.plan(model)
    plan.check_strict(config.method, config.strict)
    layers = plan.layers
    params = unique_parameters(model)
    built = {name: config.build(name, lin, i) for i, (name, lin) in enumerate(layers.items())}  # all checks first
    done = {}
    for name, lin in layers.items():
        new = built[name].to(device=lin.weight.device, dtype=lin.weight.dtype)
        new.set_from_dense(lin.weight.detach(), None if lin.bias is None else lin.bias.detach())
        err = rel_error(lin.weight, new.dense_weight())
        before = layer_params(lin)
        replace_module(model, name, new)
        done[name] = LayerStructure(name, config.method, new.netshrink_type, before, module_params(new), err)
    how = {f"{n}.weight": f"replaced by {d.module_type} ({d.params_before:,} -> {d.params_after:,} parameters)"
           for n, d in done.items()}
    return StructureResult(done, coverage=plan_coverage(model, config.method, how, plan, notes, params=params))


for _cfg in (CirculantConfig, ToeplitzConfig, HashedConfig):
    handler(_cfg)(structure_layers)

__all__ = ["CirculantConfig", "HashedConfig", "LayerStructure", "StructureResult", "ToeplitzConfig", "structure_layers"]
