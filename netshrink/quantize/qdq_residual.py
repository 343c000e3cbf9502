"""Quantized residual adds for an int8 QDQ graph, so onnxruntime runs residual networks in int8 end to end.

The int8 export (:mod:`netshrink.export`) puts QuantizeLinear/DequantizeLinear pairs on every quantized
layer's input. onnxruntime fuses ``DQ(x), DQ(W) -> Conv -> Q(y)`` into one ``QLinearConv`` only when the
conv's output is itself quantized; in a residual block the last conv feeds an ``Add`` (the shortcut sum)
whose inputs and output are float, so that conv runs in float after dequantizing its input and weight,
with layout changes around it — slower than fp32. onnxruntime's own quantizer quantizes those tensors too.

This pass does the same on our graph: for every ``Add`` it makes both inputs and the output quantized
tensors. A tensor already quantized for another consumer (a conv's input Q -> DQ pair) is shared; any
other tensor ``t`` gets a new pair ``Q(t; s, z) -> DQ`` with an affine uint8 range from its minimum and
maximum over calibration inputs run through the graph itself (``s = (max - min) / 255``, ``z = round(-min / s)``,
the range widened to include 0; Jacob et al., CVPR 2018). When an ``Add`` feeds only a ``Relu``, the pair
goes after the ``Relu`` (its range starts at 0, so onnxruntime drops the ``Relu`` into the quantized add).
onnxruntime then fuses ``QLinearConv`` and ``QLinearAdd``. The rounding of the residual stream is the one
change to the model's outputs (measured against the simulated model by the int8 benchmarks).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Mapping

import numpy as np

from ..errors import DataError, ModelError


def _consumers(graph: Any) -> dict[str, list[tuple[Any, int]]]:
    out: dict[str, list[tuple[Any, int]]] = defaultdict(list)
    for node in graph.node:
        for i, name in enumerate(node.input):
            out[name].append((node, i))
    return out


def _producers(graph: Any) -> dict[str, Any]:
    return {o: node for node in graph.node for o in node.output}


def _existing_pair(t: str, consumers: Mapping[str, list[tuple[Any, int]]]) -> str | None:
    """The output of a DequantizeLinear fed by a QuantizeLinear of ``t``, if ``t`` has one."""
    for node, i in consumers.get(t, []):
        if node.op_type == "QuantizeLinear" and i == 0:
            for nxt, j in consumers.get(node.output[0], []):
                if nxt.op_type == "DequantizeLinear" and j == 0:
                    return nxt.output[0]
    return None


def merge_duplicate_pairs(proto: Any) -> int:
    """One Q -> DQ pair per tensor: a tensor quantized for several consumers (a block output feeding the
    next block's conv and its shortcut conv) keeps its first pair; the other pairs' consumers read that
    pair's output and the other pairs are dropped. onnxruntime can fold a ``Relu`` into a quantized op
    only when the ``Relu`` feeds a single QuantizeLinear. Pairs with other scales or zero points are kept
    (merging them would change the rounding). Returns the number of pairs removed."""
    from onnx import numpy_helper

    g = proto.graph
    cons = _consumers(g)
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}

    def params(q: Any) -> tuple[Any, ...]:
        vals = [inits.get(n) for n in q.input[1:]]
        return tuple(None if v is None else (v.dtype.str, v.tobytes()) for v in vals) + tuple(
            (a.name, a.i) for a in q.attribute)

    drop: set[int] = set()
    for t, users in list(cons.items()):
        pairs = []
        for node, i in users:
            if node.op_type == "QuantizeLinear" and i == 0:
                dqs = [n for n, j in cons.get(node.output[0], []) if n.op_type == "DequantizeLinear" and j == 0]
                if len(dqs) == 1 and len(cons.get(node.output[0], [])) == 1:
                    pairs.append((node, dqs[0]))
        for q, dq in pairs[1:]:
            keep_q, keep_dq = pairs[0]
            if params(q) != params(keep_q) or [inits.get(n) is None for n in dq.input[1:]] != [False, False]:
                continue
            for n, j in cons.get(dq.output[0], []):
                n.input[j] = keep_dq.output[0]
            for o in g.output:
                if o.name == dq.output[0]:
                    break
            else:
                drop.update((id(q), id(dq)))
    dropped_inputs = {name for n in g.node if id(n) in drop for name in n.input}
    kept = [n for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(kept)
    used = {name for n in g.node for name in n.input} | {o.name for o in g.output}
    unused = [i for i in g.initializer if i.name in dropped_inputs and i.name not in used]
    for init in unused:  # the dropped pairs' scales and zero points
        g.initializer.remove(init)
    return len(drop) // 2


def residual_points(proto: Any) -> list[str]:
    """The float tensors this pass quantizes: the non-dequantized inputs of every ``Add`` and its output
    (after a sole ``Relu`` consumer). Initializers and graph inputs are left alone."""
    g = proto.graph
    prod, cons = _producers(g), _consumers(g)
    inits = {i.name for i in g.initializer}
    points: list[str] = []
    for node in g.node:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        if any(n in inits for n in node.input):  # a bias add, not a residual sum
            continue
        for t in node.input:
            p = prod.get(t)
            if p is not None and p.op_type != "DequantizeLinear" and t not in points:
                points.append(t)
        out = node.output[0]
        users = cons.get(out, [])
        if len(users) == 1 and users[0][0].op_type == "Relu":
            out = users[0][0].output[0]
        if out not in points and not any(o.name == out for o in g.output):
            points.append(out)
    return points


def _ranges(proto: Any, tensors: list[str], feeds: Iterable[Mapping[str, np.ndarray]]) -> dict[str, tuple[float, float]]:
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    have = {o.name for o in probe.graph.output}
    for t in tensors:
        if t not in have:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    lo = {t: np.inf for t in tensors}
    hi = {t: -np.inf for t in tensors}
    seen = 0
    for feed in feeds:
        seen += 1
        for name, value in zip(names, sess.run(None, dict(feed))):
            if name in lo and value.size:
                lo[name] = min(lo[name], float(value.min()))
                hi[name] = max(hi[name], float(value.max()))
    if seen == 0:
        raise DataError("quantized residual adds: no calibration input")
    return {t: (lo[t], hi[t]) for t in tensors}


def _uint8_params(lo: float, hi: float) -> tuple[float, int]:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    zero = int(np.clip(round(-lo / scale), 0, 255))
    return float(scale), zero


def quantize_residual_adds(proto: Any, feeds: Iterable[Mapping[str, np.ndarray]]) -> list[str]:
    """Make every residual ``Add`` of the int8 QDQ graph ``proto`` quantized, in place (module docstring).

    ``feeds``: calibration inputs (``{input name: array}``) run through ``proto``. Returns the tensors
    that got a new Q/DQ pair (tensors that shared an existing pair are not listed).
    """
    import onnx
    from onnx import helper, numpy_helper

    g = proto.graph
    merge_duplicate_pairs(proto)
    points = residual_points(proto)
    if not points:
        return []
    cons = _consumers(g)
    shared = {t: _existing_pair(t, cons) for t in points}
    fresh = [t for t in points if shared[t] is None]
    ranges = _ranges(proto, fresh, feeds) if fresh else {}
    for t, (lo, hi) in ranges.items():
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ModelError(f"quantized residual adds: tensor {t!r} has no finite range on the calibration inputs")
    new_nodes: list[Any] = []
    added: list[str] = []
    for t in points:
        users = [(n, i) for n, i in cons.get(t, []) if n.op_type != "QuantizeLinear"]
        if shared[t] is not None:
            deq = shared[t]
        else:
            scale, zero = _uint8_params(*ranges[t])
            base = t.replace("/", "_").replace(":", "_")
            s_name, z_name = f"{base}_res_scale", f"{base}_res_zero"
            g.initializer.append(numpy_helper.from_array(np.asarray(scale, dtype=np.float32), s_name))
            g.initializer.append(numpy_helper.from_array(np.asarray(zero, dtype=np.uint8), z_name))
            q, deq = f"{base}_res_q", f"{base}_res_dq"
            new_nodes.append((t, helper.make_node("QuantizeLinear", [t, s_name, z_name], [q], name=q)))
            new_nodes.append((t, helper.make_node("DequantizeLinear", [q, s_name, z_name], [deq], name=deq)))
            added.append(t)
        for node, i in users:
            node.input[i] = deq
    # place each new pair right after the node that produces its tensor (keeps the graph topologically sorted)
    prod_index = {o: k for k, node in enumerate(g.node) for o in node.output}
    inputs = {i.name for i in g.input}
    nodes = list(g.node)
    after: dict[int, list[Any]] = defaultdict(list)
    for t, node in new_nodes:
        after[prod_index[t] if t not in inputs else -1].append(node)
    ordered = list(after.get(-1, []))
    for k, node in enumerate(nodes):
        ordered.append(node)
        ordered.extend(after.get(k, []))
    del g.node[:]
    g.node.extend(ordered)
    onnx.checker.check_model(proto)
    return added


__all__ = ["merge_duplicate_pairs", "quantize_residual_adds", "residual_points"]
