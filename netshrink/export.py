"""ONNX export (fp32 and int8 QDQ) and an onnxruntime runner for test error and latency.

fp32: the model, its parametrizations made permanent (masked, shared, binarized weights baked in) and
its input quantizers removed, is traced by torch's TorchScript-based exporter
(``torch.onnx.export(..., dynamo=False)``; the torch.export-based one needs the ``onnxscript``
package), opset 17, with a dynamic batch axis.

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
import sys
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ._fileio import atomic_write_bytes
from .errors import ConfigError, DataError, ModelError
from .metrics import LatencyStats

log = logging.getLogger(__name__)

OPSET = 17
INPUT, OUTPUT = "input", "output"
#: ops through which a per-tensor Q/DQ pair is moved back unchanged (a monotone quantizer commutes with them)
_PASS_THROUGH = ("MaxPool", "Flatten", "Reshape")


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


def _example(model: nn.Module, example_input: torch.Tensor | Sequence[int]) -> torch.Tensor:
    if isinstance(example_input, torch.Tensor):
        if example_input.dim() == 0 or len(example_input) == 0:
            raise ConfigError("example_input", "needs a non-empty batch dimension")
        return example_input[:1].detach().to(torch.float32).cpu()
    return torch.zeros((1, *(int(s) for s in example_input)))


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
    """A float copy: parametrizations made permanent, input quantizers removed, eval mode, on the CPU."""
    from .prune._mask import make_permanent
    from .quantize.fake import remove_input_quant

    m = copy.deepcopy(model).cpu().eval()
    for mod in m.modules():
        remove_input_quant(mod)
    return make_permanent(m)


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


def _trace(model: nn.Module, x: torch.Tensor) -> Any:
    import onnx

    buf, chatter = io.BytesIO(), io.StringIO()
    try:  # the exporter prints its IR graph when it fails: kept out of the user's terminal
        with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter), _quiet_fds():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (x,), buf, dynamo=False, opset_version=OPSET, input_names=[INPUT], output_names=[OUTPUT],
                dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, do_constant_folding=True,
            )
    except Exception as exc:  # torch's exporter raises many types; each becomes one line
        text = str(exc).strip().splitlines()
        first = next((t for t in text if "not supported" in t or "Unsupported" in t), text[0] if text else type(exc).__name__)
        raise ModelError(f"cannot export {type(model).__name__} to ONNX: {first.strip()[:300]}") from None
    return onnx.load_from_string(buf.getvalue())


# ------------------------------------------------------------------------------------------- int8 QDQ


class _Graph:
    """Small editing helper over an ONNX graph: initializers, producers, consumers, unique names."""

    def __init__(self, proto: Any):
        from onnx import numpy_helper

        self.np = numpy_helper
        self.g = proto.graph
        self.inits = {i.name: i for i in self.g.initializer}
        self.new_nodes: list[Any] = []
        self.names: set[str] = set(self.inits) | {o for n in self.g.node for o in n.output} | {i.name for i in self.g.input}
        self.producer = {o: n for n in self.g.node for o in n.output}

    def consumers(self, tensor: str) -> list[tuple[Any, int]]:
        return [(n, i) for n in list(self.g.node) + self.new_nodes for i, t in enumerate(n.input) if t == tensor]

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.names:
            name, k = f"{base}_{k}", k + 1
        self.names.add(name)
        return name

    def add_init(self, base: str, arr: np.ndarray) -> str:
        name = self.fresh(base)
        self.g.initializer.append(self.np.from_array(arr, name))
        self.inits[name] = self.g.initializer[-1]
        return name

    def array(self, name: str) -> np.ndarray:
        return self.np.to_array(self.inits[name])

    def drop_init(self, name: str) -> None:
        if not self.consumers(name):
            self.g.initializer.remove(self.inits.pop(name))

    def node(self, op: str, inputs: list[str], base: str, **attrs: Any) -> str:
        from onnx import helper

        out = self.fresh(base)
        self.new_nodes.append(helper.make_node(op, inputs, [out], name=self.fresh(f"{base}_node"), **attrs))
        self.producer[out] = self.new_nodes[-1]
        return out

    def qdq(self, tensor: str, scale: float, zero: int, signed: bool) -> str:
        """``DequantizeLinear(QuantizeLinear(tensor))`` per tensor; returns the DQ output's name."""
        s = self.add_init(f"{tensor}_scale", np.array(scale, dtype=np.float32))
        z = self.add_init(f"{tensor}_zero_point", np.array(zero, dtype=np.int8 if signed else np.uint8))
        q = self.node("QuantizeLinear", [tensor, s, z], f"{tensor}_quantized")
        return self.node("DequantizeLinear", [q, s, z], f"{tensor}_dequantized")

    def finish(self) -> None:
        """Put the new nodes in and order the graph topologically (ONNX requires it)."""
        nodes = list(self.g.node) + self.new_nodes
        ready = set(self.inits) | {i.name for i in self.g.input} | {""}
        ordered, pending = [], nodes
        while pending:
            rest = [n for n in pending if not all(i in ready for i in n.input)]
            done = [n for n in pending if all(i in ready for i in n.input)]
            if not done:
                raise ModelError("int8 export: the edited ONNX graph has a cycle or a dangling input")
            for n in done:
                ordered.append(n)
                ready.update(n.output)
            pending = rest
        del self.g.node[:]
        self.g.node.extend(ordered)


