"""Low-rank decompositions of a Conv2d kernel ``K`` of shape ``(N, C, kh, kw)`` (out, in, height, width).

Pure tensor functions with typed results (the math), and the registered modules that apply them:

- Tucker-2 (Kim et al., ICLR 2016): ``K ≈ G ×_0 U_out ×_1 U_in`` — a 1x1 conv ``C -> r_in``, the
  ``kh x kw`` core conv ``r_in -> r_out``, a 1x1 conv ``r_out -> N``: :func:`tucker2_factors`, :class:`Tucker2Conv`.
- CP (Lebedev et al., ICLR 2015): ``K ≈ sum_r a_N[:, r] ∘ a_C[:, r] ∘ a_h[:, r] ∘ a_w[:, r]`` — a 1x1 conv
  ``C -> R``, a depthwise ``kh x 1`` conv, a depthwise ``1 x kw`` conv, a 1x1 conv ``R -> N``:
  :func:`cp_factors`, :class:`CPConv`.
- Spatially separable (Jaderberg, Vedaldi & Zisserman, BMVC 2014, scheme 2): SVD of ``K`` reshaped to
  ``(C kh) x (N kw)`` — a ``kh x 1`` conv with ``r`` filters, then a ``1 x kw`` conv:
  :func:`separable_factors`, :class:`SeparableConv`.

Each module keeps the original stride, padding, dilation and padding mode (split per axis where the
conv spans one axis), so its output has the original's shape. Factors are computed in float64.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._extras import require
from .._modules import register_module
from ..errors import ModelError
from ._common import (
    bool_arg,
    copy_into,
    energy_rank,
    int_pair,
    only_axis,
    padding_arg,
    padding_mode_arg,
    positive_int,
    split_padding,
)


def _kernel(kernel: torch.Tensor) -> torch.Tensor:
    if kernel.dim() != 4:
        raise ModelError(f"expected a 4-D conv kernel (out, in, kh, kw), got shape {list(kernel.shape)}")
    return kernel.detach().to(device="cpu", dtype=torch.float64)


def _like(a: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``a`` (float64, CPU) in ``kernel``'s dtype and on its device, contiguous."""
    return a.contiguous().to(dtype=kernel.dtype, device=kernel.device)


def mode_singular_values(kernel: torch.Tensor, mode: int) -> torch.Tensor:
    """Singular values of the mode-``mode`` unfolding of ``kernel`` (rows = that mode's index)."""
    k = _kernel(kernel)
    return torch.linalg.svdvals(k.movedim(mode, 0).reshape(k.shape[mode], -1))


# ---------------------------------------------------------------------------------------------- Tucker-2


@dataclass(frozen=True)
class TuckerFactors:
    """Tucker-2 factors of a kernel: ``K ≈ core ×_0 out_factor ×_1 in_factor``.

    ``core``: ``(r_out, r_in, kh, kw)``; ``out_factor``: ``(N, r_out)``; ``in_factor``: ``(C, r_in)``.
    """

    core: torch.Tensor
    out_factor: torch.Tensor
    in_factor: torch.Tensor

    @property
    def ranks(self) -> tuple[int, int]:
        return int(self.core.shape[0]), int(self.core.shape[1])

    def reconstruct(self) -> torch.Tensor:
        """``K_hat[n, c, h, w] = sum_{a, b} out_factor[n, a] in_factor[c, b] core[a, b, h, w]``."""
        return torch.einsum("abhw,na,cb->nchw", self.core, self.out_factor, self.in_factor)


