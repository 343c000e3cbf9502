"""Binary and ternary weights, as parametrizations trained with the straight-through estimator.

- BinaryConnect (Courbariaux, Bengio & David, "BinaryConnect: Training Deep Neural Networks with
  binary weights during propagations", NeurIPS 2015): deterministic ``w_b = sign(w)`` (``sign(0) = +1``),
  or stochastic ``w_b = +1`` with probability ``p = hσ(w) = clip((w + 1) / 2, 0, 1)``, else ``-1``.
  The real-valued weights are kept for the updates and clipped to ``[-1, 1]`` after each one.
- XNOR-Net weight scaling (Rastegari, Ordonez, Redmon & Farhadi, ECCV 2016, §3.1): ``W ≈ α B`` with
  ``B = sign(W)`` and ``α = mean |W|`` per output channel, the least-squares optimal scale.
  With scaling on, the stochastic rule draws with ``p = hσ(w / α)``.
- Ternary Weight Networks (Li & Liu, "Ternary Weight Networks", 2016): ``w_t = α sign(w) 1(|w| > Δ)``,
  ``Δ = 0.7 mean |W|``, ``α = mean of |w| over |w| > Δ`` (per layer, or per output channel).

Gradient (straight-through, Bengio et al. 2013; hard-tanh gate of Hubara et al. 2016):
``dL/dw = dL/dw_b · 1(|w| <= 1)``. In eval mode the stochastic rule is replaced by the deterministic
sign, so the deployed weights are fixed. Stochastic draws in training come from torch's global
generator (seeded and checkpointed by the Trainer); the pure functions take a generator.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .._attention import converted_copy, prepare
from .._coverage import Coverage, plan_coverage
from .._layers import ALL_KINDS, LayerPlan, out_axis, plan_layers
from .._registry import handler, register
from ..config import BaseConfig, check_range
from ..metrics import sqnr_db
from ._common import (
    WeightQuantizer,
    add_weight_quantizer,
    check_not_quantized,
    log,
)


def low_bit_plan(model: nn.Module, patterns: list[str] | None, method: str, per_channel: bool) -> LayerPlan:
    """The layers a binary/ternary quantizer acts on: every layer kind (Linear, ConvNd, ConvTranspose,
    GPT-2 Conv1D, Embedding); with per-channel scales, not the kinds that keep output channels on axis 1
    (ConvTranspose, Conv1D: the scale is taken over axis 0), which are skipped with the reason."""

    def reason(_name: str, m: nn.Module) -> str | None:
        if per_channel and out_axis(m) != 0:
            return (f"{type(m).__name__} stores output channels on weight axis 1 and the per-channel scale is taken "
                    "over axis 0 (use per_channel: false)")
        return None

    return plan_layers(model, patterns, method, kinds=ALL_KINDS, reason=reason)


@dataclass(frozen=True, eq=False)
class BinaryWeights:
    """``values = alpha · b`` with ``b`` in {-1, +1}; ``alpha`` 0-d, or ``(C,)`` per output channel."""

    values: torch.Tensor
    alpha: torch.Tensor


@dataclass(frozen=True, eq=False)
class TernaryWeights:
    """``values = alpha · t`` with ``t`` in {-1, 0, +1}; threshold ``delta`` and scale ``alpha`` (0-d or ``(C,)``)."""

    values: torch.Tensor
    alpha: torch.Tensor
    delta: torch.Tensor


def _per_channel(stat: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A per-output-channel statistic shaped to broadcast against ``w`` (channels on axis 0)."""
    return stat.reshape((-1,) + (1,) * (w.dim() - 1))


