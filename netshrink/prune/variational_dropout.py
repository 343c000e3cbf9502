"""Sparse variational dropout (Molchanov, Ashukha & Vetrov, "Variational Dropout Sparsifies Deep
Neural Networks", ICML 2017).

Every weight gets a Gaussian posterior ``q(w_ij) = N(theta_ij, sigma_ij^2)`` with its own variance;
the dropout rate of the weight is ``alpha_ij = sigma_ij^2 / theta_ij^2``, parametrised additively as

    log alpha = log sigma^2 - log theta^2            (eq. 10: ``log sigma^2`` is the free parameter)

Training maximises the variational lower bound with the log-uniform prior ``p(|w|) ∝ 1/|w|``:

    L = E_q[-log p(y | x, w)] + beta * KL(q || p) / N          (N: training examples; beta annealed 0 -> 1)

whose KL term has no closed form; the paper's fit (eq. 14) is

    -KL(q(w_ij) || p(w_ij)) ≈ k1 sigmoid(k2 + k3 log alpha_ij) - 0.5 log(1 + 1/alpha_ij) - k1,
    k1 = 0.63576, k2 = 1.87320, k3 = 1.48695.

The expectation uses the local reparameterization trick (Kingma, Salimans & Welling 2015): a linear
layer's pre-activations are Gaussian, ``b ~ N(x theta^T, x^2 sigma^2^T)``, so one sample per example is
``b = x theta^T + sqrt(x^2 sigma^2^T) * eps`` (a convolution likewise, with ``conv(x^2, sigma^2)``).
A weight with ``log alpha > threshold`` (3 in the paper: alpha > e^3 ≈ 20, a dropout rate above 95%)
carries only noise and is pruned; the kept weights are their means ``theta``.

In netshrink the chosen layers are wrapped for the duration of the training (:class:`VariationalLayer`
holds the original layer and a ``log_sigma2`` parameter; nothing is mutated in a forward pass), trained
with the one :class:`~netshrink.train.Trainer` (the KL is its ``extra_loss``, the annealing a
:class:`~netshrink.train.Callback`), and then unwrapped: each layer gets back its own module with
``weight = theta`` under a pruning mask ``log alpha <= threshold`` (a :mod:`netshrink.prune._mask` mask,
so later stages — k-means sharing, Huffman coding — see an ordinarily pruned layer).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._layers import select_layers
from .._registry import handler, register
from ..config import BaseConfig, check_range
from ..errors import ConfigError, ModelError
from ..train import Callback, TrainConfig, Trainer
from ._mask import apply_mask, get_mask
from .magnitude import PruneResult

log = logging.getLogger(__name__)

K1, K2, K3 = 0.63576, 1.87320, 1.48695
#: log alpha is clipped to this range in the KL and the threshold (as in the authors' code): beyond it
#: the KL approximation is flat and the gradients only add noise
LOG_ALPHA_CLIP = (-10.0, 10.0)


# ----------------------------------------------------------------------------------------- math


def log_alpha(theta: torch.Tensor, log_sigma2: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``log alpha = log sigma^2 - log theta^2`` (Molchanov et al. 2017, eq. 10), clipped to ``LOG_ALPHA_CLIP``."""
    return (log_sigma2 - torch.log(theta * theta + eps)).clamp(*LOG_ALPHA_CLIP)


def kl_approx(log_alpha_: torch.Tensor) -> torch.Tensor:
    """Elementwise ``KL(q || p)`` ≈ ``k1 - k1 sigmoid(k2 + k3 log alpha) + 0.5 log(1 + 1/alpha)`` (eq. 14).

    Non-negative up to the fit's error; tends to 0 as ``log alpha -> +inf`` (a weight that is pure noise
    costs nothing) and grows like ``-0.5 log alpha`` as ``log alpha -> -inf``.
    """
    return K1 - K1 * torch.sigmoid(K2 + K3 * log_alpha_) + 0.5 * F.softplus(-log_alpha_)


def keep_mask(log_alpha_: torch.Tensor, threshold: float) -> torch.Tensor:
    """The weights kept: ``log alpha <= threshold``."""
    return log_alpha_ <= threshold


# ---------------------------------------------------------------------------------------- layer


