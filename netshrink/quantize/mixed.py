"""Mixed precision: bits per layer chosen from a sensitivity sweep to meet a size budget with the least loss.

**Sweep** (as the pruning sensitivity of :mod:`netshrink.prune.sensitivity`, over bit widths; cf. the
per-layer precision studies of Judd et al., "Reduced-Precision Strategies for Bounded Memory in Deep
Neural Nets", 2015, and HAQ, Wang et al., CVPR 2019): each chosen layer ``l`` alone (the rest float) is
quantized to every width ``b`` of ``bits`` by the uniform quantizer (:class:`~netshrink.quantize.ptq.UniformConfig`,
weights only), and the task's validation loss ``L_l(b)`` and metric ``e_l(b)`` (top-1 error by default,
perplexity for a language model, MSE for regression) are measured on a fixed, seeded subset of the
validation split (:func:`netshrink._allocate.evaluate`).

**Size** of layer ``l`` at ``b`` bits, in bytes of the packed file's fixed-width sections (its
affine codes and its scales; Huffman coding, where smaller, only lowers it):

    S_l(b) = ceil(n_l b / 8) + 4 C_l (+ 4 C_l for zero points when asymmetric)

with ``n_l`` the weights and ``C_l`` the output channels (1 per tensor). Biases stay fp32 and are not
budgeted (they are the same for every choice).

**Allocation**: under the additive model of layer damage,

    minimise  Σ_l Δ_l(b_l),   Δ_l(b) = m_l(b) − m_base  (m = loss or error; made non-increasing in b)
    subject to Σ_l S_l(b_l) ≤ budget

the multiple-choice knapsack of :func:`netshrink._allocate.knapsack_min` (exact DP). The budget
is ``budget_bytes``, or ``avg_bits``: the size of every chosen layer at ``avg_bits`` bits per weight
(``ceil(n_l avg_bits / 8) + 4 C_l``). A budget below the size of every layer at the fewest bits is a
:class:`~netshrink.errors.ConfigError` naming the budget field. Then the model is quantized in place
with ``UniformConfig(layer_bits=...)``: the weights become ``affine`` tensors of ``b_l``-bit codes in
.nsk (:mod:`netshrink.pack._qtensors`), and the model can be fine-tuned (QAT) like any uniform one.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch import nn

from .._registry import handler, register
from ..config import BaseConfig, check_range
from ..errors import ConfigError
from .._allocate import eval_subset, evaluate, glob_escape, knapsack_min, val_source
from ..task import Task, resolve_task
from ._common import check_not_quantized, select_quantizable
from .affine import check_bits
from .observers import ObserverKind, check_percentile
from .ptq import UniformConfig, UniformResult, uniform_quantize

log = logging.getLogger("netshrink.quantize")

Metric = Literal["loss", "error"]
DEFAULT_BITS: tuple[int, ...] = (2, 3, 4, 6, 8)


def _channels(layer: nn.Module, per_channel: bool) -> int:
    return int(layer.weight.shape[0]) if per_channel else 1


def layer_bytes(numel: int, bits: int, channels: int, zero_points: bool = False) -> int:
    """``S(b) = ceil(n b / 8) + 4 C`` (+ ``4 C`` with zero points): codes and scales of one quantized weight."""
    return -(-numel * bits // 8) + 4 * channels * (2 if zero_points else 1)


@dataclass
class BitSensitivity:
    """Per-layer curves: ``error[l][i]`` and ``loss[l][i]`` with layer ``l`` alone at ``bits[i]`` bits
    (the others float); ``params[l]`` weights, ``bytes[l][i]`` its size :math:`S_l` at ``bits[i]``."""

    bits: list[int]
    base_error: float
    base_loss: float
    error: dict[str, list[float]]
    loss: dict[str, list[float]]
    params: dict[str, int]
    bytes: dict[str, list[int]]
    samples: int = 0
    #: what ``error`` holds: the task's metric (``error``, ``perplexity``, ``mse``)
    metric_name: str = "error"

    @property
    def layers(self) -> list[str]:
        return list(self.error)

    def rise(self, layer: str, metric: Metric = "loss") -> np.ndarray:
        """``m_l(b) − m_base`` along ``bits`` (ascending), made non-increasing in ``b``: more bits are
        assumed no worse (this removes the noise of a finite validation subset)."""
        values = np.asarray(self.loss[layer] if metric == "loss" else self.error[layer], dtype=np.float64)
        base = self.base_loss if metric == "loss" else self.base_error
        return np.maximum.accumulate((values - base)[::-1])[::-1]


def bit_sensitivity(
    model: nn.Module,
    data: Any,
    layers: list[str] | None = None,
    bits: tuple[int, ...] | list[int] = DEFAULT_BITS,
    samples: int = 2000,
    seed: int = 0,
    per_channel: bool = True,
    symmetric: bool = True,
    observer: ObserverKind = "minmax",
    percentile: float = 99.99,
    task: Task | str | None = None,
) -> BitSensitivity:
    """Quantize each chosen layer alone (on a copy of ``model``) to every width of ``bits`` and measure
    the task's metric and loss on ``samples`` seeded examples of the validation split (``data.val`` of
    a ``Splits``, or a Dataset / DataLoader of batches in any form ``task`` splits)."""
    task = resolve_task(task)
    bits = sorted({int(b) for b in bits})
    subset = eval_subset(val_source(data, "the bit sensitivity sweep"), samples, seed, task=task)
    chosen = select_quantizable(model, layers, "mixed_precision")
    base_error, base_loss = evaluate(model, subset, task=task)
    errors: dict[str, list[float]] = {}
    losses: dict[str, list[float]] = {}
    sizes: dict[str, list[int]] = {}
    for n, layer in chosen.items():
        errors[n], losses[n] = [], []
        sizes[n] = [layer_bytes(layer.weight.numel(), b, _channels(layer, per_channel), not symmetric) for b in bits]
        for b in bits:
            clone = copy.deepcopy(model)
            cfg = UniformConfig(bits=b, per_channel=per_channel, symmetric=symmetric, observer=observer, percentile=percentile,
                                activations=False, layers=[glob_escape(n)])
            uniform_quantize(clone, cfg)
            e, lo = evaluate(clone, subset, task=task)
            errors[n].append(e)
            losses[n].append(lo)
        log.info("bit sensitivity %s: error %s", n, ", ".join(f"{b}:{e:.4f}" for b, e in zip(bits, errors[n])))
    params = {n: int(m.weight.numel()) for n, m in chosen.items()}
    return BitSensitivity(bits, base_error, base_loss, errors, losses, params, sizes, subset.samples, task.metric_name)


@dataclass
class BitAllocation:
    """Chosen ``layer_bits``; the predicted rise of the metric (additive model); the bytes of the
    quantized weights against the ``budget`` (both :math:`Σ S_l`)."""

    layer_bits: dict[str, int]
    predicted_rise: float
    weight_bytes: int
    budget: int
    metric: str


def allocate_bits(curves: BitSensitivity, budget: int, metric: Metric = "loss", field_name: str = "budget_bytes") -> BitAllocation:
    """Bits per layer from the widths of ``curves`` whose sizes sum to at most ``budget`` bytes with the
    least predicted rise of ``metric`` (exact DP; see the module docstring)."""
    names = curves.layers
    if not names:
        raise ConfigError("layers", "no layer to allocate bits to")
    least = sum(min(curves.bytes[n]) for n in names)
    if least > budget:
        raise ConfigError(field_name, f"budget cannot be met: {budget:,} bytes is less than the {least:,} bytes the chosen layers "
                          f"take at {min(curves.bits)} bits each; raise the budget")
    order = list(range(len(curves.bits)))[::-1]  # most bits first: ties keep the wider choice
    costs = [np.array([curves.bytes[n][i] for i in order], dtype=np.int64) for n in names]
    rises = [curves.rise(n, metric)[order] for n in names]
    picked = knapsack_min(costs, rises, float(budget), resolution=max(10, min(2_000_000, budget)))
    layer_bits = {n: curves.bits[order[j]] for n, j in zip(names, picked)}
    size = sum(curves.bytes[n][order[j]] for n, j in zip(names, picked))
    rise = float(sum(r[j] for r, j in zip(rises, picked)))
    return BitAllocation(layer_bits, rise, int(size), int(budget), metric)


@register("mixed_precision", family="quantize")
@dataclass
class MixedPrecisionConfig(BaseConfig):
    """Mixed-precision weights: bits per layer from a sensitivity sweep, meeting a size budget with the least loss.

    - ``bits``: the widths to choose from (2 to 8); ``budget_bytes`` or ``avg_bits`` (exactly one): the
      size budget of the chosen layers' quantized weights (see the module docstring);
    - ``metric``: what the allocation minimises (``loss``, the task's validation loss, or ``error``, its
      metric: top-1 error, perplexity or MSE);
      ``samples``: validation examples of the sweep (drawn with ``seed``);
    - ``per_channel``, ``symmetric``, ``observer``, ``percentile``: of the uniform weight quantizer;
    - ``layers``: which Linear/Conv layers (all when None); ``report_dir``: where ``bit_sensitivity.json``
      and ``bit_allocation.json`` go (nothing written when None).
    """

    bits: list[int] = field(default_factory=lambda: list(DEFAULT_BITS))
    budget_bytes: int | None = None
    avg_bits: float | None = None
    metric: Metric = "loss"
    samples: int = 2000
    per_channel: bool = True
    symmetric: bool = True
    observer: ObserverKind = "minmax"
    percentile: float = 99.99
    layers: list[str] | None = None
    seed: int = 0
    report_dir: str | None = None

    def validate(self) -> None:
        if not self.bits:
            raise ConfigError("bits", "needs at least one width")
        for i, b in enumerate(self.bits):
            check_bits(b, f"bits[{i}]")
        if len(set(self.bits)) != len(self.bits):
            raise ConfigError("bits", f"has a width twice: {self.bits}")
        if (self.budget_bytes is None) == (self.avg_bits is None):
            raise ConfigError("budget_bytes", "give exactly one of budget_bytes and avg_bits")
        if self.budget_bytes is not None and self.budget_bytes < 1:
            raise ConfigError("budget_bytes", f"must be at least 1, got {self.budget_bytes}")
        if self.avg_bits is not None:
            if not math.isfinite(self.avg_bits):
                raise ConfigError("avg_bits", f"must be finite, got {self.avg_bits}")
            check_range("avg_bits", self.avg_bits, 1.0, 32.0)
        if self.samples < 1:
            raise ConfigError("samples", f"must be at least 1, got {self.samples}")
        check_percentile(self.percentile)

    def check_model(self, model: nn.Module) -> None:
        select_quantizable(model, self.layers, "mixed_precision")

    def budget_for(self, layers: dict[str, nn.Module]) -> tuple[int, str]:
        """The budget in bytes for ``layers`` and the field it comes from."""
        if self.budget_bytes is not None:
            return self.budget_bytes, "budget_bytes"
        assert self.avg_bits is not None
        total = sum(math.ceil(m.weight.numel() * self.avg_bits / 8) + 4 * _channels(m, self.per_channel) * (1 if self.symmetric else 2)
                    for m in layers.values())
        return int(total), "avg_bits"


@dataclass
class MixedPrecisionResult(UniformResult):
    """:class:`~netshrink.quantize.ptq.UniformResult` of the final quantization, with the
    :class:`BitAllocation` and the :class:`BitSensitivity` behind it."""

    allocation: BitAllocation | None = None
    curves: BitSensitivity | None = None

    @property
    def weight_bytes(self) -> int:
        return self.allocation.weight_bytes if self.allocation is not None else 0

    @property
    def avg_bits(self) -> float:
        """Code bits per weight of the chosen layers (scales left out)."""
        if self.curves is None or not self.bits:
            return 0.0
        n = sum(self.curves.params[k] for k in self.bits)
        return sum(self.curves.params[k] * b for k, b in self.bits.items()) / n if n else 0.0


@handler(MixedPrecisionConfig)
def mixed_precision_quantize(model: nn.Module, config: MixedPrecisionConfig, data: Any = None,
                             task: Task | None = None) -> MixedPrecisionResult:
    """Sweep (on ``task``'s batches, loss and metric; classification when None), allocate, then quantize
    every chosen layer to its bits in place (weights only)."""
    if data is None:
        raise ConfigError("data", "mixed_precision measures each layer's sensitivity: pass data=Splits or a Dataset")
    layers = select_quantizable(model, config.layers, "mixed_precision")
    check_not_quantized(layers)
    budget, field_name = config.budget_for(layers)
    least = sum(layer_bytes(m.weight.numel(), min(config.bits), _channels(m, config.per_channel), not config.symmetric) for m in layers.values())
    if least > budget:  # before the sweep: a budget that cannot be met fails at once
        raise ConfigError(field_name, f"budget cannot be met: {budget:,} bytes is less than the {least:,} bytes the chosen layers "
                          f"take at {min(config.bits)} bits each; raise the budget")
    curves = bit_sensitivity(model, data, list(layers), config.bits, config.samples, config.seed,
                             config.per_channel, config.symmetric, config.observer, config.percentile, task=task)
    alloc = allocate_bits(curves, budget, config.metric, field_name)
    log.info("mixed_precision: %s, %d of %d bytes (predicted %s rise %.4f)", alloc.layer_bits, alloc.weight_bytes, budget,
             config.metric, alloc.predicted_rise)
    cfg = UniformConfig(bits=max(config.bits), layer_bits={glob_escape(n): b for n, b in alloc.layer_bits.items()},
                        layers=[glob_escape(n) for n in alloc.layer_bits], per_channel=config.per_channel, symmetric=config.symmetric,
                        observer=config.observer, percentile=config.percentile, activations=False)
    res = uniform_quantize(model, cfg)
    if config.report_dir is not None:
        out = Path(config.report_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bit_sensitivity.json").write_text(json.dumps(asdict(curves), indent=2))
        (out / "bit_allocation.json").write_text(json.dumps(asdict(alloc), indent=2))
    base = {f.name: getattr(res, f.name) for f in fields(UniformResult)}
    return MixedPrecisionResult(**base, allocation=alloc, curves=curves)


__all__ = [
    "DEFAULT_BITS",
    "BitAllocation",
    "BitSensitivity",
    "MixedPrecisionConfig",
    "MixedPrecisionResult",
    "allocate_bits",
    "bit_sensitivity",
    "layer_bytes",
    "mixed_precision_quantize",
]
