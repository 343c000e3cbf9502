"""The data-driven pruning criteria on tasks other than classification: a language model fed dict
batches (OBD, Taylor, skeletonization, sensitivity / auto_sparsity, iterative) and a regression MLP
fed tuple batches (OBS, Karnin); a bad task is one clear DataError."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from netshrink._allocate import eval_subset, evaluate
from netshrink.errors import ConfigError, DataError
from netshrink.prune import (
    AutoSparsityConfig,
    IterativeConfig,
    KarninConfig,
    MagnitudeConfig,
    ObdConfig,
    ObsConfig,
    SkeletonizationConfig,
    TaylorConfig,
    get_mask,
    prune_,
    sensitivity_sweep,
)
from netshrink.prune._criteria import iter_batches
from netshrink.prune.hessian import fisher_diagonal, hessian_diagonal
from netshrink.prune.saliency import taylor_scores
from netshrink.task import Task, language_modeling, regression
from tests._task_models import trained_lm, trained_regressor


@pytest.fixture(scope="module")
def lm():
    torch.set_num_threads(1)
    return trained_lm()


@pytest.fixture(scope="module")
def reg():
    torch.set_num_threads(1)
    return trained_regressor()


def _lm_batches(train, n=2):
    return list(iter_batches(train, n, 16, 0, torch.device("cpu"), language_modeling()))


def test_lm_batches_are_dicts_split_into_keyword_inputs_and_shifted_targets(lm):
    _, train, _ = lm
    inputs, target = _lm_batches(train, 1)[0]
    assert set(inputs.kwargs) == {"input_ids"} and not inputs.args
    assert torch.equal(target[:, :-1], inputs.kwargs["input_ids"][:, 1:]) and bool((target[:, -1] == -100).all())


@pytest.mark.parametrize("mode", ["fisher", "gauss_newton", "exact", "hutchinson"])
def test_obd_prunes_a_language_model_on_dict_batches(lm, mode):
    model, train, val = lm
    task = language_modeling()
    m = copy.deepcopy(model)
    res = prune_(m, ObdConfig(sparsity=0.3, hessian=mode, batches=2, batch_size=16, probes=4), data=train, task=task)
    assert res.sparsity["fc1"] == pytest.approx(0.3, abs=1 / 240) and res.sparsity["head"] == pytest.approx(0.3, abs=1 / 288)
    before, after = task.evaluate(model, val), task.evaluate(m, val)
    assert after < 3 * before  # still a language model (uniform guessing: 12)


def test_fisher_of_a_language_model_is_the_sum_of_per_sequence_squared_gradients(lm):
    model, train, _ = lm
    task = language_modeling()
    inputs, target = _lm_batches(train, 1)[0]
    params = {"fc1.weight": model.fc1.weight}
    sq = fisher_diagonal(model, params, inputs, target, None, task=task)["fc1.weight"]
    want = torch.zeros_like(model.fc1.weight)
    ids = inputs.kwargs["input_ids"]
    for i in range(ids.shape[0]):  # by hand: one sequence at a time, the task's loss
        out = model(input_ids=ids[i : i + 1])["logits"]
        (g,) = torch.autograd.grad(task.loss(out, target[i : i + 1]), model.fc1.weight)
        want += g.pow(2)
    torch.testing.assert_close(sq, want, rtol=1e-4, atol=1e-9)


def test_the_old_loss_option_maps_onto_token_positions(lm):
    model, train, _ = lm
    task = language_modeling()
    layers = {"fc1": model.fc1, "head": model.head}
    by_task = hessian_diagonal(model, layers, _lm_batches(train), "exact", None, task=task)
    by_name = hessian_diagonal(model, layers, _lm_batches(train), "exact", "cross_entropy", task=task)
    for n in layers:
        torch.testing.assert_close(by_task[n], by_name[n], rtol=1e-5, atol=1e-10)
        assert float(by_task[n].abs().sum()) > 0


def test_taylor_on_a_language_model_is_g_times_w_squared(lm):
    model, train, _ = lm
    task = language_modeling()
    batches = _lm_batches(train, 1)
    scores = taylor_scores(model, {"fc1": model.fc1}, batches, "weight", None, task)["fc1"]
    inputs, target = batches[0]
    (g,) = torch.autograd.grad(task.loss(model(**inputs.kwargs)["logits"], target), model.fc1.weight)
    torch.testing.assert_close(scores, (g * model.fc1.weight.detach()).pow(2), rtol=1e-5, atol=1e-12)
    m = copy.deepcopy(model)
    res = prune_(m, TaylorConfig(sparsity=0.5, granularity="channel", batches=2, batch_size=16, layers=["fc1"]), data=train, task=task)
    assert res.sparsity["fc1"] == pytest.approx(0.5)
    rows = get_mask(m.fc1).any(1)
    assert int(rows.sum()) == 12 and not bool(get_mask(m.fc1, "bias")[~rows].any())


def test_skeletonization_removes_units_of_a_language_model(lm):
    model, train, val = lm
    m = copy.deepcopy(model)
    res = prune_(m, SkeletonizationConfig(sparsity=0.25, layers=["fc1"], batches=2, batch_size=16), data=train, task="language_modeling")
    assert res.sparsity["fc1"] == pytest.approx(0.25)
    assert language_modeling().evaluate(m, val) < 3 * language_modeling().evaluate(model, val)


def test_sensitivity_and_auto_sparsity_on_a_language_model(lm):
    model, train, val = lm
    task = language_modeling()
    curves = sensitivity_sweep(model, val, ["fc1", "head"], [0.0, 0.5, 0.9], samples=48, task=task)
    assert curves.metric_name == "perplexity" and curves.samples == 48
    base_ppl, base_loss = evaluate(model, eval_subset(val, 48, task=task), task=task)
    assert curves.base_error == pytest.approx(base_ppl) and curves.base_loss == pytest.approx(base_loss)
    assert base_loss == pytest.approx(torch.log(torch.tensor(base_ppl)).item(), rel=0.05)  # token CE vs log-perplexity
    assert curves.macs == {"fc1": 10 * 24 * 10, "head": 24 * 12 * 10}  # 10 positions per sequence
    assert curves.error["head"][-1] > curves.error["head"][0]
    m = copy.deepcopy(model)
    res = prune_(m, AutoSparsityConfig(sparsity=0.5, grid=[0.0, 0.25, 0.5, 0.75, 0.9], samples=48, layers=["fc1", "head"]),
                 data=val, task=task)
    assert res.allocation.kept <= res.allocation.budget
    kept = sum(int((mod.weight != 0).sum()) for mod in (m.fc1, m.head))
    assert kept <= 0.5 * (240 + 288) + 1


def test_iterative_on_a_language_model_with_a_perplexity_ceiling(lm):
    model, train, val = lm
    from netshrink.data import Splits

    splits = Splits("tokens", train, val, val, num_classes=12)
    m = copy.deepcopy(model)
    ft = {"epochs": 1, "lr": 0.02, "batch_size": 32, "progress": False, "device": "cpu"}
    res = prune_(m, IterativeConfig(sparsity=0.8, rounds=2, criterion="taylor", criterion_args={"batches": 1, "batch_size": 16},
                                    max_metric=50.0, finetune=ft), data=splits, task="language_modeling")
    assert [r.kept for r in res.rounds] == [True, True] and res.stopped_by == "target"
    assert all(r.error_finetuned < 50.0 for r in res.rounds)
    with pytest.raises(ConfigError) as ei:
        prune_(copy.deepcopy(model), IterativeConfig(sparsity=0.5, rounds=1, max_error=0.5, finetune=ft), data=splits, task="language_modeling")
    assert ei.value.field == "max_error"


def test_obs_compensation_on_a_regression_model_beats_the_same_mask_without_it(reg):
    model, train, val = reg
    task = regression()
    m = copy.deepcopy(model)
    prune_(m, ObsConfig(sparsity=0.6, layers=["2"], block_size=10_000, batches=8, batch_size=64), data=train, task=task)
    masked_only = copy.deepcopy(model)
    from netshrink.prune import apply_mask

    apply_mask(masked_only[2], get_mask(m[2]).clone())
    x = val.tensors[0]
    with torch.no_grad():
        h = model[1](model[0](x))
        ref = model[2](h)
    with torch.no_grad():
        err_obs = float((m[2](h) - ref).pow(2).mean())
        err_mask = float((masked_only[2](h) - ref).pow(2).mean())
    assert err_obs < 0.7 * err_mask  # the compensated weights reconstruct the layer's output better
    assert task.evaluate(m, val) < task.evaluate(masked_only, val)


def test_karnin_fine_tunes_a_regression_model_with_its_loss(reg):
    from netshrink.prune import KarninTracker
    from netshrink.train import TrainConfig, Trainer

    model, train, _ = reg
    m = copy.deepcopy(model)
    res = prune_(m, KarninConfig(sparsity=0.5, epochs=1, lr=0.01, batch_size=64), data=train, task="regression")
    assert res.sparsity["0"] == pytest.approx(0.5) and res.sparsity["4"] == pytest.approx(0.5)
    # the same run by hand: plain SGD on the regression task's MSE, tracked by the callback
    twin = copy.deepcopy(model)
    tracker = KarninTracker(twin)
    cfg = TrainConfig(epochs=1, lr=0.01, momentum=0.0, batch_size=64, progress=False, device="cpu")
    Trainer(twin, cfg, task=regression(), callbacks=[tracker]).fit(train)
    sens = tracker.sensitivities(lr=0.01)
    prune_(twin, KarninConfig(sparsity=0.5), data=tracker)
    for n in ("0", "2", "4"):
        assert torch.equal(get_mask(m[int(n)]), get_mask(twin[int(n)]))
        assert torch.equal(m[int(n)].weight, twin[int(n)].weight)
    assert all(torch.isfinite(v).all() for v in sens.values())


def _vector_loss(out, target):
    return (out - target).pow(2).mean(1)  # one value per example: not a scalar


def _failing_metric():
    from netshrink.task import Metric

    class Broken(Metric):
        name = "broken"

        def update(self, output, target):
            raise ValueError("cannot score these outputs")

    return Broken()


@pytest.mark.parametrize("cfg", [ObdConfig(sparsity=0.5, batches=1), ObdConfig(sparsity=0.5, batches=1, hessian="exact"),
                                 TaylorConfig(sparsity=0.5, batches=1), ObsConfig(sparsity=0.5, batches=1)])
def test_a_loss_that_is_not_a_scalar_is_one_data_error(reg, cfg):
    model, train, _ = reg
    bad = Task(name="bad", loss=_vector_loss)
    if isinstance(cfg, ObsConfig):  # OBS needs only the inputs: the loss is never called
        prune_(copy.deepcopy(model), cfg, data=train, task=bad)
        return
    with pytest.raises(DataError, match="scalar"):
        prune_(copy.deepcopy(model), cfg, data=train, task=bad)


def test_a_metric_that_fails_is_one_data_error_in_the_sweep(reg):
    model, _, val = reg
    bad = Task(name="bad", loss=regression().loss, metric=_failing_metric, output_key=None)
    with pytest.raises(DataError, match="metric 'broken' failed: cannot score"):
        sensitivity_sweep(model, val, ["0"], [0.0, 0.5], samples=32, task=bad)
    with pytest.raises(DataError, match="scalar"):
        sensitivity_sweep(model, val, ["0"], [0.0, 0.5], samples=32, task=Task(name="bad", loss=_vector_loss))


def test_a_data_loader_of_dict_batches_serves_the_sweep(lm):
    model, _, val = lm
    loader = DataLoader(val, batch_size=16, shuffle=False)
    sub = eval_subset(loader, 32, task=language_modeling())
    assert sub.samples == 32 and len(sub.batches) == 2
    ppl, _ = evaluate(model, sub, task=language_modeling())
    assert ppl == pytest.approx(language_modeling().evaluate(model, list(loader)[:2]))
    with pytest.raises(DataError):  # dict batches without the language-model task: no target
        eval_subset(loader, 32)


def test_magnitude_needs_no_task_and_ignores_it(lm):
    model, train, _ = lm
    m = copy.deepcopy(model)
    res = prune_(m, MagnitudeConfig(sparsity=0.5), data=train, task="language_modeling")
    assert res.sparsity["fc1"] == pytest.approx(0.5)
    assert isinstance(m.emb, nn.Embedding)


def test_a_language_model_recipe_runs_data_driven_stages_and_distills_on_its_task(tmp_path, monkeypatch):
    """End to end: the recipe's task reaches OBD, the distillation fine-tuning and mixed precision."""
    from netshrink.pipeline import run_recipe
    from netshrink.recipe import parse_recipe

    monkeypatch.setenv("NETSHRINK_CACHE", str(tmp_path / "cache"))
    ft = {"epochs": 1, "lr": 0.02, "batch_size": 32, "progress": False, "device": "cpu"}
    recipe = parse_recipe({
        "name": "lm-obd", "model": "tests._task_models:TinyLM", "data": "tests._task_models:lm_splits", "task": "language_modeling",
        "train": {**ft, "epochs": 4, "lr": 0.05},
        "stages": [
            {"method": "obd", "sparsity": 0.5, "batches": 2, "batch_size": 32,
             "finetune": {**ft, "distill": {"temperature": 2.0, "alpha": 0.5}}},
            {"method": "mixed_precision", "avg_bits": 4, "bits": [2, 4, 8], "samples": 32, "layers": ["fc1", "head"]},
        ],
    })
    res = run_recipe(recipe, tmp_path / "out", progress=False)
    base, obd, mixed = res.rows
    assert obd.nonzeros < base.nonzeros and mixed.bytes < obd.bytes
    assert 1.0 < base.test_error < 6.0 and obd.test_error < 1.5 * base.test_error  # perplexities (uniform guessing: 12)
    assert mixed.test_error < 1.5 * base.test_error


def test_auto_channel_sweeps_a_language_model_on_its_task(lm):
    from netshrink.prune.structured.auto import AutoChannelConfig
    from tests._task_models import lm_splits

    model, _, _ = lm
    splits = lm_splits()
    m = copy.deepcopy(model)
    res = prune_(m, AutoChannelConfig(reduction=0.3, budget="params", grid=[0.25, 0.5, 0.75], samples=32), data=splits,
                 task="language_modeling")
    assert res.measured_cost <= 0.7 * res.dense_cost and m.fc1.out_features < 24
    assert language_modeling().evaluate(m, splits.val) < 12  # runs, better than uniform guessing
