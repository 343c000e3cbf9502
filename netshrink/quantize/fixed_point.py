"""Fixed-point weights ⟨IL, FL⟩ with round-to-nearest or stochastic rounding (Gupta, Agrawal,
Gopalakrishnan & Narayanan, "Deep Learning with Limited Numerical Precision", ICML 2015).

A fixed-point number ⟨IL, FL⟩ has word length ``WL = IL + FL`` bits, ``IL`` integer bits including the
sign and ``FL`` fractional bits: the grid ``eps Z`` with ``eps = 2^-FL``, limited to
``[-2^(IL-1), 2^(IL-1) - 2^-FL]``. Conversion saturates (Gupta et al. §3):

    Convert(x) = clamp(Round(x), -2^(IL-1), 2^(IL-1) - 2^-FL)
    Round(x)   = eps round(x / eps)                  (round to nearest; ties, of probability zero, to even)
    Round(x)   = eps floor(x / eps) + eps  w.p. (x - eps floor(x / eps)) / eps,  else eps floor(x / eps)
                                                     (stochastic rounding: E[Round(x)] = x)

Training (Gupta et al. §4): the stored weights themselves are fixed-point numbers; each update is
computed in float and the result rounded back, ``w <- Convert(w - lr g)``. With round-to-nearest an
update smaller than ``eps / 2`` is lost; stochastic rounding keeps it in expectation, which is why
it trains at 16 bits (⟨4, 12⟩) where round-to-nearest fails.

:class:`FixedPointWeights` is a parametrization that applies that rounding lazily: in training mode
each forward pass first converts the stored tensor (``original``) in place -- so after an optimizer
step the next forward pass sees ``Convert(w - lr g)``, under the unmodified :class:`~netshrink.train.Trainer`
-- and stochastic rounding then draws from torch's global generator, which the Trainer seeds and
checkpoints. :func:`fixed_point_step_` does the same conversion explicitly, with a generator, for a
hand-written loop (call it after ``optimizer.step()``). Where a pruning mask comes first on the weight
the stored tensor is not reachable from the forward pass; the forward pass then rounds to nearest
(straight-through gradient) and only :func:`fixed_point_step_` converts the stored weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from .._registry import handler, register
from ..config import BaseConfig
from ..errors import ConfigError
from ._common import (
    WeightQuantizer,
    add_weight_quantizer,
    check_not_quantized,
    log,
    select_quantizable,
)
from .affine import Rounding, _round

#: the longest word that float32 holds exactly (24-bit significand)
MAX_WORD_LENGTH = 24


def check_format(il: int, fl: int) -> None:
    """A :class:`ConfigError` naming ``il`` or ``fl`` unless ⟨il, fl⟩ is a valid format."""
    if il < 1:
        raise ConfigError("il", f"needs at least the sign bit (il >= 1), got {il}")
    if fl < 0:
        raise ConfigError("fl", f"must be >= 0, got {fl}")
    if il + fl > MAX_WORD_LENGTH:
        raise ConfigError("fl", f"word length il + fl = {il + fl} exceeds {MAX_WORD_LENGTH}, the most float32 holds exactly")


@dataclass(frozen=True)
class FixedPointFormat:
    """⟨IL, FL⟩: ``eps = 2^-FL``, range ``[lo, hi] = [-2^(IL-1), 2^(IL-1) - 2^-FL]``."""

    il: int
    fl: int

    def __post_init__(self) -> None:
        check_format(self.il, self.fl)

    @property
    def word_length(self) -> int:
        return self.il + self.fl

    @property
    def eps(self) -> float:
        return 2.0 ** -self.fl

    @property
    def lo(self) -> float:
        return -(2.0 ** (self.il - 1))

    @property
    def hi(self) -> float:
        return 2.0 ** (self.il - 1) - self.eps


def to_fixed(
    x: torch.Tensor, il: int, fl: int, rounding: Rounding = "nearest", generator: torch.Generator | None = None
) -> torch.Tensor:
    """``Convert(x)`` to ⟨il, fl⟩ (formulas in the module docstring), saturating; same dtype as ``x``."""
    check_format(il, fl)
    k = 2 ** (il + fl - 1)  # integer codes lie in [-k, k - 1]
    v = _round(x.detach().to(torch.float32) * (2.0**fl), rounding, generator)
    return (torch.clamp(v, -k, k - 1) * (2.0 ** -fl)).to(x.dtype)


class FixedPointWeights(WeightQuantizer):
    """Parametrization keeping a weight in ⟨il, fl⟩ (see the module docstring for the training rule)."""

    def __init__(self, il: int, fl: int, rounding: Rounding = "stochastic"):
        super().__init__()
        self.format = FixedPointFormat(il, fl)
        self.rounding = rounding

    def convert(self, w: torch.Tensor, rounding: Rounding | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        return to_fixed(w, self.format.il, self.format.fl, rounding or self.rounding, generator)

    @torch.no_grad()
    def convert_(self, w: torch.Tensor, rounding: Rounding | None = None, generator: torch.Generator | None = None) -> bool:
        """Convert ``w`` in place; False (and ``w`` untouched, its version too) when it is already on the grid."""
        new = self.convert(w, rounding, generator)
        if torch.equal(new, w):
            return False
        w.copy_(new)
        return True

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if isinstance(w, nn.Parameter):  # first on the weight: the stored tensor itself
            if self.training:
                self.convert_(w)
                return w
            if torch.equal(self.convert(w, "nearest"), w):
                return w
        snapped = self.convert(w, "nearest")
        return snapped + (w - w.detach())

    def extra_repr(self) -> str:
        return f"il={self.format.il}, fl={self.format.fl}, rounding={self.rounding!r}"


@register("fixed_point", family="quantize")
@dataclass
class FixedPointConfig(BaseConfig):
    """Fixed-point ⟨il, fl⟩ weights trained with nearest or stochastic rounding (Gupta et al. 2015).

    ``bias``: the biases too; ``layers``: which Linear/Conv layers (all when None); ``seed``: of the
    stochastic rounding of the initial conversion.
    """

    il: int = 4
    fl: int = 12
    rounding: Literal["nearest", "stochastic"] = "stochastic"
    bias: bool = True
    layers: list[str] | None = None
    seed: int = 0

    def validate(self) -> None:
        check_format(self.il, self.fl)

    def check_model(self, model: nn.Module) -> None:
        select_quantizable(model, self.layers, "fixed_point")

    @property
    def format(self) -> FixedPointFormat:
        return FixedPointFormat(self.il, self.fl)


@dataclass
class FixedPointResult:
    """Per layer and tensor (``fc1.weight``): values clipped at the range ends by the initial conversion,
    and the largest absolute change it made."""

    format: FixedPointFormat
    saturated: dict[str, int] = field(default_factory=dict)
    max_abs_change: dict[str, float] = field(default_factory=dict)


def _tensor_names(module: nn.Module, bias: bool) -> list[str]:
    return ["weight"] + (["bias"] if bias and getattr(module, "bias", None) is not None else [])


@handler(FixedPointConfig)
@torch.no_grad()
def fixed_point_quantize(model: nn.Module, config: FixedPointConfig, data=None) -> FixedPointResult:
    """Convert the chosen layers' weights (and biases) to ⟨il, fl⟩ in place and keep them there
    through training (a :class:`FixedPointWeights` on each)."""
    fmt = config.format
    g = torch.Generator().manual_seed(config.seed)
    result = FixedPointResult(fmt)
    layers = select_quantizable(model, config.layers, "fixed_point")
    check_not_quantized(layers, ("weight", "bias") if config.bias else ("weight",))
    for name, layer in layers.items():
        for t in _tensor_names(layer, config.bias):
            q = FixedPointWeights(fmt.il, fmt.fl, config.rounding)
            before = getattr(layer, t).detach().clone()
            add_weight_quantizer(layer, q, t, where=name)
            stored = layer.parametrizations[t].original
            if q is layer.parametrizations[t][0]:
                q.convert_(stored, generator=g)
            after = getattr(layer, t).detach()
            result.saturated[f"{name}.{t}"] = int(((before < fmt.lo) | (before > fmt.hi)).sum())
            result.max_abs_change[f"{name}.{t}"] = float((after - before).abs().max()) if before.numel() else 0.0
    log.info("fixed_point: <%d, %d> on %d tensors", fmt.il, fmt.fl, len(result.saturated))
    return result


@torch.no_grad()
def fixed_point_step_(model: nn.Module, config: FixedPointConfig | None = None, generator: torch.Generator | None = None) -> int:
    """Convert every fixed-point tensor's stored value in place (call after ``optimizer.step()``).

    Rounding: ``config.rounding`` when a config is given, else each tensor's own; ``generator`` drives
    stochastic rounding (None: torch's global generator). Returns how many tensors changed."""
    changed = 0
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        for plist in module.parametrizations.values():
            q = next((p for p in plist if isinstance(p, FixedPointWeights)), None)
            if q is not None:
                changed += q.convert_(plist.original, config.rounding if config is not None else None, generator)
    return changed


__all__ = [
    "MAX_WORD_LENGTH",
    "FixedPointConfig",
    "FixedPointFormat",
    "FixedPointResult",
    "FixedPointWeights",
    "check_format",
    "fixed_point_quantize",
    "fixed_point_step_",
    "to_fixed",
]
