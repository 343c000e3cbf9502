"""Model compression with pseudo-data (Buciluǎ, Caruana & Niculescu-Mizil, "Model Compression",
KDD 2006): label a large synthetic transfer set with the teacher and train the small model on it.

MUNGE builds the synthetic set from the training examples. For each example ``e`` (flattened to
``d`` attributes) let ``e'`` be its nearest other training example in Euclidean distance. Each
attribute ``a`` is, with probability ``p``, replaced by a value drawn around the neighbour's:

    continuous:  e_a <- N(e'_a, sd),  sd = |e_a - e'_a| / s
    nominal:     e_a <- e'_a

and kept otherwise; ``s`` sets how tightly the new value stays near the neighbour's. One pass over
the training set gives ``n`` new examples; ``multiplier`` passes (fresh randomness each) give
``multiplier * n``. Continuous values are clipped to each attribute's range in the training set.
This is the one-sided form of the paper's procedure: the paper also changes ``e'`` symmetrically
while walking the set in place; here every new example comes from one original example and its
neighbour, which makes each pass a handful of tensor operations.

The teacher then labels the synthetic set: ``"soft"`` gives its class probabilities
``softmax(z_t / T)`` (the Trainer's cross-entropy takes probabilities as targets), ``"hard"`` its
arg-max classes. The student is trained on this set only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ..config import BaseConfig, check_range
from ..errors import ConfigError, DataError
from ..task import output_tensor
from ..train import TrainConfig, Trainer, TrainResult

# ------------------------------------------------------------------------------------- config


@dataclass
class MungeConfig(BaseConfig):
    """MUNGE pseudo-data (Buciluǎ et al. 2006): ``multiplier * n`` synthetic examples labeled by the teacher.

    ``p`` in [0, 1]: probability of swapping each attribute; ``s`` > 0: the neighbour-centred normal
    has standard deviation ``|e_a - e'_a| / s``; ``labels``: ``"soft"`` (teacher probabilities at
    ``temperature``) or ``"hard"`` (its classes); ``clip``: keep every attribute in its training range;
    ``include_original``: also put the (teacher-labeled) training examples in the set.
    """

    multiplier: int = 5
    p: float = 0.5
    s: float = 2.0
    labels: Literal["soft", "hard"] = "soft"
    temperature: float = 1.0
    clip: bool = True
    include_original: bool = False
    seed: int = 0
    batch_size: int = 1024

    def validate(self) -> None:
        if self.multiplier < 1:
            raise ConfigError("multiplier", f"must be >= 1, got {self.multiplier}")
        check_range("p", self.p, 0.0, 1.0)
        if not (math.isfinite(self.s) and self.s > 0):
            raise ConfigError("s", f"must be a finite number > 0, got {self.s}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError("temperature", f"must be a finite number > 0, got {self.temperature}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError("seed", f"must lie in [0, 2**63), got {self.seed}")
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {self.batch_size}")


# ---------------------------------------------------------------------------------- pure parts


def nearest_neighbours(x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """For each row ``i`` of ``x`` (``(n, d)``, ``n >= 2``), the index of its nearest *other* row in
    Euclidean distance (ties: the lowest index), from ``|a|^2 - 2 a.b + |b|^2`` in float64.

    ``O(n^2 d)`` work, in chunks of ``chunk`` rows (default: about 64 MiB of distances at a time),
    on ``x``'s device; the result is on the CPU.
    """
    if x.dim() != 2 or x.shape[0] < 2:
        raise DataError(f"nearest neighbours need at least 2 examples as an (n, d) tensor, got shape {tuple(x.shape)}")
    if chunk is None:
        chunk = max(1, (1 << 23) // x.shape[0])
    xd = x.to(torch.float64)
    sq = (xd * xd).sum(1)
    out = torch.empty(x.shape[0], dtype=torch.long)
    for start in range(0, x.shape[0], chunk):
        stop = min(start + chunk, x.shape[0])
        d2 = sq[start:stop, None] - 2.0 * xd[start:stop] @ xd.T + sq[None, :]
        rows = torch.arange(start, stop, device=x.device)
        d2[rows - start, rows] = math.inf  # never one's own neighbour
        out[start:stop] = d2.argmin(1).cpu()
    return out


@dataclass
class MungeSample:
    """Synthetic examples ``x`` (``(multiplier * n, *shape)``) and, for each, the index of the
    training example ``source`` it was made from and of that example's nearest ``neighbour``."""

    x: torch.Tensor
    source: torch.Tensor
    neighbour: torch.Tensor


