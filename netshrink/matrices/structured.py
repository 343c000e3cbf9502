"""Structured weight matrices for Linear layers: circulant (FFT), Toeplitz, and hashed (HashedNets).

Each replaces the ``out x in`` weight of ``y = W x + b`` by a matrix described by far fewer numbers:

- circulant (Cheng et al., "An Exploration of Parameter Redundancy in Deep Networks with Circulant
  Projections", ICCV 2015): a ``b x b`` circulant block ``C[i, j] = c[(i - j) mod b]`` applies as
  ``C x = irfft(rfft(c) * rfft(x))`` in ``O(b log b)`` time and ``O(b)`` storage. A non-square weight is a
  grid of ``ceil(out/b) x ceil(in/b)`` circulant blocks (input zero-padded, output cut). Optionally the
  input is first multiplied by a fixed random sign diagonal ``D`` (Cheng 2015's ``R D x``).
- Toeplitz: ``T[i, j] = t[i - j + in - 1]``, ``out + in - 1`` numbers, applied as a linear convolution
  through the FFT.
- hashed (Chen et al., "Compressing Neural Networks with the Hashing Trick", ICML 2015): the virtual
  weight ``V[i, j] = xi(i, j) * w[h(i, j)]`` with ``h`` a seeded hash into ``K`` buckets and ``xi`` an
  optional seeded sign hash; only ``w`` (``K`` numbers) is stored and trained.

Exported to ONNX (which has no real-FFT op that torch exports), circulant and Toeplitz layers run as
their explicit matrices: the same function, without the FFT's speed.

Every projection ``*_project(W)`` is the least-squares fit of the structure to a dense ``W``: each entry
of ``W`` depends on exactly one stored number (with coefficient +-1), so the fit is the (signed) mean of
the entries that share it -- for a circulant, the mean along each wrapped diagonal.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._modules import register_module
from ..errors import ModelError

_MASK32 = 0xFFFFFFFF


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelError(f"{name} must be a positive integer, got {value!r}")
    return value


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ModelError(f"{name} must be true or false, got {value!r}")
    return value


def _seed(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MASK32:
        raise ModelError(f"seed must be an integer in [0, 2^32 - 1], got {value!r}")
    return value


def hash32(keys: torch.Tensor, seed: int) -> torch.Tensor:
    """A deterministic 32-bit integer hash of int64 ``keys`` (each below 2^32) with ``seed``.

    Two rounds of ``x = ((x >> 16) ^ x) * 0x45d9f3b mod 2^32`` after mixing in the seed; computed in
    int64 (every product stays below 2^60), so it is the same on every platform and device.
    """
    x = (keys ^ ((seed * 0x9E3779B1) & _MASK32)) & _MASK32
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return ((x >> 16) ^ x) & _MASK32


def sign_vector(n: int, seed: int) -> torch.Tensor:
    """``n`` seeded random signs (+-1.0) from :func:`hash32` of ``0..n-1``."""
    bits = hash32(torch.arange(n, dtype=torch.int64), seed ^ 0x5BD1E995) & 1
    return 1.0 - 2.0 * bits.to(torch.float32)


# ---------------------------------------------------------------------------------------------- circulant


def circulant_matrix(c: torch.Tensor) -> torch.Tensor:
    """The explicit ``n x n`` circulant ``C[i, j] = c[(i - j) mod n]`` (for checks; ``O(n^2)``)."""
    n = c.shape[-1]
    i = torch.arange(n)
    return c[..., (i[:, None] - i[None, :]) % n]


def circulant_blocks_matmul(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``y[..., p, :] = sum_q circ(c[p, q]) x[..., q, :]`` by real FFTs.

    ``x``: ``(..., q, b)``, ``c``: ``(p, q, b)``; returns ``(..., p, b)``. Circular convolution theorem:
    ``circ(c) x = irfft(rfft(c) * rfft(x))``.
    """
    b = c.shape[-1]
    xf = torch.fft.rfft(x, n=b)
    cf = torch.fft.rfft(c, n=b)
    yf = torch.einsum("...qf,pqf->...pf", xf, cf)
    return torch.fft.irfft(yf, n=b)


def _diagonal_mean(weight: torch.Tensor, diag: torch.Tensor, n_params: int, signs: torch.Tensor | None = None) -> torch.Tensor:
    """Least-squares parameters: the (signed) mean of ``weight``'s entries grouped by index ``diag``."""
    w = weight.detach().to(torch.float64)
    if signs is not None:
        w = w * signs.to(torch.float64)
    flat = diag.reshape(-1)
    sums = torch.zeros(n_params, dtype=torch.float64).index_add_(0, flat, w.reshape(-1))
    counts = torch.zeros(n_params, dtype=torch.float64).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))


