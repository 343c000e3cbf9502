"""Layer selection, in one place: which modules hold a compressible weight, of which kind, and which
of them a method may touch.

Kinds (:func:`layer_kind`):

==================  =====================================  ===================================
kind                modules                                weight layout
==================  =====================================  ===================================
``linear``          ``nn.Linear`` (and subclasses)         ``(out, in)``
``conv``            ``nn.Conv1d/2d/3d``                    ``(out, in / groups, *k)``
``conv_transpose``  ``nn.ConvTranspose1d/2d/3d``           ``(in, out / groups, *k)``
``conv1d_gpt2``     transformers' ``Conv1D`` (GPT-2)       ``(in, out)`` (transposed!)
``embedding``       ``nn.Embedding``, ``nn.EmbeddingBag``  ``(num_embeddings, dim)``
==================  =====================================  ===================================

transformers' ``Conv1D`` is recognised by its class name and its ``nx``/``nf`` attributes, so transformers
stays optional. ``nn.MultiheadAttention``'s packed ``in_proj_weight`` is no layer of its own: the
per-layer methods convert the module first (:func:`netshrink._attention.convert_attention_`), which
gives four plain Linear projections.

:func:`select_layers` and :func:`weight_layers` keep their old meaning (Linear and Conv1d/2d/3d) unless
``kinds`` asks for more. :func:`plan_layers` is what the per-layer methods use: the layers they act on,
and for every other layer weight the reason it is skipped (for the method's coverage record).
:func:`parent_reads` finds the layers whose parent reads their weight itself (``nn.MultiheadAttention``
reads ``out_proj.weight``): replacing such a layer by another module would break the parent's forward.
"""

from __future__ import annotations

import fnmatch
import inspect
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, TypeVar

from torch import nn

from .errors import ConfigError, ModelError

#: the module types whose ``weight`` the pruning and sharing methods compress by default (the
#: ``linear`` and ``conv`` kinds); :data:`ALL_KINDS` names every kind this module knows
WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

LINEAR, CONV, CONV_TRANSPOSE, CONV1D_GPT2, EMBEDDING = "linear", "conv", "conv_transpose", "conv1d_gpt2", "embedding"
ALL_KINDS: tuple[str, ...] = (LINEAR, CONV, CONV_TRANSPOSE, CONV1D_GPT2, EMBEDDING)
DEFAULT_KINDS: tuple[str, ...] = (LINEAR, CONV)
#: registered module types that are containers of plain layers (their projections are ordinary
#: targets), not replacements made by a compression method
CONTAINER_TYPES = frozenset({"head_attention", "grouped_query_attention"})

V = TypeVar("V")


