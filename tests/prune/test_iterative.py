import pytest
import torch
from torch.nn.utils import parametrize

from netshrink.data import digits
from netshrink.errors import ConfigError
from netshrink.metrics import error_rate
from netshrink.models import build_model
from netshrink.prune import IterativeConfig, get_mask, prune_
from netshrink.train import TrainConfig, Trainer

FT = {"epochs": 1, "lr": 0.02, "batch_size": 64, "progress": False, "device": "cpu"}


@pytest.fixture(scope="module")
def trained():
    splits = digits()
    torch.manual_seed(0)
    model = build_model("mlp", in_features=64, hidden=[48, 24])
    Trainer(model, TrainConfig(epochs=8, lr=0.05, batch_size=32, schedule="cosine", progress=False, device="cpu")).fit(splits.train)
    return splits, {k: v.clone() for k, v in model.state_dict().items()}


def _model(state):
    model = build_model("mlp", in_features=64, hidden=[48, 24])
    model.load_state_dict(state)
    return model


def test_reaches_the_target_in_growing_rounds(trained):
    splits, state = trained
    model = _model(state)
    base = error_rate(model, splits.val)
    cfg = IterativeConfig(sparsity=0.9, rounds=3, layers=["fc1", "fc2"], finetune={**FT, "epochs": 2})
    res = prune_(model, cfg, data=splits)
    assert res.stopped_by == "target" and [r.round for r in res.rounds] == [1, 2, 3]
    reached = [r.sparsity for r in res.rounds]
    assert reached == sorted(reached) and reached[-1] == pytest.approx(0.9, abs=0.01)
    for n, s in res.sparsity.items():
        assert s == pytest.approx(0.9, abs=0.02), n
    # fine-tuning repairs what pruning broke, and masks hold through it
    last = res.rounds[-1]
    assert last.error_finetuned <= last.error_pruned
    assert last.error_finetuned < base + 0.1
    assert float((model.fc1.weight == 0).float().mean()) == pytest.approx(0.9, abs=0.01)


def test_the_error_ceiling_stops_and_undoes_the_round_that_broke_it(trained):
    splits, state = trained
    model = _model(state)
    base = error_rate(model, splits.val)
    ceiling = base + 0.02
    cfg = IterativeConfig(sparsity=0.995, rounds=6, max_error=ceiling, finetune={**FT, "epochs": 0})
    res = prune_(model, cfg, data=splits)
    assert res.stopped_by == "error"
    assert not res.rounds[-1].kept and res.rounds[-1].error_finetuned > ceiling
    kept = [r for r in res.rounds if r.kept]
    assert all(r.error_finetuned <= ceiling for r in kept)
    expected = kept[-1].sparsity if kept else 0.0
    layers = [model.fc1, model.fc2, model.fc3]
    zeros = sum(int((m.weight == 0).sum()) for m in layers) / sum(m.weight.numel() for m in layers)
    assert zeros == pytest.approx(expected, abs=1e-6)
    assert error_rate(model, splits.val) <= ceiling


@pytest.mark.parametrize(
    "criterion, args",
    [("obd", {"hessian": "fisher", "batches": 2}), ("obs", {"batches": 2, "block_size": 8}), ("taylor", {"batches": 2}),
     ("karnin", {"epochs": 1, "lr": 0.01}), ("skeletonization", {"batches": 2})],
)
def test_any_registered_criterion_runs_the_rounds(trained, criterion, args):
    splits, state = trained
    model = _model(state)
    target = 0.5 if criterion == "skeletonization" else 0.8
    res = prune_(model, IterativeConfig(sparsity=target, criterion=criterion, criterion_args=args, rounds=2, layers=["fc1", "fc2"], finetune=FT), data=splits)
    assert len(res.rounds) == 2 and res.stopped_by == "target"
    assert res.sparsity["fc1"] == pytest.approx(target, abs=0.02)
    assert get_mask(model.fc3) is None
    assert res.rounds[-1].error_finetuned < 0.5


def test_undoing_a_round_removes_the_masks_it_added(trained):
    splits, state = trained
    model = _model(state)
    cfg = IterativeConfig(sparsity=0.9, criterion="skeletonization", criterion_args={"batches": 1}, rounds=1,
                          max_error=0.0, layers=["fc1"], finetune={**FT, "epochs": 0})
    res = prune_(model, cfg, data=splits)
    assert res.stopped_by == "error" and res.sparsity["fc1"] == 0.0
    assert not parametrize.is_parametrized(model.fc1)
    for k, v in _model(state).state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


@pytest.mark.parametrize(
    "args, field",
    [
        ({"sparsity": 1.0}, "sparsity"),
        ({"rounds": 0}, "rounds"),
        ({"max_error": 1.5}, "max_error"),
        ({"criterion": "bogus"}, "criterion"),
        ({"criterion": "kmeans"}, "criterion"),
        ({"criterion": "iterative"}, "criterion"),
        ({"criterion_args": {"sparsity": 0.3}}, "criterion_args.sparsity"),
        ({"criterion": "obd", "criterion_args": {"hessian": "bogus"}}, "criterion_args.hessian"),
        ({"finetune": {"epochs": -1}}, "finetune.epochs"),
    ],
)
def test_bad_configs_name_the_field(args, field):
    with pytest.raises(ConfigError) as ei:
        IterativeConfig.from_dict(args)
    assert ei.value.field == field


def test_needs_splits():
    with pytest.raises(ConfigError) as ei:
        prune_(build_model("mlp", in_features=64, hidden=[8]), IterativeConfig(sparsity=0.5))
    assert ei.value.field == "data"
