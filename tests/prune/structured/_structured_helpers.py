"""Shared helpers: build a graph, prune half of every group by L1, compare the zeroed and the sliced twin."""

from __future__ import annotations

import copy

import torch
from torch import nn

from netshrink.prune.structured import (
    ChannelConfig,
    DependencyGraph,
    l1_scores,
    plan_removal,
    remove_channels,
    zero_channels,
)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so a wrong slice shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model


def twins(model: nn.Module, x: torch.Tensor, ratio: float = 0.5, **graph_kw):
    """(graph, zeroed twin, pruned twin, removed classes, max |zeroed(x) - pruned(x)|)."""
    model.eval()
    graph = DependencyGraph.build(model, (x[:1],), **graph_kw)
    removed = plan_removal(graph, l1_scores(model, graph), ChannelConfig(ratio=ratio))
    zeroed, pruned = copy.deepcopy(model), copy.deepcopy(model)
    zero_channels(zeroed, graph, removed)
    remove_channels(pruned, graph, removed)
    with torch.no_grad():
        diff = (zeroed(x) - pruned(x)).abs().max().item()
    return graph, zeroed, pruned, removed, diff


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())
