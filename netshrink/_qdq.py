"""The int8 QDQ rewrite of a traced fp32 ONNX graph (see :mod:`netshrink.export`): each quantized layer's
weight becomes ``DequantizeLinear(W_q, s_w)`` of its integer codes, its input a ``QuantizeLinear`` ->
``DequantizeLinear`` pair at the calibrated ``s_x, z_x``, its bias int32 codes at scale ``s_x s_w``
(Jacob et al., CVPR 2018), and the input's pair is moved back through max-pooling and reshaping."""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import ModelError

#: ops through which a per-tensor Q/DQ pair is moved back unchanged (a monotone quantizer commutes with them)
_PASS_THROUGH = ("MaxPool", "Flatten", "Reshape")



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
    return trans_a == 0 and trans_b in (0, 1) and alpha == 1.0 and beta == 1.0


def _channel_view(v: np.ndarray, ndim: int, axis: int | None = 0) -> np.ndarray:
    if not v.ndim or axis is None:
        return v
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def _transposed_copy(gr: _Graph, w: np.ndarray | None) -> str | None:
    """The initializer holding ``w.T`` as the weight of one MatMul (a Linear on inputs of more than 2 dims,
    whose weight torch's exporter transposes by constant folding), or None."""
    if w is None or w.ndim != 2:
        return None
    wt = w.T
    for name, init in gr.inits.items():
        if tuple(init.dims) != wt.shape:
            continue
        uses = gr.consumers(name)
        if len(uses) == 1 and uses[0][1] == 1 and uses[0][0].op_type == "MatMul" and np.array_equal(gr.array(name), wt):
            return name
    return None


def _quantize_layer(
    gr: _Graph, name: str, wqp: Any, aqp: Any, unsigned_weights: bool, prefix: str = "", hint: str = "", weight: np.ndarray | None = None,
    originals: dict[str, Any] | None = None,
) -> tuple[bool, bool]:
    wname = f"{prefix}{name}.weight"
    matmul = False
    if wname not in gr.inits:
        alt = _transposed_copy(gr, weight)
        if alt is not None:
            wname, matmul = alt, True
    uses = gr.consumers(wname)
    if wname not in gr.inits or len(uses) != 1 or uses[0][1] != 1 or uses[0][0].op_type not in ("Gemm", "Conv", "MatMul"):
        found = ", ".join(sorted({n.op_type for n, _ in uses})) or "none"
        raise ModelError(f"int8 export: the weight of layer {name!r} did not become the weight of one Gemm/Conv/MatMul node in the ONNX graph "
                         f"(consumers: {found}){hint}")
    node = uses[0][0]
    if node.op_type == "Gemm" and not _gemm_ok(node):
        raise ModelError(f"int8 export: layer {name!r} became a Gemm with transposes or scaling that the exporter does not handle")
    w = gr.array(wname).astype(np.float32)
    if originals is not None:  # the float values, for a layer onnxruntime will not fuse (see _float_unfused)
        originals[name] = {"node": node, "w": (wname, gr.array(wname))}
        if len(node.input) > 2 and node.input[2] in gr.inits:
            originals[name]["b"] = (node.input[2], gr.array(node.input[2]))
    if matmul:
        w = w.T  # (out, in) as the quantizer's channels: the codes are transposed back below
    quant_w = wqp is not None and wqp.bits <= 8
    s_w = None
    if quant_w:
        s_w = wqp.scale.detach().cpu().numpy().astype(np.float32)
        z_w = wqp.zero_point.detach().cpu().numpy()
        ax = wqp.axis if s_w.ndim else None  # the output-channel axis in the module's layout (1 for GPT-2's Conv1D)
        codes = np.round(w / _channel_view(s_w, w.ndim, ax)) + _channel_view(z_w, w.ndim, ax)
        lo, hi = (-128, 127) if wqp.signed else (0, 255)
        codes = np.clip(codes, lo, hi)
        if wqp.signed and unsigned_weights:  # the same values as uint8 codes with zero point 128
            codes, z_w = codes + 128, z_w + 128
        codes = codes.astype(np.int8 if wqp.signed and not unsigned_weights else np.uint8)
        if matmul:
            codes = np.ascontiguousarray(codes.T)
        qi = gr.add_init(f"{wname}_quantized", codes)
        si = gr.add_init(f"{wname}_scale", s_w)
        zi = gr.add_init(f"{wname}_zero_point", z_w.astype(codes.dtype))
        attrs = {"axis": (1 - ax) if matmul else ax} if s_w.ndim else {}
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


def _reaches_quantize(gr: _Graph, node: Any) -> bool:
    """Whether ``node``'s output goes, alone and through at most one Relu/Clip, into one QuantizeLinear --
    the pattern onnxruntime fuses into an integer Conv kernel (QLinearConv) -- else it runs in float."""
    out = node.output[0]
    for _ in range(2):
        uses = gr.consumers(out)
        if len(uses) != 1:
            return False
        nxt = uses[0][0]
        if nxt.op_type == "QuantizeLinear":
            return True
        if nxt.op_type not in ("Relu", "Clip"):
            return False
        out = nxt.output[0]
    return False


def _float_unfused(gr: _Graph, originals: dict[str, Any]) -> list[str]:
    """Give each quantized Conv that onnxruntime will not fuse (its output feeds a residual Add, a graph
    output, ...) its dequantized float weight and float bias back: onnxruntime would run it in float anyway,
    dequantizing the weight at every call; the values are the same (the weight is the fake-quantized one)."""
    done = []
    for name, rec in originals.items():
        node = rec["node"]
        if node.op_type != "Conv" or _reaches_quantize(gr, node):
            continue
        wname, w = rec["w"]
        node.input[1] = gr.add_init(wname, w)
        if "b" in rec:
            bname, b = rec["b"]
            node.input[2] = gr.add_init(bname, b)
        done.append(name)
    if done:  # drop the DequantizeLinear nodes no one reads now, and their initializers
        dead = [n for n in gr.new_nodes if n.op_type == "DequantizeLinear" and not gr.consumers(n.output[0])]
        for n in dead:
            gr.new_nodes.remove(n)
            for t in n.input:
                if t in gr.inits:
                    gr.drop_init(t)
    return done


def int8_graph(
    proto: Any, quant: dict[str, tuple[Any, Any]], unsigned_weights: bool, prefix: str = "", hints: dict[str, str] | None = None,
    weights: dict[str, np.ndarray] | None = None, float_unfused: bool = False,
) -> tuple[list[str], list[str], list[str]]:
    """Rewrite ``proto`` in place; returns the layers with int8 weights, those with a quantized input, and
    (``float_unfused``) the quantized Conv layers stored with float weights because onnxruntime cannot fuse them."""
    gr = _Graph(proto)
    wl, al = [], []
    originals: dict[str, Any] = {}
    for name, (wqp, aqp) in quant.items():
        w, a = _quantize_layer(gr, name, wqp, aqp, unsigned_weights, prefix, (hints or {}).get(name, ""), (weights or {}).get(name), originals)
        if w:
            wl.append(name)
        if a:
            al.append(name)
    floats = _float_unfused(gr, originals) if float_unfused else []
    gr.finish()
    return [n for n in wl if n not in floats], al, floats


__all__ = ["int8_graph"]
