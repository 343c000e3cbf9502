"""Low-rank factorization of Linear layers: ``W ≈ U V`` by truncated SVD, and Denil's fixed-basis variants.

A Linear layer ``y = W x + b`` with ``W`` of shape ``(out, in)`` becomes two layers,
``y = U (V x) + b``, with ``U`` of shape ``(out, r)`` and ``V`` of shape ``(r, in)``: ``r (in + out)``
weights instead of ``in * out`` (Denil et al., "Predicting Parameters in Deep Learning", NeurIPS 2013;
the truncated-SVD form of Denton et al., NeurIPS 2014, and Jaderberg et al., BMVC 2014).

``train`` picks how the factors are found and trained:

- ``both``: ``U, V`` from the truncated SVD (optimal in Frobenius norm, Eckart & Young 1936); both train.
- ``fixed_identity``: ``V`` = ``r`` rows of the identity (the input coordinates of largest column
  norm of ``W``), fixed; ``U`` solved by least squares against ``W`` and trained (Denil et al. 2013 §3).
- ``fixed_random``: ``V`` Gaussian (seeded), fixed; ``U`` by least squares, trained (Denil et al. 2013).

A fixed factor is a buffer, not a parameter: an optimizer never sees it; it is still packed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import nn

from .._attention import converted_copy, prepare
from .._coverage import plan_coverage
from .._state import unique_parameters
from .._layers import CONV1D_GPT2, LINEAR, LayerPlan, layer_kind, per_layer
from .._modules import register_module, replace_module
from .._registry import handler, register
from ..config import BaseConfig
from ..errors import ConfigError, ModelError
from ._common import (
    FactorizeResult,
    LayerFactorization,
    bool_arg,
    linear_matrix,
    check_rank_fields,
    copy_into,
    energy_rank,
    layer_params,
    missing_rank,
    module_params,
    override_field,
    positive_int,
    ratio_rank,
    rel_error,
    target_plan,
)


@dataclass(frozen=True)
class LinearFactors:
    """``W ≈ u @ v`` with ``u`` of shape ``(out, r)`` and ``v`` of shape ``(r, in)``.

    ``singular_values`` is the whole spectrum of ``W`` (descending, float64), for error bounds.
    """

    u: torch.Tensor
    v: torch.Tensor
    singular_values: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.u.shape[1])

    def reconstruct(self) -> torch.Tensor:
        """``u @ v``, the rank-``r`` approximation of ``W``."""
        return self.u @ self.v

    @property
    def svd_error(self) -> float:
        """The relative Frobenius error of the best rank-``r`` approximation (Eckart & Young 1936):
        ``sqrt(sum_{i>r} s_i^2) / sqrt(sum_i s_i^2)``."""
        s2 = self.singular_values.to(torch.float64) ** 2
        total = float(s2.sum())
        return float(s2[self.rank :].sum() / total) ** 0.5 if total > 0 else 0.0


def _matrix(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() != 2:
        raise ModelError(f"expected a 2-D weight, got shape {list(weight.shape)}")
    return weight.detach().to(device="cpu", dtype=torch.float64)


def _check_rank(rank: int, weight: torch.Tensor) -> None:
    full = min(weight.shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
        raise ModelError(f"rank must be an integer in [1, {full}] for a {weight.shape[0]}x{weight.shape[1]} weight, got {rank!r}")


@torch.no_grad()
def svd_factors(weight: torch.Tensor, rank: int | None = None, *, energy: float | None = None) -> LinearFactors:
    """Truncated SVD ``W ≈ U_r S_r V_r^T``, split evenly: ``u = U_r S_r^{1/2}``, ``v = S_r^{1/2} V_r^T``.

    The rank is ``rank``, or with ``energy`` the smallest ``r`` keeping that fraction of ``sum s_i^2``
    (:func:`~netshrink.lowrank._common.energy_rank`). By Eckart & Young (1936) the result is the best
    rank-``r`` approximation in Frobenius norm, with relative error ``sqrt(sum_{i>r} s_i^2) / ||W||_F``.
    Computed in float64; returned in ``weight``'s dtype and device. (Denton et al., NeurIPS 2014.)
    """
    w = _matrix(weight)
    if (rank is None) == (energy is None):
        raise ModelError("give exactly one of rank and energy")
    left, s, right = torch.linalg.svd(w, full_matrices=False)
    r = energy_rank(s, energy) if energy is not None else rank
    _check_rank(r, w)
    root = s[:r].sqrt()
    u = left[:, :r] * root
    v = root[:, None] * right[:r]
    return LinearFactors(u.to(weight.dtype).to(weight.device), v.to(weight.dtype).to(weight.device), s)


@torch.no_grad()
def fixed_basis_factors(
    weight: torch.Tensor, rank: int, basis: Literal["identity", "random"], seed: int = 0
) -> LinearFactors:
    """Denil et al. (NeurIPS 2013): a fixed input-side factor ``v`` and ``u = argmin ||W - u v||_F``.

    - ``identity``: ``v = I[idx]``, the ``rank`` input coordinates of largest column norm ``||W[:, j]||``
      (ties to the lower index, kept in ascending order); then ``u = W[:, idx]`` exactly.
    - ``random``: ``v_ij ~ N(0, 1/in)`` from a generator seeded with ``seed``; ``u = W v^T (v v^T)^{-1}``
      by least squares.

    Computed in float64; returned in ``weight``'s dtype and device.
    """
    w = _matrix(weight)
    _check_rank(rank, w)
    n_in = w.shape[1]
    if basis == "identity":
        norms = torch.linalg.vector_norm(w, dim=0)
        idx = torch.sort(torch.argsort(-norms, stable=True)[:rank]).values
        v = torch.zeros(rank, n_in, dtype=torch.float64)
        v[torch.arange(rank), idx] = 1.0
        u = w[:, idx].clone()
    elif basis == "random":
        gen = torch.Generator().manual_seed(seed)
        v = torch.randn(rank, n_in, generator=gen, dtype=torch.float64) / n_in**0.5
        u = torch.linalg.lstsq(v.T, w.T).solution.T
    else:
        raise ModelError(f"basis must be 'identity' or 'random', got {basis!r}")
    s = torch.linalg.svdvals(w)
    return LinearFactors(u.to(weight.dtype).to(weight.device), v.to(weight.dtype).to(weight.device), s)


def _freeze(layer: nn.Linear) -> None:
    """Turn ``layer.weight`` from a parameter into a (persistent) buffer."""
    value = layer.weight.detach()
    del layer.weight
    layer.register_buffer("weight", value)


@register_module("lowrank_linear")
class LowRankLinear(nn.Sequential):
    """``y = second(first(x)) = U (V x) + b``: ``first`` = Linear(in, r, bias=False) holds ``V``,
    ``second`` = Linear(r, out) holds ``U`` and the bias (Denil et al. 2013; Denton et al. 2014).

    ``fixed``: ``"first"`` or ``"second"`` makes that factor a buffer (not trained), ``"none"`` trains both.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, fixed: str = "none"):
        positive_int("in_features", in_features)
        positive_int("out_features", out_features)
        positive_int("rank", rank)
        bool_arg("bias", bias)
        if fixed not in ("none", "first", "second"):
            raise ModelError(f"fixed must be 'none', 'first' or 'second', got {fixed!r}")
        super().__init__(
            OrderedDict(first=nn.Linear(in_features, rank, bias=False), second=nn.Linear(rank, out_features, bias=bias))
        )
        self.in_features, self.out_features, self.rank, self.fixed = in_features, out_features, rank, fixed
        self._bias = bias
        if fixed != "none":
            _freeze(getattr(self, fixed))

    def netshrink_args(self) -> dict:
        # from the constructor, not the children: a later edit may replace ``first`` or ``second``
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "bias": self._bias, "fixed": self.fixed}

    def weight_product(self) -> torch.Tensor:
        """``U V``, the ``(out, in)`` matrix this module applies."""
        return self.second.weight @ self.first.weight

    @torch.no_grad()
    def set_factors(self, factors: LinearFactors, bias: torch.Tensor | None = None) -> LowRankLinear:
        """Copy ``factors.v`` into ``first.weight``, ``factors.u`` into ``second.weight``, and ``bias``."""
        if factors.rank != self.rank:
            raise ModelError(f"factors of rank {factors.rank} do not fit a LowRankLinear of rank {self.rank}")
        copy_into(self.first.weight, factors.v)
        copy_into(self.second.weight, factors.u)
        if bias is not None and self._bias:
            copy_into(self.second.bias, bias)
        return self

    @classmethod
    def from_linear(cls, linear: nn.Linear, factors: LinearFactors, fixed: str = "none") -> LowRankLinear:
        """A LowRankLinear on ``linear``'s device and dtype holding ``factors`` and ``linear``'s bias."""
        module = cls(linear.in_features, linear.out_features, factors.rank, linear.bias is not None, fixed)
        module.to(device=linear.weight.device, dtype=linear.weight.dtype)
        return module.set_factors(factors, None if linear.bias is None else linear.bias.detach())