class VariationalLayer(nn.Module):
    """A Linear or ConvNd layer with a per-weight variance, trained with the local reparameterization trick.

    ``layer`` keeps its own weight (``theta``, under a pruning mask if it has one) and bias. In training
    mode the output is one sample of the Gaussian pre-activation; in eval mode it is the deterministic
    output with the weights of ``log alpha > threshold`` left out (what the pruned model will compute).
    """

    def __init__(self, layer: nn.Module, init_log_sigma2: float, threshold: float):
        super().__init__()
        if not isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            raise ModelError(f"variational dropout: {type(layer).__name__} is not a Linear or Conv1d/2d/3d layer")
        self.layer = layer
        self.threshold = threshold
        w = layer.weight
        self.log_sigma2 = nn.Parameter(torch.full_like(w.detach(), float(init_log_sigma2)))

    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, weight, bias)
        return self.layer._conv_forward(x, weight, bias)

    def log_alpha(self) -> torch.Tensor:
        return log_alpha(self.layer.weight, self.log_sigma2)

    def kl(self) -> torch.Tensor:
        """Summed KL of the layer's weights (pruned-by-mask entries excluded)."""
        kl = kl_approx(self.log_alpha())
        mask = get_mask(self.layer)
        return kl[mask].sum() if mask is not None else kl.sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        theta = self.layer.weight
        if not self.training:
            w = torch.where(keep_mask(self.log_alpha(), self.threshold), theta, torch.zeros((), dtype=theta.dtype, device=theta.device))
            return self._op(x, w, self.layer.bias)
        mean = self._op(x, theta, self.layer.bias)
        sigma2 = torch.exp(self.log_sigma2)
        mask = get_mask(self.layer)
        if mask is not None:
            sigma2 = sigma2 * mask
        var = self._op(x * x, sigma2, None)
        return mean + torch.sqrt(var + 1e-8) * torch.randn_like(mean)


# --------------------------------------------------------------------------------------- config


@register("variational_dropout", family="prune")
@dataclass
class VariationalDropoutConfig(BaseConfig):
    """Sparse variational dropout: per-weight log sigma^2, pruned at log alpha > threshold (Molchanov et al. 2017).

    ``train`` is the variational training (Adam by default, as in the paper; ``weight_decay`` must be 0,
    the KL is the regulariser). ``kl_weight`` is the final beta; it rises linearly from 0 over the first
    ``anneal_epochs`` epochs. ``init_log_sigma2`` starts every weight almost deterministic.
    """

    threshold: float = 3.0
    init_log_sigma2: float = -10.0
    kl_weight: float = 1.0
    anneal_epochs: float = 5.0
    layers: list[str] | None = None
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, optimizer="adam", lr=1e-3, progress=False))

    def validate(self) -> None:
        check_range("threshold", self.threshold, *LOG_ALPHA_CLIP, lo_open=True, hi_open=True)
        if not math.isfinite(self.init_log_sigma2) or not -30.0 <= self.init_log_sigma2 <= 5.0:
            raise ConfigError("init_log_sigma2", f"must lie in [-30, 5], got {self.init_log_sigma2}")
        if not (math.isfinite(self.kl_weight) and self.kl_weight >= 0):
            raise ConfigError("kl_weight", f"must be a finite number >= 0, got {self.kl_weight}")
        if not (math.isfinite(self.anneal_epochs) and self.anneal_epochs >= 0):
            raise ConfigError("anneal_epochs", f"must be a finite number >= 0, got {self.anneal_epochs}")
        if self.train.weight_decay != 0:
            raise ConfigError("train.weight_decay", "must be 0: the KL term is the regulariser (a decay would pull theta to 0 and inflate alpha)")
        if self.train.epochs < 1:
            raise ConfigError("train.epochs", "must be at least 1: variational dropout is a training method")

    def check_model(self, model: nn.Module) -> None:
        for name, m in select_layers(model, self.layers).items():
            if not isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                raise ConfigError("layers", f"layer {name!r} is a {type(m).__name__}: variational dropout takes Linear and Conv1d/2d/3d")


@dataclass
class VariationalDropoutResult(PruneResult):
    """Per-layer sparsity after pruning at the threshold, the last epoch's mean KL per weight, and the
    validation error of each training epoch."""

    kl_per_weight: float = 0.0
    val_errors: list[float] = field(default_factory=list)


# ------------------------------------------------------------------------------ training pieces


class KLLoss:
    """``extra_loss`` of the Trainer: ``beta * sum_layers KL / N`` (the per-example share of the ELBO's KL)."""

    def __init__(self, layers: list[VariationalLayer], n_train: int, kl_weight: float):
        self.layers = layers
        self.n_train = max(1, int(n_train))
        self.kl_weight = kl_weight
        self.beta = 0.0

    def total_kl(self) -> torch.Tensor:
        return sum((v.kl() for v in self.layers), torch.zeros(()))

    def __call__(self, model, inputs, target, output) -> torch.Tensor:
        if self.beta == 0.0:
            return torch.zeros((), device=output.device)
        return self.beta * self.total_kl().to(output.device) / self.n_train