def _tensorly():
    tensorly = require("tensorly", "lowrank")

    return tensorly


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """Run numpy's BLAS/LAPACK (tensorly's numpy backend) on one thread for the duration.

    Measured on a shared 2-core machine: after torch has run, OpenBLAS's threads and torch's OpenMP
    threads compete for the cores: one Tucker-2 (ranks 16, 16) of a 64x64x3x3 kernel took 4.4 s, and 0.04 s
    with BLAS on one thread.
    The factorizations here are of small matrices, where one thread loses nothing.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@torch.no_grad()
def tucker2_factors(kernel: torch.Tensor, ranks: tuple[int, int], seed: int = 0, n_iter_max: int = 100) -> TuckerFactors:
    """Tucker-2 decomposition of a conv kernel (Kim et al., "Compression of Deep Convolutional Neural
    Networks for Fast and Low Power Mobile Applications", ICLR 2016; Tucker, Psychometrika 1966).

    ``K ≈ G ×_0 U_out ×_1 U_in`` with orthonormal ``U_out (N, r_out)``, ``U_in (C, r_in)`` and core
    ``G (r_out, r_in, kh, kw)``, by HOOI (tensorly ``partial_tucker`` over modes 0 and 1, SVD
    initialisation, ``random_state=seed``). At ``ranks = (N, C)`` the decomposition is exact.
    Returned in ``kernel``'s dtype and device.
    """
    k = _kernel(kernel)
    r_out, r_in = int_pair("ranks", list(ranks))
    if r_out > k.shape[0] or r_in > k.shape[1]:
        raise ModelError(f"Tucker-2 ranks {[r_out, r_in]} exceed the kernel's channels (out {k.shape[0]}, in {k.shape[1]})")
    tl = _tensorly()
    from tensorly.decomposition import partial_tucker

    with tl.backend_context("numpy"), _one_blas_thread():
        out = partial_tucker(k.numpy(), rank=[r_out, r_in], modes=[0, 1], init="svd", n_iter_max=n_iter_max,
                             random_state=seed)
    core, factors = out[0] if isinstance(out[0], tuple) else out  # tensorly >= 0.8 also returns the errors
    return TuckerFactors(*(_like(torch.as_tensor(a, dtype=torch.float64), kernel) for a in (core, *factors)))


def tucker2_energy_ranks(kernel: torch.Tensor, energy: float) -> tuple[int, int]:
    """``(r_out, r_in)``: per mode, the smallest rank keeping ``energy`` of the squared singular values of
    that mode's unfolding (the HOSVD truncation rule, De Lathauwer et al., SIAM J. Matrix Anal. 2000)."""
    return energy_rank(mode_singular_values(kernel, 0), energy), energy_rank(mode_singular_values(kernel, 1), energy)


# ---------------------------------------------------------------------------------------------- CP


@dataclass(frozen=True)
class CPFactors:
    """Rank-``R`` CP factors of a kernel: ``K[n, c, i, j] ≈ sum_r out_factor[n, r] in_factor[c, r]
    vertical[i, r] horizontal[j, r]`` (the CP weights folded in, the scale shared evenly)."""

    out_factor: torch.Tensor  # (N, R)
    in_factor: torch.Tensor  # (C, R)
    vertical: torch.Tensor  # (kh, R)
    horizontal: torch.Tensor  # (kw, R)

    @property
    def rank(self) -> int:
        return int(self.out_factor.shape[1])

    def reconstruct(self) -> torch.Tensor:
        return torch.einsum("nr,cr,ir,jr->ncij", self.out_factor, self.in_factor, self.vertical, self.horizontal)


@torch.no_grad()
def cp_factors(kernel: torch.Tensor, rank: int, seed: int = 0, n_iter_max: int = 200, tol: float = 1e-8) -> CPFactors:
    """CP decomposition of a conv kernel (Lebedev et al., "Speeding-up Convolutional Neural Networks Using
    Fine-tuned CP-Decomposition", ICLR 2015; Carroll & Chang 1970, Harshman 1970).

    ``K ≈ sum_{r=1..R} λ_r a_N[:, r] ∘ a_C[:, r] ∘ a_h[:, r] ∘ a_w[:, r]`` by alternating least squares
    (tensorly ``parafac``; SVD initialisation where ``R`` fits every mode, else random; ``random_state=seed``).
    Each rank-1 term's scale ``|λ_r| prod_k ||a_k[:, r]||`` is shared evenly by its four unit vectors
    (the sign of ``λ_r`` goes to ``a_N``). Returned in ``kernel``'s dtype and device.
    """
    k = _kernel(kernel)
    positive_int("rank", rank)
    tl = _tensorly()
    from tensorly.decomposition import parafac

    init = "svd" if rank <= min(k.shape) else "random"
    with tl.backend_context("numpy"), warnings.catch_warnings(), _one_blas_thread():
        warnings.simplefilter("ignore", UserWarning)
        cp = parafac(k.numpy(), rank=rank, init=init, n_iter_max=n_iter_max, tol=tol, random_state=seed)
    weights = torch.as_tensor(cp.weights, dtype=torch.float64)
    factors = [torch.as_tensor(f, dtype=torch.float64) for f in cp.factors]
    norms = [torch.linalg.vector_norm(f, dim=0) for f in factors]
    scale = (weights.abs() * torch.stack(norms).prod(0)) ** 0.25
    units = [f / torch.where(n > 0, n, torch.ones_like(n)) * scale for f, n in zip(factors, norms)]
    units[0] = units[0] * torch.where(weights < 0, -1.0, 1.0)
    return CPFactors(*(_like(u, kernel) for u in units))


# ---------------------------------------------------------------------------------------------- separable


@dataclass(frozen=True)
class SeparableFactors:
    """Jaderberg scheme-2 factors: ``K[n, c, i, j] ≈ sum_r horizontal[n, r, j] vertical[r, c, i]``.

    ``vertical``: ``(R, C, kh)``, the ``kh x 1`` filters; ``horizontal``: ``(N, R, kw)``, the ``1 x kw``
    filters; ``singular_values``: the whole spectrum of the ``(C kh) x (N kw)`` matrix (float64).
    """

    vertical: torch.Tensor
    horizontal: torch.Tensor
    singular_values: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.vertical.shape[0])

    def reconstruct(self) -> torch.Tensor:
        return torch.einsum("nrj,rci->ncij", self.horizontal, self.vertical)


