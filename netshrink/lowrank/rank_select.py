"""Rank selection: empirical variational Bayesian matrix factorization (EVBMF) and MACs budgets.

EVBMF (Nakajima, Sugiyama, Babacan & Tomioka, "Global Analytic Solution of Fully-Observed Variational
Bayesian Matrix Factorization", JMLR 2013): for an ``L x M`` matrix ``Y = B A^T + E`` (``L <= M``,
Gaussian noise of unknown variance ``sigma^2``), the empirical VB solution keeps exactly the singular
components with

    gamma_h > gamma_EVB = sigma * sqrt(M (1 + tau) (1 + alpha / tau)),   alpha = L / M,

with ``tau = 2.5129 sqrt(alpha)`` (the constant of Nakajima et al. 2013 for the EVB threshold).
``sigma^2`` is estimated by minimising the free energy (Nakajima et al. 2015, "Condition for Perfect
Dimensionality Recovery by Variational Bayesian PCA", JMLR):

    Omega(sigma^2) = sum_{x_h <= x_bar} (x_h - log x_h) + sum_{x_h > x_bar} (x_h - tau(x_h) + log((tau(x_h)+1)/x_h)
                     + alpha log(tau(x_h)/alpha + 1)) + R / (M sigma^2) + (L - H) log sigma^2,
    x_h = gamma_h^2 / (M sigma^2),  tau(x) = (x - (1+alpha) + sqrt((x - (1+alpha))^2 - 4 alpha)) / 2,
    x_bar = (1 + tau)(1 + alpha / tau),

over the bounded interval where the answer can lie (``R`` is the energy outside the ``H`` given
components). Kim et al. (ICLR 2016) choose the Tucker-2 ranks of a conv kernel by EVBMF on its
output- and input-channel unfoldings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from ..errors import ModelError
from .conv import mode_singular_values

#: tau_bar / sqrt(alpha): the EVB threshold constant of Nakajima et al. 2013
TAU_CONSTANT = 2.5129


@dataclass(frozen=True)
class EvbmfResult:
    """The EVBMF rank of a matrix and the estimated noise variance ``sigma2``."""

    rank: int
    sigma2: float
    threshold: float


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    b = x - (1 + alpha)
    return 0.5 * (b + np.sqrt(np.maximum(b * b - 4 * alpha, 0.0)))


def _free_energy(sigma2: float, L: int, M: int, s: np.ndarray, residual: float, xubar: float) -> float:
    H = s.size
    alpha = L / M
    x = s**2 / (M * sigma2)
    z1, z2 = x[x > xubar], x[x <= xubar]
    t1 = _tau(z1, alpha)
    value = float(np.sum(z2 - np.log(z2)))
    value += float(np.sum(z1 - t1) + np.sum(np.log((t1 + 1) / z1)) + alpha * np.sum(np.log(t1 / alpha + 1)))
    return value + residual / (M * sigma2) + (L - H) * math.log(sigma2)


def evbmf(singular_values: torch.Tensor | np.ndarray, shape: tuple[int, int], total_energy: float | None = None) -> EvbmfResult:
    """The EVBMF rank of a ``shape`` matrix with the given singular values (descending, all of them or
    the leading ``H``; ``total_energy = ||Y||_F^2`` when only some are given). Noise variance unknown."""
    s = np.asarray(torch.as_tensor(singular_values).detach().to(torch.float64).cpu()).ravel()
    L, M = sorted(int(d) for d in shape)
    if L < 1 or s.size == 0:
        raise ModelError(f"EVBMF needs a non-empty matrix, got shape {list(shape)}")
    s = np.sort(s)[::-1][: L]
    H = s.size
    energy = float(np.sum(s**2)) if total_energy is None else float(total_energy)
    if energy <= 0:
        return EvbmfResult(0, 0.0, 0.0)
    residual = max(0.0, energy - float(np.sum(s**2)))
    alpha = L / M
    tau_bar = TAU_CONSTANT * math.sqrt(alpha)
    xubar = (1 + tau_bar) * (1 + alpha / tau_bar)
    # the noise variance lies between these bounds (Nakajima et al. 2015, Theorem 2)
    eh_ub = int(min(math.ceil(L / (1 + alpha)) - 1, H)) - 1
    upper = (float(np.sum(s**2)) + residual) / (L * M)
    tail = s[eh_ub + 1 :] if eh_ub + 1 < H else s[-1:]
    lower = max(float(s[min(eh_ub + 1, H - 1)] ** 2) / (M * xubar), float(np.mean(tail**2)) / M)
    lower = max(lower, upper * 1e-12)
    if lower >= upper:
        sigma2 = upper
    else:
        found = minimize_scalar(_free_energy, args=(L, M, s, residual, xubar), bounds=(lower, upper),
                                method="bounded", options={"xatol": 1e-12 * upper})
        sigma2 = float(found.x)
    threshold = math.sqrt(M * sigma2 * (1 + tau_bar) * (1 + alpha / tau_bar))
    return EvbmfResult(int(np.sum(s > threshold)), sigma2, threshold)


def tucker2_vbmf_ranks(kernel: torch.Tensor) -> tuple[int, int]:
    """``(r_out, r_in)`` by EVBMF on the output- and input-channel unfoldings of a conv kernel
    (Kim et al., ICLR 2016), each at least 1."""
    k = kernel.detach()
    ranks = []
    for mode in (0, 1):
        rows = k.shape[mode]
        cols = k.numel() // rows
        ranks.append(max(1, evbmf(mode_singular_values(k, mode), (rows, cols)).rank))
    return ranks[0], ranks[1]


def tucker2_macs(n: int, c: int, kh: int, kw: int, r_out: int, r_in: int, in_positions: float = 1.0,
                 out_positions: float = 1.0) -> float:
    """MACs of a Tucker-2 conv: ``in_positions * C r_in + out_positions * (r_in r_out kh kw + r_out N)``
    (the 1x1 reduction runs at the input's positions, the core and the 1x1 expansion at the output's)."""
    return in_positions * c * r_in + out_positions * (r_in * r_out * kh * kw + r_out * n)


def tucker2_macs_ranks(shape: tuple[int, int, int, int], ratio: float, in_positions: float = 1.0,
                       out_positions: float = 1.0) -> tuple[int, int] | None:
    """The largest ``(r_out, r_in) = (round(b N), round(b C))`` (one scale ``b`` for both modes) whose
    Tucker-2 MACs are at most ``ratio`` times the dense ``N C kh kw`` per output position; None if even
    ``(1, 1)`` costs more."""
    n, c, kh, kw = shape
    budget = ratio * out_positions * n * c * kh * kw
    scales = sorted({i / n for i in range(1, n + 1)} | {i / c for i in range(1, c + 1)}, reverse=True)
    for b in scales:
        r_out, r_in = max(1, min(n, round(b * n))), max(1, min(c, round(b * c)))
        if tucker2_macs(n, c, kh, kw, r_out, r_in, in_positions, out_positions) <= budget + 1e-9:
            return r_out, r_in
    return None


__all__ = ["EvbmfResult", "evbmf", "tucker2_macs", "tucker2_macs_ranks", "tucker2_vbmf_ranks"]
