"""Measurements: error, parameters, non-zeros, MACs, bytes, latency, SQNR (rules in DESIGN.md).

Parameters and non-zeros are read through :func:`netshrink._state.unique_effective_parameters`: a
masked or weight-shared layer counts once, at the effective value its forward pass uses, the
parametrizations' internals (original weights, codebooks, index buffers, masks) never count, and tied
parameters (one storage under two names) count once.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .errors import ConfigError

if False:  # typing only
    from .task import Task

#: the plain torch layer types whose multiply-accumulates :func:`macs` counts (it also counts
#: ConvTranspose, GPT-2's Conv1D and attention: see :func:`macs`)
MAC_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                                           nn.ConvTranspose2d, nn.ConvTranspose3d)


def error_rate(
    model: nn.Module, data: Dataset | DataLoader, batch_size: int = 1000, device: str | torch.device | None = None,
    task: "Task | str | None" = None,
) -> float:
    """The task's metric of ``model`` on ``data``: top-1 error in [0, 1] by default (batches ``(x, y)``).

    With ``task`` (a :class:`netshrink.task.Task` or its name) the batches, outputs and metric are the
    task's: perplexity for a language model, MSE for regression, dict batches, tuple/dict outputs.
    """
    from .task import resolve_task

    return resolve_task(task).evaluate(model, data, batch_size=batch_size, device=device)


# --------------------------------------------------------------------------- parameters and bytes


def _effective_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    from ._state import unique_effective_parameters  # lazy: keeps metrics importable from the method modules

    return unique_effective_parameters(model)


def count_params(model: nn.Module) -> int:
    """``sum_p numel(p)`` over the effective parameters (a pruned weight still counts in full).

    Parameters that share one storage (an embedding tied to the output layer) count once: the sum
    runs over unique storage (:func:`netshrink._state.tie_groups`), as do :func:`count_nonzeros` and
    :func:`fp32_bytes`, so a compression ratio is never inflated by a tie.
    """
    return sum(int(t.numel()) for t in _effective_parameters(model).values())


def count_nonzeros(model: nn.Module) -> int:
    """``sum_p |{i : p_i != 0}|`` over the effective parameters (masked-out weights are zeros)."""
    return sum(int(torch.count_nonzero(t)) for t in _effective_parameters(model).values())


def fp32_bytes(model: nn.Module) -> int:
    """Bytes of the dense fp32 model, ``4 * count_params(model)``: the numerator of the compression ratio."""
    return 4 * count_params(model)


def compression_ratio(reference: nn.Module | int, packed: str | os.PathLike[str] | int) -> float:
    """Compression ratio = bytes of the dense fp32 model / bytes of the whole packed file (DESIGN.md).

    ``reference`` is the original dense model (or its byte count); ``packed`` a file path (or a byte count).
    """
    dense = reference if isinstance(reference, int) else fp32_bytes(reference)
    size = packed if isinstance(packed, int) else os.path.getsize(packed)
    if size <= 0:
        raise ValueError(f"compression_ratio: the packed size must be positive, got {size}")
    return dense / size


# --------------------------------------------------------------------------- MACs


@dataclass(frozen=True)
class LayerMacs:
    """Multiply-accumulates of one layer for the example input.

    ``dense = P * numel(W)`` and ``effective = P * nnz(W)``, where ``P`` is the number of output
    positions (rows of a Linear's output; ``N * prod(output spatial dims)`` for a convolution):
    each weight is used once per output position, groups included, since ``W`` has shape
    ``(C_out, C_in / groups, *kernel)``. Bias additions and zero-padding are not treated specially
    (the usual convention).
    """

    name: str
    type: str
    dense: int
    effective: int
    weight_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    calls: int = 1

    @property
    def density(self) -> float:
        """``effective / dense`` (1.0 for a layer that does no work)."""
        return self.effective / self.dense if self.dense else 1.0


@dataclass(frozen=True)
class MacsReport:
    """Per-layer MACs of one forward pass on ``input_shape`` (the whole batch), and their totals."""

    layers: tuple[LayerMacs, ...]
    input_shape: tuple[int, ...]

    @property
    def dense(self) -> int:
        return sum(layer.dense for layer in self.layers)

    @property
    def effective(self) -> int:
        return sum(layer.effective for layer in self.layers)

    @property
    def speedup_bound(self) -> float:
        """``dense / effective``: the MAC reduction (an upper bound on speedup, not a measured one)."""
        return self.dense / self.effective if self.effective else math.inf

    def __getitem__(self, name: str) -> LayerMacs:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r} in the MACs report (layers: {', '.join(l.name for l in self.layers)})")

    def to_dict(self) -> dict:
        return {"input_shape": list(self.input_shape), "dense": self.dense, "effective": self.effective,
                "layers": [asdict(layer) for layer in self.layers]}


def _as_inputs(example_input: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    if isinstance(example_input, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example_input):
        return tuple(example_input)
    raise ConfigError("example_input", f"expected a tensor or a tuple of tensors, got {type(example_input).__name__}")


def _attention_geometry(module: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int, int, int] | None:
    """``(N, H, L, S, d)`` of one attention call: batch, query heads, query and key lengths, head size."""
    from .prune.structured.attention import GroupedQueryAttention

    if isinstance(module, GroupedQueryAttention):
        x = args[0] if args else kwargs.get("x")
        return int(x.shape[0]), module.num_heads, int(x.shape[1]), int(x.shape[1]), module.head_dim
    names = ("query", "key", "value")
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    q, k = bound.get("query"), bound.get("key")
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
        return None
    if q.dim() == 2:
        n, lq, lk = 1, q.shape[0], k.shape[0]
    elif getattr(module, "batch_first", False):
        n, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    else:
        n, lq, lk = q.shape[1], q.shape[0], k.shape[0]
    return int(n), int(module.num_heads), int(lq), int(lk), int(module.head_dim)


def _mha_projections(module: nn.MultiheadAttention, n: int, lq: int, lk: int) -> list[tuple[str, torch.Tensor, int]]:
    """(suffix, effective weight, output positions) of the four projections nn.MultiheadAttention runs
    without calling them as modules (its packed in_proj_weight and its out_proj.weight)."""
    e = module.embed_dim
    if module._qkv_same_embed_dim:
        w = module.in_proj_weight
        wq, wk, wv = w[:e], w[e:2 * e], w[2 * e:]
    else:
        wq, wk, wv = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
    return [("q_proj", wq, n * lq), ("k_proj", wk, n * lk), ("v_proj", wv, n * lk), ("out_proj", module.out_proj.weight, n * lq)]


class _FunctionalMacs(torch.overrides.TorchFunctionMode):
    """Counts the matrix products a model computes outside the layers :func:`macs` hooks: attention written
    with ``torch.matmul`` / ``@`` / ``bmm`` / ``baddbmm`` / ``scaled_dot_product_attention`` (as in
    transformers' attention modules), or a custom layer's ``x @ W``. ``a (..., m, k) @ b (..., k, n)`` costs
    ``prod(batch) m k n``; ``sdpa(q, k, v)`` costs ``prod(q.shape[:-1]) S (d + d_v)``."""

    def __init__(self, add: Any, depth: list[int]):
        super().__init__()
        self.add, self.depth = add, depth
        f = torch.nn.functional
        self.mm = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm}
        self.baddbmm = {torch.baddbmm, torch.Tensor.baddbmm}
        self.sdpa = {f.scaled_dot_product_attention}

    @staticmethod
    def _mm(a: Any, b: Any) -> int:
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dim() == 0 or b.dim() == 0:
            return 0
        sa = (1, *a.shape) if a.dim() == 1 else tuple(a.shape)
        sb = (*b.shape, 1) if b.dim() == 1 else tuple(b.shape)
        batch = torch.broadcast_shapes(sa[:-2], sb[:-2])
        return math.prod(batch) * sa[-2] * sa[-1] * sb[-1]

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth[0] == 0:
            n, what = 0, ""
            if func in self.mm and len(args) >= 2:
                n, what = self._mm(args[0], args[1]), "matmul"
            elif func in self.baddbmm and len(args) >= 3:
                n, what = self._mm(args[1], args[2]), "matmul"
            elif func in self.sdpa and len(args) >= 3:
                q, k, v = args[:3]
                n, what = math.prod(q.shape[:-1]) * k.shape[-2] * (q.shape[-1] + v.shape[-1]), "attention"
            if n:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else ()
                self.add(f"(functional {what})", f"torch {what} outside the counted layers", (), shape, int(n), int(n))
        return out


@torch.no_grad()
def macs(model: nn.Module, example_input: Any) -> MacsReport:
    """Count dense and effective MACs of every weight layer and attention in one forward pass.

    Forward hooks record each layer's call; for a layer with weight ``W`` and ``P`` output positions,
    ``dense = P * numel(W)`` and ``effective = P * nnz(W)`` (MACs that touch a non-zero weight):

    - Linear, Conv1d/2d/3d: ``P = numel(output) / C_out``; GPT-2's ``Conv1D``: ``P = numel(output) / nf``;
    - ConvTranspose: each weight is used once per *input* position, ``P = numel(input) / C_in``;
    - Embedding: a table lookup, no MACs (not listed);
    - attention (``nn.MultiheadAttention``, and the converted/pruned ``HeadAttention`` and
      ``GroupedQueryAttention``): the two matmuls ``Q Kᵀ`` and ``A V`` cost ``2 N H L S d``
      (listed as ``NAME.attention``, effective = dense); ``nn.MultiheadAttention`` runs its q/k/v/out
      projections without calling them as modules, so they are counted here too (``NAME.q_proj`` ...;
      the converted modules' projections are ordinary Linear layers);
    - matrix products outside these layers (transformers' attention ``softmax(QKᵀ)V`` written with
      ``torch.matmul`` or ``scaled_dot_product_attention``, a custom ``x @ W``): one entry per kind,
      ``(functional matmul)`` / ``(functional attention)`` (effective = dense).

    ``W`` is the effective weight (masked or shared), as the forward pass uses it. A layer called twice is
    counted twice. The counts are for the whole example batch: pass a batch of one for per-example MACs.
    ``example_input``: a tensor, a tuple of tensors, or a :class:`netshrink.task.Inputs`.
    """
    from ._layers import CONV1D_GPT2, CONV_TRANSPOSE, EMBEDDING, layer_kind
    from .prune.structured.attention import ATTENTION_TYPES

    call = getattr(example_input, "call", None)
    if call is not None and hasattr(example_input, "tensors"):
        run = lambda: call(model)  # noqa: E731  (an Inputs: positional and keyword tensors)
        first = next(iter(example_input.tensors()), None)
        input_shape = tuple(first.shape) if first is not None else ()
    else:
        inputs = _as_inputs(example_input)
        run = lambda: model(*inputs)  # noqa: E731
        input_shape = tuple(inputs[0].shape)
    acc: dict[str, dict] = {}

    def add(name: str, kind: str, weight_shape: tuple, out_shape: tuple, dense: int, effective: int) -> None:
        entry = acc.setdefault(name, {"name": name, "type": kind, "dense": 0, "effective": 0,
                                      "weight_shape": weight_shape, "output_shape": out_shape, "calls": 0})
        entry["dense"] += dense
        entry["effective"] += effective
        entry["calls"] += 1

    def hook(name: str):
        def fn(module: nn.Module, inp: tuple, out: torch.Tensor) -> None:
            weight, kind = module.weight, layer_kind(module)
            if kind == CONV_TRANSPOSE:
                positions = inp[0].numel() // module.in_channels
            elif kind == CONV1D_GPT2:
                positions = out.numel() // module.nf
            else:
                positions = out.numel() // (module.out_features if isinstance(module, nn.Linear) else module.out_channels)
            add(name, type(module).__name__, tuple(weight.shape), tuple(out.shape), positions * weight.numel(),
                positions * int(torch.count_nonzero(weight)))

        return fn

    def attn_hook(name: str):
        def fn(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            geo = _attention_geometry(module, args, kwargs)
            if geo is None:
                return
            n, h, lq, lk, d = geo
            if isinstance(module, nn.MultiheadAttention):
                for suffix, w, positions in _mha_projections(module, n, lq, lk):
                    add(f"{name}.{suffix}", "MultiheadAttention projection", tuple(w.shape), (n, lq if suffix in ("q_proj", "out_proj") else lk, w.shape[0]),
                        positions * w.numel(), positions * int(torch.count_nonzero(w)))
            mm = 2 * n * h * lq * lk * d
            add(f"{name}.attention", "attention matmuls (QKᵀ, AV)", (), (n, h, lq, lk), mm, mm)

        return fn

    handles = []
    depth = [0]  # > 0 while inside a layer or attention module counted by its hook

    def enter(_m: nn.Module, _inp: Any) -> None:
        depth[0] += 1

    def leave(_m: nn.Module, _inp: Any, _out: Any) -> None:
        depth[0] -= 1

    for n, m in model.named_modules():
        if "parametrizations" in n.split("."):
            continue
        kind = layer_kind(m)
        counted = (kind is not None and kind != EMBEDDING) or isinstance(m, ATTENTION_TYPES)
        if counted:
            handles.append(m.register_forward_pre_hook(enter))
        if kind is not None and kind != EMBEDDING:
            handles.append(m.register_forward_hook(hook(n)))
        if isinstance(m, ATTENTION_TYPES):
            handles.append(m.register_forward_hook(attn_hook(n), with_kwargs=True))
        if counted:
            handles.append(m.register_forward_hook(leave))
    was_training = model.training
    model.eval()
    try:
        with _FunctionalMacs(add, depth):
            run()
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return MacsReport(tuple(LayerMacs(**e) for e in acc.values()), input_shape)


# --------------------------------------------------------------------------- latency


@dataclass(frozen=True)
class LatencyStats:
    """Wall-clock milliseconds of ``runs`` timed forward passes at one batch size (after ``warmup``)."""

    batch_size: int
    threads: int
    runs: int
    warmup: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    device: str
    times_ms: tuple[float, ...]

    @property
    def per_example_ms(self) -> float:
        """``median_ms / batch_size``."""
        return self.median_ms / self.batch_size


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def latency(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[int],
    batch_sizes: Sequence[int] = (1, 64),
    runs: int = 30,
    warmup: int = 5,
    threads: int | None = None,
) -> dict[int, LatencyStats]:
    """Measured forward latency per batch size: median, p10 and p90 of ``runs`` (>= 20) timed passes.

    ``example_input`` is the shape of one example without the batch dimension (e.g. ``(1, 28, 28)``;
    a fixed-seed normal tensor is used) or a tensor whose first dimension is the batch (its first
    row is repeated to each batch size). The model runs in eval mode under ``no_grad`` on the device
    of its parameters; ``torch.set_num_threads(threads)`` (default: the current count) is fixed for
    the measurement, reported in each result, and restored afterwards. Percentiles are numpy's
    linear interpolation over the sorted times. No result here is a speedup; compare two models
    measured in the same run (DESIGN.md).
    """
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 20:
        raise ConfigError("runs", f"latency needs at least 20 timed runs, got {runs!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ConfigError("warmup", f"must be a non-negative integer, got {warmup!r}")
    for i, b in enumerate(batch_sizes):
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ConfigError(f"batch_sizes[{i}]", f"must be a positive integer, got {b!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError("threads", f"must be a positive integer, got {threads!r}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    if isinstance(example_input, torch.Tensor):
        if example_input.dim() == 0 or len(example_input) == 0:
            raise ConfigError("example_input", "a tensor input needs a non-empty batch dimension")
        one = example_input[:1].detach()
    else:
        shape = tuple(int(s) for s in example_input)
        one = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0))
    one = one.to(device=device, dtype=dtype if one.is_floating_point() else one.dtype)

    previous = torch.get_num_threads()
    was_training = model.training
    results: dict[int, LatencyStats] = {}
    try:
        torch.set_num_threads(threads if threads is not None else previous)
        used = torch.get_num_threads()
        model.eval()
        for b in batch_sizes:
            x = one.expand(b, *one.shape[1:]).contiguous()
            for _ in range(warmup):
                model(x)
            _sync(device)
            times = []
            for _ in range(runs):
                t0 = time.perf_counter_ns()
                model(x)
                _sync(device)
                times.append((time.perf_counter_ns() - t0) / 1e6)
            arr = np.asarray(times)
            results[b] = LatencyStats(
                batch_size=b, threads=used, runs=runs, warmup=warmup,
                median_ms=float(np.median(arr)), p10_ms=float(np.percentile(arr, 10)), p90_ms=float(np.percentile(arr, 90)),
                mean_ms=float(arr.mean()), min_ms=float(arr.min()), device=str(device), times_ms=tuple(times),
            )
    finally:
        torch.set_num_threads(previous)
        model.train(was_training)
    return results


def compare_latency(
    models: "dict[str, nn.Module]",
    example_input: torch.Tensor | Sequence[int],
    batch_sizes: Sequence[int] = (1, 64),
    runs: int = 30,
    rounds: int = 3,
    threads: int | None = None,
) -> dict[str, dict[int, LatencyStats]]:
    """:func:`latency` of several models measured in the same run, taking turns.

    Each of ``rounds`` rounds times every model once (``runs`` passes per batch size), so that a burst
    of load on a shared machine falls on all of them alike; per model and batch size the result is the
    round with the middle median. Compare the models by the ratio of their medians (DESIGN.md).
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError("rounds", f"must be a positive integer, got {rounds!r}")
    if not models:
        raise ConfigError("models", "needs at least one model to time")
    per_round = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            per_round[name].append(latency(model, example_input, batch_sizes=batch_sizes, runs=runs, threads=threads))
    out: dict[str, dict[int, LatencyStats]] = {}
    for name, results in per_round.items():
        out[name] = {}
        for b in results[0]:
            ordered = sorted((r[b] for r in results), key=lambda st: st.median_ms)
            out[name][b] = ordered[len(ordered) // 2]
    return out


# --------------------------------------------------------------------------- SQNR


def sqnr_db(reference: torch.Tensor | np.ndarray, approx: torch.Tensor | np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in decibels, computed in float64:

    ``SQNR = 10 * log10( sum_i x_i^2 / sum_i (x_i - q_i)^2 )`` for reference ``x`` and
    approximation ``q`` (each bit of a uniform quantizer adds about 6.02 dB; Widrow & Kollar,
    "Quantization Noise", 2008). Identical inputs give ``+inf``; a zero reference with non-zero
    error gives ``-inf``.
    """
    x = torch.as_tensor(reference).detach().to("cpu", torch.float64)
    q = torch.as_tensor(approx).detach().to("cpu", torch.float64)
    if x.shape != q.shape:
        raise ValueError(f"sqnr_db: shapes differ, {tuple(x.shape)} vs {tuple(q.shape)}")
    signal = float((x * x).sum())
    noise = float(((x - q) ** 2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


__all__ = [
    "error_rate", "count_params", "count_nonzeros", "fp32_bytes", "compression_ratio",
    "LayerMacs", "MacsReport", "macs", "LatencyStats", "latency", "compare_latency", "sqnr_db", "MAC_LAYERS",
]
