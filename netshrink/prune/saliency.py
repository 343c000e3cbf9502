"""First-order and trajectory saliencies: skeletonization, Karnin's sensitivity, first-order Taylor.

**Skeletonization** (Mozer & Smolensky, "Skeletonization: A Technique for Trimming the Fat from a
Network via Relevance Assessment", NeurIPS 1988). Each output unit ``i`` of a layer gets a gate
``α_i`` (its output is multiplied by ``α_i``); the relevance of the unit is the rise of the error when
it is removed, ``ρ_i = E(α_i = 0) − E(α_i = 1) ≈ −∂E/∂α_i |_{α=1}``, with the linear error
``E = Σ |t − o|`` (its derivative does not vanish as the quadratic error's does near a fit). Over
batches the estimate is smoothed as in the paper, ``ρ̂ ← 0.8 ρ̂ + 0.2 ρ`` (``decay``). The least
relevant units are removed whole.

**Karnin** ("A Simple Procedure for Pruning Back-Propagation Trained Neural Networks", IEEE TNN
1990). The sensitivity of a weight is accumulated during training,
``S = −Σ_n g(n) Δw(n) · w_f/(w_f − w_i)``, which for plain gradient descent (``Δw = −η g``) is
``S = Σ_n [Δw(n)]² · w_f / (η (w_f − w_i))``. :class:`KarninTracker` records it.

**First-order Taylor** (Molchanov, Tyree, Karras, Aila & Kautz, "Pruning Convolutional Neural
Networks for Resource Efficient Inference", ICLR 2017; Molchanov, Mallya, Tyree, Frosio & Kautz,
"Importance Estimation for Neural Network Pruning", CVPR 2019). Removing a weight changes the loss by
about ``−g w``; the importance is ``(g w)²`` per weight, ``(Σ_{k∈S} g_k w_k)²`` per output unit
``S``, each averaged over mini-batches.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Literal

import torch
from torch import nn
from torch.nn import functional as F

from .._layers import select_layers
from .._registry import handler, register
from ..config import check_range
from ..errors import ConfigError
from ..task import DEFAULT_TASK, IGNORE_INDEX, Inputs, Task, resolve_task
from ..train import Callback
from . import importance
from ._criteria import (
    DataConfig,
    LossName,
    ScoredConfig,
    apply_row_scores,
    apply_scores,
    at_least,
    device_of,
    eval_mode,
    is_regression,
    iter_batches,
    leaf,
    loss_fn,
    masked,
    requiring_grad,
    train_source,
)
from .magnitude import PruneResult

# ------------------------------------------------------------------------------ skeletonization


def l1_error(out: torch.Tensor, y: torch.Tensor, loss: LossName | None = "cross_entropy", task: Task | None = None) -> torch.Tensor:
    """The linear error of Mozer & Smolensky, ``E = mean_n Σ_k |t_nk − o_nk|``: for class logits
    (``cross_entropy``, or a task not scored by MSE) targets one-hot and outputs ``softmax(f)`` over
    the last axis, averaged over every scored position (a language model's ``(B, T, V)`` logits: each
    token, ``IGNORE_INDEX`` skipped); for ``mse`` (or a regression task) targets and outputs as given."""
    if is_regression(loss, task):
        return (y.to(out.dtype) - out).abs().reshape(out.shape[0], -1).sum(1).mean()
    logits, t = out.reshape(-1, out.shape[-1]), y.reshape(-1)
    keep = t != IGNORE_INDEX
    logits, t = logits[keep], t[keep]
    onehot = F.one_hot(t, logits.shape[-1]).to(logits.dtype)
    return (onehot - torch.softmax(logits, dim=-1)).abs().sum(-1).mean()


@contextlib.contextmanager
def unit_gates(layers: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Gates ``α`` (ones, requiring grad) on the output units of ``layers``: inside the block each
    layer's output is multiplied by its gate along the last dimension of a Linear (features) or
    dimension 1 of a convolution (channels). The gate acts before the activation that follows; for a
    ReLU that is the same as gating the unit's output, since ``relu(α z) = α relu(z)`` for ``α ≥ 0``."""
    gates: dict[str, torch.Tensor] = {}
    handles = []
    for name, m in layers.items():
        gate = torch.ones(m.weight.shape[0], device=m.weight.device, dtype=m.weight.dtype, requires_grad=True)
        gates[name] = gate

        def hook(_mod: nn.Module, _args: tuple, out: torch.Tensor, gate: torch.Tensor = gate) -> torch.Tensor:
            shape = [1] * out.dim()
            shape[-1 if isinstance(_mod, nn.Linear) or out.dim() == 1 else 1] = -1  # features last, channels at 1
            return out * gate.view(shape)

        handles.append(m.register_forward_hook(hook))
    try:
        yield gates
    finally:
        for h in handles:
            h.remove()


