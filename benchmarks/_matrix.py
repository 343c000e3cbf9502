"""The architecture x method matrix of issue 13: every registered method that can apply, run on every
architecture of :mod:`benchmarks._archs` (and the zoo), each cell recorded as

- ``works``: the method ran and its output check passed (the check's number is recorded: exact .nsk
  round trip, masked-twin diff, ORT vs torch gap, sparsity or distinct values delivered);
- ``error``: one clear :class:`~netshrink.errors.NetshrinkError` (its first line is recorded) and the
  model still runs;
- ``reported skip``: the method changed nothing and its result says why (e.g. structured pruning of
  channels a LayerNorm normalizes over);
- ``crash``: any other exception (a bug: its type, first line and the netshrink frame it came from);
- ``broken``: the method returned (or raised) but left a model that no longer runs, or failed its check;
- ``silent skip``: the method returned, but a weight it applies to is unchanged and no report
  (``result.coverage``) says why.

Shared by the test matrix (``tests/hf/``) and the ``generality`` benchmark suite.
"""

from __future__ import annotations

import copy
import inspect
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._archs import ARCHS, Arch

METHODS = ("magnitude", "kmeans", "int8", "qat", "channel", "svd", "tucker", "circulant", "hashed", "kd", "pack",
           "onnx_fp32", "onnx_int8")
OUTCOMES = ("works", "error", "reported skip", "crash", "broken", "silent skip")
#: the outcomes the issue allows: a correct compressed model, one clear error, or a skip said with its reason
FINE = ("works", "error", "reported skip")


@dataclass
class Cell:
    arch: str
    method: str
    outcome: str
    check: str = ""
    message: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Broken(Exception):
    """The method left a model that does not run, or its output check failed."""


class SilentSkip(Exception):
    """A weight the method applies to is unchanged, with no report saying why."""


class ReportedSkip(Exception):
    """The method changed nothing and said why."""


@dataclass
class Ctx:
    arch: Arch
    model: nn.Module
    data: Any
    task: Any
    x: Any  # Inputs: a batch of 8 examples
    work: Path

    def fresh(self) -> nn.Module:
        return self.arch.build()[0]


# -------------------------------------------------------------------------------------- helpers


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:240]


def _where(exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/netshrink/" in f.filename]
    if not frames:
        frames = traceback.extract_tb(exc.__traceback__)[-1:]
    if not frames:
        return ""
    f = frames[-1]
    return f"{f.filename.split('/netshrink/')[-1] if '/netshrink/' in f.filename else Path(f.filename).name}:{f.lineno}"


def _out(model: nn.Module, x: Any, task: Any) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return task.forward(model, x).float()


def _runs(ctx: Ctx, model: nn.Module | None = None) -> torch.Tensor:
    """The model's output on the example batch; :class:`Broken` when it does not run or is not finite."""
    try:
        y = _out(model if model is not None else ctx.model, ctx.x, ctx.task)
    except Exception as exc:  # noqa: BLE001 - any failure here means a broken model
        raise Broken(f"the model no longer runs: {type(exc).__name__}: {_first_line(exc)}") from None
    if not torch.isfinite(y).all():
        raise Broken("the model's output is not finite")
    return y


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _call(model: nn.Module, config: Any, ctx: Ctx) -> Any:
    """Apply ``config`` the way the pipeline does: its registered handler, with data, task and example."""
    from netshrink._registry import HandlerContext, run_handler

    return run_handler(model, config, HandlerContext(data=ctx.data, task=ctx.task, example=ctx.x))


def _layer_kind(m: nn.Module) -> str | None:
    if type(m).__name__ == "Conv1D" and hasattr(m, "nf"):
        return "conv1d"
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, nn.modules.conv._ConvNd):
        return "conv2d" if isinstance(m, nn.Conv2d) else "conv"
    if isinstance(m, nn.Embedding):
        return "embedding"
    if isinstance(m, nn.MultiheadAttention):
        return "mha"
    return None


