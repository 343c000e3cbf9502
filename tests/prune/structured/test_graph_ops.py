"""One test per op kind the channel dependency graph handles (issue 3, part 7), and the ops it refuses.

Each model is pruned by half of every group; the pruned model must compute exactly what its zeroed
twin computes, and the layers named must really have shrunk.
"""

from __future__ import annotations

import logging

import pytest
import torch
from _structured_helpers import twins
from torch import nn
from torch.nn import functional as F

from netshrink.errors import ModelError
from netshrink.prune.structured import DependencyGraph

torch.manual_seed(0)


def img(n: int = 3, c: int = 3, side: int = 8) -> torch.Tensor:
    return torch.randn(n, c, side, side, generator=torch.Generator().manual_seed(1))


def assert_twin(model: nn.Module, x: torch.Tensor, shrunk: dict[str, tuple[str, int]], **kw):
    graph, _, pruned, removed, diff = twins(model, x, **kw)
    assert removed, "nothing was pruned"
    assert diff <= 1e-5
    for name, (attr, size) in shrunk.items():
        assert getattr(pruned.get_submodule(name), attr) == size, name
    return graph, pruned


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(12, 6, 1)

    def forward(self, x):
        return self.head(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)).mean((2, 3))


def test_concat_offsets():
    g, _ = assert_twin(Concat(), img(), {"a": ("out_channels", 4), "b": ("out_channels", 2), "head": ("in_channels", 6)})
    assert {grp.producers for grp in g.groups} == {("a",), ("b",)}


