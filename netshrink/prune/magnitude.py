"""Magnitude pruning (Han et al., NeurIPS 2015; the first stage of Deep Compression, ICLR 2016).

Weights of small magnitude are removed. Three ways to say how many:

- ``quality``: per-layer threshold ``t_l = quality_l * std(W_l)`` — the rule of Han et al. 2015
  (the std is taken over the layer's surviving weights);
- ``sparsity`` with ``scope: layer``: each layer keeps its ``1 - s_l`` largest |w|;
- ``sparsity`` with ``scope: global``: one threshold over all chosen layers.

``steps > 1`` prunes iteratively (prune, fine-tune, prune more ...): survivors shrink by the same
factor each round, ``keep_k = (1 - s) ** (k / steps)``; the recipe runner fine-tunes after each round.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from .._attention import converted_copy, prepare
from .._coverage import Coverage, plan_coverage
from .._layers import ALL_KINDS, LayerPlan, per_layer, plan_layers
from .._registry import handler, register
from ..config import BaseConfig, check_range
from ..errors import ConfigError
from . import importance
from ._mask import apply_mask, follow_parametrization, get_mask
from ._select import geometric_schedule, global_masks, layer_masks, threshold_masks


@register("magnitude", family="prune")
@dataclass
class MagnitudeConfig(BaseConfig):
    """Magnitude pruning: remove the smallest |w| (Han et al. 2015)."""

    sparsity: float | None = None
    quality: float | None = None
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    layer_quality: dict[str, float] = field(default_factory=dict)
    scope: Literal["layer", "global"] = "layer"
    layers: list[str] | None = None
    steps: int = 1

    def validate(self) -> None:
        if self.sparsity is not None and self.quality is not None:
            raise ConfigError("quality", "give sparsity or quality, not both")
        if self.sparsity is None and self.quality is None and not (self.layer_sparsity or self.layer_quality):
            raise ConfigError("sparsity", "required: give sparsity, quality, layer_sparsity or layer_quality")
        if self.layer_sparsity and self.layer_quality:
            raise ConfigError("layer_quality", "give layer_sparsity or layer_quality, not both")
        if self.sparsity is not None:
            check_range("sparsity", self.sparsity, 0.0, 1.0, hi_open=True)
        for name, s in self.layer_sparsity.items():
            check_range(f"layer_sparsity.{name}", s, 0.0, 1.0, hi_open=True)
        if self.quality is not None:
            check_range("quality", self.quality, 0.0, 100.0)
        for name, q in self.layer_quality.items():
            check_range(f"layer_quality.{name}", q, 0.0, 100.0)
        if self.scope == "global" and (self.layer_sparsity or self.layer_quality or self.quality is not None):
            raise ConfigError("scope", "scope 'global' takes one sparsity and no per-layer settings")
        if self.steps < 1:
            raise ConfigError("steps", f"must be at least 1, got {self.steps}")

    @property
    def by_quality(self) -> bool:
        return self.quality is not None or bool(self.layer_quality)

    def plan(self, model: nn.Module) -> LayerPlan:
        """The layers pruned (every Linear, ConvNd, ConvTranspose, GPT-2 Conv1D and Embedding weight,
        or those ``layers`` names) and why any other layer weight is not (see :func:`plan_layers`)."""
        return plan_layers(model, self.layers, "magnitude", kinds=ALL_KINDS)

    def check_model(self, model: nn.Module) -> None:
        layers = self.plan(converted_copy(model, self.layers)).layers
        per_layer(layers, self.layer_sparsity, 0.0, "layer_sparsity")
        per_layer(layers, self.layer_quality, 0.0, "layer_quality")

    def substages(self) -> list["MagnitudeConfig"]:
        if self.steps == 1:
            return [self]
        rounds = []
        for k, frac in enumerate(_round_fractions(self.steps), start=1):
            if self.by_quality:
                rounds.append(
                    dataclasses.replace(
                        self,
                        steps=1,
                        quality=None if self.quality is None else self.quality * frac,
                        layer_quality={n: q * frac for n, q in self.layer_quality.items()},
                    )
                )
            else:
                rounds.append(
                    dataclasses.replace(
                        self,
                        steps=1,
                        sparsity=None if self.sparsity is None else geometric_schedule(self.sparsity, self.steps)[k - 1],
                        layer_sparsity={n: geometric_schedule(s, self.steps)[k - 1] for n, s in self.layer_sparsity.items()},
                    )
                )
        return rounds


def _round_fractions(steps: int) -> list[float]:
    return [k / steps for k in range(1, steps + 1)]


@dataclass
class PruneResult:
    """Per-layer sparsity (fraction of zeros in the effective weight) after a pruning call, and what was
    done to each parameter (:class:`netshrink._coverage.Coverage`; None from methods that do not report it)."""

    sparsity: dict[str, float]
    coverage: Coverage | None = field(default=None, kw_only=True)

    @property
    def overall(self) -> float:
        return sum(self.sparsity.values()) / max(1, len(self.sparsity))


def _scores(layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in layers.items():
        s = importance.magnitude(m.weight).clone()
        mask = get_mask(m)
        if mask is not None:
            s[~mask] = -float("inf")
        out[name] = s
    return out


@handler(MagnitudeConfig)
@torch.no_grad()
def magnitude_prune(model: nn.Module, config: MagnitudeConfig, data=None) -> PruneResult:
    """Apply ``config`` to ``model`` in place (one round; the runner expands ``steps``).

    Every ``nn.MultiheadAttention`` in scope is first converted to separate q/k/v/out projections (said in
    ``result.coverage.notes``), so its packed ``in_proj_weight`` is pruned like any Linear. A weight tied to
    another (one storage) is pruned once: its layers share one mask. ``strict``: a skipped weight is an error.
    """
    notes = prepare(model, config.layers, "magnitude")
    plan = config.plan(model)
    plan.check_strict("magnitude", config.strict)
    layers = plan.layers
    scores = _scores(layers)
    if config.by_quality:
        quality = per_layer(layers, config.layer_quality, config.quality or 0.0, "layer_quality")
        thresholds = {}
        for n, m in layers.items():
            alive = m.weight[torch.isfinite(scores[n])]
            thresholds[n] = float(quality[n] * alive.std()) if alive.numel() > 1 else 0.0
        masks = threshold_masks(scores, thresholds)
    elif config.scope == "global":
        masks = global_masks(scores, float(config.sparsity))
    else:
        masks = layer_masks(scores, per_layer(layers, config.layer_sparsity, config.sparsity or 0.0, "layer_sparsity"))
    for n, m in layers.items():
        apply_mask(m, masks[n].to(m.weight.device))
        for alias in plan.aliases.get(n, ()):
            follow_parametrization(m, model.get_submodule(alias))
    sparsity = {n: 1.0 - float((m.weight != 0).float().mean()) for n, m in layers.items()}
    done = {f"{n}.weight": f"pruned by magnitude to {sparsity[n]:.1%} zeros" for n in layers}
    return PruneResult(sparsity, coverage=plan_coverage(model, "magnitude", done, plan, notes))