#: the layer kinds each per-layer method applies to (used when a method returns no coverage report)
APPLIES = {
    "magnitude": {"linear", "conv2d", "conv", "conv1d", "embedding", "mha"},
    "kmeans": {"linear", "conv2d", "conv", "conv1d", "embedding", "mha"},
    "int8": {"linear", "conv2d", "conv", "conv1d", "mha"},
    "qat": {"linear", "conv2d", "conv", "conv1d", "mha"},
    "svd": {"linear", "conv1d", "mha"},
    "tucker": {"conv2d"},
    "circulant": {"linear", "conv1d", "mha"},
    "hashed": {"linear", "conv1d", "mha"},
}


def _weights(model: nn.Module) -> dict[str, tuple[str, str, str, torch.Tensor]]:
    """``{param name: (module path, attr, kind, value)}`` of every layer weight, one per storage."""
    out: dict[str, tuple[str, str, str, torch.Tensor]] = {}
    seen: set[int] = set()
    for path, m in model.named_modules():
        kind = _layer_kind(m)
        if kind is None:
            continue
        attrs = ["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"] if kind == "mha" else ["weight"]
        for attr in attrs:
            w = getattr(m, attr, None)
            if not isinstance(w, torch.Tensor):
                continue
            key = w.untyped_storage().data_ptr() if w.device.type != "meta" else id(w)
            if key in seen:
                continue
            seen.add(key)
            out[f"{path}.{attr}" if path else attr] = (path, attr, kind, w.detach().clone())
    return out


def _touched(model: nn.Module, before: dict[str, tuple[str, str, str, torch.Tensor]]) -> dict[str, bool]:
    """For each weight of ``before``: whether the method changed it (module replaced or wrapped,
    value changed, or a parametrization put on it)."""
    mods = dict(model.named_modules())
    out = {}
    for name, (path, attr, kind, w0) in before.items():
        m = mods.get(path)
        if m is None or _layer_kind(m) != kind:
            out[name] = True
            continue
        w = getattr(m, attr, None)
        par = getattr(m, "parametrizations", None)
        out[name] = (not isinstance(w, torch.Tensor) or w.shape != w0.shape or not torch.equal(w.detach(), w0)
                     or (par is not None and attr in par))
    return out


def _reported(result: Any) -> set[str] | None:
    """Parameter names a method's result accounts for: its coverage records (any status), and the
    layers it lists as skipped with a reason. None when the result reports nothing per layer."""
    cov = getattr(result, "coverage", None)
    skipped = getattr(result, "skipped", None)
    if cov is None and not isinstance(skipped, (dict, list, tuple, set)):
        return None
    names: set[str] = set()
    if cov is not None and hasattr(cov, "params"):
        for n, r in cov.params.items():
            names.add(n)
            names.update(getattr(r, "aliases", ()))
    if isinstance(skipped, (dict, list, tuple, set)):
        for layer in skipped:
            names.update({str(layer), f"{layer}.weight", f"{layer}.in_proj_weight"})
    return names


def _check_coverage(method: str, result: Any, before: dict, model: nn.Module) -> tuple[int, int]:
    """(weights changed, weights of an applicable kind); :class:`SilentSkip` naming the unchanged
    weights of a kind the method applies to that no report accounts for (with a coverage report,
    every unchanged weight must be in it)."""
    touched = _touched(model, before)
    reported = _reported(result)
    if reported is not None and getattr(result, "coverage", None) is not None:
        silent = [n for n, t in touched.items() if not t and n not in reported]
    else:
        silent = [n for n, t in touched.items() if not t and before[n][2] in APPLIES[method] and n not in (reported or set())]
    applicable = [n for n in touched if before[n][2] in APPLIES[method]]
    if silent:
        raise SilentSkip(f"unchanged, not reported: {', '.join(silent[:4])}{' ...' if len(silent) > 4 else ''}")
    return sum(touched.values()), len(applicable)


# ---------------------------------------------------------------------------------------- methods


def _per_layer(method: str, config: Any, ctx: Ctx, check: Callable[[Any, torch.Tensor, torch.Tensor], str]) -> str:
    y0 = _runs(ctx)
    before = _weights(ctx.model)
    result = _call(ctx.model, config, ctx)
    y = _runs(ctx)
    changed, applicable = _check_coverage(method, result, before, ctx.model)
    if changed == 0:
        raise SilentSkip("the method returned without changing any weight")
    return f"{changed}/{len(before)} weights changed; " + check(result, y0, y)


