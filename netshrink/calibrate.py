"""Sequential, block-by-block calibration: the one engine under SparseGPT, GPTQ, Wanda, AWQ, SmoothQuant, ASVD.

A transformer is a stack of blocks (``model.layers``, ``model.model.layers``, ``transformer.h``: any
``nn.ModuleList`` of same-typed modules holding Linear layers). One-shot methods compress it block by
block, as in SparseGPT (Frantar & Alistarh, ICML 2023) and GPTQ (Frantar et al., ICLR 2023):

1. the calibration batches run through the model up to block 0, whose inputs (hidden states and the
   other arguments the model passes, e.g. rotary tables or HF's ``position_embeddings``) are kept;
2. for block ``b``: forward hooks on its Linear layers accumulate, over all calibration tokens ``x``
   (rows of the layer input ``X``, ``n`` tokens)::

       H = X^T X / n            (the layer-wise OBS Hessian of ||W X^T - W' X^T||^2, up to the factor 2)
       mean |x_j|, max |x_j|    (per input channel, for AWQ / SmoothQuant / ASVD)

3. the method compresses each of the block's layers from its statistics (and may replace a module);
4. the block runs again on the same inputs, now *compressed*, and its outputs become block ``b+1``'s
   inputs. Only one block's inputs and outputs are held at a time.

Layers outside the blocks (embedding, the LM head) are left alone and reported as skipped, as the
papers do. A model with no such ModuleList raises one :class:`ModelError`.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .config import BaseConfig
from .errors import ConfigError, DataError, ModelError
from .task import Task, batches, resolve_task

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised by the capture hook on block 0 to stop the model's forward pass."""


# ----------------------------------------------------------------------------------------- layers


def is_linear(m: nn.Module) -> bool:
    """``nn.Linear`` or transformers' ``Conv1D`` (GPT-2: weight stored ``(in, out)``)."""
    return isinstance(m, nn.Linear) or (type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None)


