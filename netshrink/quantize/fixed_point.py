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

:class:`FixedPointWeights` is a parametrization that keeps the stored tensor (``original``) on the
grid; the conversion after each optimizer step, ``w <- Convert(w - lr g)``, is a Trainer callback,
:class:`FixedPointRounding` (``on_step_end``; stochastic rounding draws from torch's global generator,
which the Trainer seeds and checkpoints). The Trainer adds it by itself to any model holding a
:class:`FixedPointWeights` (its ``trainer_callback``), so ``Trainer(model, cfg).fit(...)`` trains in
fixed point with nothing more to pass. :func:`fixed_point_step_` does the same conversion explicitly,
with a generator, for a hand-written loop (call it after ``optimizer.step()``). The forward pass never
changes a stored tensor: an on-grid weight is used as it is (the gradient reaches it unchanged); one off
the grid (a step not yet converted, or a pruning mask in front of it) is read rounded to nearest with a
straight-through gradient.

Activations and gradients (Gupta et al. §3-4 round every result of the training loop, weights, layer
outputs and back-propagated errors, to ⟨IL, FL⟩, while the dot products accumulate in higher precision):

- ``activations``: each chosen layer's output ``y`` becomes ``Convert(y)`` in ⟨act_il, act_fl⟩ -- a
  :class:`FixedPointAct` child ``output_quant`` of the layer, run by a forward hook (the layer keeps
  its name, type and parameters). The error passes the rounding unchanged (straight-through) and
  stops where the output saturated (the clamp's derivative, 0 outside ``[lo, hi]``; passing it there
  too lets saturated units grow without bound);
- ``gradients``: in the backward pass the error arriving at each chosen layer's output, ``dL/dy``, and
  the gradient of each fixed-point weight and bias, ``dL/dW``, become ``Convert`` of themselves in
  ⟨grad_il, grad_fl⟩ (an autograd function in :class:`FixedPointAct` and in :class:`FixedPointWeights`)
  before they flow on -- the errors to the layers below, the weight gradients to the optimizer.

In training mode all of them use the config's rounding (stochastic draws from torch's global
generator); in eval mode activations round to nearest, so evaluation is deterministic. The .nsk file
stores the weights (``IL + FL``-bit affine codes); the activation format is a training-time setting
that a loaded model does not get back (call :func:`remove_fixed_point_act` to drop it in place).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from .._registry import handler, register
from ..config import BaseConfig
from ..errors import ConfigError, ModelError
from ..train import Callback
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


def check_format(il: int, fl: int, prefix: str = "") -> None:
    """A :class:`ConfigError` naming ``il`` or ``fl`` (after ``prefix``: ``act_il``) unless ⟨il, fl⟩ is a valid format."""
    if il < 1:
        raise ConfigError(f"{prefix}il", f"needs at least the sign bit (il >= 1), got {il}")
    if fl < 0:
        raise ConfigError(f"{prefix}fl", f"must be >= 0, got {fl}")
    if il + fl > MAX_WORD_LENGTH:
        raise ConfigError(f"{prefix}fl", f"word length il + fl = {il + fl} exceeds {MAX_WORD_LENGTH}, the most float32 holds exactly")


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


def _convert_ops(x: torch.Tensor, fmt: FixedPointFormat) -> torch.Tensor:
    """Round-to-nearest ``Convert`` with plain tensor operations (eval mode; traces to ONNX Round/Clip)."""
    return torch.clamp(torch.round(x * (2.0**fmt.fl)) * (2.0**-fmt.fl), fmt.lo, fmt.hi)