def m_magnitude(ctx: Ctx) -> str:
    from netshrink.prune import MagnitudeConfig

    def check(result: Any, y0: torch.Tensor, y: torch.Tensor) -> str:
        after = _weights(ctx.model)
        total = sum(v[3].numel() for v in after.values())
        zeros = sum(int((v[3] == 0).sum()) for v in after.values())
        s = zeros / max(total, 1)
        if s < 0.45:
            raise SilentSkip(f"50% asked, {100 * s:.1f}% of the layer weights delivered")
        return f"{100 * s:.1f}% of layer weights zero (50% asked)"

    return _per_layer("magnitude", MagnitudeConfig(sparsity=0.5), ctx, check)


def m_kmeans(ctx: Ctx) -> str:
    from netshrink.quantize import KMeansConfig

    def check(result: Any, y0: torch.Tensor, y: torch.Tensor) -> str:
        most = max(int(torch.unique(v[3]).numel()) for v in _weights(ctx.model).values())
        if most > 16:
            raise Broken(f"a shared layer holds {most} distinct values (16 asked)")
        return f"<= {most} values per layer; output rel. change {_rel(y, y0):.3f}"

    return _per_layer("kmeans", KMeansConfig(bits=4), ctx, check)


def m_int8(ctx: Ctx) -> str:
    from netshrink.quantize.ptq import Int8Config

    def check(result: Any, y0: torch.Tensor, y: torch.Tensor) -> str:
        r = _rel(y, y0)
        if r > 0.25:
            raise Broken(f"int8 output differs from fp32 by {r:.2f} (relative)")
        return f"output rel. change {r:.4f} vs fp32"

    return _per_layer("int8", Int8Config(calibration_samples=64, batch_size=32), ctx, check)


def _trainer(model: nn.Module, ctx: Ctx, **kw: Any) -> Any:
    from netshrink.train import TrainConfig, Trainer

    cfg = TrainConfig(epochs=1, batch_size=32, lr=1e-3, optimizer="adam", progress=False, device="cpu")
    if "task" in inspect.signature(Trainer).parameters:
        kw["task"] = ctx.task
    return Trainer(model, cfg, **kw)


def m_qat(ctx: Ctx) -> str:
    from netshrink.quantize.ptq import QATConfig

    def check(result: Any, y0: torch.Tensor, y: torch.Tensor) -> str:
        _trainer(ctx.model, ctx).fit(ctx.data)
        y2 = _runs(ctx)
        return f"trained 1 epoch; output rel. change {_rel(y2, y0):.3f}"

    return _per_layer("qat", QATConfig(bits=8), ctx, check)


def m_channel(ctx: Ctx) -> str:
    from netshrink.prune.structured import ChannelConfig

    y0 = _runs(ctx)
    twin = copy.deepcopy(ctx.model)
    n0 = sum(p.numel() for p in ctx.model.parameters())
    res = _call(ctx.model, ChannelConfig(ratio=0.5), ctx)
    _call(twin, ChannelConfig(ratio=0.5, mode="zero"), ctx)
    y, yt = _runs(ctx), _runs(ctx, twin)
    n1 = sum(p.numel() for p in ctx.model.parameters())
    if n1 >= n0:
        notes = getattr(res, "notes", [])
        if notes:
            raise ReportedSkip(f"no channel removed: {notes[0]}")
        raise SilentSkip("no channel removed, no note says why")
    d = float((y - yt).abs().max())
    if d > 1e-4 * max(1.0, float(yt.abs().max())):
        raise Broken(f"pruned vs masked twin differ by {d:.2e}")
    extra = ""
    if ctx.arch.causal_lm:
        ids = ctx.x.kwargs["input_ids"][:2, :5]
        try:
            g = ctx.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        except Exception as exc:  # noqa: BLE001
            raise Broken(f"generate fails after pruning: {type(exc).__name__}: {_first_line(exc)}") from None
        if not torch.equal(g, twin.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)):
            raise Broken("generate differs from the masked twin's")
        extra = "; generate = twin's"
    return f"params {n0:,} -> {n1:,}; twin diff {d:.1e}{extra}"


def m_lowrank(method: str, config: Any) -> Callable[[Ctx], str]:
    def run(ctx: Ctx) -> str:
        return _per_layer(method, config, ctx, lambda r, y0, y: f"output rel. change {_rel(y, y0):.3f}")

    return run