def linear_weight(m: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight matrix of a Linear-like layer (a copy for Conv1D; an Embedding's
    ``(vocab, dim)`` table as it is: one row per token)."""
    return m.weight.data if isinstance(m, (nn.Linear, nn.Embedding)) else m.weight.data.t()


def set_linear_weight(m: nn.Module, w: torch.Tensor) -> None:
    """Copy an ``(out, in)`` matrix into the layer's weight (transposed for Conv1D)."""
    from torch.nn.utils import parametrize

    target = m.parametrizations.weight.original.data if parametrize.is_parametrized(m, "weight") else m.weight.data
    target.copy_(w if isinstance(m, (nn.Linear, nn.Embedding)) else w.t())


def in_features(m: nn.Module) -> int:
    return linear_weight(m).shape[1]


def find_blocks(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The model's decoder blocks: ``path`` when given, else the longest ModuleList of same-typed blocks
    that hold Linear layers. A :class:`ModelError` naming what was looked for when there is none."""
    if path is not None:
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            raise ConfigError("blocks", f"the model has no module {path!r}") from None
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            raise ConfigError("blocks", f"{path!r} is a {type(mod).__name__}, not a non-empty ModuleList of blocks")
        return path, mod
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        kinds = {type(c) for c in mod}
        if len(kinds) != 1 or not any(is_linear(x) for x in mod[0].modules()):
            continue
        if best is None or len(mod) > len(best[1]):
            best = (name, mod)
    if best is None:
        raise ModelError(
            f"{type(model).__name__} has no block structure: sequential calibration needs an nn.ModuleList of "
            "same-typed blocks holding Linear layers (as model.layers, model.model.layers or transformer.h)"
        )
    return best


def block_layers(block: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in block.named_modules() if n and is_linear(m)}


# ------------------------------------------------------------------------------------ statistics


@dataclass
class LayerStats:
    """Input statistics of one layer over the calibration tokens (see the module docstring)."""

    name: str
    xtx: torch.Tensor | None  # sum of x x^T, float64 (in, in)
    abs_sum: torch.Tensor  # sum |x_j|
    abs_max: torch.Tensor  # max |x_j|
    sq_sum: torch.Tensor  # sum x_j^2 (Wanda's ||X_j||^2)
    tokens: int = 0
    inputs: list[torch.Tensor] = field(default_factory=list)  # a sample of input rows (AWQ's search)

    @property
    def hessian(self) -> torch.Tensor:
        """``X^T X / n`` in float64."""
        if self.xtx is None:
            raise ModelError(f"{self.name}: no Hessian was collected")
        return self.xtx / max(1, self.tokens)

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(1, self.tokens)

    @property
    def col_norm(self) -> torch.Tensor:
        """``||X_j||_2`` per input column."""
        return self.sq_sum.sqrt()


def _stats_hook(st: LayerStats, hessian: bool, keep_rows: int) -> Callable:
    def hook(_m: nn.Module, args: tuple, _out: Any) -> None:
        x = args[0].detach()
        x = x.reshape(-1, x.shape[-1]).float()
        if not torch.isfinite(x).all():
            raise DataError(f"{st.name}: the calibration input holds NaN or inf")
        st.tokens += x.shape[0]
        a = x.abs()
        st.abs_sum += a.sum(0).double()
        st.abs_max = torch.maximum(st.abs_max, a.amax(0))
        st.sq_sum += (x.double() ** 2).sum(0)
        if hessian:
            xd = x.double()
            st.xtx += xd.t() @ xd
        have = sum(r.shape[0] for r in st.inputs)
        if have < keep_rows:
            st.inputs.append(x[: keep_rows - have].clone())

    return hook


# ---------------------------------------------------------------------------------------- memory


def _rss_peak() -> int:
    """The process's peak resident set size in bytes (VmHWM; ru_maxrss as a fallback)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(o) for o in obj.values())
    return 0


@dataclass
class CalibrationReport:
    """What one sequential pass cost: tokens, blocks, seconds, and memory (bytes)."""

    blocks_path: str
    blocks: int
    samples: int
    tokens: int
    seconds: float
    model_bytes: int
    activation_bytes: int  # one block's inputs + outputs (all calibration tokens)
    stats_bytes: int  # the largest block's Hessians and channel statistics
    peak_rss_bytes: int  # the process's peak RSS during the pass (reset at the start where Linux allows)
    rss_before_bytes: int


# ------------------------------------------------------------------------------------ the engine


def _calibration_batches(data: Any, task: Task, samples: int, batch_size: int, seq_len: int | None, group: int | None) -> list:
    if data is None:
        raise DataError("this method needs calibration data (token sequences), got none")
    out, n = [], 0
    for batch in batches(data, batch_size):
        inputs, _ = task.split(batch)
        ids = inputs.tensors()[0] if inputs.tensors() else None
        if ids is not None and seq_len is not None and ids.dim() >= 2 and ids.shape[-1] < seq_len:
            raise DataError(f"calibration sequences hold {ids.shape[-1]} tokens, shorter than the context seq_len={seq_len}")
        take = min(inputs.batch_size, samples - n)
        out.append(inputs.take(take) if take < inputs.batch_size else inputs)
        n += take
        if n >= samples:
            break
    if n == 0:
        raise DataError("the calibration data is empty")
    tokens = sum(b.tensors()[0].numel() for b in out if b.tensors())
    if group is not None and tokens < group:
        raise DataError(f"the calibration data holds {tokens} tokens, fewer than one group of {group}")
    return out


def _capture(model: nn.Module, first: nn.Module, batches_: list) -> list[tuple[torch.Tensor, tuple, dict]]:
    caught: list[tuple[torch.Tensor, tuple, dict]] = []

    def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        if args:
            hidden, rest = args[0], args[1:]
        else:
            key = next((k for k in ("hidden_states", "x") if k in kwargs), None)
            if key is None:
                raise ModelError("block 0 was called without a hidden-state argument")
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop(key), ()
        caught.append((hidden.detach(), rest, dict(kwargs)))
        raise _Stop

    handle = first.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        for inputs in batches_:
            kw = dict(inputs.kwargs)
            if _takes_use_cache(model):
                kw.setdefault("use_cache", False)
            try:
                model(*inputs.args, **kw)
            except _Stop:
                continue
            raise ModelError("the model's forward pass never reached its first block")
    finally:
        handle.remove()
    return caught


def _takes_use_cache(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(getattr(model, "config"), "use_cache")


def _run_block(block: nn.Module, cached: list[tuple[torch.Tensor, tuple, dict]]) -> list[torch.Tensor]:
    outs = []
    for hidden, rest, kwargs in cached:
        y = block(hidden, *rest, **kwargs)
        outs.append((y[0] if isinstance(y, (tuple, list)) else y).detach())
    return outs


LayerFn = Callable[[str, nn.Module, LayerStats, nn.Module, str], Any]


@torch.no_grad()
def sequential(
    model: nn.Module,
    data: Any,
    layer_fn: LayerFn,
    *,
    task: Task | None = None,
    samples: int = 128,
    batch_size: int = 8,
    seq_len: int | None = None,
    min_group: int | None = None,
    hessian: bool = True,
    keep_rows: int = 0,
    blocks: str | None = None,
    layers: Iterable[str] | None = None,
    progress: bool = True,
    desc: str = "calibrate",
) -> tuple[dict[str, Any], dict[str, str], CalibrationReport]:
    """Run ``layer_fn(name, module, stats, block, local_name)`` on every Linear of every block in order,
    each block fed by the already-compressed blocks before it (see the module docstring).

    Returns ``(results by full layer name, skipped layers with the reason, report)``. ``layers``: fnmatch
    patterns of full names to act on (others in the blocks are skipped, said so). ``keep_rows``: input
    rows kept per layer (AWQ's scale search).
    """
    import fnmatch

    task = task if isinstance(task, Task) else lm_task(task)
    if not isinstance(samples, int) or samples < 1:
        raise ConfigError("samples", f"must be a positive integer, got {samples!r}")
    path, mods = find_blocks(model, blocks)
    model_bytes = sum(_nbytes(p) for p in model.parameters()) + sum(_nbytes(b) for b in model.buffers())
    rss_before = _rss_peak()
    _reset_rss_peak()
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        cal = _calibration_batches(data, task, samples, batch_size, seq_len, min_group)
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        cal = [b.to(dev) for b in cal]
        cached = _capture(model, mods[0], cal)
        del cal
        tokens = sum(h.shape[0] * h.shape[1] if h.dim() == 3 else h.shape[0] for h, _, _ in cached)
        nsamp = sum(h.shape[0] for h, _, _ in cached)
        results: dict[str, Any] = {}
        skipped: dict[str, str] = {}
        for name, m in model.named_modules():
            if is_linear(m) and not name.startswith(path + "."):
                skipped[name] = f"outside the blocks {path!r} (kept dense, as in the papers)"
        act_bytes = stats_bytes = 0
        bar = _bar(len(mods), desc, progress)
        for b, block in enumerate(mods):
            todo = block_layers(block)
            chosen = {}
            for local, m in todo.items():
                full = f"{path}.{b}.{local}"
                if layers is not None and not any(fnmatch.fnmatchcase(full, p) for p in layers):
                    skipped[full] = "not selected by layers"
                else:
                    chosen[local] = m
            stats = {}
            for local, m in chosen.items():
                w = linear_weight(m)
                k = w.shape[1]
                stats[local] = LayerStats(
                    f"{path}.{b}.{local}", torch.zeros(k, k, dtype=torch.float64, device=w.device) if hessian else None,
                    torch.zeros(k, dtype=torch.float64, device=w.device), torch.zeros(k, device=w.device),
                    torch.zeros(k, dtype=torch.float64, device=w.device),
                )
            hooks = [m.register_forward_hook(_stats_hook(stats[local], hessian, keep_rows)) for local, m in chosen.items()]
            try:
                outs = _run_block(block, cached)
            finally:
                for h in hooks:
                    h.remove()
            stats_bytes = max(stats_bytes, sum(_nbytes([s.xtx, s.abs_sum, s.abs_max, s.sq_sum, s.inputs]) for s in stats.values()))
            act_bytes = max(act_bytes, _nbytes([h for h, _, _ in cached]) + _nbytes(outs))
            del outs
            for local, m in chosen.items():
                full = f"{path}.{b}.{local}"
                results[full] = layer_fn(full, m, stats[local], block, local)
                stats[local] = None  # free the Hessian
            outs = _run_block(block, cached)  # the compressed block's outputs feed the next block
            cached = [(o, rest, kw) for o, (_, rest, kw) in zip(outs, cached)]
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    finally:
        model.train(was_training)
    report = CalibrationReport(path, len(mods), nsamp, tokens, time.perf_counter() - t0, model_bytes, act_bytes, stats_bytes,
                               _rss_peak(), rss_before)
    log.info("%s: %d blocks, %d tokens, %.1f s, peak RSS %.1f MiB", desc, len(mods), tokens, report.seconds, report.peak_rss_bytes / 2**20)
    return results, skipped, report


def _bar(total: int, desc: str, progress: bool) -> Any:
    if not progress or not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()) or os.environ.get("NETSHRINK_NO_PROGRESS"):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="block", file=sys.stderr, dynamic_ncols=True)


def replace_in(block: nn.Module, local: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule ``local`` of ``block``."""
    parent_name, _, child = local.rpartition(".")
    parent = block.get_submodule(parent_name) if parent_name else block
    setattr(parent, child, new)


def damped_hessian(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``H + damp * mean(diag H) * I`` with dead input columns (``H_jj = 0``) given ``H_jj = 1``;
    returns the damped Hessian and the mask of dead columns (their weights are irrelevant: zeroed by
    callers that prune, as in the SparseGPT/GPTQ reference code)."""
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    mean = torch.diag(h).mean()
    idx = torch.arange(h.shape[0], device=h.device)
    h[idx, idx] += damp * mean
    return h, dead


def inverse_cholesky_upper(h: torch.Tensor, damp: float, name: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """The upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``) of the damped Hessian, and the dead
    columns. Retries with 10x the damping (up to 5 times) if ``H`` is not positive definite."""
    for attempt in range(6):
        hd, dead = damped_hessian(h, damp * (10**attempt))
        chol, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            u, info2 = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info2) == 0 and torch.isfinite(u).all():
                return u, dead
    raise ModelError(f"{name}: the Hessian stays singular after damping {damp * 1e5:g}; give more calibration data")


# ------------------------------------------------------------------------- configs and results


@dataclass
class CalibConfig(BaseConfig):
    """Calibration fields shared by the one-shot methods (subclasses add their own).

    ``samples``: calibration sequences; ``batch_size``: sequences per forward pass; ``seq_len``: when
    given, every calibration sequence must hold at least this many tokens; ``blocks``: the dotted path of
    the ModuleList of blocks (found when None); ``layers``: fnmatch patterns of the layers to compress
    (every Linear in the blocks when None); ``progress``: a bar per block on a terminal.
    """

    samples: int = 128
    batch_size: int = 8
    seq_len: int | None = None
    blocks: str | None = None
    layers: list[str] | None = None
    progress: bool = True

    def validate(self) -> None:
        for f in ("samples", "batch_size"):
            if getattr(self, f) < 1:
                raise ConfigError(f, f"must be a positive integer, got {getattr(self, f)}")
        if self.seq_len is not None and self.seq_len < 2:
            raise ConfigError("seq_len", f"must be at least 2, got {self.seq_len}")


@dataclass
class OneShotResult:
    """What a one-shot method did: per-layer facts, the layers it skipped and why, the calibration report."""

    method: str
    layers: dict[str, dict]
    skipped: dict[str, str]
    report: CalibrationReport

    @property
    def seconds(self) -> float:
        return self.report.seconds


def run_one_shot(model: nn.Module, config: CalibConfig, data: Any, layer_fn: LayerFn, *, task: Any = None, hessian: bool = True,
                 min_group: int | None = None, keep_rows: int = 0) -> OneShotResult:
    """:func:`sequential` with the calibration fields of ``config``; a :class:`OneShotResult`."""
    results, skipped, report = sequential(
        model, data, layer_fn, task=task, samples=config.samples, batch_size=config.batch_size, seq_len=config.seq_len,
        min_group=min_group, hessian=hessian, keep_rows=keep_rows, blocks=config.blocks, layers=config.layers,
        progress=config.progress, desc=config.method or "calibrate",
    )
    return OneShotResult(config.method, results, skipped, report)


def calibration_data(data: Any, seq_len: int | None = None) -> Any:
    """The calibration sequences in ``data``: a :class:`~netshrink.text.TextCorpus` gives windows of its
    train split (``seq_len`` tokens, 128 when None); an object with a ``train`` split gives that split;
    anything else (a Dataset, DataLoader or list of batches) is used as given."""
    if data is None:
        return None
    from .text import TextCorpus

    if isinstance(data, TextCorpus):
        return data.chunks("train", seq_len or 128)
    train = getattr(data, "train", None)
    if train is not None and not isinstance(data, (torch.Tensor, nn.Module)):
        return train
    return data


def lm_task(task: Any) -> Task:
    """The task a one-shot method reads batches with: language modelling unless told otherwise."""
    from .task import language_modeling

    return language_modeling() if task is None else resolve_task(task)


__all__ = [
    "CalibConfig",
    "OneShotResult",
    "run_one_shot",
    "lm_task",
    "calibration_data",
    "CalibrationReport",
    "LayerStats",
    "block_layers",
    "damped_hessian",
    "find_blocks",
    "inverse_cholesky_upper",
    "is_linear",
    "linear_weight",
    "replace_in",
    "sequential",
    "set_linear_weight",
]
