"""ONNX export (fp32 and int8 QDQ) and an onnxruntime runner for test error and latency.

fp32: the model, its parametrizations made permanent (masked, shared, binarized weights baked in) and
its input quantizers removed, is traced by torch's TorchScript-based exporter
(``torch.onnx.export(..., dynamo=False)``; the torch.export-based one needs the ``onnxscript``
package), opset 17. Inputs are the user's example inputs (:class:`netshrink.task.Inputs`: one tensor,
several, or a dict of keyword inputs; any dtype -- token ids stay int64), named ``input`` (one input),
``input_0``, ``input_1``, ... (several) and by their keywords; every input and the output get a dynamic
batch axis, and integer inputs of shape ``(batch, length)`` (token ids) a dynamic ``sequence`` axis
(the output's axis 1 too). A model that returns a tuple, dict or ``transformers`` ModelOutput is
exported through :func:`netshrink.task.output_tensor` (the logits). PyTorch's fused attention fast
path (``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer`` in inference) has no ONNX form: it is
switched off while tracing; and each ``nn.MultiheadAttention`` of the exported copy is converted to
separate q/k/v/out projections (:func:`netshrink._attention.convert_attention_`, equal outputs), whose
traced graph keeps the sequence length dynamic.

int8 (static, QDQ format of the ONNX standard; Jacob et al., CVPR 2018): the quantization is ours,
not the runtime's -- every layer quantized by :func:`netshrink.quantize.quantize_` (``Int8Config`` or
``UniformConfig``: a :class:`~netshrink.quantize.WeightFakeQuant` on the weight and a calibrated
:class:`~netshrink.quantize.ActFakeQuant` on the input; a model without them is quantized first with
``Int8Config`` on ``calibration`` data) becomes, in the fp32 graph,

    x -> QuantizeLinear(s_x, z_x) -> DequantizeLinear -> Gemm/Conv <- DequantizeLinear(W_q, s_w, axis 0)
                                                                  <- DequantizeLinear(b_q int32, s_x s_w)

with ``W_q = round(Ŵ / s_w)`` the integer codes of the simulated weight ``Ŵ`` (exact) and the bias in
int32 at scale ``s_x s_w`` (the one change from the simulated model: at most half a step
``s_x s_w / 2`` per output). Q/DQ pairs are also placed on the inputs of MaxPool, Flatten and Reshape
ops that lead to a quantized input -- exact, since a monotone per-tensor quantizer commutes with max
and reshaping -- so onnxruntime fuses the graph into QLinearConv / QGemm / int8 MaxPool kernels.
BatchNorm is folded into the layer before it (:mod:`netshrink.quantize.fold`) when the model is
quantized; a quantized layer that the model never calls is not in the graph and is reported in
``ExportResult.skipped``. Only a Conv whose output reaches a quantized input is fused by onnxruntime
(QLinearConv needs a QuantizeLinear after it); one that feeds a residual Add keeps its input Q/DQ (as
simulated) and its int8 weight (or, with ``float_unfused``, its dequantized weight in float).

Weights are written as uint8 codes ``q + 128`` with zero point 128 (``unsigned_weights``, the default):
the same values as the int8 codes, but onnxruntime's x86 u8s8 kernels on CPUs without VNNI sum pairs
of u8 x s8 products in 16 bits and saturate (measured here: up to 10 % of the logit range off, a few
percent of argmax flips), while its u8u8 path is exact and still faster than fp32.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import re
import sys
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ._extras import require
from ._fileio import atomic_write_bytes
from ._qdq import int8_graph
from .errors import ConfigError, DataError, ModelError
from .metrics import LatencyStats

log = logging.getLogger(__name__)

OPSET = 17
INPUT, OUTPUT = "input", "output"


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote: ``path``, its ``bytes``, whether ``int8``, the ``quantized`` layers
    (int8 weights) and those with a quantized input (``act_quantized``), and the ops of the graph."""

    path: str
    bytes: int
    int8: bool
    quantized: list[str] = field(default_factory=list)
    act_quantized: list[str] = field(default_factory=list)
    ops: dict[str, int] = field(default_factory=dict)
    input_names: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    float_weights: list[str] = field(default_factory=list)
    #: tensors around residual Adds given Q/DQ pairs (:mod:`netshrink.quantize.qdq_residual`)
    residual_quantized: list[str] = field(default_factory=list)
    #: what the export chose or could not do, in words (e.g. residual adds left in float and why)
    notes: list[str] = field(default_factory=list)


