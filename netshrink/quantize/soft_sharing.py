"""Soft weight-sharing (Ullrich, Meeds & Welling, "Soft Weight-Sharing for Neural Network Compression",
ICLR 2017).

A pretrained network is retrained under a Gaussian mixture prior over its weights,

    p(w) = prod_i sum_{j=0}^{J-1} pi_j N(w_i | mu_j, sigma_j^2),

whose means, variances and mixing proportions are learned with the weights by minimising

    L = -log p(T | X, w) / N  +  tau * ( -log p(w) - log p(sigma^2) ) / N        (N: training examples)

(the paper's ``L_E + tau L_C`` divided by N, so that the data term is the usual per-example loss). The
zero component is pinned: ``mu_0 = 0`` and ``pi_0`` fixed and large (0.999 by default), so most weights
are pulled to zero; the other ``J - 1`` proportions are ``(1 - pi_0) softmax(logits)``. Gamma
hyper-priors on the precisions ``lambda_j = 1 / sigma_j^2``,
``log p(lambda) = (a - 1) log lambda - b lambda + const``, keep the components from collapsing onto
single weights (a stronger one for the zero component).

After training, components that describe the same cluster are merged while the symmetric
Kullback-Leibler divergence of two Gaussians,
``KL(N_j||N_k) = log(sigma_k/sigma_j) + (sigma_j^2 + (mu_j - mu_k)^2) / (2 sigma_k^2) - 1/2``, summed both
ways, is below ``merge_kl`` (the merged component carries the summed proportion and the
proportion-weighted mean and variance). Each weight is then set to the mean of its most responsible
component, ``argmax_j pi_j N(w | mu_j, sigma_j^2)``: the zero component's weights become a pruning mask,
the others a per-layer codebook of the means a layer uses plus an index per weight — the storage of
k-means sharing (:func:`netshrink.quantize._sharing.apply_sharing`), so the packed file codes it with the
same sparse-position, codebook and Huffman streams, and a later fine-tuning trains the codebook.

During the retraining the prior is an ``extra_loss`` of the one :class:`~netshrink.train.Trainer`, and
its parameters have their own Adam optimizer stepped by a :class:`~netshrink.train.Callback`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._layers import select_layers
from .._registry import handler, register
from ..config import BaseConfig, check_range
from ..errors import ConfigError, ModelError
from ..prune._mask import apply_mask, get_mask
from ..train import Callback, TrainConfig, Trainer
from ._sharing import apply_sharing, get_sharing

log = logging.getLogger(__name__)

_LOG_2PI = math.log(2.0 * math.pi)


# ----------------------------------------------------------------------------------------- math


def mixture_log_prob(w: torch.Tensor, means: torch.Tensor, log_var: torch.Tensor, log_pi: torch.Tensor) -> torch.Tensor:
    """``log sum_j pi_j N(w | mu_j, sigma_j^2)`` for every entry of ``w`` (flattened), by logsumexp."""
    w = w.reshape(-1, 1)
    comp = log_pi - 0.5 * (_LOG_2PI + log_var) - 0.5 * (w - means) ** 2 / torch.exp(log_var)
    return torch.logsumexp(comp, dim=1)


def responsibilities_argmax(w: torch.Tensor, means: torch.Tensor, log_var: torch.Tensor, log_pi: torch.Tensor) -> torch.Tensor:
    """Index of the most responsible component of every entry of ``w`` (flattened)."""
    w = w.reshape(-1, 1)
    comp = log_pi - 0.5 * log_var - 0.5 * (w - means) ** 2 / torch.exp(log_var)
    return comp.argmax(dim=1)


def gamma_log_prob(precision: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """``(a - 1) log lambda - b lambda`` (the Gamma(a, b) log density up to its constant)."""
    return (a - 1.0) * torch.log(precision) - b * precision


def gaussian_kl(mu1: float, var1: float, mu2: float, var2: float) -> float:
    """``KL(N(mu1, var1) || N(mu2, var2))``."""
    return 0.5 * math.log(var2 / var1) + (var1 + (mu1 - mu2) ** 2) / (2.0 * var2) - 0.5


@dataclass
class Mixture:
    """A 1-D Gaussian mixture: component 0 is the zero component (``means[0] == 0``)."""

    means: list[float]
    variances: list[float]
    mixing: list[float]


def merge_components(mix: Mixture, threshold: float) -> Mixture:
    """Merge the closest pair (symmetric KL) while it is below ``threshold``; the zero component absorbs
    its partner and keeps ``mu = 0``. Proportion-weighted mean and variance, summed proportion."""
    means, var, pi = list(mix.means), list(mix.variances), list(mix.mixing)
    while len(means) > 1:
        best, pair = math.inf, None
        for i in range(len(means)):
            for j in range(i + 1, len(means)):
                d = gaussian_kl(means[i], var[i], means[j], var[j]) + gaussian_kl(means[j], var[j], means[i], var[i])
                if d < best:
                    best, pair = d, (i, j)
        if pair is None or best >= threshold:
            break
        i, j = pair
        p = pi[i] + pi[j]
        mu = 0.0 if i == 0 else (pi[i] * means[i] + pi[j] * means[j]) / p
        v = (pi[i] * var[i] + pi[j] * var[j]) / p
        means[i], var[i], pi[i] = mu, v, p
        del means[j], var[j], pi[j]
    return Mixture(means, var, pi)


# ---------------------------------------------------------------------------------------- prior


class GaussianMixturePrior(nn.Module):
    """The learned prior: ``J - 1`` free means, ``J`` log-variances, ``J - 1`` mixing logits; ``mu_0 = 0``
    and ``pi_0`` fixed."""

    def __init__(self, components: int, zero_mixing: float, lo: float, hi: float, init_std: float):
        super().__init__()
        self.zero_mixing = zero_mixing
        self.means = nn.Parameter(torch.linspace(lo, hi, components - 1, dtype=torch.float32))
        self.log_var = nn.Parameter(torch.full((components,), 2.0 * math.log(init_std), dtype=torch.float32))
        self.logits = nn.Parameter(torch.zeros(components - 1, dtype=torch.float32))

    def all_means(self) -> torch.Tensor:
        return torch.cat([torch.zeros(1, dtype=self.means.dtype, device=self.means.device), self.means])

    def log_pi(self) -> torch.Tensor:
        rest = math.log(1.0 - self.zero_mixing) + torch.log_softmax(self.logits, dim=0)
        return torch.cat([torch.full((1,), math.log(self.zero_mixing), dtype=rest.dtype, device=rest.device), rest])

    def log_prob(self, w: torch.Tensor) -> torch.Tensor:
        """``sum_i log p(w_i)``."""
        return mixture_log_prob(w, self.all_means(), self.log_var, self.log_pi()).sum()

    @torch.no_grad()
    def mixture(self) -> Mixture:
        return Mixture(self.all_means().tolist(), torch.exp(self.log_var).tolist(), torch.exp(self.log_pi()).tolist())


# --------------------------------------------------------------------------------------- config


@register("soft_sharing", family="quantize")
@dataclass
class SoftSharingConfig(BaseConfig):
    """Soft weight-sharing: retrain under a learned Gaussian mixture prior, merge, quantize to the means (Ullrich et al. 2017).

    ``components`` counts the zero component (17: 16 free means + zero, as in the paper). ``tau`` weighs
    the prior against the data (per example, see the module docstring). ``zero_gamma`` / ``gamma`` are the
    (a, b) of the Gamma hyper-priors on the precisions. ``means_lr``, ``variance_lr`` and ``mixing_lr`` are
    the Adam learning rates of the prior's parameters; ``train`` is the retraining of the weights.
    ``init_std`` (None: a quarter of the spacing of the initial means) is every component's initial std.
    """

    components: int = 17
    zero_mixing: float = 0.999
    tau: float = 5e-3
    zero_gamma: list[float] = field(default_factory=lambda: [5000.0, 2.0])
    gamma: list[float] = field(default_factory=lambda: [250.0, 0.1])
    init_std: float | None = None
    means_lr: float = 1e-4
    variance_lr: float = 3e-3
    mixing_lr: float = 3e-3
    merge_kl: float = 1.0
    layers: list[str] | None = None
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, optimizer="adam", lr=5e-4, batch_size=128, progress=False))

    def validate(self) -> None:
        check_range("components", self.components, 2, 4096)
        check_range("zero_mixing", self.zero_mixing, 0.0, 1.0, lo_open=True, hi_open=True)
        for name in ("tau", "means_lr", "variance_lr", "mixing_lr"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(name, f"must be a finite number >= 0, got {v}")
        if not (math.isfinite(self.merge_kl) and self.merge_kl >= 0):
            raise ConfigError("merge_kl", f"must be a finite number >= 0, got {self.merge_kl}")
        for name in ("zero_gamma", "gamma"):
            ab = getattr(self, name)
            if len(ab) != 2 or not all(math.isfinite(x) and x > 0 for x in ab):
                raise ConfigError(name, f"expected [a, b], two positive numbers, got {ab!r}")
        if self.init_std is not None and not (math.isfinite(self.init_std) and self.init_std > 0):
            raise ConfigError("init_std", f"must be a finite number > 0, got {self.init_std}")
        if self.train.weight_decay != 0:
            raise ConfigError("train.weight_decay", "must be 0: the mixture prior is the regulariser")

    def check_model(self, model: nn.Module) -> None:
        select_layers(model, self.layers)


@dataclass
class SoftSharingResult:
    """Per layer: the distinct non-zero values kept (its codebook size) and the fraction of zeros; the
    mixture after training and after merging; the validation error of each retraining epoch."""

    clusters: dict[str, int]
    sparsity: dict[str, float]
    trained: Mixture
    merged: Mixture
    val_errors: list[float] = field(default_factory=list)


# ------------------------------------------------------------------------------ training pieces


class PriorLoss:
    """``extra_loss``: ``tau * (-log p(w) - log p(lambda)) / N`` over the chosen layers' kept weights."""

    def __init__(self, prior: GaussianMixturePrior, layers: dict[str, nn.Module], config: SoftSharingConfig, n_train: int):
        self.prior = prior
        self.layers = layers
        self.config = config
        self.scale = config.tau / max(1, int(n_train))
        self.n_pruned = self.pruned_count()

    def weights(self) -> torch.Tensor:
        """The kept (unmasked) weights of the chosen layers, flattened."""
        parts = []
        for m in self.layers.values():
            w = m.weight
            mask = get_mask(m)
            parts.append(w[mask] if mask is not None else w.reshape(-1))
        return torch.cat(parts)

    def pruned_count(self) -> int:
        """How many weights an earlier pruning mask holds at exactly 0."""
        return sum(int((~mask).sum()) for mask in (get_mask(m) for m in self.layers.values()) if mask is not None)

    def complexity(self) -> torch.Tensor:
        """``-(sum_i log p(w_i) + log p(lambda))``. Weights already pruned are zeros under the prior too
        (counted as ``n_pruned * log p(0)``, without touching them): they keep the zero component narrow,
        as the paper's pruned weights do, so that the kept ones are not absorbed by it."""
        p = self.prior
        precision = torch.exp(-p.log_var)
        (a0, b0), (a, b) = self.config.zero_gamma, self.config.gamma
        hyper = gamma_log_prob(precision[:1], a0, b0).sum() + gamma_log_prob(precision[1:], a, b).sum()
        log_p = p.log_prob(self.weights())
        if self.n_pruned:
            log_p = log_p + self.n_pruned * p.log_prob(torch.zeros(1, device=p.means.device))
        return -(log_p + hyper)

    def __call__(self, model, inputs, target, output) -> torch.Tensor:
        return self.scale * self.complexity().to(output.device)


