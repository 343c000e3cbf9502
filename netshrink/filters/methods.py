"""The compact-filter methods: ``equivariant``, ``crelu`` and ``depthwise`` replace chosen Conv2d layers.

Each config picks Conv2d layers (``layers`` globs; default every plain Conv2d not inside a replaced
module) and its handler swaps each for its module, projected from the dense kernel by least squares.
``depthwise`` then trains each new layer to mimic the original on inputs captured from ``data``.
A named layer the method does not apply to is a :class:`ConfigError` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from .._modules import replace_module
from .._registry import handler, register
from ..config import BaseConfig, check_range
from ..errors import ConfigError
from .._coverage import plan_coverage
from .._layers import CONV, LayerPlan
from .._state import unique_parameters
from ..lowrank._common import conv_geometry, layer_params, module_params, rel_error, target_plan
from ..lowrank._fit import layer_inputs, mimic_, relative_output_error
from ..quantize._common import calibration_batches, model_device
from ._common import CompactResult, LayerCompaction, plain_conv_reason
from .crelu import CReLUConv2d
from .depthwise import DepthwiseSeparableConv2d
from .equivariant import GROUPS, EquivariantConv2d


class _FilterMethod(BaseConfig):
    replaces_modules: ClassVar[bool] = True

    def reason(self, module: nn.Module) -> str | None:
        return plain_conv_reason(module)

    def plan(self, model: nn.Module) -> LayerPlan:
        """The Conv2d layers replaced and why any other layer weight is not."""
        return target_plan(model, self.layers, self.method, self.reason, (CONV,))

    def targets(self, model: nn.Module) -> dict[str, nn.Conv2d]:
        return self.plan(model).layers

    def check_model(self, model: nn.Module) -> None:
        self.targets(model)

    def build(self, conv: nn.Conv2d) -> nn.Module:
        raise NotImplementedError


@register("equivariant", family="filters")
@dataclass
class EquivariantConfig(_FilterMethod):
    """Equivariant filter sharing: each stored filter also acts flipped / rotated (Cohen & Welling 2016)."""

    layers: list[str] | None = None
    group: Literal["flip", "p4", "p4m"] = "p4"

    def reason(self, module: nn.Module) -> str | None:
        why = plain_conv_reason(module)
        if why is not None:
            return why
        n = len(GROUPS[self.group])
        if module.out_channels % n:
            return f"its {module.out_channels} output channels are not a multiple of {n} (the elements of {self.group})"
        kh, kw = module.kernel_size
        if kh != kw and self.group != "flip":
            return f"its kernel {kh}x{kw} is not square (90 degree rotations need a square kernel)"
        return None

    def build(self, conv: nn.Conv2d) -> nn.Module:
        return EquivariantConv2d(**conv_geometry(conv), group=self.group)


@register("crelu", family="filters")
@dataclass
class CReLUConfig(_FilterMethod):
    """CReLU: half the filters, outputs [relu(z), relu(-z)] (Shang et al. 2016)."""

    layers: list[str] | None = None
    relu: bool = True

    def reason(self, module: nn.Module) -> str | None:
        why = plain_conv_reason(module)
        if why is None and module.out_channels % 2:
            return f"it has an odd number of output channels ({module.out_channels})"
        return why

    def build(self, conv: nn.Conv2d) -> nn.Module:
        return CReLUConv2d(**conv_geometry(conv), relu=self.relu)


@register("depthwise", family="filters")
@dataclass
class DepthwiseConfig(_FilterMethod):
    """Depthwise-separable replacement of kxk convs, trained to mimic each layer (MobileNets 2017)."""

    layers: list[str] | None = None
    multiplier: int = 1  # depthwise filters per input channel
    steps: int = 200  # Adam steps mimicking each layer on sample inputs (0: the SVD init only)
    lr: float = 1e-3
    samples: int = 256
    batch_size: int = 64
    seed: int = 0

    def validate(self) -> None:
        for name in ("multiplier", "samples", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be at least 1, got {getattr(self, name)}")
        if self.steps < 0:
            raise ConfigError("steps", f"must be at least 0, got {self.steps}")
        check_range("lr", self.lr, 0.0, 10.0, lo_open=True)

    def reason(self, module: nn.Module) -> str | None:
        why = plain_conv_reason(module)
        if why is None and tuple(module.kernel_size) == (1, 1):
            return "it is a 1x1 conv (already pointwise)"
        return why

    def check_model(self, model: nn.Module) -> None:
        for name, conv in self.targets(model).items():
            n, _, kh, kw = conv.weight.shape
            if self.multiplier > min(n, kh * kw):
                raise ConfigError("multiplier", f"{self.multiplier} is above the full rank {min(n, kh * kw)} "
                                                f"of layer {name!r} (min(out channels, kh*kw))")

    def build(self, conv: nn.Conv2d) -> nn.Module:
        return DepthwiseSeparableConv2d(**conv_geometry(conv), multiplier=self.multiplier)


def compact_layers(model: nn.Module, config: _FilterMethod, data: Any = None) -> CompactResult:
    """Replace each chosen Conv2d of ``model`` in place by the compact module ``config`` names.

    ``depthwise`` with ``steps > 0`` replaces layer by layer: each new layer is fitted to the original's
    outputs on the inputs it sees in the model as already changed (so later layers correct earlier ones).
    """
    config.check_model(model)
    plan = config.plan(model)
    plan.check_strict(config.method, config.strict)
    layers = plan.layers
    params = unique_parameters(model)
    mimic = isinstance(config, DepthwiseConfig) and config.steps > 0
    if mimic and data is None:
        raise ConfigError("data", "depthwise mimics each layer on sample inputs: pass data= (Splits, Dataset, "
                                  "DataLoader or a tensor of inputs), or set steps: 0")
    batches = []
    if mimic:
        batches = calibration_batches(data, config.samples, config.batch_size, config.seed, model_device(model))
    done = {}
    for name, conv in layers.items():
        with torch.no_grad():
            new = config.build(conv).to(device=conv.weight.device, dtype=conv.weight.dtype)
            new.set_from_dense(conv.weight.detach(), None if conv.bias is None else conv.bias.detach())
        err = rel_error(conv.weight, new.dense_weight())
        out_err = None
        if mimic:
            inputs = layer_inputs(model, conv, batches)
            mimic_(new, conv, inputs, config.steps, config.lr, config.seed)
            out_err = relative_output_error(conv, new, inputs)
        before = layer_params(conv)
        replace_module(model, name, new)
        done[name] = LayerCompaction(name, config.method, new.netshrink_type, before, module_params(new), err, out_err)
    how = {f"{n}.weight": f"replaced by {d.module_type} ({d.params_before:,} -> {d.params_after:,} parameters)"
           for n, d in done.items()}
    return CompactResult(done, coverage=plan_coverage(model, config.method, how, plan, params=params))


for _cfg in (EquivariantConfig, CReLUConfig, DepthwiseConfig):
    handler(_cfg)(compact_layers)

__all__ = ["CReLUConfig", "DepthwiseConfig", "EquivariantConfig", "compact_layers"]
