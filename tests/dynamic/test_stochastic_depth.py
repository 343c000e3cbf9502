"""Stochastic depth (Huang et al. 2016): linear decay, train-time drops, eval-time scaling, seeding."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from netshrink.data import digits
from netshrink.dynamic import (
    DropBranch,
    ResidualBlock,
    StochasticDepthConfig,
    apply_stochastic_depth,
    conv_branch,
    linear_decay,
    mlp_branch,
    remove_stochastic_depth,
)
from netshrink.errors import ConfigError, ModelError
from netshrink.metrics import error_rate
from netshrink.train import TrainConfig, Trainer


def res_mlp(blocks: int = 4, width: int = 16, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(1), nn.Linear(64, width), nn.ReLU(),
        *[ResidualBlock(mlp_branch(width)) for _ in range(blocks)],
        nn.Linear(width, 10),
    )


def x_batch(n: int = 8) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def test_linear_decay_and_plan():
    assert linear_decay(4, 0.5) == pytest.approx([0.875, 0.75, 0.625, 0.5])
    assert linear_decay(1, 0.2) == pytest.approx([0.2])
    model = res_mlp(4)
    plan = apply_stochastic_depth(model, 0.5, seed=0)
    assert plan.survival == pytest.approx((0.875, 0.75, 0.625, 0.5))
    assert [b.name for b in plan.blocks] == ["3", "4", "5", "6"] and [b.depth for b in plan.blocks] == [1, 2, 3, 4]
    assert plan.expected_depth == pytest.approx(2.75)
    assert [model[i].branch.survival for i in range(3, 7)] == pytest.approx(list(plan.survival))


def test_eval_output_is_the_scaled_branch():
    model = res_mlp(3)
    original = copy.deepcopy(model).eval()
    plan = apply_stochastic_depth(model, 0.4, seed=0)
    model.eval()
    x = x_batch()
    h = original[2](original[1](original[0](x)))
    for block, p in zip(list(original)[3:6], plan.survival):
        h = torch.relu(h + p * block.branch(h))
    expected = original[6](h)
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)  # deterministic in eval mode


def test_survival_one_always_keeps_the_branch():
    model = res_mlp(3)
    original = copy.deepcopy(model)
    apply_stochastic_depth(model, 1.0, seed=0)
    model.train()
    x = x_batch()
    for _ in range(20):
        assert torch.equal(model(x), original(x))


class _Counting(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.inner = mlp_branch(width)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def test_survival_zero_is_the_identity_and_skips_the_branch():
    torch.manual_seed(0)
    branch = _Counting(16)
    block = ResidualBlock(branch)
    model = nn.Sequential(block)
    apply_stochastic_depth(model, 0.0, seed=0)
    x = torch.randn(8, 16)
    model.train()
    for _ in range(20):
        assert torch.equal(model(x), torch.relu(x))
    assert branch.calls == 0
    model.eval()
    torch.testing.assert_close(model(x), torch.relu(x))  # 0 * branch


def test_drop_rate_follows_the_survival_probability_and_is_seeded():
    def draws(seed: int | None, n: int = 2000) -> list[bool]:
        model = nn.Sequential(ResidualBlock(mlp_branch(4)))
        apply_stochastic_depth(model, 0.3, seed=seed)
        model.train()
        out = []
        x = torch.zeros(2, 4)
        for _ in range(n):
            model(x)
            out.append(model[0].branch.last_kept)
        return out

    a = draws(5)
    assert abs(sum(a) / len(a) - 0.3) < 0.04
    assert draws(5) == a and draws(6) != a
    torch.manual_seed(11)
    g1 = draws(None, 200)
    torch.manual_seed(11)
    assert draws(None, 200) == g1  # the global generator: reproducible under torch.manual_seed


def test_errors():
    with pytest.raises(ModelError, match="ResidualBlock"):
        apply_stochastic_depth(nn.Sequential(nn.Linear(2, 2)), 0.5)
    model = res_mlp(2)
    apply_stochastic_depth(model, 0.5)
    with pytest.raises(ModelError, match="already"):
        apply_stochastic_depth(model, 0.5)

    class NoBranch(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(ModelError, match="branch"):
        apply_stochastic_depth(nn.Sequential(NoBranch()), 0.5, block_types=(NoBranch,))
    for bad in (-0.1, 1.1):
        with pytest.raises(ConfigError, match="p_last"):
            apply_stochastic_depth(res_mlp(1), bad)
        with pytest.raises(ConfigError) as err:
            StochasticDepthConfig(p_last=bad)
        assert err.value.field == "p_last"


def test_remove_keeps_or_folds_the_scaling():
    model = res_mlp(2)
    original = copy.deepcopy(model).eval()
    plan = apply_stochastic_depth(model, StochasticDepthConfig(p_last=0.5, seed=0))
    assert plan.survival == pytest.approx((0.75, 0.5))
    model.eval()
    x = x_batch()
    scaled = model(x)
    folded = copy.deepcopy(model)
    assert remove_stochastic_depth(folded, fold_survival=True) == 2
    torch.testing.assert_close(folded(x), scaled)
    assert remove_stochastic_depth(model) == 2
    assert not any(isinstance(m, DropBranch) for m in model.modules())
    torch.testing.assert_close(model(x), original(x))


def test_conv_blocks_train_and_the_model_learns():
    torch.manual_seed(0)  # one torch thread: tests/conftest.py
    conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), ResidualBlock(conv_branch(4)), nn.Flatten(1), nn.Linear(256, 10))
    apply_stochastic_depth(conv, 0.5, seed=0)
    conv.train()
    conv(x_batch()).sum().backward()  # a dropped or kept branch, either way the graph is sound
    data = digits(seed=0)
    model = res_mlp(4, width=32)
    apply_stochastic_depth(model, 0.5, seed=0)
    cfg = TrainConfig(epochs=5, lr=0.05, batch_size=32, schedule="cosine", device="cpu", progress=False)
    Trainer(model, cfg).fit(data.train)
    assert error_rate(model, data.test) < 0.1
