"""Stochastic depth (Huang, Sun, Liu, Sedra & Weinberger, "Deep Networks with Stochastic Depth",
ECCV 2016).

A residual block computes ``H_l = act(f_l(H_{l-1}) + id(H_{l-1}))``. With stochastic depth the
residual branch ``f_l`` of block ``l`` is kept, for a whole mini-batch, with *survival probability*
``p_l`` during training and dropped otherwise (the block is then the identity, followed by ``act``):

    training:  H_l = act(b_l * f_l(H_{l-1}) + id(H_{l-1})),   b_l ~ Bernoulli(p_l)
    inference: H_l = act(p_l * f_l(H_{l-1}) + id(H_{l-1}))

so that at test time each branch contributes its expected value. The paper's linear decay rule
sets, for blocks ``l = 1 .. L`` from input to output,

    p_l = 1 - (l / L) * (1 - p_L)

(``p_0 = 1`` for the input; the paper uses ``p_L = 0.5``). A dropped branch is not computed, which
is where the training speed-up comes from.

Example::

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), *[ResidualBlock(mlp_branch(32)) for _ in range(4)],
                          nn.Linear(32, 10))
    plan = apply_stochastic_depth(model, p_last=0.5, seed=0)   # wraps each ResidualBlock's branch
    plan.survival                                             # (0.875, 0.75, 0.625, 0.5)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..config import BaseConfig, check_range
from ..errors import ConfigError, ModelError

# ------------------------------------------------------------------------------------- blocks


class ResidualBlock(nn.Module):
    """``y = activation(shortcut(x) + branch(x))`` with an identity ``shortcut`` by default
    (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016). ``activation`` defaults
    to ReLU; pass ``None`` for none. The branch's output must have the shortcut's shape."""

    def __init__(self, branch: nn.Module, activation: nn.Module | None = None, shortcut: nn.Module | None = None):
        super().__init__()
        self.branch = branch
        self.shortcut = shortcut if shortcut is not None else nn.Identity()
        self.activation = activation if activation is not None else nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.shortcut(x) + self.branch(x))


def mlp_branch(width: int, hidden: int | None = None) -> nn.Sequential:
    """A fully connected residual branch ``Linear(width, hidden) -> ReLU -> Linear(hidden, width)``."""
    hidden = width if hidden is None else hidden
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width))


def conv_branch(channels: int) -> nn.Sequential:
    """The basic block's branch: ``conv3x3 -> BN -> ReLU -> conv3x3 -> BN`` at constant width."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
    )


class DropBranch(nn.Module):
    """A residual branch under stochastic depth, with survival probability ``survival``.

    Training: with probability ``survival`` returns ``branch(x)``, otherwise a zero scalar (which the
    block adds to its shortcut: the identity) without running the branch; one draw per forward call
    (per mini-batch, as in the paper) from ``generator``, or from torch's global generator when it
    is None (then ``torch.manual_seed`` and the Trainer's checkpoints make it reproducible).
    Eval: returns ``survival * branch(x)``. ``last_kept`` records the last training-mode draw.
    """

    def __init__(self, branch: nn.Module, survival: float, generator: torch.Generator | None = None):
        super().__init__()
        check_range("survival", survival, 0.0, 1.0)
        self.branch = branch
        self.survival = float(survival)
        self.generator = generator
        self.last_kept: bool | None = None

    def extra_repr(self) -> str:
        return f"survival={self.survival:g}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            out = self.branch(x)
            return out if self.survival == 1.0 else out * self.survival
        kept = bool(torch.rand((), generator=self.generator) < self.survival)
        self.last_kept = kept
        if kept:
            return self.branch(x)
        return x.new_zeros(())


# ------------------------------------------------------------------------------------- plan


def linear_decay(num_blocks: int, p_last: float) -> list[float]:
    """Huang et al. (2016) linear decay: ``p_l = 1 - (l / L) (1 - p_L)`` for ``l = 1 .. L``."""
    if num_blocks < 0:
        raise ConfigError("num_blocks", f"must be >= 0, got {num_blocks}")
    check_range("p_last", p_last, 0.0, 1.0)
    return [1.0 - (l / num_blocks) * (1.0 - p_last) for l in range(1, num_blocks + 1)]


@dataclass
class StochasticDepthConfig(BaseConfig):
    """Stochastic depth (Huang et al. 2016): survival ``p_l = 1 - (l/L)(1 - p_last)`` for the ``L``
    residual blocks; ``seed`` seeds a private generator for the drops (None: torch's global one)."""

    p_last: float = 0.5
    seed: int | None = None

    def validate(self) -> None:
        check_range("p_last", self.p_last, 0.0, 1.0)
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ConfigError("seed", f"must lie in [0, 2**63), got {self.seed}")


