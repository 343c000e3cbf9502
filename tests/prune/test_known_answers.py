"""Known-answer checks of the pruning criteria (issue 3, part 1): each score against a case solved by hand."""

import itertools

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from netshrink.prune import MagnitudeConfig, ObdConfig, get_mask, obs_prune, prune_
from netshrink.prune import importance
from netshrink.prune.hessian import hessian_diagonal_hutchinson


def _spd(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    return a @ a.T / n + 0.5 * torch.eye(n, dtype=torch.float64)


def _constrained_min(w0, h, removed):
    """argmin_w ½(w − w0)ᵀH(w − w0) subject to w_q = 0 for q in ``removed``, solved directly."""
    d = w0.numel()
    rest = [i for i in range(d) if i not in removed]
    q = list(removed)
    w = torch.zeros_like(w0)
    h_rr, h_rq = h[rest][:, rest], h[rest][:, q]
    w[rest] = w0[rest] + torch.linalg.solve(h_rr, h_rq @ w0[q])
    return w


def _quad(w, w0, h):
    dw = w - w0
    return float(0.5 * dw @ h @ dw)


def test_magnitude_keeps_exactly_the_largest_entries():
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.3, -2.0, 0.01, -0.5]]))
    prune_(nn.Sequential(layer), MagnitudeConfig(sparsity=0.5))
    assert get_mask(layer).tolist() == [[False, True, False, True]]


def test_obd_saliency_is_the_true_loss_rise_on_a_separable_quadratic():
    # a linear model at its exact fit, inputs with orthogonal columns: the loss ½ mean (x·w − t)² has
    # the diagonal Hessian h_kk = mean x_k², so OBD's ½ h_kk w_k² is the exact rise when w_k → 0
    d, n = 6, 64
    q, _ = torch.linalg.qr(torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    x = (q * torch.tensor([1.0, 3.0, 0.5, 2.0, 4.0, 0.2], dtype=torch.float64) * n**0.5).float()
    w_star = torch.tensor([[0.9, -0.1, 2.0, 0.4, -0.05, 1.5]])
    t = x @ w_star.T
    h = x.pow(2).mean(0)
    expected = 0.5 * h * w_star[0].pow(2)
    rises = []
    for k in range(d):
        w = w_star.clone()
        w[0, k] = 0
        rises.append(float(0.5 * (x @ w.T - t).pow(2).mean()))
    torch.testing.assert_close(torch.tensor(rises), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(importance.obd_saliency(w_star[0], h), expected)
    layer = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w_star)
    prune_(nn.Sequential(layer), ObdConfig(sparsity=0.5, hessian="exact", loss="mse", batches=1, batch_size=n),
           data=TensorDataset(x, t))
    keep = get_mask(layer)[0]
    assert sorted((~keep).nonzero().flatten().tolist()) == sorted(torch.argsort(expected)[:3].tolist())


def test_hutchinson_is_exact_for_a_diagonal_hessian_with_one_probe():
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    diag = torch.arange(1.0, 8.0, dtype=torch.float64)
    loss = 0.5 * (diag * w.pow(2)).sum()
    (est,) = hessian_diagonal_hutchinson(loss, [w], 1, torch.Generator().manual_seed(0))
    torch.testing.assert_close(est, diag)  # z ⊙ Hz = z² ⊙ diag = diag for z = ±1


def test_obs_update_is_the_exact_constrained_minimiser():
    h = _spd(7, seed=3)
    w0 = torch.randn(7, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    res = obs_prune(w0[None], h, [1])
    q = int((~res.keep[0]).nonzero())
    # the removed weight is the one whose optimal removal costs least (brute force over every q)
    costs = [_quad(_constrained_min(w0, h, [k]), w0, h) for k in range(7)]
    assert q == min(range(7), key=costs.__getitem__)
    torch.testing.assert_close(res.weight[0], _constrained_min(w0, h, [q]))
    assert float(res.loss[0]) == pytest.approx(costs[q], rel=1e-9)
    # and the saliency w_q²/(2[H⁻¹]_qq) is that cost for every q
    sal = importance.obs_saliency(w0, torch.linalg.inv(h).diagonal())
    torch.testing.assert_close(sal, torch.tensor(costs, dtype=torch.float64))


@pytest.mark.parametrize("block_size", [1, 3])
def test_greedy_obs_ends_at_the_minimiser_on_its_support(block_size):
    h = _spd(8, seed=5)
    w0 = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    res = obs_prune(w0[None], h, [5], block_size=block_size)
    removed = (~res.keep[0]).nonzero().flatten().tolist()
    assert len(removed) == 5
    best = _constrained_min(w0, h, removed)
    torch.testing.assert_close(res.weight[0], best)
    assert float(res.loss[0]) == pytest.approx(_quad(best, w0, h), rel=1e-9)
    # removing 2: greedy one-at-a-time is never better than the best pair (a sanity bound)
    pair = obs_prune(w0[None], h, [2])
    best_pair = min(_quad(_constrained_min(w0, h, list(p)), w0, h) for p in itertools.combinations(range(8), 2))
    assert float(pair.loss[0]) >= best_pair - 1e-12


def test_taylor_weight_is_the_first_order_loss_change_squared():
    # E(w) = ½‖w − c‖² has g = w − c; the first-order change when w_k → 0 is −g_k w_k
    w, c = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.0, 1.0, 3.0])
    g = w - c
    torch.testing.assert_close(importance.taylor_weight(w, g).sqrt(), (g * w).abs())
    torch.testing.assert_close(importance.taylor_group(w[None], g[None]), (g * w).sum().pow(2).reshape(1))


def test_karnin_formula_on_plain_gradient_descent_of_a_quadratic():
    # E = ½ a w², w_{n+1} = (1 − η a) w_n: S = Σ Δw² · w_f / (η (w_f − w_i)), checked by hand
    a, eta, w = 2.0, 0.1, torch.tensor([1.0])
    w_i, sq = w.clone(), torch.zeros(1)
    for _ in range(5):
        new = w - eta * a * w
        sq += (new - w).pow(2)
        w = new
    s = importance.karnin_sensitivity(sq, w_i, w, eta)
    r = 1 - eta * a
    by_hand = sum((eta * a * r**n) ** 2 for n in range(5)) * r**5 / (eta * (r**5 - 1))
    assert float(s) == pytest.approx(by_hand, rel=1e-5)


def test_one_shot_obs_is_the_block_update_with_every_removal_in_one_block():
    h = _spd(9, seed=7)
    w0 = torch.randn(3, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    keep = torch.ones(3, 9, dtype=torch.bool)
    keep[1, 4] = False  # one entry already off: eliminated first, then the rest chosen at once
    protected = torch.zeros(9, dtype=torch.bool)
    protected[8] = True
    res = obs_prune(w0, h, [5, 4, 6], keep=keep, protected=protected, block_size=9)
    for r in range(3):
        removed = (~res.keep[r]).nonzero().flatten().tolist()
        assert 8 not in removed and len(removed) == [5, 5, 6][r]
        start = w0[r].clone()
        start[~keep[r]] = 0
        best = _constrained_min(start, h, removed)
        torch.testing.assert_close(res.weight[r], best)
        assert float(res.loss[r]) == pytest.approx(_quad(best, start, h), rel=1e-9)
    # the set removed is the one-shot choice: the least w²/(2[H⁻¹]_qq) of the first step
    sal = importance.obs_saliency(w0[0], torch.linalg.inv(h).diagonal())
    sal[8] = float("inf")
    assert sorted((~res.keep[0]).nonzero().flatten().tolist()) == sorted(torch.argsort(sal)[:5].tolist())