def _is_shape(example: Any) -> bool:
    return isinstance(example, (tuple, list, torch.Size)) and len(example) > 0 and all(
        isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in example
    )


def example_inputs(example_input: Any) -> Any:
    """The :class:`~netshrink.task.Inputs` of ``example_input``: one input's shape without the batch axis
    (a float32 zero batch of one), a tensor, a tuple of tensors, a dict of keyword inputs, or Inputs.
    Tensors keep their dtype; each must have a non-empty batch axis."""
    from .task import Inputs

    if _is_shape(example_input):
        if any(int(d) < 1 for d in example_input):
            raise ConfigError("example_input", f"a shape needs positive sizes, got {tuple(example_input)}")
        return Inputs((torch.zeros((1, *(int(d) for d in example_input))),))
    inputs = Inputs.of(example_input)
    if not inputs.tensors():
        raise ConfigError("example_input", "holds no tensor")
    for t in inputs.tensors():
        if t.dim() == 0 or t.shape[0] == 0:
            raise ConfigError("example_input", f"every input needs a non-empty batch axis, got shape {tuple(t.shape)}")
    return inputs.take(1).to("cpu")


class _Adapter(nn.Module):
    """``forward(*tensors)``: the model called with the example's positional and keyword inputs (non-tensor
    values fixed), its output reduced to one tensor by :func:`netshrink.task.output_tensor`."""

    def __init__(self, inner: nn.Module, example: Any, output_key: str | None):
        super().__init__()
        self.inner = inner
        self.slots = [("arg", i, a) for i, a in enumerate(example.args)] + [("kw", k, v) for k, v in example.kwargs.items()]
        self.output_key = output_key

    def tensors(self) -> list[torch.Tensor]:
        return [v for _, _, v in self.slots if isinstance(v, torch.Tensor)]

    def names(self) -> list[str]:
        pos = [i for kind, i, v in self.slots if kind == "arg" and isinstance(v, torch.Tensor)]
        kws = [k for kind, k, v in self.slots if kind == "kw" and isinstance(v, torch.Tensor)]
        if len(pos) == 1 and not kws:
            return [INPUT]
        return [f"{INPUT}_{i}" for i in pos] + list(kws)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        from .task import output_tensor

        it = iter(tensors)
        args, kwargs = [], {}
        for kind, key, v in self.slots:
            value = next(it) if isinstance(v, torch.Tensor) else v
            if kind == "arg":
                args.append(value)
            else:
                kwargs[key] = value
        return output_tensor(self.inner(*args, **kwargs), self.output_key)


def _dynamic_axes(names: list[str], tensors: list[torch.Tensor], override: Any) -> dict[str, dict[int, str]]:
    """Batch axis 0 everywhere; a ``sequence`` axis 1 on integer ``(batch, length)`` inputs and on the output."""
    if override is not None:
        if not isinstance(override, dict):
            raise ConfigError("dynamic_axes", f"expected a dict of input/output name -> {{axis: name}}, got {type(override).__name__}")
        unknown = sorted(set(override) - set(names) - {OUTPUT})
        if unknown:
            raise ConfigError(f"dynamic_axes.{unknown[0]}", f"no input or output of that name (inputs: {', '.join(names)}; output: {OUTPUT})")
        return dict(override)
    axes: dict[str, dict[int, str]] = {}
    seq = False
    for n, t in zip(names, tensors):
        axes[n] = {0: "batch"}
        if t.dim() == 2 and not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool:
            axes[n][1] = "sequence"
            seq = True
    axes[OUTPUT] = {0: "batch", 1: "sequence"} if seq else {0: "batch"}
    return axes