def is_gpt2_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D``: ``y = x @ W + b`` with ``W`` of shape ``(nx, nf)`` = (in, out)."""
    w = getattr(module, "weight", None)
    # by class name (a parametrized module's class is a generated subclass: look along the MRO)
    return (any(c.__name__ == "Conv1D" for c in type(module).__mro__) and hasattr(module, "nx") and hasattr(module, "nf")
            and w is not None and w.dim() == 2 and tuple(w.shape) == (module.nx, module.nf))


def layer_kind(module: nn.Module) -> str | None:
    """The kind of ``module`` (see the module docstring), or None when it is no known weight layer."""
    if isinstance(module, nn.Linear):
        return LINEAR
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return CONV_TRANSPOSE
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return CONV
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return EMBEDDING
    if is_gpt2_conv1d(module):
        return CONV1D_GPT2
    return None


def out_axis(module: nn.Module) -> int:
    """The axis of ``module.weight`` that indexes output channels (1 for ConvTranspose and Conv1D)."""
    return 1 if layer_kind(module) in (CONV_TRANSPOSE, CONV1D_GPT2) else 0


def _inside_parametrization(name: str) -> bool:
    return "parametrizations" in name.split(".")


def weight_layers(model: nn.Module, kinds: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """Named weight layers of ``model`` of ``kinds`` (default: Linear and Conv1d/2d/3d), in definition order."""
    kinds = tuple(kinds) if kinds is not None else DEFAULT_KINDS
    return {name: m for name, m in model.named_modules()
            if not _inside_parametrization(name) and layer_kind(m) in kinds}


def select_layers(model: nn.Module, patterns: Iterable[str] | None, field: str = "layers",
                  kinds: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """The weight layers (of ``kinds``, default Linear and Conv) whose names match any of ``patterns``
    (fnmatch globs); all when None.

    A pattern that matches no such layer raises :class:`ConfigError` naming it and the layers there are
    (or, when it names a weight layer of another kind, what that layer is).
    """
    layers = weight_layers(model, kinds)
    if patterns is None:
        return layers
    chosen: dict[str, nn.Module] = {}
    for i, pat in enumerate(patterns):
        hits = [n for n in layers if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            other = next((n for n, m in weight_layers(model, ALL_KINDS).items() if fnmatch.fnmatchcase(n, pat)), None)
            if other is not None:
                m = model.get_submodule(other)
                raise ConfigError(f"{field}[{i}]", f"layer {other!r} is a {type(m).__name__} ({layer_kind(m)}), "
                                                   "which this method does not apply to")
            raise ConfigError(f"{field}[{i}]", f"no layer named {pat!r} (layers: {', '.join(layers)})")
        for n in hits:
            chosen[n] = layers[n]
    return {n: layers[n] for n in layers if n in chosen}


def per_layer(
    layers: Mapping[str, nn.Module], overrides: Mapping[str, V] | None, default: V, field: str
) -> dict[str, V]:
    """``default`` for every layer, replaced by ``overrides`` (keys are names or globs).

    An override key that matches no layer raises :class:`ConfigError` naming ``field.key``.
    """
    out = {n: default for n in layers}
    for pat, value in (overrides or {}).items():
        hits = [n for n in layers if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise ConfigError(f"{field}.{pat}", f"no layer named {pat!r} (layers: {', '.join(layers)})")
        for n in hits:
            out[n] = value
    return out


# ---------------------------------------------------------------------------------------------- parents


_READS = re.compile(r"\w\.((?:\w+\.)*\w+)\.weight\b|getattr\(\s*\w+\.((?:\w+\.)*\w+)\s*,\s*['\"]weight['\"]")
_NOT_FORWARD = frozenset({"__init__", "netshrink_args", "extra_repr", "reset_parameters", "_reset_parameters",
                          "__setstate__", "_load_from_state_dict", "__repr__"})
_SOURCE_CACHE: dict[type, frozenset[str]] = {}


def _children_read(cls: type) -> frozenset[str]:
    """Names ``c`` for which ``forward`` or a private helper of ``cls`` (and of its bases below ``nn.Module``)
    reads ``<obj>.c.weight``: a heuristic on the source text (it may see a read that is none,
    which only keeps a layer from being replaced), none where the source is unavailable."""
    if cls not in _SOURCE_CACHE:
        found: set[str] = set()
        for base in cls.__mro__:
            if base in (nn.Module, object) or base.__module__.startswith("torch.nn.modules.container"):
                continue
            for attr, fn in vars(base).items():
                # forward and private helpers it may call (``_forward_impl``), not public utilities
                # (``weight_product``) nor construction code
                if attr in _NOT_FORWARD or not inspect.isfunction(fn) or not (attr == "forward" or (attr.startswith("_") and not attr.startswith("__"))):
                    continue
                try:
                    src = inspect.getsource(fn)
                except (OSError, TypeError):
                    continue
                for m in _READS.finditer(src):
                    found.add(m.group(1) or m.group(2))
        _SOURCE_CACHE[cls] = frozenset(found)
    return _SOURCE_CACHE[cls]


def parent_reads(model: nn.Module) -> dict[str, str]:
    """Layers (by name) whose parent reads their ``weight`` or ``bias`` itself instead of calling them,
    with the reason: such a layer may be masked or quantized in place, but replacing it breaks the parent.

    Found from the parent class's source (``self.<child>.weight``); a class may also declare
    ``netshrink_reads_children = ("out_proj", ...)``.
    """
    out: dict[str, str] = {}
    for pname, parent in model.named_modules():
        if _inside_parametrization(pname):
            continue
        declared = set(getattr(type(parent), "netshrink_reads_children", ()) or ())
        for child in sorted(_children_read(type(parent)) | declared):
            # a direct child (``self.out_proj.weight``) or a deeper one (``self.embeddings.patch.projection.weight``)
            try:
                layer = parent.get_submodule(child)
            except AttributeError:
                continue
            if layer is None or layer_kind(layer) is None:
                continue
            name = f"{pname}.{child}" if pname else child
            who = "parent" if "." not in child else "ancestor"
            out.setdefault(name, f"its {who} {pname or '(the model)'!r} ({type(parent).__name__}) reads {child}.weight itself "
                                 "instead of calling it, so the layer cannot be replaced by another module")
    return out


def _inside_replaced(model: nn.Module) -> Callable[[str], str | None]:
    roots = {n: t for n, m in model.named_modules()
             if n and (t := getattr(type(m), "netshrink_type", None)) and t not in CONTAINER_TYPES}
    return lambda name: next((t for r, t in roots.items() if name.startswith(r + ".")), None)


# ---------------------------------------------------------------------------------------------- plans


@dataclass
class LayerPlan:
    """What a per-layer method will do: ``layers`` it acts on (by module name), ``aliases`` (a chosen
    layer -> the layers whose weight is tied to its weight: they follow it), and for every other layer
    weight why not (``skipped``: parameter name -> reason) or that the patterns left it out (``excluded``)."""

    layers: dict[str, nn.Module] = field(default_factory=dict)
    aliases: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    excluded: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    #: layer weights of a kind the method never handles (a Linear under Tucker): name -> why; reported
    #: as ``kept``, not as a skip (``strict`` does not refuse them)
    inapplicable: dict[str, str] = field(default_factory=dict)

    def check_strict(self, method: str, strict: bool) -> None:
        """With ``strict``, the first skipped parameter is a :class:`ModelError` naming it and why (before
        anything is changed)."""
        if strict and self.skipped:
            name, why = next(iter(self.skipped.items()))
            more = f" (and {len(self.skipped) - 1} more)" if len(self.skipped) > 1 else ""
            raise ModelError(f"{method}: strict: parameter {name!r} would be skipped: {why}{more}")


def _unknown_weight_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that hold a matrix (>= 2-D) ``weight`` parameter but are of no known kind (a custom
    layer): their weight is reported as skipped, never silently left out."""
    out = {}
    for name, m in model.named_modules():
        w = m._parameters.get("weight") if "weight" in m._parameters else None
        if w is None and hasattr(m, "parametrizations") and "weight" in m.parametrizations:
            w = m.parametrizations["weight"].original
        if (w is not None and w.dim() >= 2 and layer_kind(m) is None and not _inside_parametrization(name)
                and not isinstance(m, nn.MultiheadAttention)):
            out[name] = m
    return out


