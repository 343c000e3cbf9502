"""Sparse execution of highly sparse Linear layers through ``torch.sparse`` (CSR).

A masked layer still multiplies by every zero: pruning alone never makes it faster. Stored in
compressed sparse row form (Saad, "Iterative Methods for Sparse Linear Systems", 2003, §3.4; the
format of Han et al.'s EIE accelerator, ISCA 2016, is its column-wise twin), a layer ``y = W x + b``
does one multiply-add per non-zero:

    y_r = b_r + Σ_{k = crow[r]}^{crow[r+1] − 1} values[k] · x[col[k]]

so its cost falls with the density ``ρ`` — but with an indexed, irregular memory access per
non-zero where the dense kernel streams. It pays only above a sparsity that depends on the layer's
shape, the batch and the machine; ``benchmarks/suites/sparse_exec.py`` measures that crossover.

:func:`sparsify_linear_` swaps every Linear layer at or above ``min_sparsity`` for a
:class:`SparseLinear` with the same outputs (up to float summation order). The CSR arrays are three
plain buffers (``crow``, ``col``, ``values``), so the module copies, saves and loads as any other;
the sparse tensor is assembled (no copy) at each call. Convolutions are not converted.
"""

from __future__ import annotations

import logging
import warnings
from typing import Iterable

import torch
from torch import nn

from .._layers import select_layers
from ..config import check_range
from ..errors import ModelError

log = logging.getLogger(__name__)


def _quiet_csr(dense: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # torch marks CSR as beta on every first use
        warnings.simplefilter("ignore", UserWarning)
        return dense.to_sparse_csr()


class SparseLinear(nn.Module):
    """``y = W x + b`` with ``W`` held in CSR form (``crow``, ``col``, ``values`` buffers)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if weight.dim() != 2:
            raise ModelError(f"SparseLinear needs a 2-D weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        csr = _quiet_csr(weight.detach())
        self.register_buffer("crow", csr.crow_indices().clone())
        self.register_buffer("col", csr.col_indices().clone())
        self.register_buffer("values", csr.values().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "SparseLinear":
        """The CSR twin of ``linear``, from its effective (masked) weight; zeros are dropped."""
        return cls(linear.weight.detach(), None if linear.bias is None else linear.bias.detach())

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.out_features * self.in_features)

    def weight_csr(self) -> torch.Tensor:
        """The sparse CSR weight (a view of the buffers)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(
                self.crow, self.col, self.values, (self.out_features, self.in_features), check_invariants=False
            )

    def to_dense_weight(self) -> torch.Tensor:
        return self.weight_csr().to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ModelError(f"SparseLinear expects {self.in_features} input features, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        y = torch.mm(self.weight_csr(), flat.t()).t()  # (W Xᵀ)ᵀ: CSR times dense
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz}, density={self.density:.4f}"


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@torch.no_grad()
def sparsify_linear_(model: nn.Module, min_sparsity: float = 0.9, layers: Iterable[str] | None = None) -> dict[str, float]:
    """Replace, in place, every chosen ``nn.Linear`` whose effective weight has at least
    ``min_sparsity`` zeros by a :class:`SparseLinear`; returns ``{name: density}`` of those replaced.
    ``layers`` (globs) may only name Linear layers; a convolution named there raises :class:`ModelError`."""
    check_range("min_sparsity", min_sparsity, 0.0, 1.0)
    chosen = select_layers(model, None if layers is None else list(layers))
    if layers is not None:
        for n, m in chosen.items():
            if not isinstance(m, nn.Linear):
                raise ModelError(f"sparse execution: layer {n!r} is a {type(m).__name__}; only nn.Linear runs as CSR")
    replaced: dict[str, float] = {}
    for name, m in chosen.items():
        if not isinstance(m, nn.Linear):
            continue
        w = m.weight
        sparsity = 1.0 - int(torch.count_nonzero(w)) / w.numel()
        if sparsity < min_sparsity:
            continue
        new = SparseLinear.from_linear(m).to(w.device)
        _set_module(model, name, new)
        replaced[name] = new.density
        log.info("sparse execution: %s as CSR (density %.4f)", name, new.density)
    return replaced


__all__ = ["SparseLinear", "sparsify_linear_"]