class Chunk(nn.Module):
    def __init__(self, split: bool = False, sizes=None):
        super().__init__()
        self.split, self.sizes = split, sizes
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(4 if not isinstance(sizes, list) else sizes[0], 5, 1)

    def forward(self, x):
        y = self.conv(x)
        if self.sizes is not None:
            a, b = torch.split(y, self.sizes, dim=1)
            return self.head(F.relu(a)).sum((2, 3)) + b.sum()
        a, b = y.split(y.size(1) // 2, dim=1) if self.split else y.chunk(2, dim=1)
        return self.head(F.relu(a) * torch.sigmoid(b)).amax((2, 3))


@pytest.mark.parametrize("split", [False, True])
def test_chunk_and_equal_split_prune_the_pieces_alike(split):
    # 8 channels in two tied pieces of 4: 4 classes, half removed -> 2 per piece
    g, _ = assert_twin(Chunk(split), img(), {"conv": ("out_channels", 4), "head": ("in_channels", 2)})
    assert [grp.size for grp in g.groups if grp.producers == ("conv",)] == [4]


@pytest.mark.parametrize("sizes", [[5, 3], 4])
def test_split_with_fixed_sizes_is_left_unpruned_with_a_message(sizes, caplog):
    with caplog.at_level(logging.WARNING):
        g = DependencyGraph.build(Chunk(sizes=sizes).eval(), (img(1),))
    assert not [grp for grp in g.groups if "conv" in grp.producers]
    assert any("fixed sizes" in m for m in g.messages) and "fixed sizes" in caplog.text


class Flat(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 6, 3)
        self.fc = nn.Linear(6 * 6 * 6, 4)

    def forward(self, x):
        y = F.relu(self.conv(x))
        if self.how == "view":
            y = y.view(y.size(0), -1)
        elif self.how == "reshape":
            y = y.reshape(y.shape[0], -1)
        elif self.how == "flatten":
            y = torch.flatten(y, 1)
        else:
            y = y.view(-1, 216)  # a hard-coded size: cannot follow a pruned conv
        return self.fc(y)


@pytest.mark.parametrize("how", ["view", "reshape", "flatten"])
def test_flatten_to_linear_removes_blocks_of_features(how):
    assert_twin(Flat(how), img(), {"conv": ("out_channels", 3), "fc": ("in_features", 3 * 36)})


def test_hard_coded_view_size_is_left_unpruned_with_a_message():
    g = DependencyGraph.build(Flat("literal").eval(), (img(1),))
    assert not [grp for grp in g.groups if "conv" in grp.producers]
    assert any("hard-coded size 216" in m for m in g.messages)


class ChannelsLast(nn.Module):
    """conv -> permute to NHWC -> Linear over channels -> LayerNorm -> permute back -> conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.mix = nn.Linear(8, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = F.gelu(self.conv(x)).permute(0, 2, 3, 1)
        y = self.norm(self.mix(y)).transpose(1, 3).transpose(2, 3)
        return self.head(y).mean((2, 3))


def test_permute_and_linear_over_channels():
    # exact mode: the LayerNorm pins mix's outputs, conv's channels are still pruned through the permute
    g, pruned = assert_twin(ChannelsLast(), img(), {"conv": ("out_channels", 4), "mix": ("in_features", 4)})
    assert pruned.mix.out_features == 6 and any("LayerNorm 'norm'" in m for m in g.messages)


def test_layernorm_pruned_only_in_approximate_mode():
    g = DependencyGraph.build(ChannelsLast().eval(), (img(1),), approximate_layernorm=True)
    assert ("mix",) in {grp.producers for grp in g.groups}
    from netshrink.prune.structured import structured_prune_

    m = ChannelsLast().eval()
    structured_prune_(m, 0.5, input_shape=[3, 8, 8], approximate_layernorm=True)
    assert m.norm.normalized_shape == (3,) and m.head.in_channels == 3 and m(img()).shape == (3, 4)


class Acts(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.hardswish(F.silu(F.gelu(self.c1(x))))
        y = F.leaky_relu(F.relu6(self.c2(y)), 0.1)
        y = F.interpolate(F.max_pool2d(y, 2), scale_factor=2, mode="nearest")
        y = F.interpolate(y, size=(11, 11), mode="bilinear", align_corners=False)
        return self.c3(torch.tanh(y)).flatten(1)


def test_functional_activations_pooling_and_interpolate():
    assert_twin(Acts(), img(), {"c1": ("out_channels", 4), "c2": ("out_channels", 4), "c3": ("in_channels", 4)})


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.g = nn.Conv2d(16, 8, 3, padding=1, groups=4)  # 4 in / 2 out per group
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)  # depthwise, multiplier 2
        self.pw = nn.Conv2d(16, 5, 1)

    def forward(self, x):
        return self.pw(F.relu(self.dw(F.relu(self.g(F.relu(self.c1(x))))))).mean((2, 3))


def test_grouped_and_depthwise_convolutions():
    _, pruned = assert_twin(Grouped(), img(), {"c1": ("out_channels", 8), "g": ("out_channels", 4), "dw": ("out_channels", 8),
                                               "pw": ("in_channels", 8)})
    assert pruned.g.groups == 4 and pruned.dw.groups == 4 and pruned.g.in_channels == 8


class Transposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dec = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.head(F.relu(self.dec(F.relu(self.bn(self.enc(x))))))


def test_transposed_convolution_in_and_out():
    assert_twin(Transposed(), img(), {"enc": ("out_channels", 4), "dec": ("in_channels", 4), "head": ("in_channels", 3)})


class Shared(nn.Module):
    """One conv applied twice (weights shared across calls) inside a residual sum."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.block = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        y = F.relu(self.stem(x))
        y = F.relu(self.block(y)) + y
        y = F.relu(self.block(y)) + y
        return self.head(y.mean((2, 3)))


def test_module_called_twice_stays_consistent():
    _, pruned = assert_twin(Shared(), img(), {"stem": ("out_channels", 4), "block": ("out_channels", 4)})
    assert pruned.block.in_channels == 4


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.attn(h, h, h)
        return self.out(a).mean(1)


class GQA(nn.Module):
    """Grouped-query attention: 4 query heads share 2 key/value heads."""

    def __init__(self, d: int = 16, hq: int = 4, hkv: int = 2):
        super().__init__()
        self.hq, self.hkv, self.hd = hq, hkv, d // hq
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, hkv * self.hd), nn.Linear(d, hkv * self.hd)
        self.o = nn.Linear(d, d)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.hq, self.hd).transpose(1, 2)
        k = self.k(x).view(b, t, self.hkv, self.hd).transpose(1, 2).repeat_interleave(self.hq // self.hkv, 1)
        v = self.v(x).view(b, t, self.hkv, self.hd).transpose(1, 2).repeat_interleave(self.hq // self.hkv, 1)
        att = torch.softmax(q @ k.transpose(-1, -2) / self.hd ** 0.5, -1)
        return self.o((att @ v).transpose(1, 2).reshape(b, t, -1))


def test_multihead_attention_is_pruned_head_wise():
    # head-wise pruning of attention is tested in depth in test_attention.py
    graph, pruned = assert_twin(Attention(), torch.randn(2, 5, 8), {"inp": ("out_features", 8), "out": ("in_features", 8)})
    assert pruned.attn.num_heads == 2 and ("attn",) in {g.producers for g in graph.groups if g.kind == "heads"}


def test_attention_written_with_raw_ops_is_left_unpruned_with_a_message(caplog):
    # a grouped-query attention written with view / matmul / softmax in the user's own module: the graph
    # cannot see its heads (use netshrink's GroupedQueryAttention block to prune it head-wise)
    model = GQA().eval()
    x = torch.randn(2, 5, 16)
    with caplog.at_level(logging.WARNING):
        graph, _, _, _, diff = twins(model, x)
    assert graph.messages and "stay unpruned" in caplog.text
    assert diff <= 1e-5
    for grp in graph.groups:
        assert not set(grp.producers) & {"q", "k", "v"}


def test_unsupported_op_in_strict_mode_names_the_op_and_module():
    model = Attention().eval()
    model.attn = nn.MultiheadAttention(16, 4, batch_first=True, add_bias_kv=True)
    with pytest.raises(ModelError, match=r"MultiheadAttention with add_bias_kv.*'attn'"):
        DependencyGraph.build(model, (torch.randn(1, 5, 8),), strict=True)
    with pytest.raises(ModelError, match=r"reshape from \[1, 5, 16\] to \[1, 5, 4, 4\].*'view'"):
        DependencyGraph.build(GQA().eval(), (torch.randn(1, 5, 16),), strict=True)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.conv(x))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return x
        return -x


def test_untraceable_model_names_the_failing_module():
    with pytest.raises(ModelError, match=r"cannot trace Untraceable at module 'gate'"):
        DependencyGraph.build(Untraceable(), (img(1),))


class PerChannelConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.scale = nn.Parameter(torch.ones(1, 4, 1, 1))
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.conv(x) * self.scale)


def test_a_per_channel_parameter_pins_the_channels():
    g = DependencyGraph.build(PerChannelConstant().eval(), (img(1),))
    assert not [grp for grp in g.groups if "conv" in grp.producers]
