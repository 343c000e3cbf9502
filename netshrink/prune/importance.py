"""Importance scores: pure functions that rate weights; masks are decided elsewhere (``_select``).

Higher score = more important. Entries already pruned (masked out) are given ``-inf`` by the callers
so they stay pruned and count toward the target sparsity.
"""

from __future__ import annotations

import torch


def magnitude(weight: torch.Tensor) -> torch.Tensor:
    """|w|: the magnitude criterion of Han et al., "Learning both Weights and Connections for
    Efficient Neural Networks", NeurIPS 2015 (and of Deep Compression, ICLR 2016)."""
    return weight.detach().abs()
