"""Early exits in onnxruntime with real control flow: a sample that leaves early skips the later stages.

An :class:`~netshrink.dynamic.early_exit.EarlyExitNet` exported as one graph would run every stage for
every sample (ONNX ``If`` branches cannot drop part of a batch). Here the network is cut at its exits
into segments, each exported as its own fp32 ONNX graph,

    segment_k : h_{k-1} -> (h_k, z_k)      (the stages up to exit k, then exit k's head)
    final     : h_{K}   -> z_final          (the remaining stages)

and :class:`ExitRuntime` runs them in onnxruntime with the routing of
:meth:`EarlyExitNet.route <netshrink.dynamic.early_exit.EarlyExitNet.route>` in between: after segment
``k`` the samples whose softmax entropy ``H(z_k) = -Σ p log p`` is below ``T_k`` leave with ``z_k``;
only the rest are fed to segment ``k+1``. The cost of this control flow is one extra session call per
exit passed (tens of microseconds), which is the price of skipping the stages after it.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ModelError
from .early_exit import EarlyExitNet, exit_thresholds


class _Segment(nn.Module):
    def __init__(self, stages: Sequence[nn.Module], head: nn.Module | None):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.head = head

    def forward(self, h: torch.Tensor):
        for s in self.stages:
            h = s(h)
        if self.head is None:
            return h
        return h, self.head(h)


def _entropy(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return -(np.exp(logp) * logp).sum(axis=-1)


@dataclass
class ExitRun:
    """The outcome of :meth:`ExitRuntime.run`: logits per sample and the exit each took (0-based)."""

    logits: np.ndarray
    exit_index: np.ndarray


class ExitRuntime:
    """onnxruntime sessions of an early-exit network's segments plus the entropy routing (module doc)."""

    def __init__(self, paths: Sequence[str | os.PathLike[str]], thresholds: Sequence[float], threads: int | None = 1):
        from ..export import ort_session

        if len(paths) != len(thresholds) + 1:
            raise ModelError(f"{len(paths)} segments for {len(thresholds)} early exits: expected {len(thresholds) + 1}")
        self.sessions = [ort_session(p, threads=threads) for p in paths]
        self.names = [s.get_inputs()[0].name for s in self.sessions]
        self.thresholds = tuple(float(t) for t in thresholds)

    def run(self, x: np.ndarray | torch.Tensor) -> ExitRun:
        h = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        h = np.ascontiguousarray(h, dtype=np.float32)
        n = h.shape[0]
        active = np.arange(n)
        logits: np.ndarray | None = None
        exit_index = np.full(n, len(self.sessions) - 1, dtype=np.int64)
        for k, (sess, name) in enumerate(zip(self.sessions[:-1], self.names[:-1])):
            h, z = sess.run(None, {name: h})
            if logits is None:
                logits = np.empty((n, *z.shape[1:]), dtype=z.dtype)
            leave = _entropy(z) < self.thresholds[k]
            if leave.any():
                idx = active[leave]
                logits[idx], exit_index[idx] = z[leave], k
                keep = ~leave
                active, h = active[keep], np.ascontiguousarray(h[keep])
            if active.size == 0:
                return ExitRun(logits, exit_index)
        z = self.sessions[-1].run(None, {self.names[-1]: h})[0]
        if logits is None:
            logits = np.empty((n, *z.shape[1:]), dtype=z.dtype)
        logits[active] = z
        return ExitRun(logits, exit_index)


def export_exit_runtime(
    net: EarlyExitNet, out_dir: str | os.PathLike[str], example_input: torch.Tensor,
    thresholds: float | Sequence[float], threads: int | None = 1,
) -> ExitRuntime:
    """Export ``net``'s segments (module docstring) as ``segment_<k>.onnx`` in ``out_dir`` and return the
    :class:`ExitRuntime` over them with entropy ``thresholds`` (one per early exit, or one for all)."""
    from ..export import _quiet_fds
    from .._fileio import atomic_write_bytes

    thr = exit_thresholds(thresholds, len(net.heads))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net = net.eval()
    bounds = [-1, *net.exit_after, len(net.stages) - 1]
    h = example_input[:1].detach()
    paths = []
    for k in range(len(bounds) - 1):
        head = net.heads[k] if k < len(net.heads) else None
        seg = _Segment([net.stages[i] for i in range(bounds[k] + 1, bounds[k + 1] + 1)], head).eval()
        outputs = ["hidden", "logits"] if head is not None else ["logits"]
        buf = io.BytesIO()
        try:
            with torch.no_grad(), _quiet_fds(), warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.onnx.export(seg, (h,), buf, input_names=["input"], output_names=outputs, opset_version=17,
                                  dynamic_axes={n: {0: "batch"} for n in ["input", *outputs]}, dynamo=False)
        except Exception as exc:  # torch's exporter raises many types
            raise ModelError(f"segment {k} of the early-exit network does not export to ONNX: {str(exc).splitlines()[0][:200]}") from None
        path = out / f"segment_{k}.onnx"
        atomic_write_bytes(path, buf.getvalue())
        paths.append(path)
        with torch.no_grad():
            res = seg(h)
        h = res[0] if head is not None else res
    return ExitRuntime(paths, thr, threads=threads)


__all__ = ["ExitRun", "ExitRuntime", "export_exit_runtime"]
