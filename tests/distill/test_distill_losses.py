"""Soft-target distillation (Hinton et al. 2015): the loss, its gradient scale, the Trainer hooks, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _distill_helpers import fast, splits, teacher

from netshrink.distill import (
    DistillConfig,
    distill,
    distillation_loss,
    kd_loss,
    soft_target_loss,
)
from netshrink.errors import ConfigError, ModelError
from netshrink.metrics import error_rate
from netshrink.models import build_model


def logits(seed: int, n: int = 16, c: int = 10, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(n, c, generator=torch.Generator().manual_seed(seed))


def test_alpha_zero_is_cross_entropy():
    zs, zt = logits(0), logits(1)
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(2))
    for t in (1.0, 4.0):
        assert torch.equal(kd_loss(zs, zt, y, temperature=t, alpha=0.0), F.cross_entropy(zs, y))


def test_temperature_one_alpha_one_is_kl():
    zs, zt = logits(0), logits(1, scale=3.0)
    got = kd_loss(zs, zt, None, temperature=1.0, alpha=1.0)
    pt = F.softmax(zt, dim=1)
    manual = (pt * (pt.log() - F.log_softmax(zs, dim=1))).sum(1).mean()
    torch.testing.assert_close(got, manual, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got, F.kl_div(F.log_softmax(zs, 1), pt, reduction="batchmean"), rtol=1e-6, atol=1e-7)
    assert float(got) > 0


def test_mixed_loss_matches_the_formula():
    zs, zt = logits(3), logits(4, scale=2.0)
    y = torch.arange(16) % 10
    t, a = 3.0, 0.3
    pt, log_ps = F.softmax(zt / t, 1), F.log_softmax(zs / t, 1)
    expected = (1 - a) * F.cross_entropy(zs, y) + a * t * t * (pt * (pt.log() - log_ps)).sum(1).mean()
    torch.testing.assert_close(kd_loss(zs, zt, y, t, a), expected, rtol=1e-5, atol=1e-6)
    # identical logits: the soft term vanishes
    assert float(soft_target_loss(zs, zs.clone(), 2.0)) == pytest.approx(0.0, abs=1e-6)


def _soft_grad_norm(t: float, scaled: bool) -> float:
    zs = (logits(5) - logits(5).mean(1, keepdim=True)).requires_grad_()
    zt = logits(6, scale=2.0)
    loss = kd_loss(zs, zt, None, t, 1.0) if scaled else soft_target_loss(zs, zt, t)
    loss.backward()
    return float(zs.grad.norm())


def test_t_squared_keeps_the_soft_gradient_scale():
    temps = (4.0, 8.0, 16.0, 32.0)
    scaled = [_soft_grad_norm(t, scaled=True) for t in temps]
    assert max(scaled) / min(scaled) < 1.15, scaled
    # without the T^2 factor the gradient shrinks like 1 / T^2: 64x from T=4 to T=32
    raw = [_soft_grad_norm(t, scaled=False) for t in temps]
    assert raw[0] / raw[-1] == pytest.approx(64.0, rel=0.15)


def test_teacher_logits_get_no_gradient():
    zs, zt = logits(0).requires_grad_(), logits(1).requires_grad_()
    kd_loss(zs, zt, torch.zeros(16, dtype=torch.long), 2.0, 0.5).backward()
    assert zt.grad is None and zs.grad is not None


@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf])
def test_bad_temperature(value):
    with pytest.raises(ConfigError) as err:
        DistillConfig(temperature=value)
    assert err.value.field == "temperature"
    with pytest.raises(ConfigError, match="temperature"):
        kd_loss(logits(0), logits(1), None, value, 1.0)


@pytest.mark.parametrize("value", [-0.1, 1.5, math.nan])
def test_bad_alpha(value):
    with pytest.raises(ConfigError) as err:
        DistillConfig(alpha=value)
    assert err.value.field == "alpha"
    with pytest.raises(ConfigError, match="alpha"):
        kd_loss(logits(0), logits(1), torch.zeros(16, dtype=torch.long), 2.0, value)


def test_config_from_dict_and_labels_needed():
    cfg = DistillConfig.from_dict({"temperature": 2, "alpha": 0.5})
    assert cfg == DistillConfig(temperature=2.0, alpha=0.5) and DistillConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="temperature"):
        DistillConfig.from_dict({"temperature": "hot"})
    with pytest.raises(ConfigError, match="targets"):
        kd_loss(logits(0), logits(1), None, 2.0, 0.5)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ModelError, match=r"\(16, 5\).*\(16, 10\)"):
        kd_loss(logits(0), logits(1, c=5), None, 2.0, 1.0)
    data = splits()
    wrong_teacher = build_model("mlp", in_features=64, hidden=[8], num_classes=5)
    student = build_model("mlp", in_features=64, hidden=[8])
    with pytest.raises(ModelError) as err:
        distill(student, wrong_teacher, data.train, None, fast(1), DistillConfig())
    assert "(32, 5)" in str(err.value) and "(32, 10)" in str(err.value)


def test_trainer_hooks_sum_to_kd_loss():
    t = teacher()
    kd = distillation_loss(t, DistillConfig(temperature=3.0, alpha=0.7))
    x, y = splits().val.tensors
    student = build_model("mlp", in_features=64, hidden=[8])
    z = student(x)
    combined = kd.hard_loss(z, y) + kd(student, x, y, z)
    torch.testing.assert_close(combined, kd_loss(z, t(x), y, 3.0, 0.7), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kd.full(x, y, z), combined, rtol=1e-5, atol=1e-6)
    t.train()
    kd(student, x, y, z)
    assert t.training  # the teacher's mode is left as it was


def test_kd_student_comes_close_to_the_teacher():
    data = splits()
    t = teacher()
    before = [p.detach().clone() for p in t.parameters()]
    torch.manual_seed(1)
    student = build_model("mlp", in_features=64, hidden=[16])
    result = distill(student, t, data.train, data.val, fast(12), DistillConfig(temperature=4.0, alpha=0.9))
    teacher_err, student_err = error_rate(t, data.test), error_rate(student, data.test)
    assert teacher_err < 0.06
    assert student_err <= teacher_err + 0.04, (student_err, teacher_err)
    assert result.teacher_val_error is not None and result.student_val_error == result.train.final_val_error
    assert all(torch.equal(a, b) for a, b in zip(before, t.parameters()))  # the teacher is frozen
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in t.parameters()) / 5