def _layer_quant(model: nn.Module) -> dict[str, tuple[Any, Any]]:
    """``{layer: (weight QuantParams or None, input QuantParams or None)}`` of the uniformly quantized layers."""
    from .quantize._common import weight_quantizer_of
    from .quantize.fake import WeightFakeQuant, input_quant_of

    out = {}
    for name, m in model.named_modules():
        if "parametrizations" in name.split("."):
            continue
        wq = weight_quantizer_of(m) if isinstance(getattr(m, "weight", None), torch.Tensor) else None
        aq = input_quant_of(m)
        wqp = wq.qparams() if isinstance(wq, WeightFakeQuant) else None
        aqp = aq.qparams() if aq is not None and bool(aq.calibrated) else None
        if wqp is not None or aqp is not None:
            out[name] = (wqp, aqp)
    return out


def _plain_copy(model: nn.Module) -> nn.Module:
    """A float copy: parametrizations made permanent, input quantizers removed, attention converted, eval mode, on the CPU."""
    from .prune._mask import make_permanent
    from .quantize.fake import remove_input_quant

    m = copy.deepcopy(model).cpu().eval()
    for mod in m.modules():
        remove_input_quant(mod)
    m = make_permanent(m)
    _convert_attention(m)
    return m


def _convert_attention(m: nn.Module) -> None:
    """``nn.MultiheadAttention`` -> separate q/k/v/out projections (equal outputs; its functional form bakes
    the sequence length into the traced graph). One that cannot be converted is exported as it is."""
    from ._attention import attention_modules, convert_attention_, why_not_convertible

    names = [n for n, a in attention_modules(m).items() if n and why_not_convertible(a) is None]
    if names:
        convert_attention_(m, names)


@contextlib.contextmanager
def _quiet_fds() -> Any:
    """Send what is written to file descriptors 1 and 2 (torch's C++ exporter log prints its IR graph
    there when it fails, whatever its settings) to a scratch file for the duration."""
    import tempfile

    saved = []
    with tempfile.TemporaryFile() as sink:
        try:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (AttributeError, OSError, ValueError):
                    pass
            for fd in (1, 2):
                try:
                    saved.append((fd, os.dup(fd)))
                    os.dup2(sink.fileno(), fd)
                except OSError:  # no such descriptor here: nothing to silence
                    pass
            yield
        finally:
            for fd, copy_fd in saved:
                os.dup2(copy_fd, fd)
                os.close(copy_fd)


