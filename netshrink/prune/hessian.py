"""Second-order pruning: Optimal Brain Damage and layer-wise Optimal Brain Surgeon.

**Optimal Brain Damage** (LeCun, Denker & Solla, NeurIPS 1989). Around a trained minimum the loss is
locally quadratic, ``δE ≈ ½ δwᵀ H δw``; with the off-diagonal terms of ``H`` neglected, setting
``w_k`` to zero raises the loss by the saliency ``s_k = ½ h_kk w_k²``. The diagonal ``h_kk`` comes
from one of (``ObdConfig.hessian``):

- ``exact``: ``∂²E/∂w_k²`` by double back-propagation (one Hessian-vector product per weight,
  batched; for small layers);
- ``fisher``: the empirical Fisher ``mean_n (∂ℓ_n/∂w_k)²``, from per-sample gradients;
- ``gauss_newton``: the same with targets drawn from the model's own predictive distribution (a
  class from ``softmax(f)`` at every position, or ``f + ε`` with ``ε ~ N(0, I)`` for ``mse`` / a
  regression task) — an unbiased estimate
  of the Gauss–Newton diagonal ``diag(Jᵀ ∇²ℓ J)`` that OBD itself uses (Martens, "New insights and
  perspectives on the natural gradient method", JMLR 2020);
- ``hutchinson``: ``E_z[z ⊙ Hz]`` with Rademacher ``z`` (Bekas, Kokiopoulou & Saad, "An estimator
  for the diagonal of a matrix", 2007; Hutchinson 1990), seeded.

**Optimal Brain Surgeon** (Hassibi & Stork, NeurIPS 1993), in the layer-wise form of Dong, Chen & Pan
("Learning to Prune Deep Neural Networks via Layer-wise Optimal Brain Surgeon", NeurIPS 2017): a
Linear layer's error ``½ mean_n ‖(W − Ŵ) x_n‖²`` has, for each output row, the Hessian
``H = XᵀX/n + λI`` (``X`` the layer's inputs, a column of ones for the bias, ``λ`` a damping). The
weight ``q`` of least saliency ``w_q² / (2[H⁻¹]_qq)`` is removed and the rest of the row compensates,
``δw = −(w_q/[H⁻¹]_qq) H⁻¹e_q``; ``H⁻¹`` is then downdated to the surviving weights,
``H⁻¹ ← H⁻¹ − H⁻¹e_q e_qᵀH⁻¹/[H⁻¹]_qq``, and the step repeats (greedy, one weight or a block at a time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .._layers import select_layers
from .._registry import handler, register
from ..config import check_range
from ..errors import ConfigError, ModelError
from ..task import DEFAULT_TASK, IGNORE_INDEX, Inputs, Task, resolve_task
from . import importance
from ._mask import apply_mask, get_mask
from ._select import global_masks, layer_masks
from ._criteria import (
    DataConfig,
    LossName,
    apply_scores,
    at_least,
    device_of,
    eval_mode,
    is_regression,
    iter_batches,
    leaf,
    loss_fn,
    masked,
    raw_loss,
    requiring_grad,
    result,
    sparsities,
    train_source,
)
from .magnitude import PruneResult

HessianMode = Literal["exact", "fisher", "gauss_newton", "hutchinson"]

# --------------------------------------------------------------------------- Hessian diagonals


def hessian_diagonal_exact(
    loss: torch.Tensor, params: Sequence[torch.Tensor], chunk: int = 64, batched: bool = True
) -> list[torch.Tensor]:
    """``diag ∂²loss/∂p²`` of each tensor in ``params``, exactly, by double back-propagation.

    ``loss`` must have been computed from ``params`` with autograd on. Row ``k`` of the Hessian is
    ``∂(∂loss/∂p)_k/∂p``: one backward pass per weight, or, with ``batched``, ``chunk`` rows per
    vmapped pass (much faster through Linear layers; torch's batching of the double backward of a
    convolution is slower than the plain loop). Cross-tensor blocks are not formed. For small layers.
    """
    grads = torch.autograd.grad(loss, list(params), create_graph=True, allow_unused=True)
    out = []
    for p, g in zip(params, grads):
        diag = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
        if g is not None and g.requires_grad:
            flat, n = g.reshape(-1), p.numel()
            if not batched:
                for k in range(n):
                    (row,) = torch.autograd.grad(flat[k], p, retain_graph=True, allow_unused=True)
                    if row is not None:
                        diag[k] = row.reshape(-1)[k]
                out.append(diag.reshape(p.shape))
                continue
            for start in range(0, n, chunk):
                idx = torch.arange(start, min(n, start + chunk), device=p.device)
                rows = torch.arange(idx.numel(), device=p.device)
                probe = torch.zeros(idx.numel(), n, dtype=p.dtype, device=p.device)
                probe[rows, idx] = 1.0
                (hv,) = torch.autograd.grad(flat, p, probe, retain_graph=True, is_grads_batched=True, allow_unused=True)
                if hv is not None:
                    diag[idx] = hv.reshape(idx.numel(), n)[rows, idx]
        out.append(diag.reshape(p.shape))
    return out


def rademacher(shape: Sequence[int], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Entries ±1 with probability ½ each, drawn on the CPU from ``generator`` (device-independent)."""
    z = torch.randint(0, 2, tuple(shape), generator=generator).to(like.dtype) * 2 - 1
    return z.to(like.device)