def m_kd(ctx: Ctx) -> str:
    from netshrink.distill.losses import DistillConfig, distill
    from netshrink.prune import MagnitudeConfig, prune_

    teacher = ctx.model
    student = copy.deepcopy(teacher)
    prune_(student, MagnitudeConfig(sparsity=0.5))
    y0 = _runs(ctx, student)
    from netshrink.train import TrainConfig

    cfg = TrainConfig(epochs=1, batch_size=32, lr=1e-3, optimizer="adam", progress=False, device="cpu")
    kw = {"task": ctx.task} if "task" in inspect.signature(distill).parameters else {}
    distill(student, teacher, ctx.data, None, cfg, DistillConfig(temperature=2.0, alpha=0.5), **kw)
    y = _runs(ctx, student)
    if torch.equal(y, y0):
        raise Broken("distillation did not change the student")
    return f"1 epoch; student output moved {_rel(y, y0):.3f}"


def m_pack(ctx: Ctx) -> str:
    from netshrink.pack import load, pack
    from netshrink.prune import MagnitudeConfig, prune_
    from netshrink.quantize import KMeansConfig, quantize_

    prune_(ctx.model, MagnitudeConfig(sparsity=0.5))
    quantize_(ctx.model, KMeansConfig(bits=4))
    y = _runs(ctx)
    path = ctx.work / f"{ctx.arch.name}.nsk"
    stats = pack(ctx.model, path)
    restored = load(path, model=ctx.fresh())
    y2 = _runs(ctx, restored)
    if not torch.equal(y, y2):
        raise Broken(f"the loaded model differs from the packed one by {float((y - y2).abs().max()):.2e}")
    size = path.stat().st_size
    dense = sum(p.numel() for p in ctx.fresh().parameters()) * 4
    return f"exact round trip; {size:,} B file ({getattr(stats, 'ratio', dense / size):.1f}x)"


def _ort(ctx: Ctx, path: Path, model: nn.Module) -> tuple[float, float]:
    from netshrink.export import ort_predict, ort_session

    y = _runs(ctx, model)
    sess = ort_session(path, threads=1)
    yo = torch.from_numpy(ort_predict(sess, ctx.x)).float()
    if yo.shape != y.shape:
        raise Broken(f"onnxruntime output {tuple(yo.shape)} vs torch {tuple(y.shape)}")
    agree = float((yo.argmax(-1) == y.argmax(-1)).float().mean())
    return float((yo - y).abs().max() / y.abs().max().clamp_min(1e-12)), agree


def m_onnx_fp32(ctx: Ctx) -> str:
    from netshrink.export import export_onnx

    path = ctx.work / f"{ctx.arch.name}.onnx"
    export_onnx(ctx.model, path, ctx.x, task=ctx.task)
    gap, agree = _ort(ctx, path, ctx.model)
    if gap > 1e-4:
        raise Broken(f"onnxruntime vs torch gap {gap:.1e} (relative max)")
    return f"ORT vs torch gap {gap:.1e}"


def m_onnx_int8(ctx: Ctx) -> str:
    from netshrink.export import export_onnx
    from netshrink.quantize.ptq import Int8Config

    _call(ctx.model, Int8Config(calibration_samples=64, batch_size=32), ctx)
    path = ctx.work / f"{ctx.arch.name}.int8.onnx"
    export_onnx(ctx.model, path, ctx.x, int8=True, task=ctx.task)
    gap, agree = _ort(ctx, path, ctx.model)
    if agree < 0.75 or gap > 0.25:
        raise Broken(f"onnxruntime int8 vs simulated torch: gap {gap:.2f}, top-1 agreement {100 * agree:.0f}%")
    return f"ORT int8 vs simulated torch gap {gap:.3f}, top-1 agree {100 * agree:.0f}%"


def _svd():
    from netshrink.lowrank import SvdConfig

    return SvdConfig(param_ratio=0.5)


def _tucker():
    from netshrink.lowrank import TuckerConfig

    return TuckerConfig(energy=0.8)


def _circ():
    from netshrink.matrices import CirculantConfig

    return CirculantConfig()