class PriorStep(Callback):
    """Steps the prior's own optimizer after every weight update, and logs the mixture per epoch."""

    def __init__(self, prior: GaussianMixturePrior, config: SoftSharingConfig):
        self.prior = prior
        self.optimizer = torch.optim.Adam(
            [
                {"params": [prior.means], "lr": config.means_lr},
                {"params": [prior.log_var], "lr": config.variance_lr},
                {"params": [prior.logits], "lr": config.mixing_lr},
            ]
        )
        self.val_errors: list[float] = []

    def on_fit_start(self, trainer) -> None:
        self.prior.to(next(trainer.model.parameters()).device)
        self.optimizer.zero_grad(set_to_none=True)

    def on_step_end(self, trainer, step: int) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def on_epoch_end(self, trainer, epoch: int, stats) -> None:
        if stats.val_error is not None:
            self.val_errors.append(float(stats.val_error))
        mix = self.prior.mixture()
        log.info("soft sharing epoch %d: val %s, means %s, std %s", epoch + 1, stats.val_error,
                 [round(m, 4) for m in mix.means], [round(math.sqrt(v), 4) for v in mix.variances])


@torch.no_grad()
def quantize_to_mixture_(layers: dict[str, nn.Module], mix: Mixture) -> tuple[dict[str, int], dict[str, float]]:
    """Set every weight to the mean of its most responsible component: zero-component weights are masked,
    the rest shared through a per-layer codebook of the means that layer uses."""
    means = torch.tensor(mix.means, dtype=torch.float64)
    log_var = torch.log(torch.tensor(mix.variances, dtype=torch.float64))
    log_pi = torch.log(torch.tensor(mix.mixing, dtype=torch.float64))
    clusters, sparsity = {}, {}
    for name, m in layers.items():
        w = m.weight.detach()
        old = get_mask(m)
        comp = responsibilities_argmax(w.double().cpu(), means, log_var, log_pi).reshape(w.shape)
        keep = comp != 0
        if old is not None:
            keep &= old.cpu()
        used = sorted(set(comp[keep].tolist()))
        if not used:  # every weight went to zero: the layer is all-pruned, which the mask says
            apply_mask(m, keep.to(w.device))
            clusters[name], sparsity[name] = 0, 1.0
            continue
        lut = torch.zeros(len(mix.means), dtype=torch.long)
        lut[torch.tensor(used)] = torch.arange(len(used))
        codebook = means[torch.tensor(used)].to(torch.float32)
        indices = torch.where(keep, lut[comp], torch.zeros((), dtype=torch.long))
        apply_mask(m, keep.to(w.device))
        apply_sharing(m, codebook, indices.to(w.device))
        clusters[name] = len(used)
        sparsity[name] = 1.0 - float(keep.float().mean())
    return clusters, sparsity