def hessian_diagonal_hutchinson(
    loss: torch.Tensor, params: Sequence[torch.Tensor], probes: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """Hutchinson's estimate ``(1/m) Σ_i z_i ⊙ H z_i`` of the Hessian diagonal, ``z_i`` Rademacher
    over all of ``params`` jointly (so cross-tensor blocks add variance but no bias): ``E[z ⊙ Hz] =
    diag H`` because ``E[z_j z_k] = δ_jk``. One batched Hessian-vector product for ``probes`` probes."""
    params = list(params)
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    zs = [rademacher((probes, *p.shape), generator, p) for p in params]
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    out = [torch.zeros_like(p) for p in params]
    if not live:
        return out
    flat = torch.cat([grads[i].reshape(-1) for i in live])
    vecs = torch.cat([zs[i].reshape(probes, -1) for i in live], dim=1)
    hz = torch.autograd.grad(flat, params, vecs, is_grads_batched=True, allow_unused=True)
    for i, (p, h) in enumerate(zip(params, hz)):
        if h is not None:
            out[i] = (zs[i] * h).mean(0)
    return out


def _sample(value: Any, i: int) -> Any:
    return value[i : i + 1] if isinstance(value, torch.Tensor) and value.dim() > 0 else value


def _draw_targets(out: torch.Tensor, target: Any, regression: bool, gen: torch.Generator) -> torch.Tensor:
    """Targets drawn from the model's predictive distribution: ``f + ε``, ``ε ~ N(0, I)`` for a
    regression; else a class from ``softmax(f)`` over the last axis at every position (positions the
    true target ignores stay ignored)."""
    if regression:
        return out + torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)
    probs = torch.softmax(out.float().reshape(-1, out.shape[-1]), dim=-1).cpu()
    drawn = torch.multinomial(probs, 1, generator=gen).reshape(out.shape[:-1]).to(out.device)
    if isinstance(target, torch.Tensor) and target.shape == drawn.shape:
        drawn = torch.where(target == IGNORE_INDEX, target, drawn)
    return drawn