def plan_layers(model: nn.Module, patterns: list[str] | None, method: str, *, kinds: Iterable[str],
                reason: Callable[[str, nn.Module], str | None] | None = None, replaces: bool = False,
                field: str = "layers") -> LayerPlan:
    """The layers ``method`` acts on, and why each other layer weight is left alone.

    ``kinds``: the layer kinds the method applies to; ``reason(name, module)``: why it does not apply to
    one of them (None: it does); ``replaces``: the method swaps modules (low rank, structured matrices),
    so layers whose parent reads their weight, the insides of modules already replaced, and tied weights
    are skipped. With ``patterns`` (fnmatch globs) a pattern matching nothing, or a matched layer the method
    does not apply to, is a :class:`ConfigError` naming it; layers outside the patterns are ``excluded``.
    Tied weights (one storage) are compressed once: the first layer is chosen, the others follow it
    (``aliases``), or, for a replacing method, are skipped with the reason.
    """
    from ._state import tie_groups

    kinds = tuple(kinds)
    candidates = weight_layers(model, ALL_KINDS)
    reads = parent_reads(model) if replaces else {}
    inside = _inside_replaced(model) if replaces else (lambda _n: None)
    tied_to: dict[str, str] = {}  # weight name -> first name of its tie group
    for group in tie_groups(model):
        for n in group[1:]:
            tied_to[n] = group[0]
    plan = LayerPlan()
    matched: set[str] = set()
    for i, pat in enumerate(patterns or []):
        hits = [n for n in candidates if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            other = next(((n, mod) for n, mod in model.named_modules() if n and fnmatch.fnmatchcase(n, pat)), None)
            if other is not None:
                raise ConfigError(f"{field}[{i}]", f"{method} does not apply to {other[0]!r}: it is a "
                                                   f"{type(other[1]).__name__}, not a weight layer ({', '.join(ALL_KINDS)})")
            raise ConfigError(f"{field}[{i}]", f"no layer named {pat!r} (layers: {', '.join(candidates)})")
        matched.update(hits)
    for name, m in candidates.items():
        wname = f"{name}.weight"
        if patterns is not None and name not in matched:
            plan.excluded.add(wname)
            continue
        kind = layer_kind(m)
        why = None
        if kind not in kinds:
            why = (reason(name, m) if reason is not None else None) or f"{method} does not apply to {type(m).__name__} layers ({kind})"
            if patterns is None:
                plan.inapplicable[wname] = why
                continue
        elif inside(name) is not None and patterns is None:
            plan.excluded.add(wname)  # the insides of a replaced module: the replacement is the layer
            continue
        elif name in reads:
            why = reads[name]
        elif replaces and wname in tied_to:
            why = f"its weight is tied to {tied_to[wname]!r} (one storage); replacing it would untie them"
        elif replaces and any(t == wname for t in tied_to.values()):
            others = [n for n, t in tied_to.items() if t == wname]
            why = f"its weight is tied to {', '.join(map(repr, others))} (one storage); replacing it would untie them"
        elif reason is not None:
            why = reason(name, m)
        if why is not None:
            if patterns is not None:
                i = next(i for i, p in enumerate(patterns) if fnmatch.fnmatchcase(name, p))
                raise ConfigError(f"{field}[{i}]", f"{method} does not apply to layer {name!r}: {why}")
            plan.skipped[wname] = why
            continue
        if wname in tied_to:  # follows the first layer of its tie group
            plan.aliases.setdefault(tied_to[wname].rsplit(".", 1)[0], []).append(name)
            continue
        plan.layers[name] = m
    # a tied weight follows its first layer; when that one is not compressed, neither is the tie
    for first, followers in list(plan.aliases.items()):
        if first not in plan.layers:
            del plan.aliases[first]
            for f in followers:
                plan.skipped[f"{f}.weight"] = (f"its weight is tied to {first + '.weight'!r} (one storage), which "
                                               f"{method} does not compress here; the tie is compressed as one or not at all")
    for name, m in _unknown_weight_modules(model).items():
        wname = f"{name}.weight"
        if patterns is not None and not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            plan.excluded.add(wname)
        else:
            plan.skipped[wname] = f"{type(m).__name__} is not a layer type netshrink knows ({', '.join(ALL_KINDS)})"
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            for p in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                if getattr(m, p, None) is not None:
                    plan.skipped[f"{name}.{p}" if name else p] = ("a packed attention projection of nn.MultiheadAttention "
                                                                   "(convert it first: netshrink.convert_attention_)")
    order = {n: i for i, n in enumerate(candidates)}
    plan.layers = dict(sorted(plan.layers.items(), key=lambda kv: order.get(kv[0], 0)))
    return plan


__all__ = [
    "ALL_KINDS", "CONV", "CONV1D_GPT2", "CONV_TRANSPOSE", "DEFAULT_KINDS", "EMBEDDING", "LINEAR", "LayerPlan",
    "WEIGHT_LAYERS", "is_gpt2_conv1d", "layer_kind", "out_axis", "parent_reads", "per_layer", "plan_layers",
    "select_layers", "weight_layers",
]
