"""Shared weights (codebook + indices) as a parametrization, trainable through its centroids.

``weight = codebook[indices] * mask``. Autograd through the indexing sums the gradients of all the
weights of a cluster into its centroid, which is exactly the centroid update of Deep Compression
(Han et al., ICLR 2016, eq. 3): dL/dC_k = sum_ij dL/dW_ij * 1(I_ij = k).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..prune._mask import Mask, parametrization_of, remove_parametrization


class SharedWeights(nn.Module):
    """Parametrization that ignores the stored weight and returns ``codebook[indices] (* mask)``."""

    def __init__(self, codebook: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor | None = None):
        super().__init__()
        self.codebook = nn.Parameter(codebook.detach().to(torch.float32).clone())
        self.register_buffer("indices", indices.detach().to(torch.long).clone())
        if mask is not None:
            self.register_buffer("mask", mask.detach().to(torch.bool).clone())
        else:
            self.mask = None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        out = self.codebook[self.indices]
        if self.mask is not None:
            out = torch.where(self.mask, out, torch.zeros((), dtype=out.dtype, device=out.device))
        return out

    @property
    def bits(self) -> int:
        """Bits of a fixed-length index into this codebook."""
        return max(1, int(self.codebook.numel() - 1).bit_length())


def apply_sharing(module: nn.Module, codebook: torch.Tensor, indices: torch.Tensor, name: str = "weight") -> SharedWeights:
    """Replace ``module.name`` by shared weights, keeping the pruning mask that is there, if any."""
    p = parametrization_of(module, name)
    mask = None
    if isinstance(p, Mask):
        mask = p.mask.clone()
        remove_parametrization(module, name)
    elif p is not None:
        mask = getattr(p, "mask", None)
        mask = mask.clone() if mask is not None else None
        remove_parametrization(module, name)
    shared = SharedWeights(codebook, indices, mask)
    parametrize.register_parametrization(module, name, shared, unsafe=True)
    module.parametrizations[name].original.requires_grad_(False)
    return shared


def get_sharing(module: nn.Module, name: str = "weight") -> SharedWeights | None:
    p = parametrization_of(module, name)
    return p if isinstance(p, SharedWeights) else None