def fisher_diagonal(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    x: Inputs | torch.Tensor,
    y: Any,
    loss: LossName | None = "cross_entropy",
    sampled: bool = False,
    generator: torch.Generator | None = None,
    task: Task | None = None,
) -> dict[str, torch.Tensor]:
    """``Σ_n (∂ℓ_n/∂p)²`` over the samples of a batch, for the named parameters ``params`` of ``model``
    (names as in ``model.named_parameters()``); divide by the batch size for the mean. ``x``: the
    batch's inputs (a tensor or :class:`~netshrink.task.Inputs`); ``ℓ_n`` the criterion's loss
    (:func:`~netshrink.prune._criteria.loss_fn`: the task's when ``loss`` is None) of sample ``n``
    (a whole sequence of a language model).

    ``sampled=False``: the empirical Fisher, with the true targets ``y``. ``sampled=True``: targets
    drawn from the model (a class from ``softmax(f(x))``; ``f(x) + ε``, ``ε ~ N(0, I)`` for a
    regression) with ``generator`` — the true Fisher, whose expectation is the Gauss–Newton diagonal.
    Per-sample gradients come from ``torch.func`` (``vmap`` of ``grad``); a sample-by-sample loop if
    that fails.
    """
    task = task or DEFAULT_TASK
    inputs = Inputs.of(x)
    lossf = loss_fn(loss, task)
    inner = raw_loss(loss, task)
    with torch.no_grad():
        out = task.forward(model, inputs)
        if sampled:
            gen = generator if generator is not None else torch.Generator().manual_seed(0)
            y = _draw_targets(out, y, is_regression(loss, task), gen)
        lossf(out, y)  # the batch's loss once, checked: a loss that is not a scalar is one clear error
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in params}
    chosen = {n: p.detach() for n, p in params.items()}

    def one(ps: dict[str, torch.Tensor], args: tuple, kwargs: dict, yi: torch.Tensor) -> torch.Tensor:
        a = tuple(t.unsqueeze(0) for t in args)
        k = {n: t.unsqueeze(0) for n, t in kwargs.items()}
        out = task.output(torch.func.functional_call(model, {**fixed, **ps}, a, k))
        return inner(out, yi.unsqueeze(0))

    try:
        if not all(isinstance(t, torch.Tensor) for t in (*inputs.args, *inputs.kwargs.values(), y)):
            raise ValueError("non-tensor inputs: no vmap")
        per = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0, 0))(chosen, tuple(inputs.args), dict(inputs.kwargs), y)
        return {n: g.pow(2).sum(0) for n, g in per.items()}
    except (RuntimeError, NotImplementedError, ValueError):  # an op without a batching rule
        sums = {n: torch.zeros_like(p) for n, p in chosen.items()}
        names = list(params)
        with requiring_grad([params[n] for n in names]):
            for i in range(inputs.batch_size):
                xi = Inputs(tuple(_sample(a, i) for a in inputs.args), {k: _sample(v, i) for k, v in inputs.kwargs.items()})
                li = lossf(task.forward(model, xi), _sample(y, i))
                gs = torch.autograd.grad(li, [params[n] for n in names], allow_unused=True)
                for n, g in zip(names, gs):
                    if g is not None:
                        sums[n] += g.detach().pow(2)
        return sums


def hessian_diagonal(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: Iterable[tuple[Inputs | torch.Tensor, Any]],
    mode: HessianMode = "fisher",
    loss: LossName | None = None,
    probes: int = 8,
    seed: int = 0,
    task: Task | None = None,
) -> dict[str, torch.Tensor]:
    """The Hessian diagonal of the batch-mean loss (the task's, classification when None, unless
    ``loss`` names one) for the ``weight`` of each layer in ``layers``, averaged over ``batches``
    ``(inputs, target)``, by ``mode`` (see the module docstring). Computed in eval mode; a masked
    entry gets 0 (the loss does not depend on it)."""
    task = task or DEFAULT_TASK
    leaves = {n: leaf(m) for n, m in layers.items()}
    by_param = {id(p): pn for pn, p in model.named_parameters()}
    pnames = {n: by_param[id(p)] for n, p in leaves.items()}
    gen = torch.Generator().manual_seed(seed)
    lossf = loss_fn(loss, task)
    sums = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in leaves.items()}
    count = 0
    with eval_mode(model), requiring_grad(list(leaves.values())):
        for x, y in batches:
            x = Inputs.of(x)
            names = list(leaves)
            if mode in ("fisher", "gauss_newton"):
                sq = fisher_diagonal(model, {pnames[n]: leaves[n] for n in names}, x, y, loss, mode == "gauss_newton", gen, task)
                diag = [sq[pnames[n]] / x.batch_size for n in names]
            elif mode == "exact":
                batched = not any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
                diag = hessian_diagonal_exact(lossf(task.forward(model, x), y), [leaves[n] for n in names], batched=batched)
            else:
                diag = hessian_diagonal_hutchinson(lossf(task.forward(model, x), y), [leaves[n] for n in names], probes, gen)
            for n, d in zip(names, diag):
                sums[n] += d.detach().to(torch.float64)
            count += 1
    if count == 0:
        raise ConfigError("data", "the data yielded no batch")
    return {n: (s / count).to(leaves[n].dtype) for n, s in sums.items()}


# ----------------------------------------------------------------------------------------- OBD


@register("obd", family="prune")
@dataclass
class ObdConfig(DataConfig):
    """Optimal Brain Damage: remove the weights of least ½ h_kk w_k² (LeCun et al. 1989)."""

    hessian: HessianMode = "fisher"
    loss: LossName | None = None  # None: the task's loss
    probes: int = 8

    def validate(self) -> None:
        super().validate()
        at_least("probes", self.probes, 1)