# ---------------------------------------------------------------------------------------------- the method


def _linear_reason(module: nn.Module) -> str | None:
    if layer_kind(module) in (LINEAR, CONV1D_GPT2):
        return None
    return f"it is a {type(module).__name__}, not a Linear (or GPT-2 Conv1D)"


@register("svd", family="lowrank")
@dataclass
class SvdConfig(BaseConfig):
    """Low-rank Linear layers W ≈ U V by truncated SVD (Denil et al. 2013; Denton et al. 2014)."""

    replaces_modules: ClassVar[bool] = True

    rank: int | None = None
    energy: float | None = None
    param_ratio: float | None = None
    layer_rank: dict[str, int] = field(default_factory=dict)
    layers: list[str] | None = None
    train: Literal["both", "fixed_identity", "fixed_random"] = "both"
    seed: int = 0

    def validate(self) -> None:
        check_rank_fields(self, ("rank", "energy", "param_ratio"))

    def plan(self, model: nn.Module) -> LayerPlan:
        """The Linear and GPT-2 Conv1D layers this config factorizes and why any other layer weight is not
        (a named layer it does not apply to is a :class:`ConfigError`)."""
        return target_plan(model, self.layers, "svd", _linear_reason, (LINEAR, CONV1D_GPT2))

    def targets(self, model: nn.Module) -> dict[str, nn.Linear]:
        """The layers of :meth:`plan`."""
        return self.plan(model).layers

    def explicit_ranks(self, layers: dict[str, nn.Linear]) -> dict[str, int | None]:
        """Each layer's rank from ``rank`` / ``param_ratio`` / ``layer_rank`` (None: chosen by energy),
        checked against the layer's full rank ``min(out, in)``."""
        overrides = per_layer(layers, self.layer_rank, None, "layer_rank")
        out: dict[str, int | None] = {}
        for name, lin in layers.items():
            n_out, n_in = linear_matrix(lin)[0].shape
            full = min(n_out, n_in)
            r = overrides[name]
            if r is None and self.rank is None and self.energy is None and self.param_ratio is None:
                raise missing_rank(name, ("rank", "energy", "param_ratio"))
            if r is None and self.rank is not None:
                r = self.rank
            elif r is None and self.param_ratio is not None:
                r = ratio_rank(n_out * n_in, n_out + n_in, self.param_ratio, full)
            if r is not None and r > full:
                raise ConfigError(override_field(name, self.layer_rank),
                                  f"rank {r} is above the full rank {full} of layer {name!r} ({n_out}x{n_in})")
            out[name] = r
        return out

    def check_model(self, model: nn.Module) -> None:
        self.explicit_ranks(self.targets(converted_copy(model, self.layers)))