@dataclass(frozen=True)
class BlockSurvival:
    """One wrapped residual block: its name in the model, its depth ``l`` (from 1) and ``p_l``."""

    name: str
    depth: int
    survival: float


@dataclass(frozen=True)
class StochasticDepthPlan:
    """What :func:`apply_stochastic_depth` did: every wrapped block, from input to output."""

    blocks: tuple[BlockSurvival, ...]
    p_last: float

    @property
    def survival(self) -> tuple[float, ...]:
        return tuple(b.survival for b in self.blocks)

    @property
    def expected_depth(self) -> float:
        """``sum_l p_l``: the expected number of residual branches run per training step."""
        return math.fsum(self.survival)


def _blocks(model: nn.Module, block_types: Sequence[type[nn.Module]]) -> list[tuple[str, nn.Module]]:
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, tuple(block_types))]
    if not found:
        names = ", ".join(t.__name__ for t in block_types)
        raise ModelError(f"no residual block of type {names} in the model: nothing to apply stochastic depth to")
    for name, block in found:
        branch = getattr(block, "branch", None)
        if not isinstance(branch, nn.Module):
            raise ModelError(f"block {name!r} ({type(block).__name__}) has no 'branch' module to drop")
        if isinstance(branch, DropBranch):
            raise ModelError(f"block {name!r} already has stochastic depth (remove it first)")
    return found


def apply_stochastic_depth(
    model: nn.Module,
    p_last: float | StochasticDepthConfig = 0.5,
    block_types: Sequence[type[nn.Module]] = (ResidualBlock,),
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> StochasticDepthPlan:
    """Wrap, in place, the ``branch`` of every block of ``block_types`` in ``model`` (in
    ``named_modules`` order, input to output) in a :class:`DropBranch` with the linear-decay survival
    probability ``p_l = 1 - (l/L)(1 - p_last)`` (Huang et al. 2016).

    A block type must hold its residual branch as ``block.branch`` and add it to its shortcut.
    The drops come from ``generator``, or a private one seeded with ``seed``, or torch's global
    generator when both are None. ``p_last`` may also be a :class:`StochasticDepthConfig` (its
    ``seed`` is then used unless ``seed`` is given). Returns a :class:`StochasticDepthPlan`.
    """
    if isinstance(p_last, StochasticDepthConfig):
        seed = p_last.seed if seed is None else seed
        p_last = p_last.p_last
    if isinstance(p_last, bool) or not isinstance(p_last, (int, float)):
        raise ConfigError("p_last", f"must be a number in [0, 1], got {p_last!r}")
    check_range("p_last", p_last, 0.0, 1.0)
    if generator is None and seed is not None:
        if not 0 <= seed < 2**63:
            raise ConfigError("seed", f"must lie in [0, 2**63), got {seed}")
        generator = torch.Generator().manual_seed(seed)
    found = _blocks(model, block_types)
    probs = linear_decay(len(found), p_last)
    plan = []
    for depth, ((name, block), p) in enumerate(zip(found, probs), start=1):
        block.branch = DropBranch(block.branch, p, generator)
        plan.append(BlockSurvival(name, depth, p))
    return StochasticDepthPlan(tuple(plan), float(p_last))


def remove_stochastic_depth(model: nn.Module, *, fold_survival: bool = False) -> int:
    """Unwrap every :class:`DropBranch` in ``model`` in place; returns how many were removed.

    With ``fold_survival`` each branch is wrapped in a fixed scaling by ``p_l`` instead, so the
    model keeps its inference-time output ``act(p_l f_l(x) + x)``; without it the branches run at
    full weight (continue training, or fine-tune, after removal).
    """
    count = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, DropBranch):
                inner = child.branch if not fold_survival or child.survival == 1.0 else _Scaled(child.branch, child.survival)
                setattr(module, child_name, inner)
                count += 1
    return count


class _Scaled(nn.Module):
    """``scale * module(x)``: a dropped-out branch's inference-time form after removal."""

    def __init__(self, module: nn.Module, scale: float):
        super().__init__()
        self.module = module
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x) * self.scale


__all__ = [
    "BlockSurvival",
    "DropBranch",
    "ResidualBlock",
    "StochasticDepthConfig",
    "StochasticDepthPlan",
    "apply_stochastic_depth",
    "conv_branch",
    "linear_decay",
    "mlp_branch",
    "remove_stochastic_depth",
]
