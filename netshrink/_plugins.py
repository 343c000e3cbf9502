"""The composition root: the one place that imports the families and reads Python entry points.

The registries (:mod:`netshrink._registry`) know nothing of what fills them. On the first read of a
registry this module imports netshrink's built-in families (whose decorators register their methods,
module types, models, data sets and tasks), then loads the entry points of the registry's group:

==================== ===================================================================
group                what the entry point names
==================== ===================================================================
``netshrink.models``   a builder ``fn(**args) -> nn.Module``, registered under the entry point's
                       name (or a module whose import registers models with ``register_model``)
``netshrink.datasets`` a loader ``fn(**args) -> Splits``, registered under the entry point's name
                       (or a module that calls ``register_dataset``)
``netshrink.methods``  a module (or a config class in it) whose import registers the method named
                       like the entry point, with ``register_method`` and ``method_handler``
``netshrink.tasks``    a factory ``fn(**args) -> netshrink.task.Task``, registered under the entry
                       point's name (recipes' ``task:``)
==================== ===================================================================

A package declares them in its ``pyproject.toml``::

    [project.entry-points."netshrink.models"]
    my_net = "my_pkg.models:build_my_net"

An entry point that fails to import is not fatal to the others: it is logged, and asking for its name
gives one line with the reason. This module also resolves ``"package.module:attribute"`` strings
(recipes' ``model:``, ``data:`` and ``task:`` factories) with :func:`import_object`.
"""

from __future__ import annotations

import importlib
import logging
import re
from typing import Any

from .errors import ConfigError

log = logging.getLogger("netshrink.plugins")

#: netshrink's own modules whose import registers methods, module types, models, data sets and tasks
FAMILIES = (
    "netshrink.models",
    "netshrink.data",
    "netshrink.task",
    "netshrink.prune",
    "netshrink.quantize",
    "netshrink.lowrank",
    "netshrink.filters",
    "netshrink.matrices",
    "netshrink.pack.stage",
)

_families_loaded = False
#: entry points already tried, per group: (name, value)
_tried: set[tuple[str, str, str]] = set()


def load_families() -> None:
    """Import the built-in families once (their decorators fill the registries)."""
    global _families_loaded
    if _families_loaded:
        return
    _families_loaded = True
    for name in FAMILIES:
        importlib.import_module(name)


def entry_points(group: str) -> list[Any]:
    """The installed entry points of ``group`` (any distribution on ``sys.path``)."""
    from importlib.metadata import entry_points as _eps

    return list(_eps(group=group))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def populate(registry: Any, *, rescan: bool = False) -> None:
    """Fill ``registry``: the built-in families, then the entry points of its group not yet loaded."""
    load_families()
    if registry.group is None:
        if registry.kind == "module type":  # plugin methods define the module types they swap in
            from ._registry import METHODS

            METHODS._populate(rescan=rescan)
        return
    for ep in entry_points(registry.group):
        key = (registry.group, ep.name, ep.value)
        if key in _tried or ep.name in registry._items:
            continue
        _tried.add(key)
        where = f"entry point {ep.name} = {ep.value} (group {registry.group})"
        try:
            obj = ep.load()
        except Exception as err:  # a broken plugin must not break netshrink: it is reported by name
            registry.broken[ep.name] = f"{where}: {_first_line(err)}"
            log.warning("netshrink plugin failed to load: %s: %s", where, _first_line(err))
            continue
        if ep.name in registry._items:  # importing it registered the name
            continue
        if registry.group != "netshrink.methods" and callable(obj) and not isinstance(obj, type(importlib)):
            registry.add(ep.name, obj)
            continue
        registry.broken[ep.name] = f"{where}: loaded, but it registered no {registry.kind} named {ep.name!r}"
        log.warning("netshrink plugin %s registered no %s named %r", where, registry.kind, ep.name)


# ------------------------------------------------------------------------------------ user objects

_SPEC = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def is_object_spec(value: Any) -> bool:
    """Whether ``value`` reads ``package.module:attribute`` (a factory to import)."""
    return isinstance(value, str) and _SPEC.match(value) is not None


def import_object(spec: str, field: str) -> Any:
    """The object that ``"package.module:attribute"`` names; a :class:`ConfigError` naming ``field`` if
    the module does not import or lacks the attribute.

    This runs the module's code: it is how a recipe names the user's own Python (a recipe is code the
    user chose to run, like a script), never something read from a data or model file.
    """
    if not is_object_spec(spec):
        raise ConfigError(field, f"expected 'package.module:attribute', got {spec!r}")
    module_name, attr = spec.split(":", 1)
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or any error raised by the module's own code
        raise ConfigError(field, f"cannot import {module_name!r} (from {spec!r}): {_first_line(err)}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(field, f"module {module_name!r} has no attribute {attr!r}") from None
    return obj


def call_factory(spec: str, args: dict[str, Any], field: str, what: str) -> Any:
    """``import_object(spec)(**args)``; anything the factory raises becomes one :class:`ConfigError` line."""
    fn = import_object(spec, field)
    if not callable(fn):
        raise ConfigError(field, f"{spec!r} is a {type(fn).__name__}, not a callable that builds {what}")
    try:
        return fn(**args)
    except ConfigError as err:
        raise err.under(field) from None
    except Exception as err:  # the user's code: any exception, reported in one line
        raise ConfigError(field, f"the factory {spec!r} raised {_first_line(err)}") from None