@contextlib.contextmanager
def _no_attention_fast_path() -> Any:
    """Switch off PyTorch's fused multi-head-attention inference path (no ONNX form) for the duration."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    was = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(was)


def _trace(model: _Adapter, dynamic_axes: Any = None) -> Any:
    onnx = require("onnx", "onnx")

    buf, chatter = io.BytesIO(), io.StringIO()
    tensors, names = tuple(model.tensors()), model.names()
    try:  # the exporter prints its IR graph when it fails: kept out of the user's terminal
        with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter), _quiet_fds(), _no_attention_fast_path():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, tensors, buf, dynamo=False, opset_version=OPSET, input_names=names, output_names=[OUTPUT],
                dynamic_axes=_dynamic_axes(names, list(tensors), dynamic_axes), do_constant_folding=True,
            )
    except ConfigError:
        raise
    except Exception as exc:  # torch's exporter raises many types; each becomes one line
        text = str(exc).strip().splitlines()
        first = next((t for t in text if "not supported" in t or "Unsupported" in t), text[0] if text else type(exc).__name__)
        where = ""
        op = re.search(r"operator '(?:aten::)?([A-Za-z0-9_]+)'", first)
        if op is not None:
            layer = _layer_calling(model.inner, model, op.group(1))
            where = f" (op {op.group(1)!r}, called by layer {layer!r})" if layer is not None else ""
        raise ModelError(f"cannot export {type(model.inner).__name__} to ONNX{where}: {first.strip()[:300]}") from None
    proto = onnx.load_from_string(buf.getvalue())
    _strip_prefix(proto, "inner.", "/inner/")
    return proto


def _layer_calling(inner: nn.Module, adapter: nn.Module, op: str) -> str | None:
    """The innermost named module of ``inner`` whose forward runs the aten operator ``op`` (``""``: the
    model's own forward), found by running the model once under a dispatch mode; None if not found."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    stack: list[str] = []
    found: list[str] = []

    def seen(names: set[str]) -> None:
        if not found and op in names:
            found.append(stack[-1] if stack else "")

    class _Functions(TorchFunctionMode):  # torch.linalg.svdvals is linalg_svdvals to the exporter
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            seen({name, f"{str(getattr(func, '__module__', '')).rsplit('.', 1)[-1]}_{name}"})
            return func(*args, **(kwargs or {}))

    class _Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen({func.overloadpacket.__name__})
            return func(*args, **(kwargs or {}))

    handles = []
    for name, mod in inner.named_modules():
        handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: stack.append(n)))
        handles.append(mod.register_forward_hook(lambda m, a, o: stack.pop() and None))  # a hook returning non-None replaces the output
    try:
        with torch.no_grad(), _Functions(), _Watch():
            adapter(*adapter.tensors())
    except Exception:  # the search is best effort: the export error is raised either way
        pass
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def _strip_prefix(proto: Any, prefix: str, node_prefix: str) -> None:
    """Name initializers, values and nodes as in the user's model (without the adapter's ``inner`` level)."""
    g = proto.graph

    def short(name: str) -> str:
        if name.startswith(prefix):
            return name[len(prefix):]
        for a, b in ((node_prefix + prefix, "/"), (node_prefix, "/"), ("/" + prefix, "/")):
            if name.startswith(a):
                return b + name[len(a):]
        return name

    names = {i.name for i in g.initializer} | {t for n in g.node for t in (*n.input, *n.output)}
    graph_io = {v.name for v in (*g.input, *g.output)}
    rename = {t: short(t) for t in names if t and t not in graph_io and short(t) != t}
    if len(set(rename.values()) | (names - set(rename))) != len(names):  # a clash: keep the long names
        return
    for init in g.initializer:
        init.name = rename.get(init.name, init.name)
    for v in g.value_info:
        v.name = rename.get(v.name, v.name)
    for n in g.node:
        for i, t in enumerate(n.input):
            n.input[i] = rename.get(t, t)
        for i, t in enumerate(n.output):
            n.output[i] = rename.get(t, t)
        n.name = short(n.name)


def _bn_hints(model: nn.Module, quant: dict[str, tuple[Any, Any]], example: Any) -> dict[str, str]:
    """For each quantized layer that an unfolded BatchNorm follows: the reason its weight is not in the graph."""
    from torch.nn.modules.batchnorm import _BatchNorm

    if not any(isinstance(m, _BatchNorm) for m in model.modules()):
        return {}
    from .quantize.fold import find_bn_pairs

    try:
        pairs, _, _ = find_bn_pairs(model, example.call)
    except Exception:  # only a hint: the export's own error follows
        return {}
    return {layer: f"; BatchNorm {bn!r} follows it unfolded: quantize with fold_bn=True (the default) so the fold comes first"
            for bn, layer in pairs.items() if layer in quant}


