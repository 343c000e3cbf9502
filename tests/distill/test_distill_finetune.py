"""Distillation as the fine-tuning loss after another method (in a recipe and through the Trainer)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from netshrink.distill.finetune import DistillFinetuneLoss, FinetuneDistillConfig, check_teacher_fits, freeze_teacher
from netshrink.errors import ConfigError, ModelError, NetshrinkError
from netshrink.models import build_model
from netshrink.pipeline import run_recipe
from netshrink.prune import MagnitudeConfig, prune_
from netshrink.recipe import parse_recipe
from netshrink.train import Trainer

from _distill_helpers import fast, splits, teacher


def _kl_to_teacher(student, teach, data) -> float:
    x = torch.stack([data[i][0] for i in range(len(data))])
    student.eval()
    with torch.no_grad():
        pt = F.log_softmax(teach(x), dim=1)
        ps = F.log_softmax(student(x), dim=1)
    return float((pt.exp() * (pt - ps)).sum(1).mean())


def test_distillation_finetune_pulls_the_pruned_student_to_its_teacher():
    teach = freeze_teacher(teacher())
    before = teacher()
    prune_(before, MagnitudeConfig(sparsity=0.95))
    plain, kd_student = copy.deepcopy(before), copy.deepcopy(before)
    val = splits().val
    Trainer(plain, fast(3, lr=0.01)).fit(splits().train)
    kd = DistillFinetuneLoss(teach, kd_student, FinetuneDistillConfig(temperature=2.0, alpha=1.0))
    Trainer(kd_student, fast(3, lr=0.01), loss_fn=kd.hard_loss, extra_loss=kd).fit(splits().train)
    kd.close()
    start, after_plain, after_kd = (_kl_to_teacher(m, teach, val) for m in (before, plain, kd_student))
    assert after_kd < start
    assert after_kd < after_plain
    # the teacher was not trained
    assert all(torch.equal(a, b) for a, b in zip(teach.state_dict().values(), teacher().state_dict().values()))
    assert not kd_student.fc1._forward_hooks  # close() removed the hint / recording hooks


def test_hint_term_is_half_the_squared_feature_distance():
    teach = freeze_teacher(teacher())
    student = teacher()
    with torch.no_grad():
        student.fc1.bias.add_(0.5)
    cfg = FinetuneDistillConfig(alpha=0.0, hints=[{"teacher_layer": "fc1", "student_layer": "fc1"}], hint_weight=2.0)
    kd = DistillFinetuneLoss(teach, student, cfg)
    x = torch.stack([splits().val[i][0] for i in range(8)])
    logits = student(x)
    loss = kd(student, x, None, logits)
    width = student.fc1.out_features
    assert float(loss.detach()) == pytest.approx(2.0 * 0.5 * 0.25 * width, rel=1e-4)
    kd.close()


def test_hint_shape_mismatch_is_a_model_error():
    teach = freeze_teacher(teacher())
    student = teacher()
    kd = DistillFinetuneLoss(teach, student, FinetuneDistillConfig(hints=[{"teacher_layer": "fc1", "student_layer": "fc2"}]))
    x = torch.stack([splits().val[i][0] for i in range(4)])
    with pytest.raises(ModelError, match="'fc1'.*'fc2'"):
        kd(student, x, torch.zeros(4, dtype=torch.long), student(x))
    kd.close()


def test_teacher_output_shape_mismatch_is_a_clear_error():
    student = build_model("mlp", in_features=64, hidden=[16], num_classes=10)
    wrong = build_model("mlp", in_features=64, hidden=[16], num_classes=7)
    with pytest.raises(ConfigError, match=r"stages\[0\]\.finetune\.distill: .*\(1, 7\).*\(1, 10\)"):
        check_teacher_fits(wrong, student, torch.zeros(1, 1, 8, 8), "stages[0].finetune.distill")


@pytest.mark.parametrize(
    "block, where",
    [
        ({"temperature": 0}, r"stages\[0\]\.finetune\.distill\.temperature"),
        ({"temperature": -1.0}, r"stages\[0\]\.finetune\.distill\.temperature"),
        ({"alpha": 1.5}, r"stages\[0\]\.finetune\.distill\.alpha"),
        ({"teacher": "oracle"}, r"stages\[0\]\.finetune\.distill\.teacher"),
        ({"hints": [{"teacher_layer": "fc9", "student_layer": "fc1"}]}, r"stages\[0\]\.finetune\.distill\.hints\[0\]\.teacher_layer: no layer named 'fc9'"),
        ({"hints": [{"teacher_layer": "fc1", "student_layer": "nope"}]}, r"stages\[0\]\.finetune\.distill\.hints\[0\]\.student_layer: no layer named 'nope'"),
        ({"tempreature": 3}, r"stages\[0\]\.finetune\.distill"),
    ],
)
def test_bad_distill_blocks_name_their_field(digits_recipe, block, where):
    digits_recipe["stages"][0]["finetune"]["distill"] = block
    with pytest.raises(ConfigError, match=where) as info:
        parse_recipe(digits_recipe)
    assert "\n" not in str(info.value)


def test_recipe_level_default_is_validated_and_applies_to_every_finetuned_stage(digits_recipe):
    digits_recipe["distill"] = {"temperature": -2}
    with pytest.raises(ConfigError, match=r"^distill\.temperature"):
        parse_recipe(digits_recipe)
    digits_recipe["distill"] = {"temperature": 3, "teacher": "previous"}
    digits_recipe["stages"][1]["finetune"]["distill"] = None  # a stage may turn it off
    recipe = parse_recipe(digits_recipe)
    stages = recipe.expanded()
    assert [s.distill is not None for s in stages] == [True, True, False, False]
    assert stages[0].distill.temperature == 3.0 and stages[0].distill.teacher == "previous"


def _distill_recipe(digits_recipe):
    digits_recipe["stages"] = digits_recipe["stages"][:1]
    digits_recipe["stages"][0]["finetune"]["distill"] = {
        "temperature": 3, "alpha": 0.7, "teacher": "previous",
        "hints": [{"teacher_layer": "relu2", "student_layer": "relu2"}], "hint_weight": 0.1,
    }
    return digits_recipe


def test_recipe_distillation_runs_and_resumes_to_the_same_result(digits_recipe, tmp_path, monkeypatch):
    recipe = parse_recipe(_distill_recipe(digits_recipe))
    straight = run_recipe(recipe, tmp_path / "a", progress=False)
    assert [r.stage for r in straight.rows] == ["baseline", "prune 1/2", "prune 2/2"]
    assert straight.rows[-1].test_error < 0.2

    calls = {"n": 0}
    real = Trainer._run_epoch

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second fine-tuning epoch of the first round (the baseline is cached)
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(Trainer, "_run_epoch", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, tmp_path / "b", progress=False)
    monkeypatch.setattr(Trainer, "_run_epoch", real)
    resumed = run_recipe(recipe, tmp_path / "b", resume=True, progress=False)
    assert [(r.stage, r.test_error, r.nonzeros, r.bytes) for r in resumed.rows] == [
        (r.stage, r.test_error, r.nonzeros, r.bytes) for r in straight.rows
    ]
    assert (tmp_path / "a" / "model.nsk").read_bytes() == (tmp_path / "b" / "model.nsk").read_bytes()


def test_a_changed_distill_block_redoes_its_stage(digits_recipe, tmp_path):
    recipe = _distill_recipe(digits_recipe)
    recipe["train"]["epochs"] = 1
    recipe["stages"][0]["finetune"]["epochs"] = 1
    first = run_recipe(parse_recipe(recipe), tmp_path / "o", progress=False)
    recipe["stages"][0]["finetune"]["distill"]["temperature"] = 5
    resumed = run_recipe(parse_recipe(recipe), tmp_path / "o", resume=True, progress=False)
    fresh = run_recipe(parse_recipe(recipe), tmp_path / "f", progress=False)
    assert [dataclasses.astuple(r)[:6] for r in resumed.rows] == [dataclasses.astuple(r)[:6] for r in fresh.rows]
    w_first, w_resumed = first.model.state_dict(), resumed.model.state_dict()
    assert any(not torch.equal(w_first[k], w_resumed[k]) for k in w_first)  # the stage ran again, at T = 5
    recipe["distill"] = {"temperature": 3}  # a recipe-level default reaches every stage: nothing is kept
    with pytest.raises(NetshrinkError, match="different recipe"):
        run_recipe(parse_recipe(recipe), tmp_path / "o", resume=True, progress=False)


def test_recipe_level_default_distils_from_the_baseline(digits_recipe, tmp_path):
    digits_recipe["stages"] = [{"method": "magnitude", "sparsity": 0.9,
                                "finetune": {"epochs": 1, "lr": 0.01, "batch_size": 32, "progress": False}}]
    plain = run_recipe(parse_recipe(digits_recipe), tmp_path / "plain", progress=False)
    digits_recipe["distill"] = {"temperature": 2, "alpha": 1.0}  # teacher: the baseline (the default)
    kd = run_recipe(parse_recipe(digits_recipe), tmp_path / "kd", progress=False)
    assert kd.rows[0].test_error == plain.rows[0].test_error  # the same cached baseline
    assert kd.rows[1].nonzeros == plain.rows[1].nonzeros
    w_plain = plain.model.state_dict()
    w_kd = kd.model.state_dict()
    assert any(not torch.equal(w_plain[k], w_kd[k]) for k in w_plain)  # the loss was the teacher's, not the labels'
    assert kd.rows[1].test_error < 0.3