def _gemm_ok(node: Any) -> bool:
    attrs = {a.name: a for a in node.attribute}
    trans_a = attrs["transA"].i if "transA" in attrs else 0
    trans_b = attrs["transB"].i if "transB" in attrs else 0
    alpha = attrs["alpha"].f if "alpha" in attrs else 1.0
    beta = attrs["beta"].f if "beta" in attrs else 1.0
    return trans_a == 0 and trans_b == 1 and alpha == 1.0 and beta == 1.0


def _channel_view(v: np.ndarray, ndim: int) -> np.ndarray:
    return v.reshape((-1,) + (1,) * (ndim - 1)) if v.ndim else v


def _quantize_layer(gr: _Graph, name: str, wqp: Any, aqp: Any, unsigned_weights: bool) -> tuple[bool, bool]:
    wname = f"{name}.weight"
    uses = gr.consumers(wname)
    if wname not in gr.inits or len(uses) != 1 or uses[0][1] != 1 or uses[0][0].op_type not in ("Gemm", "Conv"):
        raise ModelError(f"int8 export: the weight of layer {name!r} did not become the weight of one Gemm/Conv node in the ONNX graph")
    node = uses[0][0]
    if node.op_type == "Gemm" and not _gemm_ok(node):
        raise ModelError(f"int8 export: layer {name!r} became a Gemm with transposes or scaling that the exporter does not handle")
    w = gr.array(wname).astype(np.float32)
    quant_w = wqp is not None and wqp.bits <= 8
    s_w = None
    if quant_w:
        s_w = wqp.scale.detach().cpu().numpy().astype(np.float32)
        z_w = wqp.zero_point.detach().cpu().numpy()
        codes = np.round(w / _channel_view(s_w, w.ndim)) + _channel_view(z_w, w.ndim)
        lo, hi = (-128, 127) if wqp.signed else (0, 255)
        codes = np.clip(codes, lo, hi)
        if wqp.signed and unsigned_weights:  # the same values as uint8 codes with zero point 128
            codes, z_w = codes + 128, z_w + 128
        codes = codes.astype(np.int8 if wqp.signed and not unsigned_weights else np.uint8)
        qi = gr.add_init(f"{wname}_quantized", codes)
        si = gr.add_init(f"{wname}_scale", s_w)
        zi = gr.add_init(f"{wname}_zero_point", z_w.astype(codes.dtype))
        attrs = {"axis": 0} if s_w.ndim else {}
        node.input[1] = gr.node("DequantizeLinear", [qi, si, zi], f"{wname}_dequantized", **attrs)
        gr.drop_init(wname)
    if aqp is None:
        return quant_w, False
    s_x, z_x = float(aqp.scale), int(aqp.zero_point)
    node.input[0] = gr.qdq(node.input[0], s_x, z_x, aqp.signed)
    if quant_w and len(node.input) > 2 and node.input[2] in gr.inits:
        bname = node.input[2]
        s_b = (np.float32(s_x) * s_w).astype(np.float32)
        bq = np.round(gr.array(bname).astype(np.float64) / s_b.astype(np.float64))
        bq = np.clip(bq, -(2**31), 2**31 - 1).astype(np.int32)
        si = gr.add_init(f"{bname}_scale", s_b)
        zi = gr.add_init(f"{bname}_zero_point", np.zeros(s_b.shape, dtype=np.int32))
        qi = gr.add_init(f"{bname}_quantized", bq)
        node.input[2] = gr.node("DequantizeLinear", [qi, si, zi], f"{bname}_dequantized", **({"axis": 0} if s_b.ndim else {}))
        gr.drop_init(bname)
    # move a copy of the input's Q/DQ back through max-pooling and reshaping (exact; lets ORT fuse)
    dq = gr.producer[node.input[0]]
    q = gr.producer[dq.input[0]]
    src = q.input[0]
    while src in gr.producer and gr.producer[src].op_type in _PASS_THROUGH and len(gr.consumers(src)) == 1:
        p = gr.producer[src]
        before = p.input[0]
        p.input[0] = gr.qdq(before, s_x, z_x, aqp.signed)
        src = before
    return quant_w, True


