"""What a compressible weight is now: dense, sparse (masked), or shared (codebook + indices).

The packer, the metrics and the report read weights only through :func:`weight_state`, so every
method that compresses a weight is seen the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .prune._mask import get_mask
from .quantize._sharing import get_sharing


@dataclass
class WeightState:
    """A weight as stored: ``values`` (dense, zeros included), and what structure it carries."""

    values: torch.Tensor  # the effective weight, fp32, the exact tensor the forward pass uses
    mask: torch.Tensor | None = None  # bool keep-mask, when pruned
    codebook: torch.Tensor | None = None  # (k,) fp32 centroids, when shared
    indices: torch.Tensor | None = None  # long, weight-shaped, index into codebook, when shared

    @property
    def nonzeros(self) -> int:
        return int(torch.count_nonzero(self.values))


@torch.no_grad()
def weight_state(module: nn.Module, name: str = "weight") -> WeightState:
    values = getattr(module, name).detach().to(torch.float32).cpu()
    shared = get_sharing(module, name)
    if shared is not None:
        mask = shared.mask.cpu() if shared.mask is not None else None
        return WeightState(values, mask, shared.codebook.detach().cpu().float(), shared.indices.cpu())
    mask = get_mask(module, name)
    return WeightState(values, mask.cpu() if mask is not None else None)


def effective_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer under its plain state_dict name, as the forward pass sees it.

    A parametrized weight appears once, as ``layer.weight`` with its effective (masked or shared)
    value; the parametrization's internals (``original``, ``codebook``, ``indices``, ``mask``) do not.
    """
    out: dict[str, torch.Tensor] = {}
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if "parametrizations" in mod_name.split("."):
            continue  # a parametrization's internals: its weight is reported once, below
        plist = getattr(module, "parametrizations", None)
        for name in list(module._parameters) + list(module._buffers):
            t = getattr(module, name)
            if t is not None:
                out[prefix + name] = t.detach()
        if plist is not None:
            for name in plist.keys():
                out[prefix + name] = getattr(module, name).detach()
    return out


def effective_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Like :func:`effective_tensors`, parameters only (buffers such as BN statistics left out)."""
    buffers = {f"{m}.{b}" if m else b for m, mod in model.named_modules() for b in mod._buffers}
    return {k: v for k, v in effective_tensors(model).items() if k not in buffers}


# ---------------------------------------------------------------------------------------------- ties


def _stored(module: nn.Module, name: str) -> torch.Tensor | None:
    """The tensor that holds ``module.name``'s storage: the parametrization's ``original`` when there is one."""
    plist = getattr(module, "parametrizations", None)
    if plist is not None and name in plist:
        return getattr(plist[name], "original", None)
    return module._parameters.get(name)


def storage_key(t: torch.Tensor) -> tuple:
    """Two tensors with equal keys are one storage seen twice (same memory, offset, shape and strides)."""
    if t.device.type == "meta":
        return ("id", id(t))
    return (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())


def tie_groups(model: nn.Module) -> list[list[str]]:
    """Names of the parameters that share one storage (an embedding tied to an output layer), grouped;
    only groups of two or more names, each in model order (the first name is the one kept)."""
    groups: dict[tuple, list[str]] = {}
    for mod_name, module in model.named_modules():
        if "parametrizations" in mod_name.split("."):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        plist = getattr(module, "parametrizations", None)
        names = list(module._parameters) + [n for n in (plist.keys() if plist is not None else ()) if n not in module._parameters]
        for name in names:
            t = _stored(module, name)
            if t is not None:
                groups.setdefault(storage_key(t), []).append(prefix + name)
    return [g for g in groups.values() if len(g) > 1]


def unique_parameters(model: nn.Module) -> dict[str, tuple[int, tuple[str, ...]]]:
    """Every effective parameter once per storage: first name -> (elements, the other names tied to it)."""
    aliases: dict[str, tuple[str, ...]] = {}
    dropped: set[str] = set()
    for group in tie_groups(model):
        aliases[group[0]] = tuple(group[1:])
        dropped.update(group[1:])
    return {n: (int(t.numel()), aliases.get(n, ())) for n, t in effective_parameters(model).items() if n not in dropped}


def unique_effective_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """:func:`effective_parameters` with each tied storage once, under its first name."""
    dropped = {n for g in tie_groups(model) for n in g[1:]}
    return {n: t for n, t in effective_parameters(model).items() if n not in dropped}


def tie_aliases(model: nn.Module) -> set[str]:
    """The names of tied parameters other than the first of their group (packed once, under the first)."""
    return {n for g in tie_groups(model) for n in g[1:]}


MAX_TIES = 1 << 12


def check_ties(ties: object, where: str) -> list[list[str]]:
    """``ties`` as a file header stores it: a list of groups of two or more dotted parameter names;
    else a :class:`~netshrink.errors.FormatError` naming ``where``."""
    from .errors import FormatError

    if not isinstance(ties, list) or len(ties) > MAX_TIES:
        raise FormatError(f"{where}: expected a list of at most {MAX_TIES} groups of tied parameter names")
    for i, g in enumerate(ties):
        if (not isinstance(g, list) or not 2 <= len(g) <= MAX_TIES
                or not all(isinstance(n, str) and 0 < len(n) <= 1000 and "" not in n.split(".") for n in g)):
            raise FormatError(f"{where}[{i}]: expected a list of two or more dotted parameter names")
    return ties  # type: ignore[return-value]


def retie_(model: nn.Module, ties: list[list[str]], where: str) -> None:
    """Make each group of ``ties`` one storage in ``model`` again (the first name's Parameter, set on the
    others' modules) where the model does not tie them already. A name the model lacks, or tensors of
    different shapes, is a :class:`~netshrink.errors.ModelError`."""
    from .errors import ModelError

    for i, group in enumerate(ties):
        owners = []
        for name in group:
            mod_name, _, attr = name.rpartition(".")
            try:
                mod = model.get_submodule(mod_name)
            except AttributeError:
                mod = None
            if mod is None or attr not in mod._parameters or mod._parameters[attr] is None:
                raise ModelError(f"{where}[{i}]: the model has no plain parameter {name!r} to tie")
            owners.append((mod, attr))
        first = owners[0][0]._parameters[owners[0][1]]
        for (mod, attr), name in zip(owners[1:], group[1:]):
            p = mod._parameters[attr]
            if p is first:
                continue
            if p.shape != first.shape:
                raise ModelError(f"{where}[{i}]: {name!r} has shape {list(p.shape)}, {group[0]!r} {list(first.shape)}: cannot tie")
            setattr(mod, attr, first)


def follow_ties_(model: nn.Module, ties: list[list[str]]) -> None:
    """After the first parameter of each tie group got a parametrization (a mask, a codebook), give the
    others the same one, so the tie holds for the compressed value."""
    from .prune._mask import follow_parametrization

    for group in ties:
        mod_name, _, attr = group[0].rpartition(".")
        first = model.get_submodule(mod_name)
        plist = getattr(first, "parametrizations", None)
        if plist is None or attr not in plist:
            continue
        for name in group[1:]:
            m, _, a = name.rpartition(".")
            if a == attr:
                follow_parametrization(first, model.get_submodule(m), attr)