class _Convert(torch.autograd.Function):
    """Forward: ``Convert(x)`` to ``act`` (identity when None); backward: ``Convert(g)`` to ``grad``
    (identity when None). The rounding passes the gradient straight through; the saturation does not
    (zero gradient where ``x`` lies outside ``[lo, hi]``, the derivative of the clamp)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, act: FixedPointFormat | None, grad: FixedPointFormat | None, rounding: Rounding) -> torch.Tensor:
        ctx.grad_format, ctx.rounding = grad, rounding
        if act is None:
            ctx.inside = None
            return x.view_as(x)
        ctx.inside = (x >= act.lo) & (x <= act.hi)
        return to_fixed(x, act.il, act.fl, rounding)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        fmt = ctx.grad_format
        if fmt is not None:
            g = to_fixed(g, fmt.il, fmt.fl, ctx.rounding)
        if ctx.inside is not None:
            g = g * ctx.inside.to(g.dtype)
        return g, None, None, None


class FixedPointAct(nn.Module):
    """A layer's output in ⟨act⟩ and the error arriving at it in ⟨grad⟩ (either may be None); held by
    the layer as ``output_quant`` and run by :func:`_round_output`, a forward hook."""

    def __init__(self, act: FixedPointFormat | None, grad: FixedPointFormat | None, rounding: Rounding = "stochastic"):
        super().__init__()
        self.act, self.grad, self.rounding = act, grad, rounding

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            return _Convert.apply(y, self.act, self.grad, self.rounding)
        if self.training and self.act is not None:
            return to_fixed(y, self.act.il, self.act.fl, self.rounding)
        return _convert_ops(y, self.act) if self.act is not None else y

    def extra_repr(self) -> str:
        fmt = lambda f: f"<{f.il}, {f.fl}>" if f is not None else "float"  # noqa: E731
        return f"act={fmt(self.act)}, grad={fmt(self.grad)}, rounding={self.rounding!r}"


def _round_output(module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook: the layer's output through its ``output_quant`` (a plain function, so that
    ``deepcopy`` of the layer keeps a hook that finds the copy's own quantizer)."""
    q = module._modules.get("output_quant")
    return q(output) if isinstance(q, FixedPointAct) and isinstance(output, torch.Tensor) else output


def attach_fixed_point_act(layer: nn.Module, quant: FixedPointAct, where: str = "") -> None:
    """Round ``layer``'s output (and the error arriving at it) by ``quant``, a child named ``output_quant``."""
    if "output_quant" in layer._modules:
        raise ModelError(f"{where or type(layer).__name__} already has an output quantizer")
    layer.output_quant = quant
    layer.register_forward_hook(_round_output)


def remove_fixed_point_act(model: nn.Module) -> int:
    """Drop every :class:`FixedPointAct` (child and hook) from ``model``, in place; how many were removed."""
    n = 0
    for module in model.modules():
        if isinstance(module._modules.get("output_quant"), FixedPointAct):
            del module._modules["output_quant"]
            for key in [k for k, fn in module._forward_hooks.items() if fn is _round_output]:
                del module._forward_hooks[key]
            n += 1
    return n


class FixedPointRounding(Callback):
    """Trainer callback of fixed-point training (Gupta et al. 2015, §4): after every optimizer step,
    each fixed-point tensor's stored value becomes ``Convert(w − lr g)`` (:func:`fixed_point_step_`);
    at the start of a fit, too (a no-op on weights already on the grid). ``rounding``: None for each
    tensor's own; ``generator``: of stochastic rounding (None: torch's global generator, which the
    Trainer seeds). The Trainer adds one by itself to a model with :class:`FixedPointWeights`."""

    def __init__(self, rounding: Rounding | None = None, generator: torch.Generator | None = None):
        self.rounding = rounding
        self.generator = generator
        self.changed = 0

    def _convert(self, model: nn.Module) -> None:
        self.changed += fixed_point_step_(model, rounding=self.rounding, generator=self.generator)

    def on_fit_start(self, trainer: Any) -> None:
        self._convert(trainer.model)

    def on_step_end(self, trainer: Any, step: int) -> None:
        self._convert(trainer.model)


