"""What a method did to each parameter of a model: compressed (and how), or not, and why.

Every per-layer method returns a :class:`Coverage` in its result (``result.coverage``). A parameter is:

- ``compressed``: the method changed how it is stored or computed (``how`` says what: "pruned to 50.0%
  zeros", "16-entry codebook", "factorized rank 8");
- ``skipped``: a layer weight the method was asked to cover but could not (an unsupported layer type, a
  parent that reads the weight itself); ``reason`` says why. With ``strict=True`` on the config a skip is
  a :class:`~netshrink.errors.ModelError` naming the parameter and the reason;
- ``excluded``: a layer weight outside the ``layers`` patterns the user gave;
- ``kept``: not what the method acts on by design (biases, norms, position tables, layers of a kind the
  method never handles, such as a Linear under Tucker); ``detail`` says which.

Tied parameters (one storage under several names, :func:`netshrink._state.tie_groups`) appear once, under
the first name, with the other names in ``aliases``. ``notes`` hold model-level changes a method made
first (an ``nn.MultiheadAttention`` converted to separate projections).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from .errors import ModelError

Status = Literal["compressed", "skipped", "excluded", "kept"]
STATUSES: tuple[str, ...] = ("compressed", "skipped", "excluded", "kept")


@dataclass(frozen=True)
class ParamRecord:
    """One parameter's fate under one method: ``status``, and ``detail`` (how, or why not)."""

    name: str
    numel: int
    status: Status
    detail: str = ""
    aliases: tuple[str, ...] = ()


@dataclass
class Coverage:
    """Per-parameter records of one method call, in the model's parameter order."""

    method: str
    params: dict[str, ParamRecord] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def by_status(self, status: str) -> dict[str, ParamRecord]:
        return {n: r for n, r in self.params.items() if r.status == status}

    @property
    def compressed(self) -> dict[str, ParamRecord]:
        return self.by_status("compressed")

    @property
    def skipped(self) -> dict[str, ParamRecord]:
        return self.by_status("skipped")

    def numel(self, status: str) -> int:
        return sum(r.numel for r in self.params.values() if r.status == status)

    @property
    def fraction_compressed(self) -> float:
        """Elements compressed / elements of every parameter (unique storage)."""
        total = sum(r.numel for r in self.params.values())
        return self.numel("compressed") / total if total else 0.0

    def check_strict(self) -> None:
        """A :class:`ModelError` naming the first skipped parameter and its reason, if any."""
        skipped = self.skipped
        if skipped:
            first = next(iter(skipped.values()))
            more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
            raise ModelError(f"{self.method}: strict: parameter {first.name!r} was skipped: {first.detail}{more}")

    def summary(self) -> str:
        """One line: counts and elements per status."""
        parts = [f"{len(self.by_status(s))} {s} ({self.numel(s):,} elements)" for s in STATUSES if self.by_status(s)]
        return f"{self.method}: " + ", ".join(parts)

    def rows(self) -> list[list[str]]:
        """Table rows: parameter (and its tied names), elements, status, how or why."""
        return [[r.name + (f" (= {', '.join(r.aliases)})" if r.aliases else ""), f"{r.numel:,}", r.status, r.detail]
                for r in self.params.values()]

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "notes": list(self.notes),
                "params": [{"name": r.name, "numel": r.numel, "status": r.status, "detail": r.detail,
                            "aliases": list(r.aliases)} for r in self.params.values()]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Coverage":
        cov = cls(str(data.get("method", "")), notes=[str(n) for n in data.get("notes", [])])
        for p in data.get("params", []):
            cov.params[p["name"]] = ParamRecord(p["name"], int(p["numel"]), p["status"], p.get("detail", ""),
                                                tuple(p.get("aliases", ())))
        return cov


COLUMNS = ("parameter", "elements", "status", "how / why")


def build_coverage(model: nn.Module, method: str, done: dict[str, str], skipped: dict[str, str] | None = None,
                   excluded: set[str] | None = None, notes: list[str] | None = None,
                   kept_reason: str = "not a layer weight this method acts on",
                   inapplicable: dict[str, str] | None = None,
                   params: dict[str, tuple[int, tuple[str, ...]]] | None = None) -> Coverage:
    """A :class:`Coverage` of every parameter of ``model`` (unique storage, by effective name).

    ``done``: parameter name -> how it was compressed; ``skipped``: name -> why not; ``excluded``: names
    outside the user's patterns; ``inapplicable``: layer weights of a kind the method never handles ->
    why (``kept``); everything else is ``kept`` with ``kept_reason`` (a bias: "bias"). ``params``: the
    parameters to report (:func:`netshrink._state.unique_parameters` taken before a method replaced modules;
    default: the model's now).
    A tied parameter named under any of its names takes the first name's record.
    """
    from ._state import unique_parameters

    skipped, excluded, inapplicable = skipped or {}, excluded or set(), inapplicable or {}
    cov = Coverage(method, notes=list(notes or []))
    for name, (numel, aliases) in (params if params is not None else unique_parameters(model)).items():
        names = (name, *aliases)
        hit = next((n for n in names if n in done), None)
        if hit is not None:
            rec = ParamRecord(name, numel, "compressed", done[hit], aliases)
        elif any(n in skipped for n in names):
            via = next(n for n in names if n in skipped)
            rec = ParamRecord(name, numel, "skipped", (f"as {via}: " if via != name else "") + skipped[via], aliases)
        elif any(n in excluded for n in names):
            rec = ParamRecord(name, numel, "excluded", "not matched by the config's layers patterns", aliases)
        elif any(n in inapplicable for n in names):
            rec = ParamRecord(name, numel, "kept", inapplicable[next(n for n in names if n in inapplicable)], aliases)
        else:
            leaf = name.rsplit(".", 1)[-1]
            why = "a bias (this method compresses layer weights)" if leaf.endswith("bias") else kept_reason
            rec = ParamRecord(name, numel, "kept", why, aliases)
        cov.params[name] = rec
    return cov


def plan_coverage(model: nn.Module, method: str, done: dict[str, str], plan: Any, notes: list[str] | None = None,
                  strict: bool = False, extra_skipped: dict[str, str] | None = None,
                  params: dict[str, tuple[int, tuple[str, ...]]] | None = None) -> Coverage:
    """:func:`build_coverage` from a :class:`netshrink._layers.LayerPlan`; with ``strict``, a skip found
    only while compressing (``extra_skipped``) is an error too."""
    skipped = dict(plan.skipped)
    skipped.update(extra_skipped or {})
    cov = build_coverage(model, method, done, skipped, plan.excluded, list(plan.notes) + list(notes or []),
                         inapplicable=plan.inapplicable, params=params)
    record(model, cov)
    if strict:
        cov.check_strict()
    return cov


#: the attribute on the root model that keeps the coverage of every method applied to it (plain JSON)
LOG_ATTR = "netshrink_coverage"


def record(model: nn.Module, coverage: Coverage) -> None:
    """Append ``coverage`` to the model's log (:data:`LOG_ATTR`), which the run report shows."""
    log = list(getattr(model, LOG_ATTR, None) or [])
    log.append(coverage.to_dict())
    setattr(model, LOG_ATTR, log)


def coverage_log(model: nn.Module) -> list[Coverage]:
    """Every :class:`Coverage` recorded on ``model``, in the order the methods ran (in this process: a
    model loaded from a file starts with none)."""
    return [Coverage.from_dict(d) for d in getattr(model, LOG_ATTR, None) or []]


__all__ = ["COLUMNS", "Coverage", "ParamRecord", "STATUSES", "build_coverage", "coverage_log", "plan_coverage", "record"]
