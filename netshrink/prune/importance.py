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


def obd_saliency(weight: torch.Tensor, hessian_diag: torch.Tensor) -> torch.Tensor:
    """Optimal Brain Damage saliency ``s_k = ½ h_kk w_k²``: the rise of a locally quadratic loss when
    ``w_k`` is set to zero, off-diagonal Hessian terms neglected (LeCun, Denker & Solla, "Optimal
    Brain Damage", NeurIPS 1989). ``hessian_diag`` has the weight's shape."""
    return 0.5 * hessian_diag.detach() * weight.detach().pow(2)


def obs_saliency(weight: torch.Tensor, hessian_inv_diag: torch.Tensor) -> torch.Tensor:
    """Optimal Brain Surgeon saliency ``L_q = w_q² / (2 [H⁻¹]_qq)``: the least rise of the quadratic
    loss when ``w_q`` is removed and the other weights move by ``δw = −(w_q/[H⁻¹]_qq) H⁻¹ e_q``
    (Hassibi & Stork, "Second order derivatives for network pruning: Optimal Brain Surgeon",
    NeurIPS 1993). ``hessian_inv_diag`` broadcasts against ``weight`` (one row of it per output in the
    layer-wise form of Dong et al., "Learning to Prune Deep Neural Networks via Layer-wise Optimal
    Brain Surgeon", NeurIPS 2017)."""
    return weight.detach().pow(2) / (2.0 * hessian_inv_diag.detach())


def taylor_weight(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """First-order Taylor importance of each weight, ``(g_k w_k)²``: the squared first-order change
    of the loss when ``w_k`` is removed (Molchanov et al., "Importance Estimation for Neural Network
    Pruning", CVPR 2019, eq. 3; the first-order criterion of Molchanov et al., ICLR 2017)."""
    return (grad.detach() * weight.detach()).pow(2)


def taylor_group(
    weight: torch.Tensor, grad: torch.Tensor, bias: torch.Tensor | None = None, bias_grad: torch.Tensor | None = None
) -> torch.Tensor:
    """First-order Taylor importance of each output unit (neuron or channel) as a group,
    ``I_S = (Σ_{k∈S} g_k w_k)²`` over the unit's weights (and its bias) — Molchanov et al. 2019, eq. 4.
    Returns one score per row of ``weight``."""
    prod = (grad.detach() * weight.detach()).reshape(weight.shape[0], -1).sum(1)
    if bias is not None and bias_grad is not None:
        prod = prod + bias_grad.detach() * bias.detach()
    return prod.pow(2)


def karnin_sensitivity(
    sum_sq_delta: torch.Tensor, initial: torch.Tensor, final: torch.Tensor, lr: float
) -> torch.Tensor:
    """Karnin's sensitivity, accumulated during training by plain gradient descent with step ``η``:

    ``S = Σ_n [Δw(n)]² · w_f / (η (w_f − w_i))``

    — the path integral of the gradient along the training trajectory, rescaled to the straight path
    from ``w_f`` to 0, i.e. an estimate of the rise of the error if the weight were removed (Karnin,
    "A Simple Procedure for Pruning Back-Propagation Trained Neural Networks", IEEE TNN 1990).
    A weight that never moved (``w_f = w_i``) gets 0.
    """
    moved = final - initial
    safe = torch.where(moved != 0, moved, torch.ones_like(moved))
    return torch.where(moved != 0, sum_sq_delta * final / (lr * safe), torch.zeros_like(moved))


def merge_saliency(incoming: torch.Tensor, outgoing: torch.Tensor) -> torch.Tensor:
    """Saliency of merging neuron ``j`` into neuron ``i`` of a Linear→ReLU→Linear pair,
    ``s_ij = ⟨a_j²⟩ ‖W_i − W_j‖²`` (Srinivas & Babu, "Data-free Parameter Pruning for Deep Neural
    Networks", BMVC 2015): ``incoming`` is ``(h, fan_in)`` (bias appended as a column), ``outgoing``
    is ``(h, fan_out)`` (the next layer's columns, transposed) and ``⟨a_j²⟩`` is the mean of ``a_j²``
    over the next layer's outputs. Returns ``(h, h)`` with ``s[i, j]``; the diagonal is ``+inf``."""
    w = incoming.detach().to(torch.float64)
    dist = torch.cdist(w, w, compute_mode="donot_use_mm_for_euclid_dist").pow(2)
    s = dist * outgoing.detach().to(torch.float64).pow(2).mean(1)[None, :]
    s.fill_diagonal_(float("inf"))
    return s