def separable_matrix(kernel: torch.Tensor) -> torch.Tensor:
    """``M[(c, i), (n, j)] = K[n, c, i, j]``, the ``(C kh) x (N kw)`` matrix that scheme 2 factorizes."""
    k = _kernel(kernel)
    n, c, kh, kw = k.shape
    return k.permute(1, 2, 0, 3).reshape(c * kh, n * kw)


@torch.no_grad()
def separable_factors(kernel: torch.Tensor, rank: int | None = None, *, energy: float | None = None) -> SeparableFactors:
    """Spatially separable filters (Jaderberg, Vedaldi & Zisserman, "Speeding up Convolutional Neural
    Networks with Low Rank Expansions", BMVC 2014, scheme 2; the SVD solution of Tai et al., ICLR 2016).

    With ``M = U S V^T`` the SVD of :func:`separable_matrix`, ``vertical[r, c, i] = sqrt(s_r) U[(c, i), r]``
    and ``horizontal[n, r, j] = sqrt(s_r) V[(n, j), r]`` for ``r <= R``: the best rank-``R`` fit in
    Frobenius norm; exact at ``R = min(C kh, N kw)``. ``rank``, or with ``energy`` the smallest rank
    keeping that fraction of ``sum s_i^2``. Returned in ``kernel``'s dtype and device.
    """
    n, c, kh, kw = _kernel(kernel).shape
    m = separable_matrix(kernel)
    if (rank is None) == (energy is None):
        raise ModelError("give exactly one of rank and energy")
    left, s, right = torch.linalg.svd(m, full_matrices=False)
    r = energy_rank(s, energy) if energy is not None else rank
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= s.numel():
        raise ModelError(f"rank must be an integer in [1, {s.numel()}] for a {list(kernel.shape)} kernel, got {r!r}")
    root = s[:r].sqrt()
    vertical = (left[:, :r] * root).T.reshape(r, c, kh)
    horizontal = (root[:, None] * right[:r]).reshape(r, n, kw).permute(1, 0, 2)
    return SeparableFactors(_like(vertical, kernel), _like(horizontal, kernel), s)


# ---------------------------------------------------------------------------------------------- modules


class _DecomposedConv(nn.Sequential):
    """A Sequential that replaces a Conv2d; keeps the original's geometry and its ``rank`` (an int, or
    ``(r_out, r_in)`` for Tucker-2) for ``netshrink_args``."""

    def _geometry(self, in_channels: Any, out_channels: Any, kernel_size: Any, stride: Any, padding: Any,
                  dilation: Any, padding_mode: Any, bias: Any) -> dict[str, Any]:
        g = {
            "in_channels": positive_int("in_channels", in_channels),
            "out_channels": positive_int("out_channels", out_channels),
            "kernel_size": int_pair("kernel_size", kernel_size),
            "stride": int_pair("stride", stride),
            "padding": padding_arg(padding),
            "dilation": int_pair("dilation", dilation),
            "padding_mode": padding_mode_arg(padding_mode),
            "bias": bool_arg("bias", bias),
        }
        if g["padding"] == "same" and g["stride"] != (1, 1):
            raise ModelError("padding 'same' needs stride 1")
        return g

    def netshrink_args(self) -> dict[str, Any]:
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in self.geometry.items()}
        return dict(out, rank=list(self.rank) if isinstance(self.rank, tuple) else self.rank)


