"""Replaceable module types: models whose layers were swapped for new module types still pack and load.

A method that replaces a layer (low-rank factorization turns a ``Linear`` into two) builds the new
module from a class registered here and swaps it in with :func:`replace_module`, which records the
edit on the root model::

    model.netshrink_edits == [{"path": "fc1", "type": "lowrank_linear", "args": {...}}, ...]

``args`` is what the new module's ``netshrink_args()`` reports: plain JSON, enough to rebuild the
module (with fresh values) by ``cls(**args)``. The packer stores the edits in the .nsk header;
:func:`apply_edits` replays them on a freshly built (or user-supplied) model before its tensors are
filled, so the architecture matches the file. Edits replay in order, so an edit inside a replaced
module (``fc1.second``) follows the edit that created it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ._registry import Registry
from .errors import FormatError, ModelError, NetshrinkError

#: the attribute on the root model that lists its edits
EDITS_ATTR = "netshrink_edits"
#: limits checked when edits are read
MAX_EDITS = 1 << 16
MAX_PATH_CHARS = 1000
MAX_TYPE_CHARS = 100

_MODULES: Registry[type[nn.Module]] = Registry("module type")


def register_module(name: str) -> Callable[[type], type]:
    """Class decorator: register an ``nn.Module`` class under ``name`` as a replaceable module type.

    The class must define ``netshrink_args(self) -> dict`` returning JSON-able constructor keyword
    arguments such that ``cls(**args)`` builds a module of the same structure. The class gains the
    attribute ``netshrink_type = name``.
    """

    def deco(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"register_module({name!r}) needs an nn.Module class, got {cls!r}")
        if not callable(getattr(cls, "netshrink_args", None)):
            raise TypeError(f"{cls.__name__} must define netshrink_args() to be registered as {name!r}")
        _MODULES.add(name, cls)
        cls.netshrink_type = name
        return cls

    return deco


def module_types() -> dict[str, type[nn.Module]]:
    """Every registered module type by name (the families that define them are imported first)."""
    return dict(_MODULES)


# Plain torch layers that a structured pruner resizes: recorded as edits by type name and constructor
# arguments (read from the module), so a physically pruned model rebuilds with the smaller shapes.
_PLAIN: dict[str, tuple[type[nn.Module], Callable[[Any], dict[str, Any]]]] = {}


def _conv_args(m: Any) -> dict[str, Any]:
    args = {"in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": list(m.kernel_size),
            "stride": list(m.stride), "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
            "dilation": list(m.dilation), "groups": m.groups, "bias": m.bias is not None, "padding_mode": m.padding_mode}
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        args["output_padding"] = list(m.output_padding)
    return args


def _bn_args(m: Any) -> dict[str, Any]:
    return {"num_features": m.num_features, "eps": m.eps, "momentum": m.momentum, "affine": m.affine,
            "track_running_stats": m.track_running_stats}


for _cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    _PLAIN[f"torch.nn.{_cls.__name__}"] = (_cls, _conv_args)
for _cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    _PLAIN[f"torch.nn.{_cls.__name__}"] = (_cls, _bn_args)
_PLAIN["torch.nn.Linear"] = (nn.Linear, lambda m: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None})
_PLAIN["torch.nn.LayerNorm"] = (nn.LayerNorm, lambda m: {"normalized_shape": list(m.normalized_shape), "eps": m.eps,
                                                         "elementwise_affine": m.elementwise_affine, "bias": m.bias is not None})
_PLAIN["torch.nn.PReLU"] = (nn.PReLU, lambda m: {"num_parameters": m.num_parameters})


def _plain_kind(module: nn.Module) -> str | None:
    """The edit type name of a plain (exactly typed) torch layer that may be recorded, else None."""
    kind = f"torch.nn.{type(module).__name__}"
    return kind if kind in _PLAIN and _PLAIN[kind][0] is type(module) else None


def module_class(name: str, where: str = "") -> type[nn.Module]:
    """The class registered as ``name``; a :class:`ModelError` (prefixed by ``where``) if none is."""
    if name in _PLAIN:
        return _PLAIN[name][0]
    types = _MODULES if name in _MODULES else module_types()
    if name not in types:
        known = ", ".join(sorted(types)) or "none"
        raise ModelError(f"{where + ': ' if where else ''}unknown module type {name!r} (known: {known})")
    return types[name]


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


def check_edits(edits: Any, where: str = "edits", error: type[NetshrinkError] = FormatError) -> list[dict[str, Any]]:
    """``edits`` checked to be a list of ``{"path": str, "type": str, "args": dict}``; else ``error``.

    Paths are dotted (no empty part) and at most :data:`MAX_PATH_CHARS` long; at most
    :data:`MAX_EDITS` edits. ``args`` must be strict JSON (string keys, no NaN).
    """
    if not isinstance(edits, list):
        raise error(f"{where}: expected a list of edits, got {type(edits).__name__}")
    if len(edits) > MAX_EDITS:
        raise error(f"{where}: {len(edits)} edits exceed the limit of {MAX_EDITS}")
    for i, e in enumerate(edits):
        at = f"{where}[{i}]"
        if not isinstance(e, dict) or set(e) != {"path", "type", "args"}:
            keys = sorted(e) if isinstance(e, dict) else type(e).__name__
            raise error(f"{at}: expected an object with keys args, path, type; got {keys}")
        path, kind, args = e["path"], e["type"], e["args"]
        if not isinstance(path, str) or not 0 < len(path) <= MAX_PATH_CHARS or "" in path.split("."):
            raise error(f"{at}.path: expected a dotted module path of 1 to {MAX_PATH_CHARS} characters, got {str(path)[:60]!r}")
        if not isinstance(kind, str) or not 0 < len(kind) <= MAX_TYPE_CHARS:
            raise error(f"{at}.type: expected a module type name of 1 to {MAX_TYPE_CHARS} characters, got {str(kind)[:60]!r}")
        if not isinstance(args, dict):
            raise error(f"{at}.args: expected an object, got {type(args).__name__}")
        try:
            json.dumps(args, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise error(f"{at}.args: not JSON-serializable: {exc}") from None
    return edits


def edits_of(model: nn.Module) -> list[dict[str, Any]]:
    """A copy of ``model``'s recorded edits (``[]`` when none); a malformed list raises :class:`ModelError`."""
    edits = check_edits(getattr(model, EDITS_ATTR, []), f"model.{EDITS_ATTR}", ModelError)
    return json.loads(json.dumps(edits))