@handler(SoftSharingConfig)
def soft_sharing(model: nn.Module, config: SoftSharingConfig, data: Any = None, task: Any = None) -> SoftSharingResult:
    """Retrain ``model`` on ``data`` (a ``Splits``) under the mixture prior, merge the components, and
    quantize every chosen layer's weights to their component means, in place (see the module docstring)."""
    train = getattr(data, "train", None)
    if train is None:
        raise ConfigError("data", "soft weight-sharing retrains: pass a Splits (train and val)")
    layers = select_layers(model, config.layers)
    for name, m in layers.items():
        if get_sharing(m) is not None:
            raise ModelError(f"soft weight-sharing: layer {name!r} is already weight-shared; run soft_sharing before kmeans")
    if not layers:
        raise ModelError("soft weight-sharing: the model has no Linear or Conv layer")
    with torch.no_grad():
        flat = PriorLoss(None, layers, config, 1).weights()  # type: ignore[arg-type]  (no prior needed for the weights)
        if flat.numel() == 0:
            raise ModelError("soft weight-sharing: every weight of the chosen layers is pruned already")
        lo, hi = float(flat.min()), float(flat.max())
    spacing = (hi - lo) / max(1, config.components - 2)
    init_std = config.init_std if config.init_std is not None else max(spacing / 4.0, 1e-4)
    prior = GaussianMixturePrior(config.components, config.zero_mixing, lo, hi, init_std)
    loss = PriorLoss(prior, layers, config, len(train))
    step = PriorStep(prior, config)
    if config.train.epochs > 0:
        Trainer(model, config.train, task=task, extra_loss=loss, callbacks=[step]).fit(train, getattr(data, "val", None))
    trained = prior.mixture()
    merged = merge_components(trained, config.merge_kl)
    clusters, sparsity = quantize_to_mixture_(layers, merged)
    log.info("soft sharing: %d components -> %d after merging; clusters per layer %s", len(trained.means), len(merged.means), clusters)
    return SoftSharingResult(clusters, sparsity, trained, merged, step.val_errors)


__all__ = [
    "GaussianMixturePrior", "Mixture", "PriorLoss", "PriorStep", "SoftSharingConfig", "SoftSharingResult",
    "gamma_log_prob", "gaussian_kl", "merge_components", "mixture_log_prob", "quantize_to_mixture_",
    "responsibilities_argmax", "soft_sharing",
]