@handler(ObdConfig)
def obd_prune(model: nn.Module, config: ObdConfig, data=None, task: Task | None = None) -> PruneResult:
    """Score the chosen layers by OBD saliency on ``config.batches`` batches of ``data`` (read through
    ``task``, whose loss is differentiated; classification when None) and mask them."""
    task = resolve_task(task)
    source = train_source(data, "obd")
    layers = select_layers(model, config.layers)
    batches = iter_batches(source, config.batches, config.batch_size, config.seed, device_of(model), task)
    h = hessian_diagonal(model, layers, batches, config.hessian, config.loss, config.probes, config.seed, task)
    scores = {n: masked(importance.obd_saliency(m.weight, h[n]), m) for n, m in layers.items()}
    return apply_scores(layers, scores, config)


# ----------------------------------------------------------------------------------------- OBS


@dataclass
class ObsRows:
    """Result of :func:`obs_prune`: the compensated ``weight`` (removed entries exactly 0), the boolean
    ``keep`` mask, and per row the estimated rise of the quadratic error ``½ δwᵀ H δw`` (``loss``;
    exact for a quadratic error, since every greedy step is optimal given the previous ones)."""

    weight: torch.Tensor
    keep: torch.Tensor
    loss: torch.Tensor


def _eliminate(hinv: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``H⁻¹`` of the weights that survive removing the indices ``q``: the Schur-complement downdate
    ``H⁻¹ − H⁻¹[:, q] (H⁻¹[q, q])⁻¹ H⁻¹[q, :]``, in place; rows/columns ``q`` become 0."""
    cols = hinv[:, q]  # a copy (advanced indexing)
    hinv.addmm_(cols, torch.linalg.solve(cols[q], cols.T), alpha=-1.0)  # H⁻¹ is symmetric: rows q = cols qᵀ
    hinv[q, :] = 0.0
    hinv[:, q] = 0.0
    return hinv


def _obs_one_block(
    w: torch.Tensor, h: torch.Tensor, hinv: torch.Tensor, alive: torch.Tensor, guard: torch.Tensor, left: int
) -> float:
    """Remove the ``left`` alive, unguarded weights of least ``w_q²/(2[H⁻¹]_qq)`` from the row ``w`` at
    once (``hinv``: the inverse Hessian of the alive weights) and compensate the kept set ``S`` jointly:
    ``w_S ← w_S + H_SS⁻¹ H_SQ w_Q`` — the constrained minimiser of ``½ δwᵀ H δw`` with ``w_Q = 0``,
    the same as the block update ``δw = −H⁻¹[:, Q](H⁻¹[Q, Q])⁻¹ w_Q`` but solved on ``|S|`` weights
    instead of ``|Q|``. Updates ``w`` and ``alive`` in place; returns ``½ δwᵀ H δw``."""
    eligible = alive & ~guard
    b = min(left, int(eligible.sum()))
    if b == 0:
        return 0.0
    sal = w.pow(2) / (2.0 * hinv.diagonal())
    sal[~eligible] = float("inf")
    q = torch.topk(sal, b, largest=False).indices
    before = w.clone()
    alive[q] = False
    kept = alive.nonzero().flatten()
    if kept.numel():
        rhs = h[kept][:, q] @ w[q]
        w[kept] += torch.linalg.solve(h[kept][:, kept], rhs)
    w[~alive] = 0.0
    dw = w - before
    return float(0.5 * dw @ h @ dw)


def obs_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    remove: Sequence[int] | torch.Tensor,
    keep: torch.Tensor | None = None,
    protected: torch.Tensor | None = None,
    block_size: int = 1,
) -> ObsRows:
    """Greedy Optimal Brain Surgeon on each row of ``weight`` (``(rows, d)``) with the shared
    positive-definite ``hessian`` (``(d, d)``, damping already added).

    Row ``r`` loses ``remove[r]`` more weights besides those already off in ``keep`` (which are
    eliminated first: they stay 0 and take no part in the compensation). Each step removes the
    ``b = min(block_size, left)`` weights ``Q`` of least OBS saliency ``w_q²/(2[H⁻¹]_qq)``, moves the
    survivors by ``δw = −H⁻¹[:, Q] (H⁻¹[Q, Q])⁻¹ w_Q`` (for ``b = 1`` exactly Hassibi & Stork's
    update), adds ``½ w_Qᵀ (H⁻¹[Q, Q])⁻¹ w_Q`` to the row's loss, and downdates ``H⁻¹``. Columns set
    in ``protected`` (a bias) are never removed but do compensate. Cost per row: ``O(remove[r]/b · d²)``
    plus the elimination of the entries already off; computed in float64 on ``hessian``'s device.
    When ``block_size`` covers a row's whole removal (one-shot OBS: the set chosen at once by the
    saliencies of the first step), the joint compensation is solved on the kept weights instead,
    ``O(|kept|³)`` per row — the fast choice at high sparsity.
    """
    dev = hessian.device
    w_all = weight.detach().to(dev, torch.float64).clone()
    rows, d = w_all.shape
    hessian_f64 = hessian.detach().to(dev, torch.float64)
    hinv0 = torch.cholesky_inverse(torch.linalg.cholesky(hessian_f64))
    keep_all = torch.ones(rows, d, dtype=torch.bool, device=dev) if keep is None else keep.detach().to(dev, torch.bool).clone()
    guard = torch.zeros(d, dtype=torch.bool, device=dev) if protected is None else protected.detach().to(dev, torch.bool)
    losses = torch.zeros(rows, dtype=torch.float64, device=dev)
    for r in range(rows):
        w, alive = w_all[r], keep_all[r]
        dead = (~alive).nonzero().flatten()
        left = int(remove[r])
        hinv = hinv0 if (left > 0 and block_size >= left and not dead.numel()) else hinv0.clone()  # read-only when shared
        if dead.numel():
            hinv = _eliminate(hinv, dead)
            w[dead] = 0.0
        if left > 0 and block_size >= left:  # one block holds every removal: solve on the kept weights
            losses[r] = _obs_one_block(w, hessian_f64, hinv, alive, guard, left)
            continue
        while left > 0:
            eligible = alive & ~guard
            b = min(block_size, left, int(eligible.sum()))
            if b == 0:
                break
            sal = w.pow(2) / (2.0 * hinv.diagonal())
            sal[~eligible] = float("inf")
            q = torch.topk(sal, b, largest=False).indices
            if b == 1:  # Hassibi & Stork's update and an in-place rank-1 downdate (H⁻¹ is symmetric)
                k = int(q[0])
                pivot = float(hinv[k, k])
                col = hinv[:, k].clone()
                losses[r] += 0.5 * float(w[k]) ** 2 / pivot
                w -= (float(w[k]) / pivot) * col
                hinv.addr_(col, col, alpha=-1.0 / pivot)
                hinv[k, :] = 0.0
                hinv[:, k] = 0.0
            else:
                coef = torch.linalg.solve(hinv[q][:, q], w[q])
                losses[r] += 0.5 * torch.dot(w[q], coef)
                w -= hinv[:, q] @ coef
                hinv = _eliminate(hinv, q)
            alive[q] = False
            w[~alive] = 0.0
            left -= b
    return ObsRows(w_all.to(weight.dtype), keep_all, losses)


@register("obs", family="prune")
@dataclass
class ObsConfig(DataConfig):
    """Layer-wise Optimal Brain Surgeon: remove w_q²/(2[H⁻¹]_qq)-least weights and compensate (Hassibi & Stork 1993).

    ``damping``: ``λ = damping · mean diag(XᵀX/n)`` is added to the layer Hessian. ``block_size``:
    weights removed per step — 1 is the exact greedy OBS; larger blocks (e.g. 16 for layers of
    hundreds of inputs) are many times faster, each block's joint compensation still optimal. A block
    at least as large as a row's removal count prunes one-shot (one solve on the kept weights per row).
    """

    damping: float = 0.01
    block_size: int = 1

    def validate(self) -> None:
        super().validate()
        check_range("damping", self.damping, 0.0, float("inf"), lo_open=True, hi_open=True)
        at_least("block_size", self.block_size, 1)


def _layer_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The inputs of ``module`` as rows of ``X`` (one per output position): ``(positions, fan_in)``."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _check_obs_layer(name: str, m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        return
    if isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str):
        return
    raise ModelError(f"obs: layer {name!r} ({type(m).__name__}) is not a Linear or a plain Conv2d (groups 1, zero padding)")


@torch.no_grad()
def layer_hessians(
    model: nn.Module, layers: dict[str, nn.Module], batches: Iterable[tuple[Inputs | torch.Tensor, Any]]
) -> dict[str, torch.Tensor]:
    """``XᵀX/n`` of each layer's inputs ``X`` (a column of ones appended for a layer with a bias),
    gathered with forward pre-hooks over ``batches`` ``(inputs, target)`` in eval mode; float64. Only
    the inputs are used: the layer-wise objective needs no target, so any task's batches serve."""
    acc: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}

    def hook_for(name: str, m: nn.Module):
        def hook(_mod: nn.Module, args: tuple) -> None:
            x = _layer_inputs(m, args[0].detach()).to(torch.float64)
            if m.bias is not None:
                x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
            acc[name] = acc.get(name, 0) + x.T @ x
            count[name] = count.get(name, 0) + x.shape[0]

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n, m)) for n, m in layers.items()]
    try:
        with eval_mode(model):
            for x, _y in batches:
                Inputs.of(x).call(model)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in layers if n not in acc]
    if missing:
        raise ConfigError("data", f"the data yielded no batch, or layer {missing[0]!r} was never called")
    return {n: acc[n] / count[n] for n in layers}