def skeleton_relevance(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: Iterable[tuple[Inputs | torch.Tensor, Any]],
    loss: LossName | None = None,
    decay: float = 0.8,
    task: Task | None = None,
) -> dict[str, torch.Tensor]:
    """Relevance ``ρ̂_i`` of every output unit of ``layers``: ``ρ = −∂E/∂α_i`` at ``α = 1`` for the
    linear error ``E`` (:func:`l1_error`) of each batch ``(inputs, target)``, smoothed
    ``ρ̂ ← decay·ρ̂ + (1 − decay)·ρ`` (the first batch initialises ``ρ̂``). A unit whose output
    reaches nothing gets exactly 0. ``task`` reads the model's output (classification when None)."""
    task = task or DEFAULT_TASK
    rel: dict[str, torch.Tensor] = {}
    with eval_mode(model), unit_gates(layers) as gates:
        for x, y in batches:
            names = list(gates)
            out = task.forward(model, Inputs.of(x))
            grads = torch.autograd.grad(l1_error(out, y, loss, task), [gates[n] for n in names], allow_unused=True)
            for n, g in zip(names, grads):
                r = -g.detach() if g is not None else torch.zeros_like(gates[n])
                rel[n] = r if n not in rel else decay * rel[n] + (1.0 - decay) * r
    if not rel:
        raise ConfigError("data", "the data yielded no batch")
    return rel


@register("skeletonization", family="prune")
@dataclass
class SkeletonizationConfig(DataConfig):
    """Skeletonization: remove the output units of least relevance −∂E/∂α (Mozer & Smolensky 1988).

    ``loss``: None (the task's outputs: class logits, or real values for a regression task),
    ``cross_entropy`` or ``mse``: which linear error :func:`l1_error` measures."""

    loss: LossName | None = None
    decay: float = 0.8
    prune_bias: bool = True

    def validate(self) -> None:
        super().validate()
        check_range("decay", self.decay, 0.0, 1.0, hi_open=True)


@handler(SkeletonizationConfig)
def skeletonization_prune(model: nn.Module, config: SkeletonizationConfig, data=None, task: Task | None = None) -> PruneResult:
    """Remove whole units (weight rows, and bias entries with ``prune_bias``): ``sparsity`` is the
    fraction of units of each layer (or of all layers, ``scope: global``) removed."""
    task = resolve_task(task)
    source = train_source(data, "skeletonization")
    layers = select_layers(model, config.layers)
    batches = iter_batches(source, config.batches, config.batch_size, config.seed, device_of(model), task)
    rel = skeleton_relevance(model, layers, batches, config.loss, config.decay, task)
    return apply_row_scores(layers, rel, config, config.prune_bias)


# --------------------------------------------------------------------------------------- Karnin