def _int8_graph(proto: Any, quant: dict[str, tuple[Any, Any]], unsigned_weights: bool) -> tuple[list[str], list[str]]:
    gr = _Graph(proto)
    wl, al = [], []
    for name, (wqp, aqp) in quant.items():
        w, a = _quantize_layer(gr, name, wqp, aqp, unsigned_weights)
        if w:
            wl.append(name)
        if a:
            al.append(name)
    gr.finish()
    return wl, al


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: torch.Tensor | Sequence[int],
    *,
    int8: bool = False,
    calibration: Any = None,
    calibration_samples: int = 512,
    unsigned_weights: bool = True,
) -> ExportResult:
    """Write ``model`` as ONNX to ``path`` (atomically): fp32, or int8 QDQ with ``int8=True`` (module docstring).

    ``example_input``: one input's shape without the batch axis, or a batch tensor. For int8, a model
    that is not quantized yet is quantized (a copy) by ``Int8Config`` on ``calibration`` data (a
    Dataset, DataLoader, Splits or tensor; ``calibration_samples`` examples). Unsupported ops,
    layers the int8 rewrite cannot place, and a missing calibration set are one-line errors.
    """
    import onnx

    if not isinstance(model, nn.Module):
        raise ModelError(f"export needs an nn.Module, got {type(model).__name__}")
    x = _example(model, example_input)
    quant = _layer_quant(model) if int8 else {}
    if int8 and not any(a is not None for _, a in quant.values()):
        if calibration is None:
            raise DataError("int8 export: the model has no calibrated input quantizers; pass calibration data")
        from .quantize import Int8Config, quantize_

        model = copy.deepcopy(model).cpu().eval()
        quantize_(model, Int8Config(calibration_samples=calibration_samples), data=calibration)
        quant = _layer_quant(model)
    elif not int8 and _layer_quant(model):
        log.warning("fp32 export: quantized weights are exported as their float values and input quantizers are dropped")
    proto = _trace(_plain_copy(model), x)
    wl, al = _int8_graph(proto, quant, unsigned_weights) if int8 else ([], [])
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
    return ExportResult(os.fspath(path), len(blob), int8, wl, al, dict(ops))


# ------------------------------------------------------------------------------------------- runner


def ort_session(path: str | os.PathLike, threads: int | None = None) -> Any:
    """An onnxruntime CPU session of ``path`` with all graph optimizations (QDQ fusion included);
    ``threads`` fixes the intra-op thread count. An unreadable or invalid file is a :class:`ModelError`."""
    import onnxruntime as ort

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


def _input_name(session: Any) -> str:
    return session.get_inputs()[0].name


def ort_predict(session: Any, x: np.ndarray | torch.Tensor) -> np.ndarray:
    """The session's first output for the float32 batch ``x``."""
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    try:
        return session.run(None, {_input_name(session): arr.astype(np.float32, copy=False)})[0]
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise ModelError(f"onnxruntime could not run the model: {(text[0] if text else type(exc).__name__)[:300]}") from None


def ort_error_rate(session: Any, data: Any, batch_size: int = 500) -> float:
    """Top-1 error in [0, 1] of an onnxruntime session on a Dataset of ``(x, y)`` or a DataLoader."""
    from torch.utils.data import DataLoader

    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size, shuffle=False)
    wrong = total = 0
    for x, y in loader:
        pred = ort_predict(session, x).argmax(axis=1)
        wrong += int((pred != y.numpy()).sum())
        total += int(y.numel())
    if total == 0:
        raise DataError("the data set is empty")
    return wrong / total


def ort_latency(
    session: Any, example_input: Sequence[int], batch_sizes: Sequence[int] = (1, 64), runs: int = 30, warmup: int = 5
) -> dict[int, LatencyStats]:
    """Median (p10, p90) of ``runs`` timed ``session.run`` calls per batch size, as :func:`netshrink.metrics.latency`
    (a fixed-seed normal input of shape ``(batch, *example_input)``); threads as the session was built."""
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 20:
        raise ConfigError("runs", f"latency needs at least 20 timed runs, got {runs!r}")
    one = torch.randn((1, *(int(s) for s in example_input)), generator=torch.Generator().manual_seed(0)).numpy()
    name = _input_name(session)
    threads = int(session.get_session_options().intra_op_num_threads) or os.cpu_count() or 1
    out = {}
    for b in batch_sizes:
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ConfigError("batch_sizes", f"must be positive integers, got {b!r}")
        feed = {name: np.ascontiguousarray(np.repeat(one, b, axis=0))}
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


__all__ = ["ExportResult", "export_onnx", "onnx_input_shape", "ort_error_rate", "ort_latency", "ort_predict", "ort_session"]