def _check_runs(model: nn.Module, example: Any) -> None:
    from .errors import NetshrinkError

    try:
        with torch.no_grad():
            example.call(model)
    except NetshrinkError:
        raise
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise ModelError(f"the model rejects the example inputs: {type(exc).__name__}: {(text[0] if text else '')[:300]}") from None


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: Any,
    *,
    int8: bool = False,
    calibration: Any = None,
    calibration_samples: int = 512,
    unsigned_weights: bool | str = "auto",
    task: Any = None,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    float_unfused: bool = False,
    quantize_adds: bool = True,
) -> ExportResult:
    """Write ``model`` as ONNX to ``path`` (atomically): fp32, or int8 QDQ with ``int8=True`` (module docstring).

    ``example_input``: one input's shape without the batch axis, a batch tensor, a tuple of inputs, a dict of
    keyword inputs or an :class:`~netshrink.task.Inputs` (any dtype). ``task`` (a
    :class:`~netshrink.task.Task`, default classification) reads calibration batches and names the
    output to export (``output_key``). For int8, a model that is not quantized yet is quantized (a copy)
    by ``Int8Config`` on ``calibration`` data (a Dataset, DataLoader, Splits or tensor;
    ``calibration_samples`` examples), BatchNorm folded first. ``dynamic_axes`` replaces the default
    dynamic axes. With ``float_unfused``, a quantized Conv whose output onnxruntime cannot requantize (it
    feeds a residual Add or a graph output, not a quantized input) keeps its fake-quantized weight in
    float (listed in ``float_weights``; the same values, run by onnxruntime's float kernel instead of
    dequantizing the weight at every call: faster, a larger file); by default every layer stores int8 codes.
    ``unsigned_weights``: ``"auto"`` (default) stores int8 weights as int8 where this CPU has VNNI dot
    products (onnxruntime's u8s8 kernels are exact and fastest there) and as uint8 codes elsewhere (see the
    module docstring). ``quantize_adds`` (default): the residual Adds get Q/DQ pairs calibrated on
    ``calibration`` (:mod:`netshrink.quantize.qdq_residual`) so onnxruntime runs them as QLinearAdd and every
    conv before them as QLinearConv; without calibration data they stay float (said in ``notes``).
    Unsupported ops, layers the int8 rewrite cannot place, a model that rejects the example
    and a missing calibration set are one-line errors.
    """
    onnx = require("onnx", "onnx")

    from .task import resolve_task

    if not isinstance(model, nn.Module):
        raise ModelError(f"export needs an nn.Module, got {type(model).__name__}")
    task = resolve_task(task)
    example = example_inputs(example_input)
    quant = _layer_quant(model) if int8 else {}
    skipped: dict[str, str] = {}
    if int8 and not any(a is not None for _, a in quant.values()):
        if calibration is None:
            raise DataError("int8 export: the model has no calibrated input quantizers; pass calibration data")
        from .quantize.ptq import Int8Config, int8_quantize

        model = copy.deepcopy(model).cpu().eval()
        _check_runs(model, example)
        res = int8_quantize(model, Int8Config(calibration_samples=calibration_samples), data=calibration, task=task)
        skipped.update(res.skipped)
        quant = _layer_quant(model)
    elif not int8 and _layer_quant(model):
        log.warning("fp32 export: quantized weights are exported as their float values and input quantizers are dropped")
    plain = _plain_copy(model)
    _check_runs(plain, example)
    hints: dict[str, str] = {}
    if quant:
        from .quantize.ptq import called_layers

        mods = dict(plain.named_modules())
        called = called_layers(plain, {n: mods[n] for n in quant if n in mods}, example)
        for n in [n for n in quant if n not in called]:
            skipped[n] = "never called by the model's forward: not in the graph"
            del quant[n]
        hints = _bn_hints(plain, quant, example)
    adapter = _Adapter(plain, example, task.output_key)
    proto = _trace(adapter, dynamic_axes)
    weights = {n: m.weight.detach().cpu().numpy().astype(np.float32) for n, m in plain.named_modules() if n in quant}
    if unsigned_weights == "auto":
        unsigned_weights = not cpu_has_vnni()
    wl, al, floats = int8_graph(proto, quant, unsigned_weights, "", hints, weights, float_unfused) if int8 else ([], [], [])
    adds: list[str] = []
    notes: list[str] = [f"int8 weights stored as {'uint8 codes (zero point 128)' if unsigned_weights else 'int8'}"] if int8 else []
    if int8 and quantize_adds:
        from .quantize.qdq_residual import quantize_residual_adds, residual_points

        if residual_points(proto):
            feeds = _calibration_feeds(proto, calibration, task, calibration_samples)
            if feeds:
                adds = quantize_residual_adds(proto, feeds)
                notes.append(f"{len(adds)} tensors around residual Adds quantized (calibrated on {sum(len(next(iter(f.values()))) for f in feeds)} examples)")
            else:
                notes.append("residual Adds left in float: no calibration data was given to calibrate them")
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ModelError(f"the exported ONNX graph does not check: {str(exc).splitlines()[0][:300]}") from None
    blob = proto.SerializeToString()
    atomic_write_bytes(path, blob)
    ops: dict[str, int] = defaultdict(int)
    for n in proto.graph.node:
        ops[n.op_type] += 1
    log.info("exported %s (%s, %d bytes)", os.fspath(path), "int8" if int8 else "fp32", len(blob))
    return ExportResult(os.fspath(path), len(blob), int8, wl, al, dict(ops), adapter.names(), skipped, floats, adds, notes)