class KarninTracker(Callback):
    """Accumulates Karnin's sensitivity of the ``weight`` of ``layers`` of ``model`` during training.

    Create it before training (it records ``w_i``), then either call :meth:`step` after every
    ``optimizer.step()`` of your own loop, or pass it to the Trainer as a callback
    (``Trainer(model, cfg, callbacks=[tracker])``): it records each step at ``on_step_end``. Each step
    adds ``Δw²`` and ``g·Δw`` (``g`` the gradient the step used) per weight.
    """

    def __init__(self, model: nn.Module, layers: list[str] | None = None):
        self.layers = select_layers(model, layers)
        self.initial = {n: m.weight.detach().clone() for n, m in self.layers.items()}
        self._prev = {n: w.clone() for n, w in self.initial.items()}
        self.sum_sq_delta = {n: torch.zeros_like(w) for n, w in self.initial.items()}
        self.sum_grad_delta = {n: torch.zeros_like(w) for n, w in self.initial.items()}
        self.steps = 0
        self.grad_steps = 0

    @torch.no_grad()
    def step(self) -> None:
        """Record the change of every tracked weight since the last call (call after ``optimizer.step()``)."""
        with_grad = True
        for n, m in self.layers.items():
            w = m.weight.detach()
            delta = w - self._prev[n]
            self.sum_sq_delta[n] += delta.pow(2)
            g = leaf(m).grad
            if g is None:
                with_grad = False
            else:
                self.sum_grad_delta[n] += g.detach() * delta
            self._prev[n] = w.clone()
        self.steps += 1
        self.grad_steps += int(with_grad)

    def on_step_end(self, trainer: Any, step: int) -> None:
        """Trainer callback: record the step the optimizer just took."""
        self.step()

    def sensitivities(self, lr: float | None = None) -> dict[str, torch.Tensor]:
        """Karnin's ``S`` per weight, from the current weights as ``w_f``. With ``lr`` (plain SGD of
        step ``η``): ``Σ Δw² · w_f/(η(w_f − w_i))``. Without: the general ``−Σ g Δw · w_f/(w_f − w_i)``,
        valid for any optimizer, which needs the gradients of every step."""
        if self.steps == 0:
            raise ConfigError("data", "the Karnin tracker recorded no training step")
        out = {}
        for n, m in self.layers.items():
            final = m.weight.detach()
            if lr is not None:
                out[n] = importance.karnin_sensitivity(self.sum_sq_delta[n], self.initial[n], final, lr)
            else:
                if self.grad_steps != self.steps:
                    raise ConfigError("lr", "some steps were recorded without gradients: give the learning rate")
                out[n] = importance.karnin_sensitivity(-self.sum_grad_delta[n], self.initial[n], final, 1.0)
        return out


@register("karnin", family="prune")
@dataclass
class KarninConfig(ScoredConfig):
    """Karnin: remove the weights of least sensitivity accumulated during training (Karnin 1990).

    The handler takes a :class:`KarninTracker` as ``data``; given a data set instead, it first
    fine-tunes the model for ``epochs`` with plain SGD (``lr``, no momentum) while tracking."""

    epochs: int = 1
    lr: float = 0.01
    batch_size: int = 64
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        at_least("epochs", self.epochs, 1)
        check_range("lr", self.lr, 0.0, float("inf"), lo_open=True, hi_open=True)
        at_least("batch_size", self.batch_size, 1)


@handler(KarninConfig)
def karnin_prune(model: nn.Module, config: KarninConfig, data: Any = None, task: Task | None = None) -> PruneResult:
    """Mask the chosen layers by Karnin sensitivity, from a tracker or from a short tracked SGD run."""
    layers = select_layers(model, config.layers)
    if isinstance(data, KarninTracker):
        tracker = data
        missing = [n for n in layers if n not in tracker.layers or tracker.layers[n] is not layers[n]]
        if missing:
            raise ConfigError("layers", f"the Karnin tracker does not track layer {missing[0]!r} of this model")
        sens = tracker.sensitivities()
    else:
        from ..train import TrainConfig, Trainer

        source = train_source(data, "karnin")
        tracker = KarninTracker(model, list(layers))
        device = "cuda" if device_of(model).type == "cuda" else "cpu"  # the tracker's tensors live there
        train = TrainConfig(
            epochs=config.epochs, lr=config.lr, momentum=0.0, batch_size=config.batch_size, seed=config.seed,
            progress=False, device=device,
        )
        Trainer(model, train, task=task, callbacks=[tracker]).fit(source)
        sens = tracker.sensitivities(lr=config.lr)
    scores = {n: masked(sens[n], m) for n, m in layers.items()}
    return apply_scores(layers, scores, config)


