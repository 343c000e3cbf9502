"""Method registry: config type -> handler, and method name -> config type.

A family module registers each method once::

    @register("magnitude", family="prune")
    @dataclass
    class MagnitudeConfig(BaseConfig): ...

    @handler(MagnitudeConfig)
    def _magnitude(model, config, ctx): ...

Recipes resolve a method name only through :func:`config_type`; the family entry points
(``prune_``, ``quantize_``) dispatch on the config's type through :func:`handler_for`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .errors import ConfigError


@dataclass(frozen=True)
class MethodInfo:
    name: str
    family: str
    config: type
    summary: str


_BY_NAME: dict[str, MethodInfo] = {}
_HANDLERS: dict[type, Callable[..., Any]] = {}


def register(name: str, family: str) -> Callable[[type], type]:
    """Class decorator: register a config type under a recipe method name."""

    def deco(cls: type) -> type:
        if name in _BY_NAME and _BY_NAME[name].config is not cls:
            raise RuntimeError(f"method {name!r} registered twice")
        doc = (cls.__doc__ or "").strip().splitlines()
        cls.method = name
        _BY_NAME[name] = MethodInfo(name, family, cls, doc[0] if doc else "")
        return cls

    return deco


def handler(config_type: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Function decorator: the function that applies configs of ``config_type``."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _HANDLERS[config_type] = fn
        return fn

    return deco


def _load_families() -> None:
    # importing the families registers their methods; done lazily, never at package import
    from . import lowrank, prune, quantize  # noqa: F401
    from .pack import stage  # noqa: F401
    from . import filters, matrices  # noqa: F401


def config_type(name: str, field: str = "method") -> type:
    """The config class registered under ``name``; a :class:`ConfigError` naming ``field`` if none."""
    _load_families()
    try:
        return _BY_NAME[name].config
    except KeyError:
        known = ", ".join(sorted(_BY_NAME))
        raise ConfigError(field, f"unknown method {name!r} (known: {known})") from None


def method_info(name: str) -> MethodInfo:
    config_type(name)
    return _BY_NAME[name]


def handler_for(config: Any, family: str | None = None) -> Callable[..., Any]:
    """The handler registered for ``type(config)``, checked against ``family`` when given."""
    _load_families()
    fn = _HANDLERS.get(type(config))
    if fn is None:
        raise ConfigError("method", f"no handler for {type(config).__name__}")
    if family is not None:
        info = _BY_NAME.get(getattr(config, "method", ""))
        if info is not None and info.family != family:
            raise ConfigError("method", f"{info.name!r} is a {info.family} method, not a {family} method")
    return fn


def list_methods(family: str | None = None) -> list[MethodInfo]:
    """Every registered method, sorted by family then name."""
    _load_families()
    infos = [i for i in _BY_NAME.values() if family is None or i.family == family]
    return sorted(infos, key=lambda i: (i.family, i.name))
