"""Distillation on a language model: KD over (B, T, V) logits per token, the task's hard loss, the
teacher's dict output through the adapter, hints on keyword inputs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from netshrink.distill import DistillConfig, distill, distillation_loss, kd_loss, soft_target_loss
from netshrink.distill.finetune import DistillFinetuneLoss, FinetuneDistillConfig, check_teacher_fits
from netshrink.errors import ConfigError, DataError
from netshrink.task import Task, language_modeling
from netshrink.train import TrainConfig, Trainer
from tests._task_models import TinyLM, TokenDicts, trained_lm


@pytest.fixture(scope="module")
def lm():
    torch.set_num_threads(1)
    return trained_lm()


def test_soft_target_loss_on_token_logits_is_the_mean_kl_per_token():
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    t = 2.0
    want = sum(F.kl_div(F.log_softmax(zs[b, i] / t, -1), F.log_softmax(zt[b, i] / t, -1), reduction="sum", log_target=True)
               for b in range(3) for i in range(5)) / 15
    torch.testing.assert_close(soft_target_loss(zs, zt, t), want)
    # (B, C) logits: unchanged, the mean over the batch
    torch.testing.assert_close(soft_target_loss(zs[:, 0], zt[:, 0], t),
                               F.kl_div(F.log_softmax(zs[:, 0] / t, -1), F.log_softmax(zt[:, 0] / t, -1), reduction="batchmean", log_target=True))


def test_kd_loss_hard_term_is_the_tasks_loss():
    task = language_modeling()
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(2, 6, 9, generator=g), torch.randn(2, 6, 9, generator=g)
    y = torch.randint(0, 9, (2, 6), generator=g)
    y[:, -1] = -100
    got = kd_loss(zs, zt, y, 3.0, 0.25, task)
    hard = F.cross_entropy(zs.reshape(-1, 9), y.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(got, 0.75 * hard + 0.25 * 9.0 * soft_target_loss(zs, zt, 3.0))
    kd = distillation_loss(torch.nn.Identity(), DistillConfig(temperature=3.0, alpha=0.25), task)
    torch.testing.assert_close(kd.hard_loss(zs, y), 0.75 * hard)


def test_distill_a_smaller_language_model_from_a_dict_output_teacher(lm):
    teacher, train, val = lm
    task = language_modeling()
    torch.manual_seed(5)
    student = TinyLM(hidden=8)
    before = task.evaluate(student, val)
    cfg = TrainConfig(epochs=4, lr=0.05, batch_size=32, progress=False, device="cpu")
    res = distill(student, teacher, train, val, cfg, DistillConfig(temperature=2.0, alpha=0.5), task=task)
    assert res.teacher_val_error == pytest.approx(task.evaluate(teacher, val))
    assert res.student_val_error < 0.5 * before and res.student_val_error == pytest.approx(task.evaluate(student, val))
    # the soft term alone moves the student toward the teacher: its KL to the teacher falls
    batch = next(iter(torch.utils.data.DataLoader(val, batch_size=64)))
    with torch.no_grad():
        kl_after = float(soft_target_loss(student(**batch)["logits"], teacher(**batch)["logits"], 1.0))
        kl_fresh = float(soft_target_loss(TinyLM(hidden=8)(**batch)["logits"], teacher(**batch)["logits"], 1.0))
    assert kl_after < 0.5 * kl_fresh


def test_finetune_distillation_with_hints_on_keyword_inputs(lm):
    teacher, train, val = lm
    task = language_modeling()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.fc1.weight.mul_(0.5)
    check_teacher_fits(teacher, student, {"input_ids": val.ids[:2]}, task=task)
    kd = DistillFinetuneLoss(teacher, student, FinetuneDistillConfig(alpha=0.5, temperature=2.0,
                                                                     hints=[{"teacher_layer": "fc1", "student_layer": "fc1"}],
                                                                     hint_weight=0.1), task)
    try:
        cfg = TrainConfig(epochs=2, lr=0.02, batch_size=32, progress=False, device="cpu")
        Trainer(student, cfg, task=task, loss_fn=kd.hard_loss, extra_loss=kd).fit(train)
    finally:
        kd.close()
    x = val.ids[:16]
    with torch.no_grad():
        gap = float((student.fc1(student.emb(x)) - teacher.fc1(teacher.emb(x))).pow(2).mean())
    assert gap < 0.25 * float(teacher.fc1(teacher.emb(x)).detach().pow(2).mean())
    with pytest.raises(ConfigError):  # a teacher whose output does not fit the student's
        check_teacher_fits(TinyLM(vocab=7), student, {"input_ids": val.ids[:2] % 7}, task=task)


def test_a_hard_loss_that_is_not_a_scalar_is_one_data_error(lm):
    teacher, train, _ = lm
    bad = Task(name="bad", loss=lambda out, y: out.mean(-1), shift=True, metric=language_modeling().metric)
    with pytest.raises(DataError, match="scalar"):
        distill(TinyLM(hidden=8), teacher, train, None, TrainConfig(epochs=1, progress=False, device="cpu"),
                DistillConfig(alpha=0.5), task=bad)