def _abs_mean(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    a = w.detach().abs()
    return a.reshape(a.shape[0], -1).mean(dim=1) if per_channel else a.mean()


def _sign(w: torch.Tensor) -> torch.Tensor:
    """``sign`` with ``sign(0) = +1``."""
    return torch.where(w >= 0, torch.ones((), dtype=w.dtype, device=w.device), -torch.ones((), dtype=w.dtype, device=w.device))


def binarize(
    w: torch.Tensor, stochastic: bool = False, scale: bool = True, per_channel: bool = True, generator: torch.Generator | None = None
) -> BinaryWeights:
    """BinaryConnect binarization, deterministic or stochastic, with XNOR-Net's ``α = mean|W|`` when
    ``scale`` (per output channel when ``per_channel``); ``α = 1`` otherwise (formulas in the module docstring)."""
    w = w.detach()
    alpha = _abs_mean(w, per_channel) if scale else torch.ones((), dtype=w.dtype, device=w.device)
    a = _per_channel(alpha, w) if alpha.dim() else alpha
    if stochastic:
        safe = torch.where(a > 0, a, torch.ones_like(a))
        p = torch.clamp((w / safe + 1) / 2, 0, 1)
        u = torch.rand(w.shape, generator=generator, device=w.device, dtype=w.dtype)
        b = torch.where(u < p, 1.0, -1.0).to(w.dtype)
    else:
        b = _sign(w)
    return BinaryWeights(a * b, alpha)


def ternarize(w: torch.Tensor, per_channel: bool = False, threshold: float = 0.7) -> TernaryWeights:
    """TWN ternarization: ``Δ = threshold · mean|W|``, ``α = mean{|w| : |w| > Δ}``, ``w_t = α sign(w) 1(|w| > Δ)``."""
    w = w.detach()
    delta = threshold * _abs_mean(w, per_channel)
    d = _per_channel(delta, w) if delta.dim() else delta
    keep = w.abs() > d
    kept_abs = torch.where(keep, w.abs(), torch.zeros((), dtype=w.dtype, device=w.device))
    if per_channel:
        total = kept_abs.reshape(w.shape[0], -1).sum(dim=1)
        count = keep.reshape(w.shape[0], -1).sum(dim=1)
    else:
        total, count = kept_abs.sum(), keep.sum()
    alpha = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
    a = _per_channel(alpha, w) if alpha.dim() else alpha
    return TernaryWeights(a * torch.sign(w) * keep, alpha, delta)


def _straight_through(values: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``values`` in the forward pass; gradient ``1(|w| <= 1)`` to ``w``."""
    gated = torch.where(w.abs() <= 1, w, torch.zeros((), dtype=w.dtype, device=w.device))
    return values + (gated - gated.detach())


class BinaryWeightQuant(WeightQuantizer):
    """Parametrization ``W -> α B`` (BinaryConnect / XNOR-Net); with ``clip``, the stored real-valued
    weight is clipped to [-1, 1] in place at each training forward pass (i.e. after each update)."""

    def __init__(self, stochastic: bool = False, scale: bool = True, per_channel: bool = True, clip: bool = True):
        super().__init__()
        self.stochastic, self.scale, self.per_channel, self.clip = stochastic, scale, per_channel, clip

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.clip and self.training and isinstance(w, nn.Parameter):
            with torch.no_grad():
                if bool((w.abs() > 1).any()):
                    w.clamp_(-1.0, 1.0)
        b = binarize(w, self.stochastic and self.training, self.scale, self.per_channel)
        return _straight_through(b.values, w)

    def extra_repr(self) -> str:
        return f"stochastic={self.stochastic}, scale={self.scale}, per_channel={self.per_channel}, clip={self.clip}"


class TernaryWeightQuant(WeightQuantizer):
    """Parametrization ``W -> α sign(W) 1(|W| > Δ)`` (Ternary Weight Networks)."""

    def __init__(self, per_channel: bool = False, threshold: float = 0.7):
        super().__init__()
        self.per_channel, self.threshold = per_channel, threshold

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return _straight_through(ternarize(w, self.per_channel, self.threshold).values, w)

    def extra_repr(self) -> str:
        return f"per_channel={self.per_channel}, threshold={self.threshold}"


@register("binary", family="quantize")
@dataclass
class BinaryConfig(BaseConfig):
    """Binary weights: BinaryConnect sign/stochastic binarization (Courbariaux et al. 2015) with XNOR-Net scaling (Rastegari et al. 2016).

    ``stochastic``: hard-sigmoid sampling in training; ``scale``: ``α = mean|W|`` (per output channel
    when ``per_channel``), else ``±1``; ``clip``: keep the real-valued weights in [-1, 1]."""

    stochastic: bool = False
    scale: bool = True
    per_channel: bool = True
    clip: bool = True
    layers: list[str] | None = None

    def check_model(self, model: nn.Module) -> None:
        low_bit_plan(converted_copy(model, self.layers), self.layers, "binary", self.per_channel and self.scale)


@register("ternary", family="quantize")
@dataclass
class TernaryConfig(BaseConfig):
    """Ternary weights {-α, 0, α} with Δ = 0.7 mean|W| (Li & Liu, Ternary Weight Networks, 2016)."""

    threshold: float = 0.7
    per_channel: bool = False
    layers: list[str] | None = None

    def validate(self) -> None:
        check_range("threshold", self.threshold, 0.0, 10.0, lo_open=True)

    def check_model(self, model: nn.Module) -> None:
        low_bit_plan(converted_copy(model, self.layers), self.layers, "ternary", self.per_channel)


@dataclass
class LowBitResult:
    """Per quantized layer: the scale ``α`` (0-d or per channel), the SQNR of the quantized weight,
    and the fraction of zeros (ternary; 0 for binary)."""

    alpha: dict[str, torch.Tensor] = field(default_factory=dict)
    weight_sqnr_db: dict[str, float] = field(default_factory=dict)
    zeros: dict[str, float] = field(default_factory=dict)
    coverage: Coverage | None = field(default=None, kw_only=True)


def _scale_of(values: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """``α`` read back from quantized values in {-α, (0,) α}: the largest magnitude (per output channel)."""
    a = values.abs()
    return a.reshape(a.shape[0], -1).amax(dim=1) if per_channel else a.max()


def _apply_low_bit(model: nn.Module, layers_sel, method: str, make_quantizer, per_channel: bool, clip: bool,
                   strict: bool = False) -> LowBitResult:
    """Put ``make_quantizer()`` on each chosen layer's weight and measure what it did (``nn.MultiheadAttention``
    converted to separate projections first; a tied weight's layers share the one quantizer)."""
    from ..prune._mask import follow_parametrization

    result = LowBitResult()
    notes = prepare(model, layers_sel, method)
    plan = low_bit_plan(model, layers_sel, method, per_channel)
    plan.check_strict(method, strict)
    layers = plan.layers
    check_not_quantized(layers)
    for name, layer in layers.items():
        w = layer.weight.detach().clone()
        add_weight_quantizer(layer, make_quantizer(), where=name)
        stored = layer.parametrizations.weight.original
        if clip and bool((stored.abs() > 1).any()):
            stored.clamp_(-1.0, 1.0)
        wq = layer.weight.detach()
        result.alpha[name] = _scale_of(wq, per_channel)
        result.weight_sqnr_db[name] = sqnr_db(w, wq)
        result.zeros[name] = float((wq == 0).float().mean())
        for alias in plan.aliases.get(name, ()):
            follow_parametrization(layer, model.get_submodule(alias))
    how = {f"{n}.weight": f"{method} weights, weight SQNR {result.weight_sqnr_db[n]:.1f} dB" for n in result.alpha}
    result.coverage = plan_coverage(model, method, how, plan, notes)
    log.info("%s: %d layers", method, len(result.alpha))
    return result


@handler(BinaryConfig)
@torch.no_grad()
def binary_quantize(model: nn.Module, config: BinaryConfig, data=None) -> LowBitResult:
    """Binarize the chosen layers' weights in place (a :class:`BinaryWeightQuant` on each)."""
    return _apply_low_bit(
        model, config.layers, "binary",
        lambda: BinaryWeightQuant(config.stochastic, config.scale, config.per_channel, config.clip),
        config.per_channel and config.scale, config.clip, config.strict,
    )


@handler(TernaryConfig)
@torch.no_grad()
def ternary_quantize(model: nn.Module, config: TernaryConfig, data=None) -> LowBitResult:
    """Ternarize the chosen layers' weights in place (a :class:`TernaryWeightQuant` on each)."""
    return _apply_low_bit(
        model, config.layers, "ternary", lambda: TernaryWeightQuant(config.per_channel, config.threshold), config.per_channel, False,
        config.strict,
    )


__all__ = [
    "BinaryConfig",
    "BinaryWeightQuant",
    "BinaryWeights",
    "LowBitResult",
    "TernaryConfig",
    "TernaryWeightQuant",
    "TernaryWeights",
    "binarize",
    "binary_quantize",
    "ternarize",
    "ternary_quantize",
]
