"""Benchmark suites: each module registers a function ``(work_dir, results_dir, resume, machine) -> rows``."""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable


@dataclass
class SummaryRow:
    suite: str
    method: str
    model: str
    test_error: float
    params: int
    nonzeros: int
    bytes: int
    ratio: float
    macs_dense: int
    macs_effective: int
    latency_b1_ms: float
    latency_b64_ms: float


SUITES: dict[str, Callable[..., list[SummaryRow]]] = {}


def suite(name: str):
    def deco(fn):
        SUITES[name] = fn
        return fn

    return deco


def load_all() -> None:
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")
