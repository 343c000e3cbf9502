"""The exceptions that netshrink raises on bad input.

Every error is one line that names what is wrong (a recipe field, a layer name, a file offset).
The CLI turns any :class:`NetshrinkError` into that line on stderr and exit code 2.
"""

from __future__ import annotations


class NetshrinkError(Exception):
    """Base class of every error that netshrink raises on bad input."""


class ConfigError(NetshrinkError, ValueError):
    """A config or recipe field is missing, unknown, of the wrong type or out of range.

    ``field`` is the dotted path of the field (``stages[1].args.bits``) so a user can find it.
    """

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)

    def under(self, prefix: str) -> "ConfigError":
        """The same error with its field path placed under ``prefix``."""
        if not prefix:
            return self
        joined = f"{prefix}.{self.field}" if self.field and not self.field.startswith("[") else f"{prefix}{self.field}"
        return ConfigError(joined, self.message)


class FormatError(NetshrinkError):
    """An .nsk file is truncated, corrupt, of an unknown version or otherwise unreadable."""


class DataError(NetshrinkError):
    """A data set is missing, fails its checksum, or is malformed."""


class ModelError(NetshrinkError):
    """A model, layer name or module type does not fit the operation asked of it."""
