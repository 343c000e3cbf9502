"""Least-squares reconstruction of the layers that lost input channels (He, Zhang & Sun, "Channel
Pruning for Accelerating Very Deep Neural Networks", ICCV 2017).

After channels are removed, each layer ``L`` that consumed them sees fewer inputs. Its weights are
refit so that its outputs in the pruned network match its outputs in the dense one, on sample data:

    ``W', b' = argmin ‖Y − X' W'ᵀ − b'‖²_F + ρ ‖W'‖²_F``

with ``X'`` the inputs of ``L`` in the pruned network (im2col patches for a convolution) and ``Y``
its outputs in the dense network at the kept output channels. Layers are refit in graph order, so
each one sees the inputs its (already refit) predecessors produce — the errors do not pile up.
He et al. choose the channels by a LASSO regression first; here any criterion chooses them and the
least-squares step is theirs. ``ρ = ridge · mean(diag XᵀX)`` keeps the normal equations well posed.
Only ordinary convolutions (``groups = 1``) and Linear layers are refit; others are left as sliced.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ...errors import ConfigError
from .graph import DependencyGraph
from .slicing import kept_positions

log = logging.getLogger(__name__)


def _patches(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Rows of the design matrix: features for a Linear, im2col patches for a Conv2d."""
    if isinstance(m, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    cols = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride)  # (N, C*kh*kw, P)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _targets(m: nn.Module, y: torch.Tensor) -> torch.Tensor:
    if isinstance(m, nn.Linear):
        return y.reshape(-1, y.shape[-1])
    return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])


def _capture(module: nn.Module, what: str, store: list) -> torch.utils.hooks.RemovableHandle:
    def hook(_m: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        store.append((inp[0] if what == "input" else out).detach())

    return module.register_forward_hook(hook)


@torch.no_grad()
def reconstruct_(
    pruned: nn.Module,
    dense: nn.Module,
    graph: DependencyGraph,
    removed: set[int],
    batches: Iterable[tuple[Any, torch.Tensor]],
    ridge: float = 1e-4,
) -> list[str]:
    """Refit, in place, every Linear / Conv2d (``groups = 1``, zero padding) of ``pruned`` whose
    inputs lost channels; ``dense`` is the model before removal (same layer names), ``graph`` the
    dependency graph it was pruned with. Returns the names of the refit layers."""
    from ...task import Inputs

    data = [x if isinstance(x, Inputs) else Inputs.of(x) for x, _ in batches]
    if not data:
        raise ConfigError("data", "reconstruction needs data: the data yielded no batch")
    done = []
    for name, use in graph.layers.items():
        ins = kept_positions(graph, use.in_atoms, removed)
        if len(ins) == len(use.in_atoms):
            continue
        m, ref = pruned.get_submodule(name), dense.get_submodule(name)
        ok = isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"
                                          and not isinstance(m.padding, str))
        if not ok:
            log.info("reconstruction skips %s (%s): only Linear and ordinary Conv2d layers are refit", name, type(m).__name__)
            continue
        outs = torch.tensor(kept_positions(graph, use.out_atoms, removed), dtype=torch.long)
        xs: list[torch.Tensor] = []
        ys: list[torch.Tensor] = []
        h1, h2 = _capture(m, "input", xs), _capture(ref, "output", ys)
        modes = [(mod, mod.training) for mod in list(pruned.modules()) + list(dense.modules())]
        pruned.eval()
        dense.eval()
        xtx = xty = None
        try:
            for x in data:
                xs.clear()
                ys.clear()
                x.call(pruned)
                x.call(dense)
                X = _patches(m, xs[0]).double()
                Y = _targets(ref, ys[0]).double().index_select(1, outs.to(ys[0].device))
                X = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype, device=X.device)], 1)
                xtx = X.T @ X if xtx is None else xtx + X.T @ X
                xty = X.T @ Y if xty is None else xty + X.T @ Y
        finally:
            h1.remove()
            h2.remove()
            for mod, mode in modes:
                mod.training = mode
        reg = ridge * float(xtx.diagonal()[:-1].mean().clamp_min(1e-12))
        eye = torch.eye(xtx.shape[0], dtype=xtx.dtype, device=xtx.device)
        eye[-1, -1] = 0  # the bias is not penalised
        sol = torch.linalg.solve(xtx + reg * eye, xty)  # (features + 1, outputs)
        w, b = sol[:-1].T, sol[-1]
        m.weight.copy_(w.reshape(m.weight.shape).to(m.weight.dtype))
        if m.bias is not None:
            m.bias.copy_(b.to(m.bias.dtype))
        else:  # no bias to absorb the mean: refit without it
            sol = torch.linalg.solve(xtx[:-1, :-1] + reg * torch.eye(xtx.shape[0] - 1, dtype=xtx.dtype, device=xtx.device), xty[:-1])
            m.weight.copy_(sol.T.reshape(m.weight.shape).to(m.weight.dtype))
        done.append(name)
    return done


__all__ = ["reconstruct_"]