def circulant_project(weight: torch.Tensor, block: int, input_signs: torch.Tensor | None = None) -> torch.Tensor:
    """The block-circulant ``c`` (shape ``(ceil(out/b), ceil(in/b), b)``) nearest to ``weight`` in Frobenius
    norm over its real (unpadded) entries: the mean of each block's wrapped diagonals.

    With ``input_signs`` ``d``, fits ``C diag(d) ≈ W``, i.e. ``C ≈ W diag(d)`` (``d = d^{-1}``).
    """
    n_out, n_in = weight.shape
    b = _positive("block", block)
    p, q = math.ceil(n_out / b), math.ceil(n_in / b)
    i = torch.arange(n_out)[:, None]
    j = torch.arange(n_in)[None, :]
    # parameter index of entry (i, j): block (i // b, j // b), diagonal (i - j) mod b
    diag = ((i // b) * q + (j // b)) * b + (i - j) % b
    signs = None if input_signs is None else input_signs[None, :n_in].expand(n_out, n_in)
    c = _diagonal_mean(weight, diag, p * q * b, signs)
    return c.reshape(p, q, b).to(weight.dtype)


@register_module("circulant_linear")
class CirculantLinear(nn.Module):
    """``y = C D x + b`` with ``C`` a grid of ``block x block`` circulant blocks, applied by real FFT
    (Cheng et al., ICCV 2015). Stores ``ceil(out/b) * ceil(in/b) * b`` numbers (``max(in, out)`` when
    ``b = min(in, out)`` divides the other side) instead of ``in * out``. ``D`` is a fixed diagonal of
    seeded random signs when ``signs`` is true (rebuilt from ``seed``, not stored), else the identity.
    """

    def __init__(self, in_features: int, out_features: int, block: int | None = None, bias: bool = True,
                 signs: bool = False, seed: int = 0):
        super().__init__()
        self.in_features = _positive("in_features", in_features)
        self.out_features = _positive("out_features", out_features)
        self.block = _positive("block", block if block is not None else min(in_features, out_features))
        self._bias, self.signs, self.seed = _flag("bias", bias), _flag("signs", signs), _seed(seed)
        p, q = math.ceil(out_features / self.block), math.ceil(in_features / self.block)
        self.weight = nn.Parameter(torch.randn(p, q, self.block) / math.sqrt(q * self.block))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.register_buffer("input_signs", sign_vector(in_features, seed) if signs else None, persistent=False)

    def netshrink_args(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "block": self.block,
                "bias": self._bias, "signs": self.signs, "seed": self.seed}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():  # ONNX has no real FFT op torch exports: the explicit matrix
            return F.linear(x, self.dense_weight(), self.bias)
        if self.input_signs is not None:
            x = x * self.input_signs
        p, q, b = self.weight.shape
        x = F.pad(x, (0, q * b - self.in_features)).unflatten(-1, (q, b))
        y = circulant_blocks_matmul(x, self.weight).flatten(-2)[..., : self.out_features]
        return y + self.bias if self.bias is not None else y

    def dense_weight(self) -> torch.Tensor:
        """The explicit ``(out, in)`` matrix this layer applies (``C D``)."""
        p, q, b = self.weight.shape
        blocks = circulant_matrix(self.weight)  # (p, q, b, b)
        w = blocks.permute(0, 2, 1, 3).reshape(p * b, q * b)[: self.out_features, : self.in_features]
        return w * self.input_signs if self.input_signs is not None else w

    @torch.no_grad()
    def set_from_dense(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> CirculantLinear:
        """Fill with the least-squares block-circulant fit of ``weight`` (:func:`circulant_project`)."""
        _check_shape(weight, self)
        self.weight.copy_(circulant_project(weight, self.block, self.input_signs).to(self.weight))
        if bias is not None and self.bias is not None:
            self.bias.copy_(bias)
        return self


# ---------------------------------------------------------------------------------------------- Toeplitz


def toeplitz_matrix(t: torch.Tensor, n_out: int, n_in: int) -> torch.Tensor:
    """The explicit ``T[i, j] = t[i - j + n_in - 1]`` (``t`` of length ``n_out + n_in - 1``)."""
    i = torch.arange(n_out)[:, None]
    j = torch.arange(n_in)[None, :]
    return t[i - j + n_in - 1]


def toeplitz_project(weight: torch.Tensor) -> torch.Tensor:
    """The Toeplitz ``t`` nearest to ``weight`` in Frobenius norm: the mean of each diagonal."""
    n_out, n_in = weight.shape
    diag = torch.arange(n_out)[:, None] - torch.arange(n_in)[None, :] + n_in - 1
    return _diagonal_mean(weight, diag, n_out + n_in - 1).to(weight.dtype)


@register_module("toeplitz_linear")
class ToeplitzLinear(nn.Module):
    """``y = T x + b`` with ``T[i, j] = t[i - j + in - 1]``: ``out + in - 1`` numbers instead of ``out * in``.

    Applied as the linear convolution ``(t * x)[i + in - 1]`` by zero-padded real FFTs of length
    ``out + 2 in - 2`` (a Toeplitz matrix is a block of a larger circulant).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features = _positive("in_features", in_features)
        self.out_features = _positive("out_features", out_features)
        self._bias = _flag("bias", bias)
        self.weight = nn.Parameter(torch.randn(in_features + out_features - 1) / math.sqrt(in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def netshrink_args(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self._bias}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():  # as CirculantLinear: the explicit matrix in ONNX
            return F.linear(x, self.dense_weight(), self.bias)
        n = self.weight.shape[0] + self.in_features - 1
        full = torch.fft.irfft(torch.fft.rfft(x, n=n) * torch.fft.rfft(self.weight, n=n), n=n)
        y = full[..., self.in_features - 1 : self.in_features - 1 + self.out_features]
        return y + self.bias if self.bias is not None else y

    def dense_weight(self) -> torch.Tensor:
        return toeplitz_matrix(self.weight, self.out_features, self.in_features)

    @torch.no_grad()
    def set_from_dense(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> ToeplitzLinear:
        _check_shape(weight, self)
        self.weight.copy_(toeplitz_project(weight).to(self.weight))
        if bias is not None and self.bias is not None:
            self.bias.copy_(bias)
        return self


# ---------------------------------------------------------------------------------------------- hashed


def hashed_indices(n_out: int, n_in: int, buckets: int, seed: int) -> torch.Tensor:
    """``h(i, j)`` in ``[0, buckets)`` for every entry of an ``n_out x n_in`` matrix (int64)."""
    keys = torch.arange(n_out * n_in, dtype=torch.int64).reshape(n_out, n_in)
    return hash32(keys, seed) % buckets


def hashed_signs(n_out: int, n_in: int, seed: int) -> torch.Tensor:
    """``xi(i, j)`` in ``{-1, +1}`` from an independent seeded hash (float32)."""
    keys = torch.arange(n_out * n_in, dtype=torch.int64).reshape(n_out, n_in)
    return 1.0 - 2.0 * (hash32(keys, seed ^ 0x27D4EB2F) & 1).to(torch.float32)


def hashed_project(weight: torch.Tensor, index: torch.Tensor, buckets: int, signs: torch.Tensor | None) -> torch.Tensor:
    """Least-squares bucket values ``w[k] = mean_{h(i,j)=k} xi(i,j) W[i,j]`` (0 for an empty bucket)."""
    return _diagonal_mean(weight, index, buckets, signs).to(weight.dtype)


@register_module("hashed_linear")
class HashedLinear(nn.Module):
    """HashedNets (Chen et al., ICML 2015): ``y = V x + b`` with ``V[i, j] = xi(i, j) w[h(i, j)]``.

    Stores ``buckets`` weights (and the bias); the hash ``h`` and signs ``xi`` are rebuilt from ``seed``,
    never stored. The gradient of ``w[k]`` is the signed sum of the virtual weights' gradients in bucket k.
    """

    def __init__(self, in_features: int, out_features: int, buckets: int, bias: bool = True,
                 sign_hash: bool = True, seed: int = 0):
        super().__init__()
        self.in_features = _positive("in_features", in_features)
        self.out_features = _positive("out_features", out_features)
        self.buckets = _positive("buckets", buckets)
        self._bias, self.sign_hash, self.seed = _flag("bias", bias), _flag("sign_hash", sign_hash), _seed(seed)
        self.weight = nn.Parameter(torch.randn(buckets) / math.sqrt(in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.register_buffer("index", hashed_indices(out_features, in_features, buckets, seed), persistent=False)
        signs = hashed_signs(out_features, in_features, seed) if sign_hash else None
        self.register_buffer("signs", signs, persistent=False)

    def netshrink_args(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "buckets": self.buckets,
                "bias": self._bias, "sign_hash": self.sign_hash, "seed": self.seed}

    def dense_weight(self) -> torch.Tensor:
        """The virtual ``(out, in)`` weight ``V``."""
        v = self.weight[self.index]
        return v * self.signs if self.signs is not None else v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(), self.bias)

    @torch.no_grad()
    def set_from_dense(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> HashedLinear:
        _check_shape(weight, self)
        self.weight.copy_(hashed_project(weight, self.index, self.buckets, self.signs).to(self.weight))
        if bias is not None and self.bias is not None:
            self.bias.copy_(bias)
        return self


def _check_shape(weight: torch.Tensor, module: nn.Module) -> None:
    want = (module.out_features, module.in_features)
    if tuple(weight.shape) != want:
        raise ModelError(f"a weight of shape {list(weight.shape)} does not fit {type(module).__name__} {list(want)}")


STRUCTURED_TYPES = (CirculantLinear, ToeplitzLinear, HashedLinear)

__all__ = [
    "CirculantLinear",
    "HashedLinear",
    "ToeplitzLinear",
    "circulant_blocks_matmul",
    "circulant_matrix",
    "circulant_project",
    "hash32",
    "hashed_indices",
    "hashed_project",
    "hashed_signs",
    "toeplitz_matrix",
    "toeplitz_project",
]
