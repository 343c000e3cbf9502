"""Base config dataclass: validation in ``__post_init__``, conversion to and from plain dicts.

Every method config (``MagnitudeConfig``, ``KMeansConfig``, ...) subclasses :class:`BaseConfig`.
``from_dict`` rejects unknown keys and values of the wrong type with a :class:`ConfigError` that names
the field; range checks live in each subclass's ``validate`` (called from ``__post_init__``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

from .errors import ConfigError


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, field: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints accepted for floats)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(field, f"expected null, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(field, f"expected {_type_name(tp)}, got {value!r}")
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, field)
            except ConfigError:
                continue
        raise ConfigError(field, f"expected {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(field, f"expected a list, got {value!r}")
        (item_tp, *_rest) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{field}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(field, f"expected a mapping, got {value!r}")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {_coerce(k, key_tp, field): _coerce(v, val_tp, f"{field}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, BaseConfig):
        if isinstance(value, tp):
            return value
        return tp.from_dict(value, where=field)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(field, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(field, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(field, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(field, f"expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(field, f"expected {_type_name(tp)}, got {value!r}")


@dataclasses.dataclass
class BaseConfig:
    """A validated, serialisable configuration.

    Subclasses declare typed dataclass fields and override :meth:`validate` for range checks,
    raising :class:`ConfigError` with the field name.
    """

    #: the registered method name a recipe uses for this config (``"magnitude"``, ``"kmeans"``)
    method: ClassVar[str] = ""
    #: True for methods that replace modules (low rank): recipe checks apply them so that later
    #: stages can name the new layers
    replaces_modules: ClassVar[bool] = False

    #: a per-layer method that would skip a parameter (a layer type it does not handle, a layer its
    #: parent reads directly) raises a ModelError naming the parameter and the reason instead
    #: (:mod:`netshrink._coverage`); keyword-only, so subclasses keep their positional fields
    strict: bool = dataclasses.field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(getattr(self, f.name), hints[f.name], f.name))
        self.validate()

    def validate(self) -> None:  # pragma: no cover - overridden where there is something to check
        """Range checks; raise :class:`ConfigError` naming the field."""

    def check_model(self, model: Any) -> None:
        """Checks that need the model (layer names exist); raise :class:`ConfigError` naming the field.

        Called on a fresh model before a recipe runs, so bad layer names fail before anything is written.
        """

    def substages(self) -> list["BaseConfig"]:
        """The configs this one runs as, in order (an iterative method expands into its rounds)."""
        return [self]

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> "BaseConfig":
        """Build from a plain mapping; unknown keys and wrong types raise :class:`ConfigError`."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(where, f"expected a mapping of {cls.__name__} fields, got {data!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in names:
                known = ", ".join(sorted(names)) or "none"
                raise ConfigError(f"{where}.{key}" if where else str(key), f"unknown key (known: {known})")
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ConfigError(f"{where}.{missing[0]}" if where else missing[0], "required field is missing")
        try:
            return cls(**data)
        except ConfigError as err:
            raise err.under(where) from None
        except TypeError as err:  # a dataclass signature mismatch
            raise ConfigError(where, str(err)) from None

    def to_dict(self) -> dict[str, Any]:
        """A plain dict that :meth:`from_dict` turns back into an equal config."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, BaseConfig) else value
        return out


def check_range(field: str, value: float, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``lo <= value <= hi`` (bounds open where asked)."""
    ok_lo = value > lo if lo_open else value >= lo
    ok_hi = value < hi if hi_open else value <= hi
    if not (ok_lo and ok_hi):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ConfigError(field, f"must lie in {interval}, got {value}")


__all__ = ["BaseConfig", "check_range", "ConfigError"]

_ = typing  # typing is kept for get_type_hints on string annotations of subclasses
