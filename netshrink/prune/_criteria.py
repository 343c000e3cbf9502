"""Plumbing shared by the data-driven pruning criteria (OBD, OBS, skeletonization, Karnin, Taylor).

- :class:`ScoredConfig` / :class:`DataConfig`: the common config fields (sparsity, scope, layers;
  batches, batch size, seed) and their validation;
- turning the ``data`` argument of a handler (a ``Splits``, a Dataset, a DataLoader) into a bounded,
  seeded stream of batches;
- the leaf tensor that holds a (possibly masked) weight, and scores with masked entries at ``-inf``;
- applying weight-level or row-level (structured) keep-masks and reporting a :class:`PruneResult`.

Batches are read through a :class:`~netshrink.task.Task` (tuples, dicts, token tensors; the model's
output through its adapter) and the loss is the task's unless a criterion's ``loss`` names one.
Criteria that act while a model trains (Karnin's tracking, AGP) are :class:`netshrink.train.Callback`
objects, not optimizer hooks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal

import torch
from torch import nn

from .._layers import per_layer, select_layers
from ..config import BaseConfig, check_range
from ..errors import ConfigError, ModelError
from .._allocate import iter_batches, train_source
from ..task import DEFAULT_TASK, IGNORE_INDEX, Task
from ._mask import Mask, apply_mask, get_mask, parametrization_of
from ._select import global_masks, keep_count, layer_masks, topk_mask
from .magnitude import PruneResult

# ------------------------------------------------------------------------------------ configs


@dataclass
class ScoredConfig(BaseConfig):
    """Fields of every score-then-mask criterion: how much to prune and where (as in magnitude)."""

    sparsity: float | None = None
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    scope: Literal["layer", "global"] = "layer"
    layers: list[str] | None = None

    def validate(self) -> None:
        if self.sparsity is None and not self.layer_sparsity:
            raise ConfigError("sparsity", "required: give sparsity or layer_sparsity")
        if self.sparsity is not None:
            check_range("sparsity", self.sparsity, 0.0, 1.0, hi_open=True)
        for name, s in self.layer_sparsity.items():
            check_range(f"layer_sparsity.{name}", s, 0.0, 1.0, hi_open=True)
        if self.scope == "global" and (self.layer_sparsity or self.sparsity is None):
            raise ConfigError("scope", "scope 'global' takes one sparsity and no per-layer settings")

    def check_model(self, model: nn.Module) -> None:
        per_layer(select_layers(model, self.layers), self.layer_sparsity, 0.0, "layer_sparsity")


@dataclass
class DataConfig(ScoredConfig):
    """A criterion scored on data: ``batches`` batches of ``batch_size`` drawn with ``seed``."""

    batches: int = 4
    batch_size: int = 64
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        at_least("batches", self.batches, 1)
        at_least("batch_size", self.batch_size, 1)
        if not 0 <= self.seed < 2**63:
            raise ConfigError("seed", f"must lie in [0, 2**63), got {self.seed}")


def at_least(name: str, value: int, lo: int) -> None:
    if value < lo:
        raise ConfigError(name, f"must be >= {lo}, got {value}")


# --------------------------------------------------------------------------------------- data


#: the per-sample loss a criterion differentiates, averaged over a batch: ``cross_entropy`` (logits and
#: class indices over the last axis) or ``mse`` (``ℓ = ½‖f(x) − y‖²``, targets of the output's shape);
#: None (the default): the task's own loss
LossName = Literal["cross_entropy", "mse"]


def _token_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if out.dim() <= 2:
        return nn.functional.cross_entropy(out, y)
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), ignore_index=IGNORE_INDEX)


def _half_sq(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (out - y.to(out.dtype)).pow(2).reshape(out.shape[0], -1).sum(1).mean()


def loss_fn(name: str | None, task: Task | None = None) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """The batch-mean loss ``mean_n ℓ(f_n, y_n)`` a criterion differentiates: the task's loss (checked to
    be a scalar) when ``name`` is None; cross-entropy over the last axis (token positions of a
    language model's ``(B, T, V)`` logits too, ``IGNORE_INDEX`` skipped), or ``ℓ = ½‖f − y‖²`` for ``mse``."""
    if name == "mse":
        return _half_sq
    if name == "cross_entropy":
        return _token_ce
    return (task or DEFAULT_TASK).compute_loss


def raw_loss(name: str | None, task: Task | None = None) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """:func:`loss_fn` without the scalar check (for ``torch.func`` transforms)."""
    if name is None:
        return (task or DEFAULT_TASK).loss
    return loss_fn(name, task)


def is_regression(name: str | None, task: Task | None = None) -> bool:
    """Whether the criterion's loss compares real-valued outputs (``mse``, or a task scored by MSE)
    rather than class logits (for the sampled Fisher and the linear error of skeletonization)."""
    if name is not None:
        return name == "mse"
    return (task or DEFAULT_TASK).metric_name == "mse"


def device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside the block (no dropout, fixed BN statistics); each module's mode restored."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


# ------------------------------------------------------------------------------------ weights


def leaf(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The Parameter that holds ``module.name``: the ``original`` of a mask, else the plain tensor.

    Gradients with respect to it equal those of the effective weight on kept entries and are zero on
    masked ones. A weight-shared layer raises :class:`ModelError` (prune before sharing).
    """
    p = parametrization_of(module, name)
    if p is None:
        return getattr(module, name)
    if not isinstance(p, Mask):
        raise ModelError(f"{type(module).__name__}.{name} is weight-shared or quantized; prune before that")
    return module.parametrizations[name].original


@contextlib.contextmanager
def requiring_grad(tensors: list[torch.Tensor]) -> Iterator[None]:
    """Every tensor in ``tensors`` requires grad inside the block; the flags are restored after."""
    flags = [t.requires_grad for t in tensors]
    for t in tensors:
        t.requires_grad_(True)
    try:
        yield
    finally:
        for t, f in zip(tensors, flags):
            t.requires_grad_(f)


def masked(score: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``score`` (weight-shaped) with the already-pruned entries at ``-inf``: they stay pruned."""
    s = score.detach().to(torch.float32).clone()
    mask = get_mask(module)
    if mask is not None:
        s[~mask.to(s.device)] = -float("inf")
    return s


def sparsities(layers: dict[str, nn.Module], config: ScoredConfig) -> dict[str, float]:
    return per_layer(layers, config.layer_sparsity, config.sparsity or 0.0, "layer_sparsity")


def result(layers: dict[str, nn.Module]) -> PruneResult:
    return PruneResult({n: 1.0 - float((m.weight != 0).float().mean()) for n, m in layers.items()})


@torch.no_grad()
def apply_scores(layers: dict[str, nn.Module], scores: dict[str, torch.Tensor], config: ScoredConfig) -> PruneResult:
    """Keep the highest weight-level ``scores`` (masked entries at ``-inf``) per layer or globally."""
    if config.scope == "global":
        masks = global_masks(scores, float(config.sparsity))
    else:
        masks = layer_masks(scores, sparsities(layers, config))
    for n, m in layers.items():
        apply_mask(m, masks[n].to(m.weight.device))
    return result(layers)


@torch.no_grad()
def apply_row_scores(
    layers: dict[str, nn.Module], row_scores: dict[str, torch.Tensor], config: ScoredConfig, prune_bias: bool = True
) -> PruneResult:
    """Structured pruning: remove whole output units (rows of ``weight``, and their bias entries when
    ``prune_bias``) by their score; ``sparsity`` is the fraction of units removed. A unit whose weights
    are all masked already counts as removed."""
    rows: dict[str, torch.Tensor] = {}
    for n, m in layers.items():
        s = row_scores[n].detach().to(torch.float32).reshape(-1).clone()
        mask = get_mask(m)
        if mask is not None:
            s[~mask.reshape(mask.shape[0], -1).any(1).to(s.device)] = -float("inf")
        rows[n] = s
    if config.scope == "global":
        keep = global_masks(rows, float(config.sparsity))
    else:
        sp = sparsities(layers, config)
        keep = {n: topk_mask(s, keep_count(s.numel(), sp[n])) for n, s in rows.items()}
    for n, m in layers.items():
        k = keep[n].to(m.weight.device)
        apply_mask(m, k.view(-1, *([1] * (m.weight.dim() - 1))).expand_as(m.weight).clone())
        if prune_bias and getattr(m, "bias", None) is not None:
            apply_mask(m, k.clone(), name="bias")
    return result(layers)


__all__ = [
    "ScoredConfig",
    "DataConfig",
    "train_source",
    "iter_batches",
    "loss_fn",
    "leaf",
    "masked",
    "apply_scores",
    "apply_row_scores",
    "is_regression",
    "raw_loss",
]