class KLAnnealing(Callback):
    """Linear warm-up of the KL weight: ``beta = kl_weight * min(1, step / (anneal_epochs * steps_per_epoch))``."""

    def __init__(self, loss: KLLoss, steps_per_epoch: int, anneal_epochs: float):
        self.loss = loss
        self.total = max(1.0, anneal_epochs * steps_per_epoch) if anneal_epochs > 0 else 0.0
        self.val_errors: list[float] = []

    def _set(self, step: int) -> None:
        frac = 1.0 if self.total == 0 else min(1.0, step / self.total)
        self.loss.beta = self.loss.kl_weight * frac

    def on_fit_start(self, trainer) -> None:
        self._set(trainer.global_step)

    def on_step_end(self, trainer, step: int) -> None:
        self._set(trainer.global_step)

    def on_epoch_end(self, trainer, epoch: int, stats) -> None:
        if stats.val_error is not None:
            self.val_errors.append(float(stats.val_error))
        with torch.no_grad():
            n = sum(int(v.log_sigma2.numel()) for v in self.loss.layers)
            kept = sum(int(keep_mask(v.log_alpha(), v.threshold).sum()) for v in self.loss.layers)
            log.info("variational dropout epoch %d: beta %.3f, kept %d of %d weights, val %s", epoch + 1,
                     self.loss.beta, kept, n, stats.val_error)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def wrap_(model: nn.Module, config: VariationalDropoutConfig) -> dict[str, VariationalLayer]:
    """Replace each chosen layer of ``model`` by a :class:`VariationalLayer` around it (in place)."""
    wrapped = {}
    for name, m in select_layers(model, config.layers).items():
        if not isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            raise ModelError(f"variational dropout: layer {name!r} is a {type(m).__name__}, not a Linear or Conv1d/2d/3d")
        v = VariationalLayer(m, config.init_log_sigma2, config.threshold)
        _set_module(model, name, v)
        wrapped[name] = v
    if not wrapped:
        raise ModelError("variational dropout: the model has no Linear or Conv layer to train")
    return wrapped


@torch.no_grad()
def unwrap_(model: nn.Module, wrapped: dict[str, VariationalLayer]) -> dict[str, float]:
    """Put the original layers back with ``weight = theta`` masked at ``log alpha <= threshold``;
    return each layer's sparsity."""
    sparsity = {}
    for name, v in wrapped.items():
        keep = keep_mask(v.log_alpha(), v.threshold)
        _set_module(model, name, v.layer)
        apply_mask(v.layer, keep)
        sparsity[name] = 1.0 - float((v.layer.weight != 0).float().mean())
    return sparsity


@handler(VariationalDropoutConfig)
def variational_dropout_prune(model: nn.Module, config: VariationalDropoutConfig, data: Any = None, task: Any = None) -> VariationalDropoutResult:
    """Train ``model`` with sparse variational dropout on ``data`` (a ``Splits``), then prune every weight
    whose ``log alpha`` exceeds the threshold, in place. Layers come back as their own modules, masked."""
    train = getattr(data, "train", None)
    if train is None:
        raise ConfigError("data", "variational dropout trains: pass a Splits (train and val)")
    val = getattr(data, "val", None)
    wrapped = wrap_(model, config)
    try:
        loss = KLLoss(list(wrapped.values()), len(train), config.kl_weight)
        steps = math.ceil(len(train) / config.train.batch_size)
        anneal = KLAnnealing(loss, steps, config.anneal_epochs)
        Trainer(model, config.train, task=task, extra_loss=loss, callbacks=[anneal]).fit(train, val)
        with torch.no_grad():
            n = sum(int(v.log_sigma2.numel()) for v in wrapped.values())
            kl = float(loss.total_kl()) / max(1, n)
    finally:
        sparsity = unwrap_(model, wrapped)
    return VariationalDropoutResult(sparsity, kl, anneal.val_errors)


__all__ = [
    "K1", "K2", "K3", "VariationalDropoutConfig", "VariationalDropoutResult", "VariationalLayer", "KLLoss", "KLAnnealing",
    "kl_approx", "log_alpha", "keep_mask", "variational_dropout_prune", "wrap_", "unwrap_",
]