def cpu_has_vnni() -> bool:
    """Whether this CPU has 8-bit dot-product instructions (x86 AVX-512 VNNI / AVX-VNNI, Arm dotprod)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read(1 << 20)
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_vnni", "avx_vnni", " asimddp"))


def _calibration_feeds(proto: Any, calibration: Any, task: Any, samples: int) -> list[dict[str, np.ndarray]]:
    """Up to ``samples`` calibration examples as onnxruntime feeds of the graph ``proto`` (batches of 32)."""
    if calibration is None:
        return []
    import onnxruntime as ort
    from torch.utils.data import DataLoader, Dataset

    from .task import batches

    source = getattr(calibration, "train", calibration)
    if isinstance(source, torch.Tensor):
        source = [(source, torch.zeros(len(source)))]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feeds, seen = [], 0
    if isinstance(source, Dataset) and not isinstance(source, DataLoader) and hasattr(source, "__len__"):
        n = min(samples, len(source))
        source = torch.utils.data.Subset(source, range(n))
    for batch in batches(source, 32):
        inputs, _ = task.split(batch)
        inputs = inputs.take(samples - seen)
        feeds.append(ort_feed(session, inputs))
        seen += inputs.batch_size
        if seen >= samples:
            break
    return feeds


# ------------------------------------------------------------------------------------------- runner


def ort_session(path: str | os.PathLike, threads: int | None = None) -> Any:
    """An onnxruntime CPU session of ``path`` with all graph optimizations (QDQ fusion included);
    ``threads`` fixes the intra-op thread count. An unreadable or invalid file is a :class:`ModelError`."""
    ort = require("onnxruntime", "onnx")

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError("threads", f"must be a positive integer, got {threads!r}")
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(os.fspath(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise ModelError(f"onnxruntime cannot load {os.fspath(path)}: {(text[0] if text else type(exc).__name__)[:300]}") from None


_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
    "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def _as_array(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def ort_feed(session: Any, inputs: Any) -> dict[str, np.ndarray]:
    """The feed dict of ``session`` for ``inputs``: one array/tensor (the one input), a tuple/list (the
    inputs in order), a dict (by name), or :class:`~netshrink.task.Inputs` (positional inputs in order,
    then keyword inputs by name). Each array is cast to the dtype the session declares."""
    from collections.abc import Mapping

    from .task import Inputs

    decl = session.get_inputs()
    names = [d.name for d in decl]
    if isinstance(inputs, Inputs):
        pos = [a for a in inputs.args if isinstance(a, torch.Tensor)]
        kws = {k: v for k, v in inputs.kwargs.items() if isinstance(v, torch.Tensor)}
        feed = dict(zip([n for n in names if n not in kws], pos))
        feed.update(kws)
    elif isinstance(inputs, Mapping):
        feed = dict(inputs)
    elif isinstance(inputs, (tuple, list)):
        feed = dict(zip(names, inputs))
        if len(inputs) != len(names):
            raise DataError(f"onnxruntime: the model takes {len(names)} inputs ({', '.join(names)}), got {len(inputs)}")
    else:
        feed = {names[0]: inputs}
    missing = [n for n in names if n not in feed]
    extra = [k for k in feed if k not in names]
    if missing or extra:
        raise DataError(f"onnxruntime: the model's inputs are {', '.join(names)}; "
                        + (f"missing {', '.join(missing)}" if missing else f"unknown {', '.join(map(str, extra))}"))
    types = {d.name: _ORT_TYPES.get(d.type) for d in decl}
    out = {}
    for n, v in feed.items():
        arr = _as_array(v)
        out[n] = arr.astype(types[n], copy=False) if types[n] is not None else arr
    return out


def ort_predict(session: Any, x: Any) -> np.ndarray:
    """The session's first output for the inputs ``x`` (see :func:`ort_feed`; e.g. one float32 batch)."""
    feed = ort_feed(session, x)
    try:
        return session.run(None, feed)[0]
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise ModelError(f"onnxruntime could not run the model: {(text[0] if text else type(exc).__name__)[:300]}") from None


