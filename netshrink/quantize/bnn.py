"""Binarized neural networks: sign activations trained with the straight-through estimator, on binary weights.

BNN (Hubara, Courbariaux, Soudry, El-Yaniv & Bengio, "Binarized Neural Networks", NeurIPS 2016;
arXiv 1602.02830) binarizes the weights *and* the activations between hidden layers:

- forward: ``a_b = sign(a)`` with ``sign(0) = +1`` (the convention of the weights, :func:`binarize`);
- backward: ``dL/da = dL/da_b · 1(|a| <= 1)``, the gradient of hard-tanh ``Htanh(a) = clip(a, -1, 1)``:
  the straight-through estimator (Bengio et al. 2013) that cancels the gradient where ``a`` saturates.

The input of the first layer (the pixels) and the output of the last layer (the class scores) stay
real-valued, as in the paper: only activations *between* weight layers become ±1. The weights are
BinaryConnect's (deterministic sign by default; the real-valued weights are clipped to [-1, 1]),
with ``α = 1`` as in the paper (batch normalization after each layer absorbs any scale), or with
XNOR-Net's ``α = mean|W|`` per output channel (Rastegari et al. 2016) when ``scale`` is on.

:class:`BnnConfig` (recipe method ``bnn``) puts a :class:`~netshrink.quantize.binary.BinaryWeightQuant`
on each chosen Linear/Conv weight and replaces activation *modules* (``nn.ReLU``, ``nn.Hardtanh``, ...)
by :class:`SignActivation`. By default it takes every activation module that comes, in module order,
after the first and before the last binarized layer (for a ``Sequential`` MLP: exactly the activations
between hidden layers). Each swap is recorded as a model edit (:mod:`netshrink._modules`), so a packed
.nsk file rebuilds the sign activations on load. Activations called in ``forward`` (``F.relu``) are not
modules and cannot be replaced: such a model is refused with an error naming ``activations``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

from .._layers import WEIGHT_LAYERS
from .._modules import register_module, replace_module
from .._registry import handler, register
from ..config import BaseConfig
from ..errors import ConfigError
from ._common import log, select_quantizable
from .binary import BinaryWeightQuant, LowBitResult, _apply_low_bit

#: the activation module types that :class:`BnnConfig` replaces by :class:`SignActivation`
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Hardswish,
    nn.Hardsigmoid, nn.Softsign, nn.Mish, nn.CELU, nn.SELU,
)
_ACT_NAMES = ", ".join(sorted({c.__name__ for c in ACTIVATIONS}))


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """``sign(x)`` (``sign(0) = +1``) in the forward pass; gradient ``1(|x| <= 1)`` (hard-tanh STE) backward."""
    one = torch.ones((), dtype=x.dtype, device=x.device)
    s = torch.where(x >= 0, one, -one)
    if not x.requires_grad:
        return s
    gated = torch.where(x.abs() <= 1, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return s + (gated - gated.detach())


@register_module("sign_activation")
class SignActivation(nn.Module):
    """The BNN activation ``x -> sign(x)`` in {-1, +1}, trained through the hard-tanh straight-through
    estimator (:func:`sign_ste`); the same function in training and in eval."""

    def netshrink_args(self) -> dict:
        return {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sign_ste(x)


@register("bnn", family="quantize")
@dataclass
class BnnConfig(BaseConfig):
    """Binarized neural network: binary weights and sign activations between layers (Hubara et al., BNN, 2016).

    ``layers``: the Linear/Conv layers whose weights are binarized (all when None). ``activations``: the
    activation modules replaced by ``sign`` (names or globs; None: every activation module between the
    first and the last binarized layer, in module order). ``scale``: XNOR-Net's ``α = mean|W|`` (per
    output channel when ``per_channel``) instead of the paper's ``α = 1``. ``stochastic``/``clip``: as
    in the ``binary`` method (BinaryConnect)."""

    layers: list[str] | None = None
    activations: list[str] | None = None
    scale: bool = False
    per_channel: bool = True
    stochastic: bool = False
    clip: bool = True

    def validate(self) -> None:
        if self.activations is not None and not self.activations:
            raise ConfigError("activations", "is empty: for binary weights alone use the method 'binary'")

    def check_model(self, model: nn.Module) -> None:
        plan_bnn(model, self)


@dataclass
class BnnResult:
    """What :func:`bnn_quantize` did: the binarized weights (as the ``binary`` method reports them) and
    the names of the activation modules now computing ``sign``."""

    weights: LowBitResult = field(default_factory=LowBitResult)
    activations: list[str] = field(default_factory=list)


def plan_bnn(model: nn.Module, config: BnnConfig) -> tuple[dict[str, nn.Module], list[str]]:
    """The weight layers to binarize and the activation modules to replace; a :class:`ConfigError`
    naming the field when a name is unknown, names a module of the wrong type, or nothing is found."""
    layers = select_quantizable(model, config.layers, "bnn")
    if not layers:
        raise ConfigError("layers", f"the model has no {', '.join(c.__name__ for c in WEIGHT_LAYERS)} layer to binarize")
    order = [n for n, _ in model.named_modules()]
    modules = dict(model.named_modules())
    acts = {n: m for n, m in modules.items() if n and isinstance(m, ACTIVATIONS)}
    if config.activations is None:
        pos = [order.index(n) for n in layers]
        first, last = min(pos), max(pos)
        chosen = [n for n in acts if first < order.index(n) < last]
        if not chosen:
            raise ConfigError(
                "activations",
                f"the model has no activation module ({_ACT_NAMES}) between its first and last binarized layer; "
                "activations called in forward() (F.relu) cannot be replaced: use modules, or name them",
            )
        return layers, chosen
    chosen = []
    for i, pat in enumerate(config.activations):
        m = modules.get(pat)
        if m is not None and not isinstance(m, ACTIVATIONS):
            what = "the model itself" if pat == "" else f"module {pat!r}"
            raise ConfigError(f"activations[{i}]", f"{what} is a {type(m).__name__}; bnn binarizes only activation modules ({_ACT_NAMES})")
        hits = [n for n in acts if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise ConfigError(f"activations[{i}]", f"no activation module named {pat!r} (activation modules: {', '.join(acts) or 'none'})")
        chosen += [n for n in hits if n not in chosen]
    return layers, [n for n in acts if n in chosen]


@handler(BnnConfig)
@torch.no_grad()
def bnn_quantize(model: nn.Module, config: BnnConfig, data=None) -> BnnResult:
    """Binarize the chosen layers' weights and replace the chosen activations by :class:`SignActivation`,
    in place. Everything is checked before the model is changed."""
    _, acts = plan_bnn(model, config)
    weights = _apply_low_bit(
        model, config.layers, "bnn",
        lambda: BinaryWeightQuant(config.stochastic, config.scale, config.per_channel, config.clip),
        config.per_channel and config.scale, config.clip,
    )
    for name in acts:
        replace_module(model, name, SignActivation())
    log.info("bnn: %d binary layers, %d sign activations", len(weights.alpha), len(acts))
    return BnnResult(weights, acts)


__all__ = ["ACTIVATIONS", "BnnConfig", "BnnResult", "SignActivation", "bnn_quantize", "plan_bnn", "sign_ste"]