def _record(model: nn.Module, path: str, kind: str, args: dict[str, Any]) -> None:
    old = edits_of(model)
    kept = [e for e in old if e["path"] != path and not e["path"].startswith(path + ".")]
    setattr(model, EDITS_ATTR, kept + [{"path": path, "type": kind, "args": args}])


def _args_of(module: nn.Module, where: str) -> dict[str, Any]:
    args = module.netshrink_args()
    if not isinstance(args, dict):
        raise ModelError(f"{_prefix(where)}{type(module).__name__}.netshrink_args() must return a dict, got {args!r}")
    try:
        return json.loads(json.dumps(args, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{_prefix(where)}{type(module).__name__}.netshrink_args() is not JSON-serializable: {exc}") from None


def _parent(model: nn.Module, path: str, where: str) -> tuple[nn.Module, str]:
    if not isinstance(path, str) or not path or "" in path.split("."):
        raise ModelError(f"{_prefix(where)}bad module path {path!r}")
    parent_path, _, name = path.rpartition(".")
    try:
        parent = model.get_submodule(parent_path)
    except AttributeError:
        parent = None
    if parent is None or name not in parent._modules or parent._modules[name] is None:
        raise ModelError(f"{_prefix(where)}the model has no submodule {path!r}")
    return parent, name


def replace_module(model: nn.Module, path: str, new_module: nn.Module) -> nn.Module:
    """Swap the submodule at dotted ``path`` of ``model`` for ``new_module``; return the old one.

    ``new_module`` must be an instance of a class registered with :func:`register_module`, or a plain
    torch layer that structured pruning resizes (``Conv*d``, ``ConvTranspose*d``, ``Linear``,
    ``BatchNorm*d``, ``LayerNorm``, ``PReLU``; recorded as ``torch.nn.<Class>``). The edit
    is recorded in ``model.netshrink_edits``, replacing an earlier edit of the same path (and the
    edits inside it). A bad path raises :class:`ModelError`.
    """
    kind = getattr(type(new_module), "netshrink_type", None)
    plain = _plain_kind(new_module)
    if plain is not None:
        kind, args = plain, json.loads(json.dumps(_PLAIN[plain][1](new_module)))
    elif kind is None or _MODULES.get(kind) is not type(new_module):
        raise ModelError(f"{type(new_module).__name__} is not a registered module type (use @register_module)")
    else:
        args = _args_of(new_module, path)
    parent, name = _parent(model, path, "")
    old = parent._modules[name]
    setattr(parent, name, new_module)
    _record(model, path, kind, args)
    return old


def _build(cls: type[nn.Module], args: dict[str, Any], where: str) -> nn.Module:
    try:
        return cls(**args)
    except NetshrinkError as exc:
        raise ModelError(f"{where}: {exc}") from None
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise ModelError(f"{where}: cannot build {cls.__name__} from {json.dumps(args)[:200]}: {exc}") from None


def apply_edits(model: nn.Module, edits: Any, *, where: str = "edits", guard: Any = None,
                max_elements: int | None = None) -> nn.Module:
    """Replay ``edits`` (a list as :func:`replace_module` records it) on ``model`` in place; return it.

    Each edit builds its registered type from ``args`` (on the device and in the floating dtype of the
    module it replaces) and swaps it in; replaying a model's own edits rebuilds the same structure
    (with fresh values, to be filled by the caller). With a ``guard``
    (:class:`netshrink.pack._budget.BuildGuard`, used when the edits come from a file), each new module is
    first built on the meta device inside the guard, which stops a build that registers more modules or
    elements than the file justifies, and then built for real. ``max_elements`` alone is such a guard
    that bounds the new modules' elements (parameters and buffers) in all.
    An unknown type, a bad path or args the type rejects raise one-line :class:`ModelError`.
    """
    check_edits(edits, where, ModelError)
    if guard is None and max_elements is not None:
        from .pack._budget import BuildBudget, BuildGuard

        guard = BuildGuard(BuildBudget(1 << 62, int(max_elements), where))
    for i, e in enumerate(edits):
        at = f"{where}[{i}] ({e['path']})"
        cls = module_class(e["type"], at)
        parent, name = _parent(model, e["path"], at)
        current = parent._modules[name]
        if guard is not None:
            with guard.scope(meta=True):
                _build(cls, e["args"], at)
            with guard.scope(meta=False):
                new = _build(cls, e["args"], at)
        else:
            new = _build(cls, e["args"], at)
        ref = next(iter(list(current.parameters()) + list(current.buffers())), None)
        if ref is not None:
            new.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
        replace_module(model, e["path"], new)
    return model


__all__ = [
    "EDITS_ATTR",
    "apply_edits",
    "check_edits",
    "edits_of",
    "module_class",
    "module_types",
    "register_module",
    "replace_module",
]
