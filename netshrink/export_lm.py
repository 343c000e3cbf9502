"""ONNX export of a decoder LM with its key/value cache, weight-only int4/int8 ``MatMulNBits``, and a
greedy decode loop in onnxruntime.

The graph (``torch.onnx.export``, TorchScript exporter) takes ``input_ids (B, T)``, ``past_k`` and
``past_v`` ``(depth, B, kv_heads, P, head_dim)`` and returns ``logits (B, T, vocab)``, ``present_k`` and
``present_v`` (``P + T`` positions): the prompt runs with ``P = 0``, each new token with the cache.

Weight-only quantization: every Linear that carries group-quantized codes (``module.netshrink_groupq``,
from GPTQ / RTN / AWQ / SparseGPT+bits) has its ``MatMul`` replaced by onnxruntime's contrib operator
``com.microsoft.MatMulNBits`` (``bits`` 4 or 8, ``block_size`` = the group size: a power of two >= 16;
per-channel codes are written with ``block_size`` 128 and the row's scale repeated over its blocks,
which dequantizes to the same numbers), and every Embedding with codes (RTN's ``extra_layers``) has its
``Gather`` replaced by ``com.microsoft.GatherBlockQuantized`` over the same packed codes. ``B`` is packed
``(N, K/block, block*bits/8)`` uint8 (the token table ``(vocab, dim*bits/8)``), two 4-bit codes per byte
low nibble first; scales ``(N, K/block)``; zero points uint8, packed the same way. The operators compute
``A @ (s (q - z))^T`` and ``(s (q - z))[ids]`` -- the weights the torch model holds, so at
``accuracy_level`` 0 the ONNX model's logits match the simulated model's up to float rounding; level 4
(int8 activations per block, integer products) is onnxruntime's fast path. AWQ's input scale becomes a
``Div`` before the MatMulNBits.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._fileio import atomic_write_bytes
from .errors import ConfigError, ModelError

OPSET = 17
INPUTS = ("input_ids", "past_k", "past_v")
OUTPUTS = ("logits", "present_k", "present_v")


class _Cached(nn.Module):
    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, past_k, past_v):
        return self.lm.forward_cached(input_ids, past_k, past_v)


def _plain(model: nn.Module) -> nn.Module:
    """A deep copy without parametrizations (masks baked in) for tracing."""
    import copy

    from .prune._mask import make_permanent

    m = copy.deepcopy(model)
    make_permanent(m)
    _smoothquant_as_codes(m)
    return m.eval()


def _smoothquant_as_codes(model: nn.Module) -> None:
    """Each SmoothQuant W8A8 layer ``y = fq_token(x / s) @ (Δ q)^T`` becomes a Linear with weight
    ``Δ q / s`` carrying 8-bit codes ``q + 128`` (zero point 128, one group per row) and the input scale
    ``s``: exported as ``Div(x, s)`` then an 8-bit MatMulNBits, whose ``accuracy_level`` 4 quantizes the
    activations to int8 per block of 128 inputs (SmoothQuant's per-token int8, on finer blocks)."""
    from .quantize.gptq import GroupQuant
    from .quantize.smoothquant import SmoothQuantLinear

    for name, mod in list(model.named_modules()):
        if not isinstance(mod, SmoothQuantLinear):
            continue
        d = mod.w_step.float()
        codes = torch.round(mod.weight.detach().float() / d[:, None])
        gq = GroupQuant(8, mod.in_features, (codes + 128).to(torch.uint8), d[:, None].clone(),
                        torch.full((mod.out_features, 1), 128, dtype=torch.uint8), mod.smooth.detach().float().clone())
        lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
        lin.weight.data.copy_(gq.dequantize())
        if mod.bias is not None:
            lin.bias.data.copy_(mod.bias.detach())
        lin.netshrink_groupq = gq
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, lin)