class FixedPointWeights(WeightQuantizer):
    """Parametrization keeping a weight in ⟨il, fl⟩ (see the module docstring for the training rule);
    with ``grad`` (a :class:`FixedPointFormat`), the weight's gradient is converted to it as well."""

    #: the callback a Trainer adds for a model holding this parametrization
    trainer_callback = FixedPointRounding

    def __init__(self, il: int, fl: int, rounding: Rounding = "stochastic", grad: FixedPointFormat | None = None):
        super().__init__()
        self.format = FixedPointFormat(il, fl)
        self.rounding = rounding
        self.grad = grad

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
        if self.training and self.grad is not None and w.requires_grad and torch.is_grad_enabled():
            return _Convert.apply(self._forward(w), None, self.grad, self.rounding)
        return self._forward(w)

    def _forward(self, w: torch.Tensor) -> torch.Tensor:
        snapped = self.convert(w, "nearest")
        if isinstance(w, nn.Parameter) and torch.equal(snapped, w):  # the stored tensor, on the grid
            return w
        return snapped + (w - w.detach())

    def extra_repr(self) -> str:
        grad = f", grad=<{self.grad.il}, {self.grad.fl}>" if self.grad is not None else ""
        return f"il={self.format.il}, fl={self.format.fl}, rounding={self.rounding!r}{grad}"


@register("fixed_point", family="quantize")
@dataclass
class FixedPointConfig(BaseConfig):
    """Fixed-point ⟨il, fl⟩ weights trained with nearest or stochastic rounding (Gupta et al. 2015).

    ``bias``: the biases too; ``layers``: which Linear/Conv layers (all when None); ``seed``: of the
    stochastic rounding of the initial conversion. ``activations``: each chosen layer's output in
    ⟨act_il, act_fl⟩; ``gradients``: the error at each chosen layer's output and the weight (and bias)
    gradients in ⟨grad_il, grad_fl⟩ (see the module docstring). An unset ``act_*``/``grad_*`` is the
    weights' ⟨il, fl⟩; one set without its switch on is an error.
    """

    il: int = 4
    fl: int = 12
    rounding: Literal["nearest", "stochastic"] = "stochastic"
    bias: bool = True
    layers: list[str] | None = None
    seed: int = 0
    activations: bool = False
    act_il: int | None = None
    act_fl: int | None = None
    gradients: bool = False
    grad_il: int | None = None
    grad_fl: int | None = None

    def validate(self) -> None:
        check_format(self.il, self.fl)
        for kind, on in (("act", self.activations), ("grad", self.gradients)):
            for part in ("il", "fl"):
                if getattr(self, f"{kind}_{part}") is not None and not on:
                    switch = "activations" if kind == "act" else "gradients"
                    raise ConfigError(f"{kind}_{part}", f"applies only with {switch}: true")
            if on:
                fmt = self._format_of(kind)
                check_format(fmt.il, fmt.fl, prefix=f"{kind}_")

    def check_model(self, model: nn.Module) -> None:
        select_quantizable(model, self.layers, "fixed_point")

    @property
    def format(self) -> FixedPointFormat:
        return FixedPointFormat(self.il, self.fl)

    def _format_of(self, kind: str) -> FixedPointFormat:
        il, fl = getattr(self, f"{kind}_il"), getattr(self, f"{kind}_fl")
        il, fl = (self.il if il is None else il), (self.fl if fl is None else fl)
        check_format(il, fl, prefix=f"{kind}_")
        return FixedPointFormat(il, fl)

    @property
    def act_format(self) -> FixedPointFormat | None:
        """⟨act_il, act_fl⟩ of the layer outputs, or None when ``activations`` is off."""
        return self._format_of("act") if self.activations else None

    @property
    def grad_format(self) -> FixedPointFormat | None:
        """⟨grad_il, grad_fl⟩ of the errors and weight gradients, or None when ``gradients`` is off."""
        return self._format_of("grad") if self.gradients else None


