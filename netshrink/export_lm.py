"""ONNX export of a decoder LM with its key/value cache, weight-only int4/int8 ``MatMulNBits``, and a
greedy decode loop in onnxruntime.

The graph (``torch.onnx.export``, TorchScript exporter) takes ``input_ids (B, T)``, ``past_k`` and
``past_v`` ``(depth, B, kv_heads, P, head_dim)`` and returns ``logits (B, T, vocab)``, ``present_k`` and
``present_v`` (``P + T`` positions): the prompt runs with ``P = 0``, each new token with the cache.

Weight-only quantization: every Linear that carries group-quantized codes (``module.netshrink_groupq``,
from GPTQ / RTN / AWQ / SparseGPT+bits) has its ``MatMul`` replaced by onnxruntime's contrib operator
``com.microsoft.MatMulNBits`` (``bits`` 4 or 8, ``block_size`` = the group size: a power of two >= 16;
per-channel codes are written with ``block_size`` 128 and the row's scale repeated over its blocks,
which dequantizes to the same numbers). ``B`` is packed ``(N, K/block, block*bits/8)`` uint8, two 4-bit
codes per byte low nibble first; scales ``(N, K/block)``; zero points uint8, packed the same way. The
operator computes ``A @ (s (q - z))^T`` -- the weights the torch model holds, so the ONNX model's
logits match the simulated model's up to float rounding. AWQ's input scale becomes a ``Div`` before it.
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
from .calibrate import find_blocks, block_layers
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
    return m.eval()


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


def export_lm(model: nn.Module, path: str | os.PathLike[str], *, weight_bits: int | None = None) -> ExportReport:
    """Write ``model`` (a ``llama_lm``) as ONNX with its KV cache. ``weight_bits`` 4 or 8: layers with group
    codes (``netshrink_groupq``, of those bits) become MatMulNBits; None: plain fp32 MatMul everywhere."""
    from onnx import helper, numpy_helper

    if weight_bits not in (None, 4, 8):
        raise ConfigError("weight_bits", f"expected 4, 8 or None, got {weight_bits!r}")
    proto, plain = _trace(model)
    replaced = 0
    dense = 0
    if weight_bits is not None:
        inits = {i.name: i for i in proto.graph.initializer}
        by_bytes: dict[bytes, str] = {}
        for name, init in inits.items():
            if len(init.dims) == 2:
                by_bytes.setdefault(numpy_helper.to_array(init).tobytes(), name)
        path_, blocks = find_blocks(model)
        nodes = list(proto.graph.node)
        new_nodes = []
        plan: dict[str, tuple[Any, nn.Module]] = {}
        for b, block in enumerate(blocks):
            for local, mod in block_layers(block).items():
                gq = getattr(mod, "netshrink_groupq", None)
                if gq is None or gq.bits != weight_bits:
                    dense += 1
                    continue
                w = plain.get_submodule(f"{path_}.{b}.{local}").weight.detach().numpy().T
                init_name = by_bytes.get(np.ascontiguousarray(w, dtype=np.float32).tobytes())
                if init_name is None:
                    raise ModelError(f"{path_}.{b}.{local}: its weight is not an initializer of the traced graph")
                plan[init_name] = (gq, mod)
        for node in nodes:
            if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in plan:
                gq, mod = plan[node.input[1]]
                k, n = gq.q.shape[1], gq.q.shape[0]
                g, q, s, z = _block_for(gq, k)
                base = node.input[1]
                a = node.input[0]
                if gq.in_scale is not None:
                    sc = f"{base}_awq_scale"
                    proto.graph.initializer.append(numpy_helper.from_array(gq.in_scale.float().numpy(), sc))
                    new_nodes.append(helper.make_node("Div", [a, sc], [f"{base}_awq_in"]))
                    a = f"{base}_awq_in"
                proto.graph.initializer.extend([
                    numpy_helper.from_array(pack_nbits(q, weight_bits, g), f"{base}_qB"),
                    numpy_helper.from_array(s.astype(np.float32), f"{base}_scales"),
                    numpy_helper.from_array(pack_zero_points(z, weight_bits), f"{base}_zp"),
                ])
                new_nodes.append(helper.make_node("MatMulNBits", [a, f"{base}_qB", f"{base}_scales", f"{base}_zp"], list(node.output),
                                                  domain="com.microsoft", K=k, N=n, bits=weight_bits, block_size=g))
                replaced += 1
            else:
                new_nodes.append(node)
        keep = [i for i in proto.graph.initializer if i.name not in plan]
        del proto.graph.node[:]
        proto.graph.node.extend(new_nodes)
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(keep)
        if not any(o.domain == "com.microsoft" for o in proto.opset_import):
            proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        if replaced != len(plan):
            raise ModelError(f"{len(plan) - replaced} quantized layer(s) were not found as MatMul nodes in the graph")
    blob = proto.SerializeToString()
    atomic_write_bytes(path, blob)
    return ExportReport(str(path), len(blob), replaced, dense)


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
