"""Structured pruning: a torch.fx channel dependency graph, criteria, and physical removal of channels.

``prune_(model, ChannelConfig(ratio=0.5, criterion="l1"), data=...)`` (recipe method ``channel``)
removes whole channels and returns the same model object with smaller plain layers (no masks); the
resized layers are recorded as edits so a zoo model packs to .nsk and loads back.

What the dependency graph handles (each row has a test in ``tests/prune/structured/``):

| module / op                                             | handling                                         | test |
|---------------------------------------------------------|--------------------------------------------------|------|
| Conv1d/2d/3d, Linear                                    | produce channels; inputs sliced                  | every zoo model |
| BatchNorm1d/2d/3d, PReLU(C)                             | per channel, sliced                              | zoo (resnet_small, vgg_small, mobilenet_small) |
| residual add / sub / mul of tracked tensors             | members share one channel set                    | zoo (resnet_small, resnet50), ``test_module_called_twice...`` |
| ``torch.cat`` on the channel dim                        | index offsets                                    | ``test_concat_offsets``, zoo ``mlp_concat`` |
| ``chunk``, ``split`` with a computed size               | pieces pruned alike                              | ``test_chunk_and_equal_split...`` |
| ``split`` with literal sizes                            | left unpruned, logged                            | ``test_split_with_fixed_sizes...`` |
| ``flatten`` / ``view`` / ``reshape`` (-1 or x.size())   | per-channel blocks of features (flatten->linear) | ``test_flatten_to_linear...``, zoo lenet5, vgg_small |
| ``view`` / ``reshape`` with a literal size              | left unpruned, logged                            | ``test_hard_coded_view_size...`` |
| ``permute`` / ``transpose`` / ``unsqueeze`` / ``squeeze``| tracked dimension moves                          | ``test_permute_and_linear_over_channels`` |
| functional activations, pooling, ``interpolate``, pad   | pass through                                     | ``test_functional_activations...`` |
| grouped conv                                            | channel i of every group pruned alike            | ``test_grouped_and_depthwise...`` |
| depthwise conv (any multiplier)                         | output tied to its input channel                 | ``test_grouped_and_depthwise...``, zoo mobilenet_small |
| ConvTranspose (groups 1)                                | in and out sliced                                | ``test_transposed_convolution...`` |
| LayerNorm over the channels                             | exact mode: left unpruned, logged; ``approximate_layernorm``: sliced | ``test_layernorm_pruned_only...`` |
| softmax / mean / sum over the channels, per-channel constants | channels pinned                            | ``test_a_per_channel_parameter...`` |
| nn.MultiheadAttention (batch_first or not, kdim/vdim)    | head-wise: q/k/v rows and out_proj columns of removed heads; becomes a ``HeadAttention``; input and output features sliced like a Linear's | ``test_attention.py``: ``test_multihead_attention_pruned_head_wise...``, ``test_cross_attention...``, zoo vit_tiny |
| ``GroupedQueryAttention`` block (zoo, ``vit_tiny(kv_heads=...)``) | head-wise, groups kept consistent: ``gqa_heads: kv`` removes a key/value head with its query heads, ``query`` the same query heads of every group | ``test_grouped_query_attention_keeps_the_groups_consistent`` |
| MHA whose attention weights are used, or with a 3-D (per-head) ``attn_mask`` | heads left unpruned, logged; features still sliced | ``test_used_weights_or_a_per_head_mask...`` |
| MHA with ``add_bias_kv`` / ``add_zero_attn``            | left unpruned with a message; ``strict`` raises naming op and module | ``test_add_bias_kv_is_left_unpruned...``, ``test_unsupported_op_in_strict_mode...`` |
| attention written with raw view / matmul / softmax ops  | left unpruned with a message; ``strict`` raises naming op and module | ``test_attention_written_with_raw_ops...``, ``test_unsupported_op_in_strict_mode...`` |
| a model torch.fx cannot trace                           | ModelError naming the failing module             | ``test_untraceable_model...``, ``test_untraceable_zoo_language_models...`` |
| ``transformers`` models (GPT-2, Llama/GQA, BERT, ViT)     | not traced: blocks recognized by structure (:mod:`.hf`); heads and MLP units removed, module attributes and config updated, ``generate`` still runs | ``test_hf.py`` |

Attention is pruned head-wise (:mod:`.attention`): every head of an ``nn.MultiheadAttention``,
``HeadAttention`` or ``GroupedQueryAttention`` is a class scored by the criterion over its q/k/v rows
and output columns; ``head_ratio`` (default ``ratio``) of each layer's heads are removed, at least one
head is kept, and removing every head is a :class:`ModelError`. Attention written with raw tensor ops
in a user's own module is not recognized and stays unpruned.
"""

from __future__ import annotations

from .channel import (
           ChannelConfig,
           ChannelResult,
           bn_scores,
           channel_prune,
           l1_scores,
           plan_removal,
           structured_prune_,
           taylor_scores,
)
from .attention import GroupedQueryAttention, HeadAttention
from .graph import ChannelGroup, DependencyGraph, trace
from .slicing import remove_channels, zero_channels

__all__ = [
           "ChannelConfig",
           "ChannelGroup",
           "ChannelResult",
           "DependencyGraph",
           "GroupedQueryAttention",
           "HeadAttention",
           "bn_scores",
           "channel_prune",
           "l1_scores",
           "plan_removal",
           "remove_channels",
           "structured_prune_",
           "taylor_scores",
           "trace",
           "zero_channels",
]

from .reconstruct import reconstruct_
from .ssl import group_lasso, group_norms, slimming_regularizer, ssl_regularizer

__all__ += ["group_lasso", "group_norms", "reconstruct_", "slimming_regularizer", "ssl_regularizer"]
from .auto import AutoChannelConfig, AutoChannelResult, auto_channel_prune

__all__ += ["AutoChannelConfig", "AutoChannelResult", "auto_channel_prune"]
from .hf import apply_pruned_shapes, prune_hf

__all__ += ["apply_pruned_shapes", "prune_hf"]
