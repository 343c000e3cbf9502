"""Registries: one small mechanism for methods, module types, models, data sets and tasks.

This is a leaf module: it imports none of the families it serves. A :class:`Registry` maps names to
objects; the families fill it with decorators when they are imported. Who imports them is decided in
one place, the composition root :mod:`netshrink._plugins`, which a registry asks (once, lazily, on its
first lookup or listing) to import the built-in families and the Python entry points of its group
(``netshrink.models``, ``netshrink.datasets``, ``netshrink.methods``), so other packages can add to it.

A family module registers each method once::

    @register("magnitude", family="prune")
    @dataclass
    class MagnitudeConfig(BaseConfig): ...

    @handler(MagnitudeConfig)
    def _magnitude(model, config, data=None, task=None): ...

Recipes resolve a method name only through :func:`config_type`; the family entry points
(``prune_``, ``quantize_``) dispatch on the config's type through :func:`handler_for`; the pipeline
calls a handler with its context (:class:`HandlerContext`) through :func:`run_handler`.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Names -> objects of one kind (``kind`` names it in errors), filled by :meth:`register`.

    ``group`` is the Python entry-point group that extends it (None: built-ins only). Reading a
    registry (``get``, ``names``, ``in``, iteration) first lets the composition root populate it.
    Registering a second, different object under a taken name raises ``duplicate`` (an exception type).
    """

    def __init__(self, kind: str, *, group: str | None = None, field: str | None = None,
                 duplicate: type[Exception] = RuntimeError) -> None:
        self.kind = kind
        self.group = group
        self.field = field if field is not None else kind.replace(" ", "_")
        self.duplicate = duplicate
        self._items: dict[str, T] = {}
        #: entry points that failed to load: name -> the one-line reason (shown when the name is asked for)
        self.broken: dict[str, str] = {}
        self._populated = False

    # ---- filling
    def add(self, name: str, obj: T) -> T:
        if not isinstance(name, str) or not name:
            raise TypeError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        old = self._items.get(name)
        if old is not None and old is not obj:
            err = self.duplicate
            msg = f"{self.kind} {name!r} registered twice: the name is already registered"
            raise err(self.field, msg) if issubclass(err, ConfigError) else err(msg)
        self._items[name] = obj
        self.broken.pop(name, None)
        return obj

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@registry.register("name")`` adds the decorated object under ``name``."""
        return lambda obj: self.add(name, obj)

    def copy(self) -> "Registry[T]":
        """An independent registry with the same entries (tests extend a copy)."""
        new: Registry[T] = Registry(self.kind, group=self.group, field=self.field, duplicate=self.duplicate)
        self._populate()
        new._items = dict(self._items)
        new.broken = dict(self.broken)
        new._populated = True
        return new

    # ---- reading
    def _populate(self, rescan: bool = False) -> None:
        if self._populated and not rescan:
            return
        self._populated = True
        # the one composition root imports the families and reads entry points; named, not imported
        # at module level, so this leaf never depends on the families
        importlib.import_module("netshrink._plugins").populate(self, rescan=rescan)

    def names(self) -> list[str]:
        self._populate()
        return sorted(self._items)

    def get(self, name: str, default: Any = None) -> Any:  # Mapping.get: no error
        self._populate()
        if name not in self._items:
            self._populate(rescan=True)
        return self._items.get(name, default)

    def lookup(self, name: Any, field: str | None = None) -> T:
        """The object registered as ``name``; a :class:`ConfigError` naming ``field`` and the known names if none."""
        where = self.field if field is None else field
        if not isinstance(name, str):
            raise ConfigError(where, f"expected a {self.kind} name, got {name!r}")
        obj = self.get(name)
        if obj is None:
            if name in self.broken:
                raise ConfigError(where, f"{self.kind} {name!r} comes from a plugin that failed to load: {self.broken[name]}")
            raise ConfigError(where, f"unknown {self.kind} {name!r} (known: {', '.join(self.names()) or 'none'})")
        return obj

    def __getitem__(self, name: str) -> T:
        obj = self.get(name)
        if obj is None:
            raise KeyError(name)
        return obj

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._items)} entries)"


# ----------------------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class MethodInfo:
    name: str
    family: str
    config: type
    summary: str


METHODS: Registry[MethodInfo] = Registry("method", group="netshrink.methods", field="method")
_HANDLERS: dict[type, Callable[..., Any]] = {}


def register(name: str, family: str) -> Callable[[type], type]:
    """Class decorator: register a config type under a recipe method name."""

    def deco(cls: type) -> type:
        old = METHODS._items.get(name)
        if old is not None and old.config is not cls:
            raise RuntimeError(f"method {name!r} registered twice")
        doc = (cls.__doc__ or "").strip().splitlines()
        cls.method = name
        METHODS._items[name] = MethodInfo(name, family, cls, doc[0] if doc else "")
        return cls

    return deco


def handler(config_type: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Function decorator: the function that applies configs of ``config_type``."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _HANDLERS[config_type] = fn
        return fn

    return deco


def config_type(name: str, field: str = "method") -> type:
    """The config class registered under ``name``; a :class:`ConfigError` naming ``field`` if none."""
    return METHODS.lookup(name, field).config


def method_info(name: str) -> MethodInfo:
    return METHODS.lookup(name)


def handler_for(config: Any, family: str | None = None) -> Callable[..., Any]:
    """The handler registered for ``type(config)``, checked against ``family`` when given."""
    METHODS._populate()
    fn = _HANDLERS.get(type(config))
    if fn is None:
        raise ConfigError("method", f"no handler for {type(config).__name__}")
    if family is not None:
        info = METHODS.get(getattr(config, "method", ""))
        if info is not None and info.family != family:
            raise ConfigError("method", f"{info.name!r} is a {info.family} method, not a {family} method")
    return fn


def list_methods(family: str | None = None) -> list[MethodInfo]:
    """Every registered method, sorted by family then name."""
    infos = [METHODS[n] for n in METHODS.names()]
    return sorted((i for i in infos if family is None or i.family == family), key=lambda i: (i.family, i.name))


# ---------------------------------------------------------------------------------- handler calls


@dataclass
class HandlerContext:
    """What the pipeline hands a stage's handler besides the model and its config.

    ``data``: the run's :class:`~netshrink.data.Splits`; ``task``: the recipe's
    :class:`~netshrink.task.Task`; ``example``: example inputs (:class:`~netshrink.task.Inputs`) for
    tracing, MACs and timing.
    """

    data: Any = None
    task: Any = None
    example: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def run_handler(model: Any, config: Any, ctx: HandlerContext) -> Any:
    """Call the handler of ``config`` with what of ``ctx`` it takes.

    Every handler takes ``data=``; one that declares ``task``, ``example`` or ``ctx`` (or ``**kwargs``)
    gets them too.
    """
    fn = handler_for(config)
    params = inspect.signature(fn).parameters
    any_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs: dict[str, Any] = {"data": ctx.data}
    for name, value in (("task", ctx.task), ("example", ctx.example), ("ctx", ctx)):
        if any_kw or name in params:
            kwargs[name] = value
    return fn(model, config, **kwargs)