def _trace(model: nn.Module) -> Any:
    import onnx

    if not hasattr(model, "forward_cached") or not hasattr(model, "empty_cache"):
        raise ModelError(f"{type(model).__name__} has no forward_cached/empty_cache: export_lm needs a netshrink llama_lm")
    plain = _plain(model)
    k, v = plain.empty_cache(1)
    k = torch.zeros(k.shape[0], 1, k.shape[2], 3, k.shape[4])
    ids = torch.zeros(1, 2, dtype=torch.long)
    buf = io.BytesIO()
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "past_k": {1: "batch", 3: "past"}, "past_v": {1: "batch", 3: "past"},
           "logits": {0: "batch", 1: "seq"}, "present_k": {1: "batch", 3: "total"}, "present_v": {1: "batch", 3: "total"}}
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Cached(plain), (ids, k, k.clone()), buf, dynamo=False, opset_version=OPSET, input_names=list(INPUTS),
                          output_names=list(OUTPUTS), dynamic_axes=dyn, do_constant_folding=True)
    return onnx.load_from_string(buf.getvalue()), plain


def pack_nbits(q: np.ndarray, bits: int, block: int) -> np.ndarray:
    """Codes ``(N, K)`` -> MatMulNBits ``B`` ``(N, K/block, block*bits/8)`` uint8, low nibble first."""
    n, k = q.shape
    q = q.astype(np.uint8).reshape(n, k // block, block)
    if bits == 8:
        return q
    if bits == 4:
        return (q[..., 0::2] & 0xF) | ((q[..., 1::2] & 0xF) << 4)
    raise ConfigError("bits", f"MatMulNBits export takes 4 or 8 bits, got {bits}")


def pack_zero_points(z: np.ndarray, bits: int) -> np.ndarray:
    """Zero points ``(N, blocks)`` -> uint8 ``(N, ceil(blocks*bits/8))`` (4 bits: two per byte, low first)."""
    z = z.astype(np.uint8)
    if bits == 8:
        return z
    n, b = z.shape
    if b % 2:
        z = np.concatenate([z, np.zeros((n, 1), np.uint8)], axis=1)
    return (z[:, 0::2] & 0xF) | ((z[:, 1::2] & 0xF) << 4)


def _block_for(gq: Any, k: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """``(block_size, codes, scales, zeros)`` with per-channel codes spread over blocks of 128 (or less)."""
    g = gq.group_size
    q = gq.q.numpy()
    s, z = gq.scale.float().numpy(), gq.zero.numpy()
    if g == k and (g & (g - 1) or g > 256):  # per channel, not a power of two: repeat the row's parameters
        g = next((b for b in (128, 64, 32, 16) if k % b == 0), None)
        if g is None:
            raise ConfigError("group_size", f"an input width {k} that no block size 16-128 divides cannot be exported")
        s, z = np.repeat(s, k // g, axis=1), np.repeat(z, k // g, axis=1)
    if g < 16 or g & (g - 1):
        raise ConfigError("group_size", f"MatMulNBits needs a power-of-two block size >= 16, got {g}")
    return g, q, s, z


@dataclass
class ExportReport:
    path: str
    bytes: int
    nbits_layers: int
    dense_layers: int
    #: Embeddings written as ``GatherBlockQuantized`` (int4 token tables)
    nbits_gathers: int = 0


#: MatMulNBits ``accuracy_level``: 0 computes in fp32 on the dequantized weights (the simulated model's
#: numbers); 4 quantizes each block of the activations to int8 and multiplies in integers (onnxruntime's
#: fastest CPU kernels, within int8 activation rounding of the simulated model).
ACCURACY_LEVELS = (0, 1, 4)


def _quantized_layers(plain: nn.Module, bits: int) -> tuple[dict[bytes, tuple[str, Any, str]], int]:
    """``{weight bytes as in the graph: (layer name, codes, kind)}`` of every Linear / Embedding with group
    codes of ``bits``, and the number of Linear layers left dense. A Linear's weight is an initializer of
    its MatMul transposed ``(in, out)``; an Embedding's the data of its Gather ``(vocab, dim)``."""
    found: dict[bytes, tuple[str, Any, str]] = {}
    dense = 0
    for name, mod in plain.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Embedding)):
            continue
        gq = getattr(mod, "netshrink_groupq", None)
        if gq is None or gq.bits != bits:
            dense += isinstance(mod, nn.Linear)
            continue
        w = mod.weight.detach().numpy()
        if isinstance(mod, nn.Linear):
            found[np.ascontiguousarray(w.T, dtype=np.float32).tobytes()] = (name, gq, "matmul")
        else:
            if gq.in_scale is not None:
                raise ModelError(f"{name}: an Embedding with an activation-aware input scale cannot be exported")
            found[np.ascontiguousarray(w, dtype=np.float32).tobytes()] = (name, gq, "gather")
    return found, dense


def export_lm(model: nn.Module, path: str | os.PathLike[str], *, weight_bits: int | None = None, accuracy_level: int = 0) -> ExportReport:
    """Write ``model`` (a ``llama_lm``) as ONNX with its KV cache. ``weight_bits`` 4 or 8: every Linear with
    group codes (``netshrink_groupq``, of those bits) becomes ``MatMulNBits`` and every Embedding with them
    ``GatherBlockQuantized``; None: plain fp32 everywhere. ``accuracy_level``: see :data:`ACCURACY_LEVELS`."""
    from onnx import helper, numpy_helper

    if weight_bits not in (None, 4, 8):
        raise ConfigError("weight_bits", f"expected 4, 8 or None, got {weight_bits!r}")
    if accuracy_level not in ACCURACY_LEVELS:
        raise ConfigError("accuracy_level", f"expected one of {ACCURACY_LEVELS}, got {accuracy_level!r}")
    proto, plain = _trace(model)
    replaced = gathers = dense = 0
    if weight_bits is not None:
        layers, dense = _quantized_layers(plain, weight_bits)
        plan: dict[str, tuple[str, Any, str]] = {}
        for init in proto.graph.initializer:
            if len(init.dims) == 2:
                hit = layers.get(numpy_helper.to_array(init).tobytes())
                if hit is not None:
                    plan[init.name] = hit
        missing = sorted({n for n, _, _ in layers.values()} - {n for n, _, _ in plan.values()})
        if missing:
            raise ModelError(f"{missing[0]}: its weight is not an initializer of the traced graph")
        new_nodes = []
        used: set[str] = set()
        for node in proto.graph.node:
            kind = "matmul" if node.op_type == "MatMul" else "gather" if node.op_type == "Gather" else None
            w_in = node.input[1] if kind == "matmul" else node.input[0] if kind == "gather" else None
            hit = plan.get(w_in) if w_in is not None and len(node.input) == 2 else None
            if hit is None or hit[2] != kind:
                new_nodes.append(node)
                continue
            _, gq, _ = hit
            n, k = gq.q.shape
            g, q, sc, z = _block_for(gq, k)
            base, a = w_in, node.input[0]
            if base not in used:
                proto.graph.initializer.extend([
                    numpy_helper.from_array(pack_nbits(q, weight_bits, g).reshape(n, -1) if kind == "gather" else pack_nbits(q, weight_bits, g), f"{base}_qB"),
                    numpy_helper.from_array(sc.astype(np.float32), f"{base}_scales"),
                    numpy_helper.from_array(pack_zero_points(z, weight_bits), f"{base}_zp"),
                ])
                used.add(base)
            if kind == "gather":
                new_nodes.append(helper.make_node("GatherBlockQuantized", [f"{base}_qB", node.input[1], f"{base}_scales", f"{base}_zp"],
                                                  list(node.output), domain="com.microsoft", gather_axis=0, quantize_axis=1,
                                                  block_size=g, bits=weight_bits))
                gathers += 1
                continue
            if gq.in_scale is not None:
                s_name = f"{base}_awq_scale"
                if s_name not in used:
                    proto.graph.initializer.append(numpy_helper.from_array(gq.in_scale.float().numpy(), s_name))
                    used.add(s_name)
                new_nodes.append(helper.make_node("Div", [a, s_name], [f"{node.output[0]}_awq_in"]))
                a = f"{node.output[0]}_awq_in"
            new_nodes.append(helper.make_node("MatMulNBits", [a, f"{base}_qB", f"{base}_scales", f"{base}_zp"], list(node.output),
                                              domain="com.microsoft", K=k, N=n, bits=weight_bits, block_size=g,
                                              accuracy_level=accuracy_level))
            replaced += 1
        still_read = {i for node in new_nodes for i in node.input}
        keep = [i for i in proto.graph.initializer if i.name not in plan or i.name in still_read]
        del proto.graph.node[:]
        proto.graph.node.extend(new_nodes)
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(keep)
        if not any(o.domain == "com.microsoft" for o in proto.opset_import):
            proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        if not used.issuperset(plan):
            name = next(plan[i][0] for i in plan if i not in used)
            raise ModelError(f"{name}: its quantized weight was not found as a MatMul or Gather input in the graph")
    blob = proto.SerializeToString()
    atomic_write_bytes(path, blob)
    return ExportReport(str(path), len(blob), replaced, dense, gathers)


# ------------------------------------------------------------------------------------- runtime


def lm_session(path: str | os.PathLike[str], threads: int = 1) -> Any:
    """An onnxruntime CPU session with fixed thread counts (intra ``threads``, inter 1)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _empty(session: Any, batch: int) -> tuple[np.ndarray, np.ndarray]:
    shape = session.get_inputs()[1].shape
    depth, kvh, hd = shape[0], shape[2], shape[4]
    z = np.zeros((depth, batch, kvh, 0, hd), np.float32)
    return z, z.copy()


def ort_logits(session: Any, ids: np.ndarray | torch.Tensor) -> np.ndarray:
    """Logits of a whole batch of sequences (empty cache)."""
    ids = np.asarray(ids, dtype=np.int64)
    k, v = _empty(session, ids.shape[0])
    return session.run(["logits"], {"input_ids": ids, "past_k": k, "past_v": v})[0]


def ort_generate(session: Any, prompt: np.ndarray | torch.Tensor, new_tokens: int) -> np.ndarray:
    """Greedy decoding with the key/value cache in onnxruntime: the ``new_tokens`` generated ids ``(B, n)``."""
    ids = np.asarray(prompt, dtype=np.int64)
    k, v = _empty(session, ids.shape[0])
    logits, k, v = session.run(None, {"input_ids": ids, "past_k": k, "past_v": v})
    out = []
    nxt = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
    for _ in range(new_tokens):
        out.append(nxt)
        if len(out) == new_tokens:
            break
        logits, k, v = session.run(None, {"input_ids": nxt, "past_k": k, "past_v": v})
        nxt = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
    return np.concatenate(out, axis=1)


def ort_perplexity(session: Any, data: Any, batch_size: int = 8) -> float:
    """Perplexity of next-token prediction over ``data`` (batches of ``(B, T)`` ids) in onnxruntime."""
    from .task import batches

    nll, count = 0.0, 0
    for ids in batches(data, batch_size):
        ids = torch.as_tensor(ids)
        logits = torch.from_numpy(ort_logits(session, ids.numpy()))
        lp = torch.log_softmax(logits[:, :-1].double(), -1)
        nll -= float(lp.gather(-1, ids[:, 1:, None]).sum())
        count += ids[:, 1:].numel()
    return float(np.exp(nll / max(1, count)))


def decode_timing(run_prompt, run_step, prompt_len: int, new_tokens: int) -> tuple[float, float]:
    """``(prompt tokens/s, decode tokens/s)`` of one generation: ``run_prompt()`` returns the state after the
    prompt, ``run_step(state)`` one more token's state."""
    t0 = time.perf_counter()
    state = run_prompt()
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        state = run_step(state)
    t2 = time.perf_counter()
    return prompt_len / (t1 - t0), new_tokens / (t2 - t1)


def file_bytes(path: str | os.PathLike[str]) -> int:
    return Path(path).stat().st_size


__all__ = ["ExportReport", "decode_timing", "export_lm", "lm_session", "ort_generate", "ort_logits", "ort_perplexity", "pack_nbits",
           "pack_zero_points"]
