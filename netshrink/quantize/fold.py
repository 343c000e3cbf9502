"""BatchNorm folding: a BatchNorm that follows a Conv/Linear is merged into that layer's weight and bias.

In inference a BatchNorm is the per-channel affine map ``y = gamma (x - mean) / sqrt(var + eps) + beta``
over running statistics. When ``x = W u + b`` is the output of a Conv/Linear layer, the pair is one
layer (Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference", CVPR 2018, §3.2; Ioffe & Szegedy 2015 for the statistics):

    W' = W * gamma / sqrt(var + eps)              (per output channel: axis 0 of the weight)
    b' = (b - mean) * gamma / sqrt(var + eps) + beta

Integer inference needs the fold: int8 kernels compute ``W' u + b'`` in one go, and the quantizer must
see the folded weight (its range, not the unfolded one, is what runs). :func:`fold_batchnorm_` does it
in place on any model: it runs the model once on example inputs to learn which BatchNorm reads the very
tensor a Conv/Linear produced (no tracing of the model's code, so any ``forward`` works), folds those
pairs, replaces each folded BatchNorm by a :class:`FoldedBatchNorm` (an identity, recorded as a module
edit so a packed model loads with the same structure) and checks that the model's outputs did not
change. A BatchNorm that follows no foldable layer (it reads a sum, a concatenation, a pooled map, an
input; the layer's output is also read elsewhere; no running statistics) stays as it is, with the
reason in :class:`FoldResult`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from .._layers import WEIGHT_LAYERS
from .._modules import _PLAIN, _record, register_module, replace_module
from ..errors import ModelError


@register_module("folded_batchnorm")
class FoldedBatchNorm(nn.Identity):
    """What a BatchNorm becomes once folded into the layer before it: the identity.

    ``into`` names that layer (for reading a model; not needed to rebuild it)."""

    def __init__(self, into: str = ""):
        super().__init__()
        self.into = into

    def netshrink_args(self) -> dict[str, Any]:
        return {"into": self.into}

    def extra_repr(self) -> str:
        return f"into={self.into!r}"


@dataclass
class FoldResult:
    """``folded``: BatchNorm name -> the layer it was folded into; ``kept``: BatchNorm name -> why it stays;
    ``max_output_change``: the largest change of the model's outputs on the example inputs, relative to
    their largest magnitude (float rounding only)."""

    folded: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    max_output_change: float = 0.0


@torch.no_grad()
def fold_bn_weights(
    weight: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor, var: torch.Tensor, eps: float,
    gamma: torch.Tensor | None = None, beta: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W', b')`` of the module docstring (computed in float64, returned in ``weight``'s dtype).

    ``weight``: the layer's weight, output channels on axis 0; ``bias`` None means 0; ``gamma``/``beta``
    None mean 1/0 (a BatchNorm without affine parameters)."""
    dt = weight.dtype
    c = weight.shape[0]
    if mean.shape != (c,) or var.shape != (c,):
        raise ModelError(f"BatchNorm folding: {c} output channels, but statistics of shape {tuple(mean.shape)}")
    g = gamma.double() if gamma is not None else torch.ones(c, dtype=torch.float64, device=weight.device)
    factor = g / torch.sqrt(var.double() + eps)
    w = weight.double() * factor.reshape((-1,) + (1,) * (weight.dim() - 1))
    b = bias.double() if bias is not None else torch.zeros(c, dtype=torch.float64, device=weight.device)
    b = (b - mean.double()) * factor + (beta.double() if beta is not None else 0.0)
    return w.to(dt), b.to(dt)


def _parent_name(name: str) -> str:
    return name.rpartition(".")[0]


def _why_not(layer: nn.Module, bn: _BatchNorm, out: torch.Tensor) -> str | None:
    """Why ``bn`` cannot be folded into ``layer`` whose output is ``out`` (None: it can)."""
    if bn.running_mean is None or bn.running_var is None:
        return "it keeps no running statistics (track_running_stats=False)"
    channels = layer.weight.shape[0]
    if channels != bn.num_features:
        return f"it normalizes {bn.num_features} channels, the layer gives {channels}"
    if isinstance(layer, nn.Linear) and out.dim() != 2:
        return "the Linear layer's output is not 2-D (BatchNorm would normalize another axis)"
    if parametrize.is_parametrized(layer, "weight"):
        from ..prune._mask import Mask

        if not all(isinstance(p, Mask) for p in layer.parametrizations["weight"]):
            kinds = ", ".join(type(p).__name__ for p in layer.parametrizations["weight"])
            return f"the layer's weight is already transformed ({kinds}); fold BatchNorm before sharing or quantizing"
    if parametrize.is_parametrized(layer, "bias"):
        return "the layer's bias is parametrized"
    return None


