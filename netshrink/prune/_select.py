"""Turning importance scores into keep-masks: per layer, global, or by a threshold."""

from __future__ import annotations

import math

import torch


def keep_count(numel: int, sparsity: float) -> int:
    """Entries kept when a tensor of ``numel`` entries is pruned to ``sparsity`` (rounded to nearest)."""
    return max(0, min(numel, numel - int(round(sparsity * numel))))


def topk_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask keeping the ``keep`` highest scores (ties broken by position, deterministic)."""
    flat = scores.reshape(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if keep > 0:
        order = torch.argsort(flat, descending=True, stable=True)
        mask[order[:keep]] = True
    return mask.reshape(scores.shape)


def layer_masks(scores: dict[str, torch.Tensor], sparsity: dict[str, float]) -> dict[str, torch.Tensor]:
    """Each layer pruned to its own sparsity."""
    return {n: topk_mask(s, keep_count(s.numel(), sparsity[n])) for n, s in scores.items()}


def global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One threshold over all the layers' scores, keeping ``1 - sparsity`` of all their entries."""
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1).float() for n in names])
    mask = topk_mask(flat, keep_count(flat.numel(), sparsity))
    out, start = {}, 0
    for n in names:
        k = scores[n].numel()
        out[n] = mask[start : start + k].reshape(scores[n].shape)
        start += k
    return out


def threshold_masks(scores: dict[str, torch.Tensor], thresholds: dict[str, float]) -> dict[str, torch.Tensor]:
    """Keep the entries whose score is at least the layer's threshold."""
    return {n: s >= thresholds[n] for n, s in scores.items()}


def geometric_schedule(final: float, steps: int) -> list[float]:
    """Sparsities for ``steps`` rounds that remove the same fraction of survivors each round:
    keep_k = (1 - final) ** (k / steps). The last entry equals ``final``."""
    if steps <= 1:
        return [final]
    keep = 1.0 - final
    return [final if k == steps else 1.0 - math.pow(keep, k / steps) for k in range(1, steps + 1)]
