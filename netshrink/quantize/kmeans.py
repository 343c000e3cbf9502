"""Trained quantization by weight sharing: per-layer 1-D k-means (Han et al., "Deep Compression",
ICLR 2016, §3; after Gong et al. 2014).

Each layer's surviving weights W = {w_1..w_n} are partitioned into k = 2**bits clusters C_1..C_k
minimising the within-cluster sum of squares  sum_i sum_{w in C_i} |w - c_i|^2  (Lloyd's algorithm).
The layer then stores one centroid table and a ``bits``-bit index per weight. Centroid
initialisation, compared in the paper (§3.2):

- ``linear``:  c_i evenly spaced on [min W, max W]   (the paper's best: keeps the large weights);
- ``density``: c_i at evenly spaced quantiles of W   (CDF-based);
- ``random``:  k weights drawn at random (Forgy).

Fine-tuning then trains the centroids: the gradient of a centroid is the sum of the gradients of
its cluster's weights (see ``_sharing.SharedWeights``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from .._attention import converted_copy, prepare
from .._coverage import Coverage, plan_coverage
from .._layers import ALL_KINDS, LayerPlan, per_layer, plan_layers
from .._registry import handler, register
from ..config import BaseConfig, check_range
from ..errors import ConfigError
from ..prune._mask import follow_parametrization, get_mask
from ._sharing import apply_sharing

Init = Literal["linear", "density", "random"]


@dataclass
class Codebook:
    """Result of 1-D k-means: ``centroids`` (k,) float32 and, per value, the index of its centroid."""

    centroids: np.ndarray
    indices: np.ndarray
    iterations: int
    inertia: float  # sum of squared distances to the assigned centroids


def init_centroids(values: np.ndarray, k: int, init: Init, seed: int = 0) -> np.ndarray:
    """Initial centroids by the method ``init`` (see module docstring)."""
    if init == "linear":
        return np.linspace(values.min(), values.max(), k, dtype=np.float64)
    if init == "density":
        return np.quantile(values.astype(np.float64), (np.arange(k) + 0.5) / k)
    if init == "random":
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(values.astype(np.float64), size=k, replace=False))
    raise ValueError(f"unknown init {init!r}")


def _assign(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid of each value (centroids sorted ascending)."""
    mids = (centroids[1:] + centroids[:-1]) / 2.0
    return np.searchsorted(mids, values, side="left")


def kmeans_1d(values: np.ndarray, k: int, init: Init = "linear", seed: int = 0, max_iter: int = 100, tol: float = 0.0) -> Codebook:
    """Lloyd's algorithm on scalars. O(n log k) per iteration through sorted-midpoint assignment.

    Empty clusters keep their centroid. Stops when no assignment changes (or ``max_iter``).
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("kmeans_1d: no values to cluster")
    distinct = np.unique(values)
    if distinct.size <= k:
        # every value gets its own centroid: exact, no error
        centroids = distinct
        idx = np.searchsorted(distinct, values)
        return Codebook(centroids.astype(np.float32), idx.astype(np.int64), 0, 0.0)
    c = np.sort(init_centroids(values, k, init, seed))
    idx = _assign(values, c)
    it = 0
    for it in range(1, max_iter + 1):
        sums = np.bincount(idx, weights=values, minlength=k)
        counts = np.bincount(idx, minlength=k)
        new_c = np.where(counts > 0, sums / np.maximum(counts, 1), c)
        order = np.argsort(new_c, kind="stable")
        new_c = new_c[order]
        new_idx = _assign(values, new_c)
        moved = np.max(np.abs(new_c - c)) if tol > 0 else None
        c = new_c
        if np.array_equal(new_idx, idx) or (moved is not None and moved <= tol):
            idx = new_idx
            break
        idx = new_idx
    c32 = c.astype(np.float32)
    inertia = float(np.sum((values - c32[idx].astype(np.float64)) ** 2))
    return Codebook(c32, idx.astype(np.int64), it, inertia)


@register("kmeans", family="quantize")
@dataclass
class KMeansConfig(BaseConfig):
    """Weight sharing by per-layer k-means with trainable centroids (Han et al. 2016)."""

    bits: int = 5
    layer_bits: dict[str, int] = field(default_factory=dict)
    init: Init = "linear"
    layers: list[str] | None = None
    seed: int = 0
    max_iter: int = 100

    def validate(self) -> None:
        check_range("bits", self.bits, 1, 16)
        for name, b in self.layer_bits.items():
            check_range(f"layer_bits.{name}", b, 1, 16)
        if self.max_iter < 1:
            raise ConfigError("max_iter", f"must be at least 1, got {self.max_iter}")

    def plan(self, model: nn.Module) -> LayerPlan:
        """The layers shared (every Linear, ConvNd, ConvTranspose, GPT-2 Conv1D and Embedding weight, or
        those ``layers`` names) and why any other layer weight is not."""
        return plan_layers(model, self.layers, "kmeans", kinds=ALL_KINDS)

    def check_model(self, model: nn.Module) -> None:
        per_layer(self.plan(converted_copy(model, self.layers)).layers, self.layer_bits, self.bits, "layer_bits")


@dataclass
class ShareResult:
    """Per layer: the number of clusters and the mean squared error of the sharing (before fine-tuning)."""

    clusters: dict[str, int]
    mse: dict[str, float]
    coverage: Coverage | None = field(default=None, kw_only=True)


@handler(KMeansConfig)
@torch.no_grad()
def kmeans_share(model: nn.Module, config: KMeansConfig, data=None) -> ShareResult:
    """Share the weights of each chosen layer through its own k-means codebook, in place.

    Pruned entries (the layer's mask, if it has one) are left out of the clustering and stay zero.
    ``nn.MultiheadAttention`` in scope is converted to separate projections first (said in
    ``result.coverage.notes``); a weight tied to another shares one codebook with it.
    """
    notes = prepare(model, config.layers, "kmeans")
    plan = config.plan(model)
    plan.check_strict("kmeans", config.strict)
    layers = plan.layers
    skipped: dict[str, str] = {}
    bits = per_layer(layers, config.layer_bits, config.bits, "layer_bits")
    clusters, mse = {}, {}
    for n, m in layers.items():
        w = m.weight.detach()
        mask = get_mask(m)
        keep = mask if mask is not None else torch.ones_like(w, dtype=torch.bool)
        vals = w[keep].cpu().numpy()
        if vals.size == 0:
            skipped[f"{n}.weight"] = "every entry is pruned: nothing to share"
            continue
        book = kmeans_1d(vals, 2 ** bits[n], config.init, config.seed, config.max_iter)
        indices = torch.zeros(w.shape, dtype=torch.long)
        indices[keep.cpu()] = torch.from_numpy(book.indices)
        apply_sharing(m, torch.from_numpy(book.centroids), indices.to(w.device))
        for alias in plan.aliases.get(n, ()):
            follow_parametrization(m, model.get_submodule(alias))
        clusters[n] = int(book.centroids.size)
        mse[n] = book.inertia / vals.size
    done = {f"{n}.weight": f"shared: {clusters[n]}-entry k-means codebook, {bits[n]}-bit indices" for n in clusters}
    coverage = plan_coverage(model, "kmeans", done, plan, notes, config.strict, skipped)
    return ShareResult(clusters, mse, coverage=coverage)