@handler(ObsConfig)
@torch.no_grad()
def obs_prune_model(model: nn.Module, config: ObsConfig, data=None, task: Task | None = None) -> PruneResult:
    """Layer-wise OBS on the chosen layers. How many weights each row loses comes from the one-shot
    OBS saliency of the whole layer (or of all layers, for ``scope: global``); which ones, and the
    compensation of the others, from :func:`obs_prune`. The compensated weights (and biases) are
    written back and the removed ones masked."""
    source = train_source(data, "obs")
    layers = select_layers(model, config.layers)
    for n, m in layers.items():
        _check_obs_layer(n, m)
    batches = iter_batches(source, config.batches, config.batch_size, config.seed, device_of(model), resolve_task(task))
    hessians = layer_hessians(model, layers, batches)
    mats, keeps, scores = {}, {}, {}
    for n, m in layers.items():
        h = hessians[n]
        lam = config.damping * float(h.diagonal().mean().clamp_min(1e-12))
        hessians[n] = h = h + lam * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
        fan_in = m.weight[0].numel()
        w = m.weight.detach().reshape(m.weight.shape[0], -1)
        mask = get_mask(m)
        keep = torch.ones_like(w, dtype=torch.bool) if mask is None else mask.reshape(w.shape).clone()
        if m.bias is not None:
            bias_mask = get_mask(m, "bias")
            w = torch.cat([w, m.bias.detach()[:, None]], dim=1)
            bias_keep = torch.ones(w.shape[0], 1, dtype=torch.bool, device=w.device) if bias_mask is None else bias_mask[:, None]
            keep = torch.cat([keep, bias_keep], dim=1)
        mats[n], keeps[n] = w, keep
        hinv_diag = torch.cholesky_inverse(torch.linalg.cholesky(h)).diagonal()[:fan_in]
        sal = importance.obs_saliency(w[:, :fan_in].to(torch.float64), hinv_diag[None, :])
        scores[n] = masked(sal.reshape(m.weight.shape), m)
    if config.scope == "global":
        chosen = global_masks(scores, float(config.sparsity))
    else:
        chosen = layer_masks(scores, sparsities(layers, config))
    for n, m in layers.items():
        fan_in = m.weight[0].numel()
        target = chosen[n].reshape(m.weight.shape[0], -1)
        dead_now = (~keeps[n][:, :fan_in]).sum(1)
        remove = ((~target).sum(1) - dead_now).clamp_min(0)
        protected = torch.zeros(mats[n].shape[1], dtype=torch.bool)
        protected[fan_in:] = True
        res = obs_prune(mats[n], hessians[n], remove.tolist(), keeps[n], protected, config.block_size)
        new_w = res.weight.to(m.weight.device, m.weight.dtype)
        leaf(m).copy_(new_w[:, :fan_in].reshape(m.weight.shape))
        if m.bias is not None:
            leaf(m, "bias").copy_(new_w[:, fan_in])
        apply_mask(m, res.keep[:, :fan_in].reshape(m.weight.shape).to(m.weight.device))
    return result(layers)


__all__ = [
    "HessianMode",
    "hessian_diagonal",
    "hessian_diagonal_exact",
    "hessian_diagonal_hutchinson",
    "fisher_diagonal",
    "ObdConfig",
    "obd_prune",
    "ObsRows",
    "obs_prune",
    "ObsConfig",
    "obs_prune_model",
    "layer_hessians",
]