def ort_error_rate(session: Any, data: Any, batch_size: int = 500, task: Any = None) -> float:
    """The task's metric (top-1 error in [0, 1] by default) of an onnxruntime session on a Dataset, a
    DataLoader or an iterable of batches; batches are split by ``task`` (tuples, dicts of named inputs)."""
    from .task import batches, resolve_task

    task = resolve_task(task)
    metric = task.metric()
    for batch in batches(data, batch_size):
        inputs, target = task.split(batch)
        pred = torch.from_numpy(np.ascontiguousarray(ort_predict(session, inputs)))
        try:
            metric.update(pred, target if isinstance(target, torch.Tensor) else torch.as_tensor(target))
        except (RuntimeError, ValueError, IndexError, TypeError) as err:
            raise DataError(f"task {task.name!r}: the metric {metric.name!r} failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    try:
        return metric.compute()
    except DataError:
        raise DataError("the data set is empty") from None


def _batch_of(example: Any, b: int) -> Any:
    """``example`` (the first example of each input) repeated ``b`` times along the batch axis."""
    from .task import Inputs

    rep = lambda t: t[:1].repeat((b,) + (1,) * (t.dim() - 1)) if isinstance(t, torch.Tensor) else t  # noqa: E731
    return Inputs(tuple(rep(a) for a in example.args), {k: rep(v) for k, v in example.kwargs.items()})


def ort_latency(
    session: Any, example_input: Any, batch_sizes: Sequence[int] = (1, 64), runs: int = 30, warmup: int = 5
) -> dict[int, LatencyStats]:
    """Median (p10, p90) of ``runs`` timed ``session.run`` calls per batch size, as :func:`netshrink.metrics.latency`;
    threads as the session was built. ``example_input``: one input's shape (a fixed-seed normal batch of that
    shape) or example inputs as :func:`export_onnx` takes them (their first example repeated)."""
    from .task import Inputs

    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 20:
        raise ConfigError("runs", f"latency needs at least 20 timed runs, got {runs!r}")
    if _is_shape(example_input):
        one = torch.randn((1, *(int(s) for s in example_input)), generator=torch.Generator().manual_seed(0))
        example = Inputs((one,))
    else:
        example = example_inputs(example_input)
    threads = int(session.get_session_options().intra_op_num_threads) or os.cpu_count() or 1
    out = {}
    for b in batch_sizes:
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ConfigError("batch_sizes", f"must be positive integers, got {b!r}")
        feed = {k: np.ascontiguousarray(v) for k, v in ort_feed(session, _batch_of(example, b)).items()}
        for _ in range(warmup):
            session.run(None, feed)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter_ns()
            session.run(None, feed)
            times.append((time.perf_counter_ns() - t0) / 1e6)
        arr = np.asarray(times)
        out[b] = LatencyStats(
            batch_size=b, threads=threads, runs=runs, warmup=warmup, median_ms=float(np.median(arr)),
            p10_ms=float(np.percentile(arr, 10)), p90_ms=float(np.percentile(arr, 90)), mean_ms=float(arr.mean()),
            min_ms=float(arr.min()), device="cpu (onnxruntime)", times_ms=tuple(times),
        )
    return out


def onnx_input_shape(session: Any) -> tuple[int, ...]:
    """The shape of one input (without the batch axis) that the session declares; symbolic dims are an error."""
    dims = session.get_inputs()[0].shape[1:]
    if not all(isinstance(d, int) and d > 0 for d in dims):
        raise ModelError(f"the ONNX model's input has symbolic or unknown dimensions {dims}")
    return tuple(dims)


__all__ = ["ExportResult", "cpu_has_vnni", "example_inputs", "export_onnx", "onnx_input_shape", "ort_error_rate", "ort_feed", "ort_latency", "ort_predict", "ort_session"]
