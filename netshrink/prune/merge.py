"""Data-free neuron merging (Srinivas & Babu, "Data-free Parameter Pruning for Deep Neural
Networks", BMVC 2015).

In a pair ``Linear(W, b) → ReLU → Linear(A)``, two hidden neurons ``i`` and ``j`` whose incoming
weight vectors (bias included) are equal have equal outputs ``h_i = h_j``, so neuron ``j`` can be
dropped exactly by adding its outgoing weights to neuron ``i``'s, ``a_i ← a_i + a_j``. When they are
only close, the expected change of the next layer's output is bounded through the saliency

    s_ij = ⟨a_j²⟩ ‖W_i − W_j‖²

(``⟨a_j²⟩`` the mean of ``a_j²`` over the next layer's outputs). :func:`plan_merges` repeatedly merges
the pair of least saliency (recomputing it, since ``a_i`` grew); :func:`merge_linear_pair` builds the
new, smaller layers; the ``merge`` method swaps them into the model. No data is needed. The
activation between the two layers must act elementwise (ReLU, and any ``φ`` with ``φ(z_i) = φ(z_j)``
when ``z_i = z_j``) and nothing else (no normalisation) may sit between them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._modules import register_module, replace_module
from .._registry import handler, register
from ..config import BaseConfig, check_range
from ..errors import ConfigError
from . import importance
from ._mask import apply_mask, get_mask


@register_module("merged_linear")
class MergedLinear(nn.Linear):
    """An ``nn.Linear`` made by neuron merging (a registered module type, so a packed model rebuilds)."""

    def netshrink_args(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}


@dataclass(frozen=True)
class MergeDecision:
    """Neuron ``removed`` was merged into neuron ``kept`` (indices in the layer as it was) at ``saliency``."""

    kept: int
    removed: int
    saliency: float


@dataclass
class MergePlan:
    """The merges in the order made, and the surviving neurons (original indices, ascending).
    With no decisions, applying a plan simply removes the neurons not in ``keep``."""

    decisions: list[MergeDecision]
    keep: list[int]


@dataclass
class MergeResult:
    """What the ``merge`` method did: each first layer's width before and after, and its plan."""

    widths: dict[str, tuple[int, int]] = field(default_factory=dict)
    plans: dict[str, MergePlan] = field(default_factory=dict)


def incoming_vectors(layer: nn.Linear) -> torch.Tensor:
    """Rows ``W_i = [w_i, b_i]``: each neuron's incoming weights with its bias appended."""
    w = layer.weight.detach()
    if layer.bias is None:
        return w.clone()
    return torch.cat([w, layer.bias.detach()[:, None]], dim=1)


def plan_merges(incoming: torch.Tensor, outgoing: torch.Tensor, count: int) -> MergePlan:
    """Choose ``count`` merges greedily by least saliency ``s_ij = ⟨a_j²⟩ ‖W_i − W_j‖²``.

    ``incoming`` is ``(h, fan_in)`` (see :func:`incoming_vectors`), ``outgoing`` the next layer's
    weight ``(fan_out, h)``. After merging ``j`` into ``i``, ``a_i ← a_i + a_j`` and ``j`` leaves the
    candidates; the distances stay (``W_i`` does not change). Ties go to the lowest ``(i, j)``.
    """
    h = incoming.shape[0]
    if outgoing.shape[1] != h:
        raise ValueError(f"outgoing weight has {outgoing.shape[1]} inputs, the layer has {h} neurons")
    if not 0 <= count < h:
        raise ValueError(f"can merge 0 to {h - 1} of {h} neurons, not {count}")
    dist = importance.merge_saliency(incoming, torch.ones(h, 1))  # ‖W_i − W_j‖², +inf on the diagonal
    a = outgoing.detach().to(torch.float64).T.clone().cpu()
    dist = dist.cpu()
    alive = torch.ones(h, dtype=torch.bool)
    decisions: list[MergeDecision] = []
    for _ in range(count):
        s = dist * a.pow(2).mean(1)[None, :]
        s[~alive, :] = float("inf")
        s[:, ~alive] = float("inf")
        flat = int(torch.argmin(s))
        i, j = divmod(flat, h)
        decisions.append(MergeDecision(i, j, float(s[i, j])))
        a[i] += a[j]
        alive[j] = False
    return MergePlan(decisions, alive.nonzero().flatten().tolist())


def _new_linear(in_features: int, out_features: int, like: nn.Linear) -> MergedLinear:
    ref = like.weight
    return MergedLinear(in_features, out_features, bias=like.bias is not None, device=ref.device, dtype=ref.dtype)


def merged_masks(first: nn.Linear, second: nn.Linear, plan: MergePlan) -> dict[tuple[int, str], torch.Tensor]:
    """The masks of the merged pair, keyed ``(0 or 1, "weight" or "bias")`` for ``first'``/``second'``:
    ``first'`` keeps the rows of ``plan.keep``; a column of ``second'`` that absorbed others keeps the
    union of their masks (a merged column is non-zero wherever any of them was)."""
    keep = torch.tensor(plan.keep, dtype=torch.long)
    out: dict[tuple[int, str], torch.Tensor] = {}
    for name in ("weight", "bias"):
        mask = get_mask(first, name)
        if mask is not None:
            out[(0, name)] = mask[keep.to(mask.device)].clone()
    mask = get_mask(second, "bias")
    if mask is not None:
        out[(1, "bias")] = mask.clone()
    mask = get_mask(second)
    if mask is not None:
        cols = mask.T.clone()
        for d in plan.decisions:
            cols[d.kept] |= cols[d.removed]
        out[(1, "weight")] = cols[keep.to(cols.device)].T.contiguous()
    return out