@register_module("tucker2_conv")
class Tucker2Conv(_DecomposedConv):
    """Tucker-2 replacement of a Conv2d (Kim et al., ICLR 2016): ``first`` 1x1 ``C -> r_in`` (``U_in^T``),
    ``core`` ``kh x kw`` ``r_in -> r_out`` with the original stride/padding/dilation (``G``), ``last`` 1x1
    ``r_out -> N`` (``U_out``) with the original bias. ``rank = [r_out, r_in]``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, rank: Any, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, padding_mode: str = "zeros", bias: bool = True):
        g = self._geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, padding_mode, bias)
        r_out, r_in = int_pair("rank", rank)
        super().__init__(OrderedDict(
            first=nn.Conv2d(g["in_channels"], r_in, 1, bias=False),
            core=nn.Conv2d(r_in, r_out, g["kernel_size"], g["stride"], g["padding"], g["dilation"], bias=False,
                           padding_mode=g["padding_mode"]),
            last=nn.Conv2d(r_out, g["out_channels"], 1, bias=g["bias"]),
        ))
        self.geometry, self.rank = g, (r_out, r_in)

    @torch.no_grad()
    def set_factors(self, factors: TuckerFactors, bias: torch.Tensor | None = None) -> Tucker2Conv:
        if factors.ranks != self.rank:
            raise ModelError(f"Tucker factors of ranks {list(factors.ranks)} do not fit ranks {list(self.rank)}")
        copy_into(self.first.weight, factors.in_factor.T)
        copy_into(self.core.weight, factors.core)
        copy_into(self.last.weight, factors.out_factor)
        if bias is not None and self.last.bias is not None:
            copy_into(self.last.bias, bias)
        return self

    def kernel(self) -> torch.Tensor:
        """The ``(N, C, kh, kw)`` kernel this module applies (stride and padding aside)."""
        return torch.einsum("na,abhw,bc->nchw", self.last.weight[:, :, 0, 0], self.core.weight, self.first.weight[:, :, 0, 0])


@register_module("cp_conv")
class CPConv(_DecomposedConv):
    """CP replacement of a Conv2d (Lebedev et al., ICLR 2015): ``first`` 1x1 ``C -> R``, ``vertical``
    depthwise ``kh x 1``, ``horizontal`` depthwise ``1 x kw`` (stride, padding, dilation split by axis),
    ``last`` 1x1 ``R -> N`` with the original bias."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, rank: int, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, padding_mode: str = "zeros", bias: bool = True):
        g = self._geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, padding_mode, bias)
        r = positive_int("rank", rank)
        (kh, kw), mode = g["kernel_size"], g["padding_mode"]
        super().__init__(OrderedDict(
            first=nn.Conv2d(g["in_channels"], r, 1, bias=False),
            vertical=nn.Conv2d(r, r, (kh, 1), only_axis(g["stride"], 0), split_padding(g["padding"], 0),
                               only_axis(g["dilation"], 0), groups=r, bias=False, padding_mode=mode),
            horizontal=nn.Conv2d(r, r, (1, kw), only_axis(g["stride"], 1), split_padding(g["padding"], 1),
                                 only_axis(g["dilation"], 1), groups=r, bias=False, padding_mode=mode),
            last=nn.Conv2d(r, g["out_channels"], 1, bias=g["bias"]),
        ))
        self.geometry, self.rank = g, r

    @torch.no_grad()
    def set_factors(self, factors: CPFactors, bias: torch.Tensor | None = None) -> CPConv:
        if factors.rank != self.rank:
            raise ModelError(f"CP factors of rank {factors.rank} do not fit rank {self.rank}")
        copy_into(self.first.weight, factors.in_factor.T)
        copy_into(self.vertical.weight, factors.vertical.T)
        copy_into(self.horizontal.weight, factors.horizontal.T)
        copy_into(self.last.weight, factors.out_factor)
        if bias is not None and self.last.bias is not None:
            copy_into(self.last.bias, bias)
        return self


@register_module("separable_conv")
class SeparableConv(_DecomposedConv):
    """Spatially separable replacement of a Conv2d (Jaderberg et al., BMVC 2014, scheme 2): ``vertical``
    ``kh x 1`` conv ``C -> R``, then ``horizontal`` ``1 x kw`` conv ``R -> N`` with the original bias
    (stride, padding, dilation split by axis)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, rank: int, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, padding_mode: str = "zeros", bias: bool = True):
        g = self._geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, padding_mode, bias)
        r = positive_int("rank", rank)
        (kh, kw), mode = g["kernel_size"], g["padding_mode"]
        super().__init__(OrderedDict(
            vertical=nn.Conv2d(g["in_channels"], r, (kh, 1), only_axis(g["stride"], 0), split_padding(g["padding"], 0),
                               only_axis(g["dilation"], 0), bias=False, padding_mode=mode),
            horizontal=nn.Conv2d(r, g["out_channels"], (1, kw), only_axis(g["stride"], 1),
                                 split_padding(g["padding"], 1), only_axis(g["dilation"], 1), bias=g["bias"],
                                 padding_mode=mode),
        ))
        self.geometry, self.rank = g, r

    @torch.no_grad()
    def set_factors(self, factors: SeparableFactors, bias: torch.Tensor | None = None) -> SeparableConv:
        if factors.rank != self.rank:
            raise ModelError(f"separable factors of rank {factors.rank} do not fit rank {self.rank}")
        copy_into(self.vertical.weight, factors.vertical)
        copy_into(self.horizontal.weight, factors.horizontal)
        if bias is not None and self.horizontal.bias is not None:
            copy_into(self.horizontal.bias, bias)
        return self


__all__ = [
    "CPConv",
    "CPFactors",
    "SeparableConv",
    "SeparableFactors",
    "Tucker2Conv",
    "TuckerFactors",
    "cp_factors",
    "mode_singular_values",
    "separable_factors",
    "separable_matrix",
    "tucker2_energy_ranks",
    "tucker2_factors",
]