def munge(
    x: torch.Tensor,
    multiplier: int = 5,
    p: float = 0.5,
    s: float = 2.0,
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    nominal: Sequence[int] | torch.Tensor | None = None,
    clip: bool = True,
) -> MungeSample:
    """MUNGE (Buciluǎ et al. 2006, one-sided form; see the module docstring) on examples ``x`` of shape
    ``(n, ...)``: ``multiplier`` passes, each replacing every attribute of every example, with
    probability ``p``, by ``N(e'_a, |e_a - e'_a| / s)`` (``e'_a`` itself for the ``nominal`` attribute
    indices of the flattened example). Randomness comes from ``generator`` (or a fresh one seeded
    with ``seed``, default 0), on the CPU. Returns a :class:`MungeSample`.
    """
    if multiplier < 1:
        raise ConfigError("multiplier", f"must be >= 1, got {multiplier}")
    check_range("p", p, 0.0, 1.0)
    if not (math.isfinite(s) and s > 0):
        raise ConfigError("s", f"must be a finite number > 0, got {s}")
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
    shape = tuple(x.shape[1:])
    flat = x.detach().to("cpu", torch.float32).reshape(x.shape[0], -1)
    n, d = flat.shape
    nn_idx = nearest_neighbours(flat)
    other = flat[nn_idx]
    sd = (flat - other).abs() / s
    is_nominal = torch.zeros(d, dtype=torch.bool)
    if nominal is not None:
        idx = torch.as_tensor(nominal)
        if idx.dtype == torch.bool:
            if idx.numel() != d:
                raise ConfigError("nominal", f"a mask needs {d} entries, got {idx.numel()}")
            is_nominal = idx.reshape(d).clone()
        else:
            idx = idx.to(torch.long).reshape(-1)
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= d):
                raise ConfigError("nominal", f"attribute indices must lie in [0, {d}), got {idx.tolist()}")
            is_nominal[idx] = True
    lo, hi = flat.min(0).values, flat.max(0).values
    parts = []
    for _ in range(multiplier):
        swap = torch.rand((n, d), generator=generator) < p
        drawn = other + sd * torch.randn((n, d), generator=generator)
        drawn = torch.where(is_nominal, other, drawn)
        new = torch.where(swap, drawn, flat)
        if clip:
            new = torch.maximum(torch.minimum(new, hi), lo)
        parts.append(new)
    source = torch.arange(n).repeat(multiplier)
    return MungeSample(torch.cat(parts).reshape(n * multiplier, *shape), source, nn_idx[source])


