"""Budgets that bound building a model from a file's header, before anything real is built.

A header names a zoo model with arguments and lists layer replacements (edits); a crafted header can ask
for a depth of 2**40 or widths of 10**6. :class:`BuildGuard` bounds the construction itself: while it is
active, every module, parameter and buffer registered anywhere counts against the budget, and the
construction is stopped (a :class:`FormatError`) as soon as it registers more objects or more elements
than the budget allows -- so a loop of 2**40 blocks stops after a few hundred, on the meta device, in
milliseconds. The loader builds the model first on the meta device (no memory), compares its tensors'
names and shapes with the file's, and only then builds it for real.

The budget comes from the file: ``objects <= 256 + 16 * (declared tensors)`` and
``elements <= 2**24 + 256 * (declared elements)``, where the declared elements are themselves bounded by
the file's size (:func:`netshrink.pack._schema.element_limit`). The slack above the declared tensors
covers non-persistent buffers that a file does not store (a hashed layer's index, a mask).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.nn.modules import module as _module

from ..errors import FormatError

_lock = threading.Lock()
_active: list["_Counter"] = []
_hooks: list[Any] = []


@dataclass(frozen=True)
class BuildBudget:
    """Most registrations (modules, parameters, buffers) and tensor elements a build may make."""

    objects: int
    elements: int
    where: str = "model"

    @classmethod
    def for_file(cls, n_tensors: int, n_elements: int, where: str) -> "BuildBudget":
        return cls(256 + 16 * int(n_tensors), (1 << 24) + 256 * int(n_elements), where)


class _Counter:
    def __init__(self, budget: BuildBudget):
        self.budget = budget
        self.objects = 0
        self.elements = 0

    def count(self, value: Any) -> None:
        self.objects += 1
        if isinstance(value, torch.Tensor):
            self.elements += value.numel()
        b = self.budget
        if self.objects > b.objects:
            raise FormatError(f"{b.where}: building it registers {self.objects} modules and tensors, "
                              f"which exceed the limit of {b.objects} for the tensors it must hold")
        if self.elements > b.elements:
            raise FormatError(f"{b.where}: building it makes tensors of {self.elements} elements, "
                              f"which exceed the limit of {b.elements} for the tensors it must hold")


def _on_register(module: Any, name: str, value: Any) -> None:
    for c in list(_active):
        c.count(value)
    return None


def _install() -> None:
    if not _hooks:
        _hooks.append(_module.register_module_module_registration_hook(_on_register))
        _hooks.append(_module.register_module_parameter_registration_hook(_on_register))
        _hooks.append(_module.register_module_buffer_registration_hook(_on_register))


def _uninstall() -> None:
    while _hooks:
        _hooks.pop().remove()


class BuildGuard:
    """Counts registrations against one :class:`BuildBudget`, separately for meta and real builds;
    :meth:`scope` is the context in which a build is counted (and, with ``meta=True``, runs on the
    meta device)."""

    def __init__(self, budget: BuildBudget):
        self.budget = budget
        self._counters = {True: _Counter(budget), False: _Counter(budget)}

    @contextlib.contextmanager
    def scope(self, meta: bool = False) -> Iterator[None]:
        counter = self._counters[bool(meta)]
        with _lock:
            _install()
            _active.append(counter)
        try:
            if meta:
                with torch.device("meta"):
                    yield
            else:
                yield
        finally:
            with _lock:
                _active.remove(counter)
                if not _active:
                    _uninstall()
