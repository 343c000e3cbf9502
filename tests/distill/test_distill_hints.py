"""FitNets hints (Romero et al. 2015): layer names, regressors, the hint loss, stage 1 and both stages."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from _distill_helpers import fast, splits, teacher
from torch import nn
from torch.utils.data import TensorDataset

from netshrink.distill import (
    DistillConfig,
    GuidedStudent,
    HintConfig,
    HintLoss,
    fitnets,
    hint_loss,
    make_regressor,
    train_hint,
)
from netshrink.errors import ConfigError, ModelError
from netshrink.metrics import error_rate
from netshrink.models import build_model


def conv_net(channels: int, padding: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    side = 8 + 2 * padding - 2
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, channels, 3, padding=padding), relu1=nn.ReLU(),
        flatten=nn.Flatten(1), fc=nn.Linear(channels * side * side, 10),
    ))


def test_missing_layers_are_named_with_the_layers_listed():
    t, s = teacher(), build_model("mlp", in_features=64, hidden=[16])
    with pytest.raises(ConfigError) as err:
        HintConfig(teacher_layer="conv9", student_layer="fc1").check_layers(t, s)
    assert err.value.field == "teacher_layer"
    assert "'conv9'" in str(err.value) and "fc1" in str(err.value) and "relu2" in str(err.value)
    with pytest.raises(ConfigError) as err:
        train_hint(s, t, splits().train, HintConfig(teacher_layer="relu1", student_layer="fc7"), fast(1))
    assert err.value.field == "student_layer" and "'fc7'" in str(err.value) and "relu1" in str(err.value)
    with pytest.raises(ConfigError, match="teacher_layer"):
        HintConfig(teacher_layer="", student_layer="fc1")
    with pytest.raises(ConfigError, match="regressor"):
        HintConfig.from_dict({"teacher_layer": "a", "student_layer": "b", "regressor": "mlp"})


def test_regressors():
    same = make_regressor((2, 4, 8, 8), (2, 16, 8, 8))
    assert isinstance(same, nn.Conv2d) and same.kernel_size == (1, 1) and same.out_channels == 16
    bigger = make_regressor((2, 4, 10, 9), (2, 16, 8, 8))
    assert bigger.kernel_size == (3, 2)
    assert bigger(torch.zeros(2, 4, 10, 9)).shape == (2, 16, 8, 8)
    lin = make_regressor((2, 16), (2, 96))
    assert lin(torch.zeros(2, 16)).shape == (2, 96)
    assert make_regressor((2, 4, 8, 8), (2, 40)).forward(torch.zeros(2, 4, 8, 8)).shape == (2, 40)
    with pytest.raises(ModelError, match="smaller"):
        make_regressor((2, 4, 6, 6), (2, 16, 8, 8))
    with pytest.raises(ModelError, match="4-D"):
        make_regressor((2, 16), (2, 96), kind="conv")


def test_hint_loss_formula_and_gradient():
    g = torch.Generator().manual_seed(0)
    u, r = torch.randn(4, 3, 2, 2, generator=g).requires_grad_(), torch.randn(4, 12, generator=g).requires_grad_()
    loss = hint_loss(u, r)
    torch.testing.assert_close(loss, 0.5 * ((u.reshape(4, -1) - r) ** 2).sum() / 4)
    loss.backward()
    assert u.grad is None and r.grad is not None
    with pytest.raises(ModelError, match=r"\(4, 11\).*\(4, 3, 2, 2\)"):
        hint_loss(u, torch.zeros(4, 11))


def _hint_error(t: nn.Module, guided: GuidedStudent, data: TensorDataset) -> float:
    x = data.tensors[0]
    with torch.no_grad():
        return float(HintLoss(t, "relu1")(guided, x, None, guided(x)))


def test_hint_stage_trains_only_up_to_the_guided_layer():
    data = splits()
    t = teacher()
    torch.manual_seed(3)
    student = build_model("mlp", in_features=64, hidden=[16, 16])
    fc1_before, fc2_before = student.fc1.weight.detach().clone(), student.fc2.weight.detach().clone()
    cfg = HintConfig(teacher_layer="relu1", student_layer="relu1")
    torch.manual_seed(4)
    regressor = make_regressor((1, 16), (1, 96))
    guided = GuidedStudent(student, "relu1", regressor)
    before = _hint_error(t, guided, data.val)
    result = train_hint(student, t, data.train, cfg, fast(4, optimizer="adam", lr=0.01), regressor=regressor)
    after = _hint_error(t, guided, data.val)
    assert after < 0.5 * before, (before, after)
    assert result.regressor is regressor and len(result.train.history) == 4
    assert not torch.equal(student.fc1.weight, fc1_before)  # W_guided trained
    assert torch.equal(student.fc2.weight, fc2_before)  # layers after the guided one untouched


def test_fitnets_both_stages_on_digits():
    data = splits()
    t = teacher()
    torch.manual_seed(5)
    student = build_model("mlp", in_features=64, hidden=[24, 16])
    result = fitnets(
        student, t, data.train, data.val,
        HintConfig(teacher_layer="relu1", student_layer="relu1"),
        fast(2, optimizer="adam", lr=0.01), fast(10), DistillConfig(temperature=4.0, alpha=0.9),
    )
    assert isinstance(result.hint.regressor[1], nn.Linear) and result.hint.regressor[1].out_features == 96
    assert result.hint.train.history[-1].train_loss < result.hint.train.history[0].train_loss
    assert error_rate(student, data.test) < 0.1


def test_conv_hint_through_a_conv_regressor():
    data = splits()
    small = TensorDataset(*(t[:256] for t in data.train.tensors))
    t = conv_net(8, padding=0, seed=0)   # relu1: (N, 8, 6, 6)
    s = conv_net(4, padding=1, seed=1)   # relu1: (N, 4, 8, 8)
    result = train_hint(s, t, small, HintConfig(teacher_layer="relu1", student_layer="relu1"), fast(3, optimizer="adam", lr=0.01))
    reg = result.regressor
    assert isinstance(reg, nn.Conv2d) and reg.kernel_size == (3, 3) and (reg.in_channels, reg.out_channels) == (4, 8)
    out = GuidedStudent(s, "relu1", reg)(small.tensors[0][:5])
    assert out.shape == (5, 8, 6, 6)
    losses = [h.train_loss for h in result.train.history]
    assert losses[-1] < losses[0]
