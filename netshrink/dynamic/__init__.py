"""Dynamic networks: stochastic depth (Huang et al. 2016) and early exits (BranchyNet, Teerapittayanon
et al. 2016).

    plan = apply_stochastic_depth(model, p_last=0.5, seed=0)        # wraps every ResidualBlock's branch
    net = EarlyExitNet.from_sequential(mlp, ["relu1"], x[:1])       # an exit after relu1
    train_early_exit(net, train, val, TrainConfig(epochs=10))
    curve = sweep_thresholds(net, test, [0.0, 0.1, 0.3, 1.0])       # error and mean MACs per threshold
"""

from __future__ import annotations

from .early_exit import (
    EarlyExitNet,
    ExitCosts,
    ExitCurve,
    ExitDecision,
    ExitPoint,
    early_exit_loss,
    entropy,
    evaluate_early_exit,
    exit_costs,
    exit_thresholds,
    sweep_thresholds,
    train_early_exit,
)
from .stochastic_depth import (
    BlockSurvival,
    DropBranch,
    ResidualBlock,
    StochasticDepthConfig,
    StochasticDepthPlan,
    apply_stochastic_depth,
    conv_branch,
    linear_decay,
    mlp_branch,
    remove_stochastic_depth,
)

__all__ = [
    "BlockSurvival",
    "DropBranch",
    "EarlyExitNet",
    "ExitCosts",
    "ExitCurve",
    "ExitDecision",
    "ExitPoint",
    "ResidualBlock",
    "StochasticDepthConfig",
    "StochasticDepthPlan",
    "apply_stochastic_depth",
    "conv_branch",
    "early_exit_loss",
    "entropy",
    "evaluate_early_exit",
    "exit_costs",
    "exit_thresholds",
    "linear_decay",
    "mlp_branch",
    "remove_stochastic_depth",
    "sweep_thresholds",
    "train_early_exit",
]