# --------------------------------------------------------------------------------------- Taylor


def taylor_scores(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: Iterable[tuple[Inputs | torch.Tensor, Any]],
    granularity: Literal["weight", "channel"] = "weight",
    loss: LossName | None = None,
    task: Task | None = None,
) -> dict[str, torch.Tensor]:
    """First-order Taylor importance averaged over ``batches`` (gradients of each batch's mean loss:
    the task's, classification when None, unless ``loss`` names one): per weight ``(g w)²``
    (weight-shaped), or per output unit ``(Σ g w)²`` over its weights and bias (one score per row)."""
    task = task or DEFAULT_TASK
    lossf = loss_fn(loss, task)
    tensors: list[torch.Tensor] = []
    for m in layers.values():
        tensors.append(leaf(m))
        if granularity == "channel" and m.bias is not None:
            tensors.append(leaf(m, "bias"))
    sums: dict[str, torch.Tensor] = {}
    count = 0
    with eval_mode(model), requiring_grad(tensors):
        for x, y in batches:
            grads = iter(torch.autograd.grad(lossf(task.forward(model, Inputs.of(x)), y), tensors, allow_unused=True))
            for n, m in layers.items():
                gw = next(grads)
                gw = torch.zeros_like(m.weight) if gw is None else gw
                if granularity == "weight":
                    s = importance.taylor_weight(m.weight, gw)
                else:
                    gb = next(grads) if m.bias is not None else None
                    gb = torch.zeros_like(m.bias) if m.bias is not None and gb is None else gb
                    s = importance.taylor_group(m.weight, gw, m.bias, gb)
                sums[n] = sums[n] + s if n in sums else s
            count += 1
    if count == 0:
        raise ConfigError("data", "the data yielded no batch")
    return {n: s / count for n, s in sums.items()}


@register("taylor", family="prune")
@dataclass
class TaylorConfig(DataConfig):
    """First-order Taylor: remove weights of least (g·w)², or units of least (Σ g·w)² (Molchanov et al. 2017, 2019)."""

    granularity: Literal["weight", "channel"] = "weight"
    loss: LossName | None = None  # None: the task's loss
    prune_bias: bool = True


@handler(TaylorConfig)
def taylor_prune(model: nn.Module, config: TaylorConfig, data=None, task: Task | None = None) -> PruneResult:
    """Weight granularity: mask single weights. Channel granularity: remove whole output units
    (``sparsity`` = fraction of units), with their bias entries when ``prune_bias``. Scored on
    ``task``'s batches and loss (classification when None)."""
    task = resolve_task(task)
    source = train_source(data, "taylor")
    layers = select_layers(model, config.layers)
    batches = iter_batches(source, config.batches, config.batch_size, config.seed, device_of(model), task)
    scores = taylor_scores(model, layers, batches, config.granularity, config.loss, task)
    if config.granularity == "channel":
        return apply_row_scores(layers, scores, config, config.prune_bias)
    return apply_scores(layers, {n: masked(s, layers[n]) for n, s in scores.items()}, config)


__all__ = [
    "l1_error",
    "unit_gates",
    "skeleton_relevance",
    "SkeletonizationConfig",
    "skeletonization_prune",
    "KarninTracker",
    "KarninConfig",
    "karnin_prune",
    "taylor_scores",
    "TaylorConfig",
    "taylor_prune",
]