def _hashed():
    from netshrink.matrices import HashedConfig

    return HashedConfig(ratio=0.25)


RUNNERS: dict[str, Callable[[Ctx], str]] = {
    "magnitude": m_magnitude,
    "kmeans": m_kmeans,
    "int8": m_int8,
    "qat": m_qat,
    "channel": m_channel,
    "svd": lambda ctx: m_lowrank("svd", _svd())(ctx),
    "tucker": lambda ctx: m_lowrank("tucker", _tucker())(ctx),
    "circulant": lambda ctx: m_lowrank("circulant", _circ())(ctx),
    "hashed": lambda ctx: m_lowrank("hashed", _hashed())(ctx),
    "kd": m_kd,
    "pack": m_pack,
    "onnx_fp32": m_onnx_fp32,
    "onnx_int8": m_onnx_int8,
}


# ----------------------------------------------------------------------------------------- cells


#: zoo models that take token ids (a causal language model, fed :func:`benchmarks._archs.token_stream`)
ZOO_LM = ("llama_tiny",)


def zoo_arch(name: str) -> Arch:
    """A zoo model as an :class:`Arch` (random seeded weights; 256 digits upsampled to MNIST-shaped
    images, or token sequences for a zoo language model)."""
    from benchmarks._archs import _seeded, digits, token_stream

    if name in ZOO_LM:
        def build_lm() -> tuple[nn.Module, Any]:
            from netshrink.models import build_model

            return _seeded(lambda: build_model(name)), token_stream()

        return Arch(f"zoo:{name}", build_lm, "language_modeling", causal_lm=False)

    def build() -> tuple[nn.Module, Any]:
        from netshrink.models import build_model

        model = _seeded(lambda: build_model(name))
        shape = _zoo_shape(model)
        data = digits(image=True)
        x = data.tensors[0]
        if shape[-1] != 8:  # MNIST-sized zoo models: upsample the digits to 28x28
            x = torch.nn.functional.interpolate(x, size=shape[-2:], mode="bilinear", align_corners=False)
        return model, torch.utils.data.TensorDataset(x, data.tensors[1])

    return Arch(f"zoo:{name}", build)


def _zoo_shape(model: nn.Module) -> tuple[int, ...]:
    first = next(m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    return (1, 28, 28)


def get_arch(name: str) -> Arch:
    return zoo_arch(name[4:]) if name.startswith("zoo:") else ARCHS[name]


def run_cell(arch_name: str, method: str, work: str | Path | None = None) -> Cell:
    """Run one cell in a fresh model and record its outcome (never raises)."""
    from netshrink.errors import NetshrinkError
    from netshrink.task import resolve_task

    arch = get_arch(arch_name)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    tmp = None
    if work is None:
        tmp = tempfile.TemporaryDirectory()
        work = tmp.name
    try:
        model, data = arch.build()
        task = resolve_task(arch.task)
        ctx = Ctx(arch, model, data, task, task.example(data, 8), Path(work))
        try:
            check = RUNNERS[method](ctx)
            return Cell(arch_name, method, "works", check, "", time.perf_counter() - t0)
        except Broken as exc:
            return Cell(arch_name, method, "broken", "", str(exc), time.perf_counter() - t0)
        except SilentSkip as exc:
            return Cell(arch_name, method, "silent skip", "", str(exc), time.perf_counter() - t0)
        except ReportedSkip as exc:
            return Cell(arch_name, method, "reported skip", "", str(exc), time.perf_counter() - t0)
        except NetshrinkError as exc:
            msg = f"{type(exc).__name__}: {_first_line(exc)}"
            try:
                _runs(ctx)
            except Broken as b:
                return Cell(arch_name, method, "broken", "", f"{msg}; after it {b}", time.perf_counter() - t0)
            return Cell(arch_name, method, "error", "", msg, time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001 - a crash is what this records
            return Cell(arch_name, method, "crash", "", f"{type(exc).__name__}: {_first_line(exc)} [{_where(exc)}]",
                        time.perf_counter() - t0)
    finally:
        if tmp is not None:
            tmp.cleanup()


__all__ = ["APPLIES", "Cell", "FINE", "ZOO_LM", "METHODS", "OUTCOMES", "RUNNERS", "get_arch", "run_cell", "zoo_arch"]