@torch.no_grad()
def merge_linear_pair(
    first: nn.Linear, second: nn.Linear, plan: MergePlan, masks: bool = True
) -> tuple[MergedLinear, MergedLinear]:
    """New ``(first', second')`` with only ``plan.keep`` neurons: ``first'`` keeps their rows (and
    biases), ``second'`` their columns after each merge ``(i ← j)`` added column ``j`` into column
    ``i``, in order. With ``masks``, the pruning masks carry over (:func:`merged_masks`); leave them off
    to swap the modules in first (a parametrized module is of another class) and mask afterwards."""
    keep = torch.tensor(plan.keep, dtype=torch.long, device=first.weight.device)
    a = second.weight.detach().T.clone()
    for d in plan.decisions:
        a[d.kept] += a[d.removed]
    new1 = _new_linear(first.in_features, len(plan.keep), first)
    new1.weight.copy_(first.weight.detach()[keep])
    if first.bias is not None:
        new1.bias.copy_(first.bias.detach()[keep])
    new2 = _new_linear(len(plan.keep), second.out_features, second)
    new2.weight.copy_(a[keep.to(a.device)].T)
    if second.bias is not None:
        new2.bias.copy_(second.bias.detach())
    if masks:
        _apply_masks((new1, new2), merged_masks(first, second, plan))
    return new1, new2


def _apply_masks(pair: tuple[nn.Module, nn.Module], masks: dict[tuple[int, str], torch.Tensor]) -> None:
    for (which, name), mask in masks.items():
        apply_mask(pair[which], mask.to(getattr(pair[which], name).device), name)


@register("merge", family="prune")
@dataclass
class MergeConfig(BaseConfig):
    """Data-free neuron merging: merge the hidden neurons of least ⟨a_j²⟩‖W_i − W_j‖² (Srinivas & Babu 2015).

    ``pairs`` maps each first Linear layer to the Linear that reads its (activated) outputs, e.g.
    ``{"fc1": "fc2"}``; ``neurons`` (a count per first layer) or ``fraction`` (of its width) says
    how many of its neurons go."""

    pairs: dict[str, str] = field(default_factory=dict)
    neurons: int | None = None
    fraction: float | None = None

    def validate(self) -> None:
        if not self.pairs:
            raise ConfigError("pairs", "required: map each first layer to its next layer, e.g. {fc1: fc2}")
        if (self.neurons is None) == (self.fraction is None):
            raise ConfigError("neurons", "give neurons or fraction (exactly one)")
        if self.neurons is not None and self.neurons < 0:
            raise ConfigError("neurons", f"must be >= 0, got {self.neurons}")
        if self.fraction is not None:
            check_range("fraction", self.fraction, 0.0, 1.0, hi_open=True)

    def count(self, width: int) -> int:
        return self.neurons if self.neurons is not None else int(round(float(self.fraction) * width))

    def check_model(self, model: nn.Module) -> None:
        for first in self.pairs:
            self.pair_layers(model, first)

    def pair_layers(self, model: nn.Module, first: str) -> tuple[nn.Linear, nn.Linear]:
        """The modules of the pair ``first -> pairs[first]``, checked (Linear, widths that fit)."""
        second = self.pairs[first]
        modules = dict(model.named_modules())
        for name in (first, second):
            if not isinstance(modules.get(name), nn.Linear):
                raise ConfigError(f"pairs.{first}", f"{name!r} is not a Linear layer of the model")
        a, b = modules[first], modules[second]
        if a.out_features != b.in_features:
            raise ConfigError(f"pairs.{first}", f"{first} has {a.out_features} outputs but {second} takes {b.in_features}")
        if self.count(a.out_features) >= a.out_features:
            field_name = "neurons" if self.neurons is not None else "fraction"
            raise ConfigError(field_name, f"would remove all of {first}'s {a.out_features} neurons")
        return a, b


@handler(MergeConfig)
def merge_prune(model: nn.Module, config: MergeConfig, data: Any = None) -> MergeResult:
    """Merge neurons of each pair in order and swap the smaller layers into ``model`` (recorded as
    edits, so a packed model rebuilds its architecture). ``data`` is not used."""
    res = MergeResult()
    for first_name, second_name in config.pairs.items():
        first, second = config.pair_layers(model, first_name)  # looked up afresh: an earlier pair may have replaced them
        h = first.out_features
        plan = plan_merges(incoming_vectors(first), second.weight.detach(), config.count(h))
        masks = merged_masks(first, second, plan)
        new1, new2 = merge_linear_pair(first, second, plan, masks=False)
        replace_module(model, first_name, new1)
        replace_module(model, second_name, new2)
        _apply_masks((new1, new2), masks)
        res.widths[first_name] = (h, len(plan.keep))
        res.plans[first_name] = plan
    return res


__all__ = [
    "MergedLinear",
    "MergeDecision",
    "MergePlan",
    "MergeResult",
    "incoming_vectors",
    "plan_merges",
    "merge_linear_pair",
    "merged_masks",
    "MergeConfig",
    "merge_prune",
]
