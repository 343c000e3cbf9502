"""Deployment: a compressed model in the runtime form where it runs fastest, chosen by measurement.

:func:`deploy` builds every form a model has —

- ``torch``: the model as it is (eager PyTorch; masks and shared weights made permanent);
- ``torch-sparse``: Linear layers at or above ``sparse_min`` sparsity as CSR
  (:func:`netshrink.prune.sparse_exec.sparsify_linear_`), when any layer qualifies;
- ``onnx-fp32``: ONNX of the physically smaller graph (pruned channels, factors, BatchNorm fused by
  onnxruntime's graph optimizer) in onnxruntime;
- ``onnx-int8``: static int8 QDQ (per-channel weights, calibrated activations, BatchNorm folded:
  :func:`netshrink.export.export_onnx` with ``int8=True``) in onnxruntime, when calibration data is given

— checks each against the compressed model (outputs within ``atol``/``rtol`` for the float forms; the
task's metric on ``val`` data within ``metric_tolerance`` for int8, whose rounding changes outputs by
design), refuses a form that is off with the measured gap, times the accepted ones in turns (``rounds``
rounds of ``runs`` timed calls per batch size, threads fixed, the round with the middle median kept:
ratios from one run, as DESIGN.md asks) and picks the fastest by the geometric mean of its speedups
over ``torch`` across the batch sizes. The chosen ONNX file (or, when eager torch wins, none) and a
``deploy.json`` with every form's timings land in ``out_dir``.

:func:`profile_onnx` is the per-operator profile of an onnxruntime session (where the time of a small
model goes: arithmetic or overhead).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .errors import ConfigError, ModelError
from .task import Inputs, Task, resolve_task

FORMS = ("torch", "torch-sparse", "onnx-fp32", "onnx-int8")


@dataclass
class FormResult:
    """One runtime form: its timings (median ms per batch size), its check against the model, its file."""

    name: str
    runtime: str
    median_ms: dict[int, float] = field(default_factory=dict)
    speedup: dict[int, float] = field(default_factory=dict)
    max_abs_gap: float | None = None
    metric: float | None = None
    path: str | None = None
    bytes: int | None = None
    refused: str | None = None
    note: str = ""


@dataclass
class DeployResult:
    chosen: str
    forms: list[FormResult]
    threads: int
    batch_sizes: tuple[int, ...]
    path: str | None

    def form(self, name: str) -> FormResult:
        for f in self.forms:
            if f.name == name:
                return f
        raise KeyError(name)

    def table(self) -> str:
        bs = self.batch_sizes
        head = "| form | runtime | " + " | ".join(f"b{b} ms | b{b} x" for b in bs) + " | check | |\n"
        head += "|---|---|" + "---:|---:|" * len(bs) + "---|---|\n"
        rows = []
        for f in self.forms:
            if f.refused:
                cells = " | ".join("— | —" for _ in bs)
                rows.append(f"| {f.name} | {f.runtime} | {cells} | refused: {f.refused} | |")
                continue
            cells = " | ".join(f"{f.median_ms[b]:.3f} | {f.speedup[b]:.2f}x" for b in bs)
            check = f"max gap {f.max_abs_gap:.2e}" if f.max_abs_gap is not None else ""
            if f.metric is not None:
                check += f"{', ' if check else ''}metric {f.metric:.4g}"
            rows.append(f"| {f.name} | {f.runtime} | {cells} | {check} | {'**chosen**' if f.name == self.chosen else ''} |")
        return head + "\n".join(rows) + "\n"


def _time(fn: Callable[[], Any], runs: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - t0) / 1e6)
    return float(np.median(times))


def _repeat(example: Inputs, b: int) -> Inputs:
    rep = lambda t: t[:1].repeat((b,) + (1,) * (t.dim() - 1)) if isinstance(t, torch.Tensor) and t.dim() > 0 else t  # noqa: E731
    return Inputs(tuple(rep(a) for a in example.args), {k: rep(v) for k, v in example.kwargs.items()})


def time_forms(
    runners: dict[str, Callable[[Inputs], Any]], example: Any, batch_sizes: Sequence[int] = (1, 32), *,
    runs: int = 20, rounds: int = 3, warmup: int = 3,
) -> dict[str, dict[int, float]]:
    """Median ms of ``runs`` calls of each runner per batch size, the runners taking turns for ``rounds``
    rounds, every other round in reverse order (a burst or drift of load falls on all alike); per runner and
    batch size the round with the middle median.
    ``example``'s first example is repeated to each batch size."""
    ex = Inputs.of(example).take(1)
    feeds = {b: _repeat(ex, b) for b in batch_sizes}
    per_round: dict[str, dict[int, list[float]]] = {n: {b: [] for b in batch_sizes} for n in runners}
    order = list(runners.items())
    for r in range(rounds):
        # every other round in reverse order: a load that drifts during the run falls on every form alike
        for name, run in (order if r % 2 == 0 else order[::-1]):
            for b in batch_sizes:
                per_round[name][b].append(_time(lambda: run(feeds[b]), runs, warmup))
    return {n: {b: sorted(v)[len(v) // 2] for b, v in d.items()} for n, d in per_round.items()}


def torch_runner(model: nn.Module, task: Task | None = None) -> Callable[[Inputs], np.ndarray]:
    """A callable running ``model`` (eval, no grad) on :class:`~netshrink.task.Inputs`, returning its output as numpy."""
    return _runner_torch(model.eval(), resolve_task(task))


def ort_runner(session: Any) -> Callable[[Inputs], np.ndarray]:
    """A callable running an onnxruntime session on :class:`~netshrink.task.Inputs`."""
    return _runner_ort(session)


#: the runtimes a latency budget can be measured in
RUNTIMES = ("torch", "onnxruntime")


def measured_latency(
    model: nn.Module, example: Any, batch: int, runtime: str = "onnxruntime", *, runs: int = 20, warmup: int = 3,
    threads: int | None = None, task: Task | str | None = None,
) -> float:
    """Median ms of ``runs`` calls of ``model`` at batch ``batch`` in its deployed ``runtime`` form:
    ``torch`` (eager) or ``onnxruntime`` (fp32 ONNX of the model as it is, all graph optimizations) —
    what a latency budget (``auto_channel``) is measured in."""
    import tempfile

    if runtime not in RUNTIMES:
        raise ConfigError("latency_runtime", f"unknown runtime {runtime!r} (known: {', '.join(RUNTIMES)})")
    ex = Inputs.of(example).take(1)
    previous = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        if runtime == "torch":
            run = torch_runner(_plain(model), task)
        else:
            from .export import export_onnx, ort_session

            with tempfile.TemporaryDirectory(prefix="netshrink-latency-") as tmp:
                path = Path(tmp) / "model.onnx"
                export_onnx(model, path, ex, task=resolve_task(task))
                run = _runner_ort(ort_session(path, threads=threads or torch.get_num_threads()))
        return time_forms({"m": run}, ex, (batch,), runs=runs, rounds=1, warmup=warmup)["m"][batch]
    finally:
        torch.set_num_threads(previous)


def _plain(model: nn.Module) -> nn.Module:
    from .export import _plain_copy

    return _plain_copy(model).eval()


def _runner_torch(model: nn.Module, task: Task) -> Callable[[Inputs], np.ndarray]:
    @torch.no_grad()
    def run(inputs: Inputs) -> np.ndarray:
        return task.forward(model, inputs).float().numpy()

    return run


def _runner_ort(session: Any) -> Callable[[Inputs], np.ndarray]:
    from .export import ort_feed

    def run(inputs: Inputs) -> np.ndarray:
        return np.asarray(session.run(None, ort_feed(session, inputs))[0])

    return run


def _check_gap(name: str, got: np.ndarray, want: np.ndarray, atol: float, rtol: float) -> tuple[float, str | None]:
    if got.shape != want.shape:
        return math.inf, f"output shape {got.shape} differs from the model's {want.shape}"
    gap = float(np.max(np.abs(got.astype(np.float64) - want))) if got.size else 0.0
    bound = atol + rtol * float(np.max(np.abs(want))) if want.size else atol
    if not gap <= bound:
        return gap, f"outputs differ from the compressed model by {gap:.3g} (tolerance {bound:.3g})"
    return gap, None


def deploy(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    example: Any,
    *,
    calibration: Any = None,
    val: Any = None,
    task: Task | str | None = None,
    forms: Sequence[str] = FORMS,
    batch_sizes: Sequence[int] = (1, 32),
    runs: int = 20,
    rounds: int = 3,
    warmup: int = 3,
    threads: int | None = 1,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    metric_tolerance: float = 0.005,
    sparse_min: float = 0.9,
    strict: bool = False,
) -> DeployResult:
    """Build, check and time every runtime form of ``model``; write the fastest (module docstring).

    ``example``: example inputs (a tensor batch, a tuple, a dict or :class:`~netshrink.task.Inputs`);
    ``calibration``: data for the int8 form (no int8 form without it); ``val``: data on which the int8
    form's metric must stay within ``metric_tolerance`` of the model's (the first 512 examples'
    outputs otherwise). ``strict=True`` turns a refused form into a :class:`ModelError` carrying the gap.
    """
    task = resolve_task(task)
    unknown = [f for f in forms if f not in FORMS]
    if unknown:
        raise ConfigError("forms", f"unknown form {unknown[0]!r} (known: {', '.join(FORMS)})")
    if "torch" not in forms:
        forms = ("torch", *forms)
    for i, b in enumerate(batch_sizes):
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ConfigError(f"batch_sizes[{i}]", f"must be a positive integer, got {b!r}")
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 20:
        raise ConfigError("runs", f"needs at least 20 timed runs, got {runs!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ex = Inputs.of(example).take(1)
    probe = _repeat(ex, max(batch_sizes))
    previous = torch.get_num_threads()
    used = threads or previous
    base = _plain(model)
    results: list[FormResult] = []
    runners: dict[str, Callable[[Inputs], np.ndarray]] = {}
    try:
        torch.set_num_threads(used)
        want = _runner_torch(base, task)(probe)
        runners["torch"] = _runner_torch(base, task)
        results.append(FormResult("torch", f"torch {torch.__version__} eager", max_abs_gap=0.0))
        if "torch-sparse" in forms:
            from .prune.sparse_exec import sparsify_linear_

            sparse = copy.deepcopy(base)
            converted = sparsify_linear_(sparse, min_sparsity=sparse_min)
            if converted:
                r = FormResult("torch-sparse", "torch CSR (torch.sparse)", note=f"{len(converted)} Linear layers as CSR")
                r.max_abs_gap, r.refused = _check_gap("torch-sparse", _runner_torch(sparse, task)(probe), want, atol, rtol)
                results.append(r)
                if r.refused is None:
                    runners["torch-sparse"] = _runner_torch(sparse, task)
        for name, int8 in (("onnx-fp32", False), ("onnx-int8", True)):
            if name not in forms or (int8 and calibration is None):
                continue
            results.append(_onnx_form(name, int8, model, out, ex, probe, want, calibration, val, task, used, atol, rtol,
                                      metric_tolerance, base, runners))
        for r in results:
            if r.refused and strict:
                raise ModelError(f"deploy: the {r.name} form is refused: {r.refused}")
        timed = time_forms(runners, ex, batch_sizes, runs=runs, rounds=rounds, warmup=warmup)
    finally:
        torch.set_num_threads(previous)
    for r in results:
        if r.name in timed:
            r.median_ms = timed[r.name]
    ref = next(r for r in results if r.name == "torch")
    for r in results:
        if r.median_ms:
            r.speedup = {b: ref.median_ms[b] / r.median_ms[b] for b in batch_sizes}
    timed = [r for r in results if r.median_ms]
    chosen = max(timed, key=lambda r: sum(math.log(s) for s in r.speedup.values()))
    path = None
    if chosen.path is not None:
        path = str(out / "model.onnx")
        os.replace(chosen.path, path)
        chosen.path = path
    res = DeployResult(chosen.name, results, used, tuple(batch_sizes), path)
    _write_json(out / "deploy.json", res)
    return res


def _onnx_form(
    name: str, int8: bool, model: nn.Module, out: Path, ex: Inputs, probe: Inputs, want: np.ndarray, calibration: Any,
    val: Any, task: Task, threads: int, atol: float, rtol: float, metric_tolerance: float, base: nn.Module,
    runners: dict[str, Callable[[Inputs], np.ndarray]],
) -> FormResult:
    from .export import export_onnx, ort_error_rate, ort_session

    r = FormResult(name, f"onnxruntime {_ort_version()} ({'int8 QDQ' if int8 else 'fp32'}, all graph optimizations)")
    path = out / f"candidate-{name}.onnx"
    try:
        res = export_onnx(model, path, ex, int8=int8, calibration=calibration, task=task)
    except ModelError as err:
        r.refused = f"export failed: {err}"
        return r
    r.path, r.bytes = str(path), res.bytes
    session = ort_session(path, threads=threads)
    got = _runner_ort(session)(probe)
    if not int8:
        r.max_abs_gap, r.refused = _check_gap(name, got, want, atol, rtol)
    else:
        r.max_abs_gap = float(np.max(np.abs(got - want))) if got.shape == want.shape else math.inf
        if val is not None:
            ours = task.evaluate(base, val)
            r.metric = ort_error_rate(session, val, task=task)
            if abs(r.metric - ours) > metric_tolerance:
                r.refused = f"its {task.metric_name} {r.metric:.4g} differs from the model's {ours:.4g} by more than {metric_tolerance:g}"
        else:
            agree = float(np.mean(got.argmax(-1) == want.argmax(-1))) if got.shape == want.shape else 0.0
            if agree < 0.95:
                r.refused = f"only {100 * agree:.1f}% of its argmax outputs agree with the model's (pass val= to judge by the metric)"
    if r.refused is None:
        runners[name] = _runner_ort(session)
    return r


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _write_json(path: Path, res: DeployResult) -> None:
    from ._fileio import atomic_write_bytes

    data = {"chosen": res.chosen, "threads": res.threads, "batch_sizes": list(res.batch_sizes), "path": res.path,
            "forms": [{**asdict(f), "median_ms": {str(k): v for k, v in f.median_ms.items()},
                       "speedup": {str(k): v for k, v in f.speedup.items()}} for f in res.forms]}
    atomic_write_bytes(path, (json.dumps(data, indent=2, allow_nan=True) + "\n").encode())


def profile_onnx(path: str | os.PathLike[str], example: Any, *, runs: int = 20, threads: int | None = 1) -> dict[str, float]:
    """Share of onnxruntime's measured node time per operator type over ``runs`` calls (sums to 1),
    plus ``"(outside nodes)"``: the wall time of ``session.run`` not spent inside any node
    (input/output copies, scheduling: the per-call overhead that dominates tiny models)."""
    import onnxruntime as ort

    from .export import ort_feed

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(path).with_suffix("")) + "-profile"
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    session = ort.InferenceSession(os.fspath(path), sess_options=opts, providers=["CPUExecutionProvider"])
    feed = ort_feed(session, Inputs.of(example))
    for _ in range(3):
        session.run(None, feed)
    t0 = time.perf_counter_ns()
    for _ in range(runs):
        session.run(None, feed)
    wall_us = (time.perf_counter_ns() - t0) / 1e3
    prof = session.end_profiling()
    try:
        events = json.loads(Path(prof).read_text())
    finally:
        Path(prof).unlink(missing_ok=True)
    per_op: dict[str, float] = {}
    node_runs = [e for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")]
    # the last `runs` calls' kernels (warm-up calls come first in the trace)
    per_call = len(node_runs) // (runs + 3) if node_runs else 0
    for e in node_runs[-per_call * runs:] if per_call else []:
        op = e.get("args", {}).get("op_name", "?")
        per_op[op] = per_op.get(op, 0.0) + float(e.get("dur", 0))
    inside = sum(per_op.values())
    per_op["(outside nodes)"] = max(wall_us - inside, 0.0)
    total = sum(per_op.values()) or 1.0
    return dict(sorted(((k, v / total) for k, v in per_op.items()), key=lambda kv: -kv[1]))


__all__ = ["DeployResult", "FORMS", "FormResult", "RUNTIMES", "deploy", "measured_latency", "ort_runner", "profile_onnx", "time_forms", "torch_runner"]