@handler(SvdConfig)
@torch.no_grad()
def svd_factorize(model: nn.Module, config: SvdConfig, data=None) -> FactorizeResult:
    """Replace each chosen Linear (or GPT-2 Conv1D, through its transposed weight) of ``model`` in place by
    a :class:`LowRankLinear`.

    ``nn.MultiheadAttention`` in scope is converted to separate q/k/v/out projections first (said in
    ``result.coverage.notes``): its ``out_proj`` is read by the module itself and could not be replaced. A
    layer whose parent reads its weight, or whose weight is tied to another, is skipped with the reason
    (``strict``: an error, before anything changes).
    """
    notes = prepare(model, config.layers, "svd")
    plan = config.plan(model)
    plan.check_strict("svd", config.strict)
    layers = plan.layers
    ranks = config.explicit_ranks(layers)
    params = unique_parameters(model)
    done = {}
    for i, (name, lin) in enumerate(layers.items()):
        weight, n_in, n_out, bias = linear_matrix(lin)
        r = ranks[name]
        if config.train == "both":
            factors = svd_factors(weight, r, energy=config.energy if r is None else None)
        else:
            if r is None:
                r = energy_rank(torch.linalg.svdvals(weight.to(torch.float64)), config.energy)
            basis = "identity" if config.train == "fixed_identity" else "random"
            factors = fixed_basis_factors(weight, r, basis, seed=config.seed + i)
        new = LowRankLinear(n_in, n_out, factors.rank, bias is not None, "none" if config.train == "both" else "first")
        new.to(device=weight.device, dtype=weight.dtype)
        new.set_factors(factors, bias)
        before = layer_params(lin)
        replace_module(model, name, new)
        done[name] = LayerFactorization(name, "svd", new.netshrink_type, (factors.rank,), before, module_params(new),
                                        rel_error(weight, new.weight_product()))
    how = {f"{n}.weight": f"factorized by SVD to rank {f.ranks[0]} ({f.params_before:,} -> {f.params_after:,} parameters)"
           for n, f in done.items()}
    return FactorizeResult(done, coverage=plan_coverage(model, "svd", how, plan, notes, params=params))


__all__ = ["LinearFactors", "LowRankLinear", "SvdConfig", "fixed_basis_factors", "svd_factorize", "svd_factors"]