@torch.no_grad()
def teacher_labels(
    teacher: nn.Module, x: torch.Tensor, labels: Literal["soft", "hard"] = "soft", temperature: float = 1.0, batch_size: int = 1024
) -> torch.Tensor:
    """The teacher's labels for ``x``: ``softmax(z_t / T)`` (``"soft"``, float ``(N, C)``) or
    ``argmax z_t`` (``"hard"``, int64 ``(N,)``), computed in eval mode in batches on the teacher's
    device and returned on the CPU; the teacher's mode is restored. A tuple/dict/ModelOutput is read
    through :func:`netshrink.task.output_tensor` (its logits). MUNGE's labels are class
    probabilities: the transfer set serves classification students."""
    if labels not in ("soft", "hard"):
        raise ConfigError("labels", f"expected 'soft' or 'hard', got {labels!r}")
    param = next(teacher.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = teacher.training
    teacher.eval()
    outs = []
    try:
        for start in range(0, x.shape[0], batch_size):
            z = output_tensor(teacher(x[start : start + batch_size].to(device))).float()
            outs.append((F.softmax(z / temperature, dim=1) if labels == "soft" else z.argmax(1)).cpu())
    finally:
        teacher.train(was_training)
    return torch.cat(outs)


# ------------------------------------------------------------------------------------- datasets


def _inputs(data: Dataset | DataLoader | torch.Tensor) -> torch.Tensor:
    """All inputs of a data set as one tensor (a TensorDataset directly, otherwise by iterating)."""
    if isinstance(data, torch.Tensor):
        return data
    if isinstance(data, TensorDataset):
        return data.tensors[0]
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=1024, shuffle=False)
    xs = []
    for batch in loader:
        xs.append(batch[0] if isinstance(batch, (tuple, list)) else batch)
    if not xs:
        raise DataError("the training data is empty")
    return torch.cat(xs)


def pseudo_dataset(
    teacher: nn.Module, data: Dataset | DataLoader | torch.Tensor, config: MungeConfig | Mapping[str, Any] | None = None
) -> TensorDataset:
    """A synthetic transfer set: :func:`munge` of ``data``'s inputs, labeled by ``teacher``
    (:func:`teacher_labels`), as a ``TensorDataset(x, labels)`` of ``multiplier * n`` examples
    (``(multiplier + 1) * n`` with ``include_original``). Real labels are never used."""
    cfg = _munge_config(config)
    x = _inputs(data)
    sample = munge(x, cfg.multiplier, cfg.p, cfg.s, seed=cfg.seed, clip=cfg.clip)
    xs = sample.x.to(x.dtype if x.is_floating_point() else torch.float32)
    if cfg.include_original:
        xs = torch.cat([x.detach().cpu().to(xs.dtype), xs])
    return TensorDataset(xs, teacher_labels(teacher, xs, cfg.labels, cfg.temperature, cfg.batch_size))


def _munge_config(config: MungeConfig | Mapping[str, Any] | None) -> MungeConfig:
    if config is None:
        return MungeConfig()
    if isinstance(config, Mapping):
        return MungeConfig.from_dict(dict(config))  # type: ignore[return-value]
    if not isinstance(config, MungeConfig):
        raise ConfigError("munge", f"expected a MungeConfig or a mapping, got {type(config).__name__}")
    return config


@dataclass
class PseudoDataResult:
    """What :func:`compress_with_pseudo_data` did: the Trainer's result and the size of the transfer set."""

    train: TrainResult
    transfer_size: int


def compress_with_pseudo_data(
    student: nn.Module,
    teacher: nn.Module,
    train_data: Dataset | DataLoader | torch.Tensor,
    val_data: Dataset | DataLoader | None = None,
    munge_config: MungeConfig | Mapping[str, Any] | None = None,
    train_config: TrainConfig | Mapping[str, Any] | None = None,
) -> PseudoDataResult:
    """Model compression (Buciluǎ et al. 2006): train ``student`` in place only on the MUNGE transfer set
    built from ``train_data`` and labeled by ``teacher`` (:func:`pseudo_dataset`). ``val_data``
    (real labels) only measures the student after each epoch."""
    transfer = pseudo_dataset(teacher, train_data, munge_config)
    result = Trainer(student, train_config).fit(transfer, val_data)
    return PseudoDataResult(result, len(transfer))


__all__ = [
    "MungeConfig",
    "MungeSample",
    "PseudoDataResult",
    "compress_with_pseudo_data",
    "munge",
    "nearest_neighbours",
    "pseudo_dataset",
    "teacher_labels",
]