@torch.no_grad()
def find_bn_pairs(model: nn.Module, run: Any) -> tuple[dict[str, str], dict[str, str], Any]:
    """``(pairs, kept, output)``: BatchNorm -> the Conv/Linear whose output tensor it normalizes, the
    BatchNorms that cannot be folded with the reason, and what ``run(model)`` returned (eval mode)."""
    modules = dict(model.named_modules())
    bns = {n: m for n, m in modules.items() if isinstance(m, _BatchNorm)}
    layers = {n: m for n, m in modules.items() if isinstance(m, WEIGHT_LAYERS) and "parametrizations" not in n.split(".")}
    produced: dict[int, tuple[str, torch.Tensor]] = {}
    calls: dict[str, int] = {}
    bn_input: dict[str, list[torch.Tensor]] = {}
    handles = []

    def on_layer(name: str):
        def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            if isinstance(out, torch.Tensor):
                produced[id(out)] = (name, out)  # the reference keeps the id unique while we look

        return hook

    def on_bn(name: str):
        def hook(_m: nn.Module, inp: Any) -> None:
            bn_input.setdefault(name, []).append(inp[0] if inp else None)

        return hook

    for n, m in layers.items():
        handles.append(m.register_forward_hook(on_layer(n)))
    for n, m in bns.items():
        handles.append(m.register_forward_pre_hook(on_bn(n)))
    was = model.training
    model.eval()
    try:
        output = run(model)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    pairs: dict[str, str] = {}
    kept: dict[str, str] = {}
    claimed: dict[str, str] = {}
    for n, bn in bns.items():
        seen = bn_input.get(n, [])
        if not seen:
            kept[n] = "never called on the example inputs"
            continue
        if len(seen) > 1:
            kept[n] = f"called {len(seen)} times in one forward pass"
            continue
        x = seen[0]
        hit = produced.get(id(x)) if isinstance(x, torch.Tensor) else None
        if hit is None or hit[1] is not x:
            kept[n] = "its input is not the output of a Conv/Linear layer"
            continue
        lname = hit[0]
        if calls.get(lname, 0) != 1:
            kept[n] = f"the layer before it, {lname!r}, is called {calls.get(lname, 0)} times in one forward pass"
            continue
        if lname in claimed:
            kept[n] = f"the output of {lname!r} is also normalized by {claimed[lname]!r}"
            continue
        why = _why_not(layers[lname], bn, x)
        if why is not None:
            kept[n] = f"cannot fold into {lname!r}: {why}"
            continue
        pairs[n] = lname
        claimed[lname] = n
    return pairs, kept, output


def _set_param(layer: nn.Module, name: str, value: torch.Tensor) -> None:
    if name == "weight" and parametrize.is_parametrized(layer, "weight"):
        target = layer.parametrizations["weight"].original  # a mask multiplies it elementwise: the fold commutes
    else:
        target = getattr(layer, name)
    target.data.copy_(value)


def _fold_pair(model: nn.Module, bn_name: str, layer_name: str) -> None:
    modules = dict(model.named_modules())
    layer, bn = modules[layer_name], modules[bn_name]
    raw_w = layer.parametrizations["weight"].original if parametrize.is_parametrized(layer, "weight") else layer.weight
    gamma = bn.weight if bn.affine else None
    beta = bn.bias if bn.affine else None
    w, b = fold_bn_weights(raw_w.detach(), None if layer.bias is None else layer.bias.detach(), bn.running_mean, bn.running_var, bn.eps,
                           None if gamma is None else gamma.detach(), None if beta is None else beta.detach())
    _set_param(layer, "weight", w)
    if layer.bias is None:
        layer.bias = nn.Parameter(b, requires_grad=raw_w.requires_grad)
        _record_bias(model, layer_name, layer)
    else:
        _set_param(layer, "bias", b)
    replace_module(model, bn_name, FoldedBatchNorm(layer_name))


def _record_bias(model: nn.Module, layer_name: str, layer: nn.Module) -> None:
    """A layer that had no bias has one now: recorded as a module edit, so a packed model rebuilds with it."""
    base = next(c for c in type(layer).__mro__ if c in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
    kind = f"torch.nn.{base.__name__}"
    _record(model, layer_name, kind, json.loads(json.dumps(_PLAIN[kind][1](layer))))


def _compare(a: Any, b: Any) -> float:
    from ..task import output_tensor

    x, y = output_tensor(a).detach().double(), output_tensor(b).detach().double()
    if x.shape != y.shape:
        return float("inf")
    scale = max(float(x.abs().max()) if x.numel() else 0.0, 1e-12)
    return float((x - y).abs().max()) / scale if x.numel() else 0.0


#: largest relative output change accepted as float rounding of the fold
TOLERANCE = 1e-3


@torch.no_grad()
def fold_batchnorm_(model: nn.Module, run: Any) -> FoldResult:
    """Fold every BatchNorm that follows a Conv/Linear into it, in place (see the module docstring).

    ``run(model)`` runs the model on example inputs (e.g. ``inputs.call``). The folded model's outputs
    are compared with the original's on them; a pair whose fold changes the outputs (the layer's output
    is read elsewhere too) is left unfolded, with the reason."""
    if not any(isinstance(m, _BatchNorm) for m in model.modules()):
        return FoldResult()
    pairs, kept, reference = find_bn_pairs(model, run)
    result = FoldResult(kept=kept)
    if not pairs:
        return result

    def trial(chosen: dict[str, str]) -> float:
        twin = copy.deepcopy(model)
        for bn_name, layer_name in chosen.items():
            _fold_pair(twin, bn_name, layer_name)
        twin.eval()
        return _compare(reference, run(twin))

    change = trial(pairs)
    if not change <= TOLERANCE:  # find the pairs at fault one by one
        good = {}
        for bn_name, layer_name in pairs.items():
            c = trial({bn_name: layer_name})
            if c <= TOLERANCE:
                good[bn_name] = layer_name
            else:
                result.kept[bn_name] = f"folding it into {layer_name!r} changes the outputs (the layer's output is also used elsewhere)"
        pairs = good
        change = trial(pairs) if pairs else 0.0
    for bn_name, layer_name in pairs.items():
        _fold_pair(model, bn_name, layer_name)
    result.folded = dict(pairs)
    result.max_output_change = change
    return result


__all__ = ["FoldResult", "FoldedBatchNorm", "find_bn_pairs", "fold_batchnorm_", "fold_bn_weights"]