@dataclass
class FixedPointResult:
    """Per layer and tensor (``fc1.weight``): values clipped at the range ends by the initial conversion,
    and the largest absolute change it made; ``outputs``: the layers whose output (and error) is rounded."""

    format: FixedPointFormat
    saturated: dict[str, int] = field(default_factory=dict)
    max_abs_change: dict[str, float] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    act_format: FixedPointFormat | None = None
    grad_format: FixedPointFormat | None = None


def _tensor_names(module: nn.Module, bias: bool) -> list[str]:
    return ["weight"] + (["bias"] if bias and getattr(module, "bias", None) is not None else [])


@handler(FixedPointConfig)
@torch.no_grad()
def fixed_point_quantize(model: nn.Module, config: FixedPointConfig, data=None) -> FixedPointResult:
    """Convert the chosen layers' weights (and biases) to ⟨il, fl⟩ in place and keep them there
    through training (a :class:`FixedPointWeights` on each); with ``activations`` or ``gradients``,
    a :class:`FixedPointAct` on each chosen layer's output."""
    fmt, act, grad = config.format, config.act_format, config.grad_format
    g = torch.Generator().manual_seed(config.seed)
    result = FixedPointResult(fmt, act_format=act, grad_format=grad)
    layers = select_quantizable(model, config.layers, "fixed_point")
    check_not_quantized(layers, ("weight", "bias") if config.bias else ("weight",))
    if act is not None or grad is not None:
        for name, layer in layers.items():
            if "output_quant" in layer._modules:
                raise ModelError(f"{name or type(layer).__name__} already has an output quantizer")
    for name, layer in layers.items():
        if act is not None or grad is not None:
            attach_fixed_point_act(layer, FixedPointAct(act, grad, config.rounding), where=name)
            result.outputs.append(name)
        for t in _tensor_names(layer, config.bias):
            q = FixedPointWeights(fmt.il, fmt.fl, config.rounding, grad)
            before = getattr(layer, t).detach().clone()
            add_weight_quantizer(layer, q, t, where=name)
            stored = layer.parametrizations[t].original
            if q is layer.parametrizations[t][0]:
                q.convert_(stored, generator=g)
            after = getattr(layer, t).detach()
            result.saturated[f"{name}.{t}"] = int(((before < fmt.lo) | (before > fmt.hi)).sum())
            result.max_abs_change[f"{name}.{t}"] = float((after - before).abs().max()) if before.numel() else 0.0
    log.info("fixed_point: <%d, %d> on %d tensors; outputs %s, gradients %s", fmt.il, fmt.fl, len(result.saturated),
             f"<{act.il}, {act.fl}>" if act else "float", f"<{grad.il}, {grad.fl}>" if grad else "float")
    return result


@torch.no_grad()
def fixed_point_step_(model: nn.Module, config: FixedPointConfig | None = None, generator: torch.Generator | None = None,
                      rounding: Rounding | None = None) -> int:
    """Convert every fixed-point tensor's stored value in place (call after ``optimizer.step()``).

    Rounding: ``rounding``, else ``config.rounding`` when a config is given, else each tensor's own;
    ``generator`` drives stochastic rounding (None: torch's global generator). Returns how many
    tensors changed."""
    if rounding is None and config is not None:
        rounding = config.rounding
    changed = 0
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        for plist in module.parametrizations.values():
            q = next((p for p in plist if isinstance(p, FixedPointWeights)), None)
            if q is not None:
                changed += q.convert_(plist.original, rounding, generator)
    return changed


__all__ = [
    "MAX_WORD_LENGTH",
    "FixedPointAct",
    "attach_fixed_point_act",
    "remove_fixed_point_act",
    "FixedPointConfig",
    "FixedPointFormat",
    "FixedPointResult",
    "FixedPointRounding",
    "FixedPointWeights",
    "check_format",
    "fixed_point_quantize",
    "fixed_point_step_",
    "to_fixed",
]
