"""Structured pruning: a torch.fx channel dependency graph, criteria, and physical removal of channels."""

from __future__ import annotations

from .channel import ChannelConfig, ChannelResult, bn_scores, channel_prune, l1_scores, plan_removal, structured_prune_, taylor_scores
from .graph import ChannelGroup, DependencyGraph, trace
from .slicing import remove_channels, zero_channels

__all__ = ["ChannelConfig", "ChannelResult", "channel_prune", "structured_prune_", "l1_scores", "bn_scores", "taylor_scores",
           "plan_removal", "DependencyGraph", "ChannelGroup", "trace", "remove_channels", "zero_channels"]

from .reconstruct import reconstruct_
from .ssl import group_lasso, group_norms, slimming_regularizer, ssl_regularizer

__all__ += ["reconstruct_", "group_lasso", "group_norms", "ssl_regularizer", "slimming_regularizer"]
