"""Tests of the one Trainer: learning, masks and shared weights, checkpoints and resume, config."""

from __future__ import annotations

import logging
import math
import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from netshrink import _checkpoint as ckpt
from netshrink import train as train_mod
from netshrink.errors import ConfigError, ModelError, NetshrinkError
from netshrink.prune._mask import apply_mask
from netshrink.quantize._sharing import apply_sharing
from netshrink.train import (
    CheckpointError,
    DivergenceError,
    TrainConfig,
    Trainer,
    lr_factor,
    resolve_device,
)

# --------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train fastest on one thread (and a busy machine does not slow them down)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return TensorDataset(x[:1400], y[:1400]), TensorDataset(x[1400:], y[1400:])


@pytest.fixture(scope="module")
def small(digits) -> TensorDataset:
    """A 300-sample slice for the resume tests (fast, several batches per epoch)."""
    x, y = digits[0].tensors
    return TensorDataset(x[:300], y[:300])


def mlp(hidden: int = 32, dropout: float = 0.0, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 10))


def cfg(**kw) -> TrainConfig:
    base = dict(epochs=3, batch_size=32, lr=0.05, device="cpu", progress=False)
    base.update(kw)
    return TrainConfig(**base)


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class CountingLoss:
    """An extra_loss that adds exactly zero, counts its calls and can raise at a given call."""

    def __init__(self, raise_at: int | None = None, exc: BaseException | None = None, nan_at: int | None = None):
        self.calls = 0
        self.raise_at, self.exc, self.nan_at = raise_at, exc, nan_at

    def __call__(self, model, x, y, logits):
        self.calls += 1
        if self.raise_at is not None and self.calls == self.raise_at:
            raise self.exc or KeyboardInterrupt()
        if self.nan_at is not None and self.calls >= self.nan_at:
            return torch.tensor(float("nan"))
        return torch.zeros(())


# ----------------------------------------------------------------------------------- learning


def test_fit_learns_digits(digits):
    train, val = digits
    model = mlp()
    trainer = Trainer(model, cfg(epochs=8, lr=0.1, schedule="cosine"))
    before = trainer.evaluate(val)
    result = trainer.fit(train, val)
    assert before > 0.5
    assert result.epochs_run == result.epochs_done == 8 and len(result.history) == 8
    assert result.final_val_error == result.history[-1].val_error
    assert result.final_val_error < 0.08
    assert result.history[-1].train_loss < 0.5 * result.history[0].train_loss
    assert all(s.seconds >= 0 and s.epoch == i + 1 for i, s in enumerate(result.history))
    assert model.training  # the mode the model had before fit


def test_same_seed_same_weights_other_seed_differs(small):
    runs = []
    for seed in (3, 3, 4):
        model = mlp(dropout=0.2)
        Trainer(model, cfg(epochs=2, seed=seed)).fit(small)
        runs.append(model)
    assert same_state(runs[0], runs[1])
    assert not same_state(runs[0], runs[2])


def test_shuffling_depends_only_on_seed_and_epoch(small):
    def batch_labels(dropout):
        seen = []

        def record(model, x, y, logits):
            seen.append(y.clone())
            return torch.zeros(())

        Trainer(mlp(dropout=dropout), cfg(epochs=2, seed=11), extra_loss=record).fit(small)
        return seen

    a, b = batch_labels(0.0), batch_labels(0.5)  # dropout draws from the global RNG; shuffling must not care
    assert len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b))
    half = len(a) // 2
    assert not all(torch.equal(u, v) for u, v in zip(a[:half], a[half:]))  # a new order each epoch


def test_schedules_follow_their_formulas(small):
    step = cfg(schedule="step", step_size=2, gamma=0.5, epochs=5, lr=0.08)
    assert [lr_factor(step, e) for e in range(5)] == [1, 1, 0.5, 0.5, 0.25]
    cos = cfg(schedule="cosine", epochs=4)
    assert [lr_factor(cos, e) for e in range(4)] == pytest.approx([1, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2])
    assert lr_factor(cfg(schedule="constant"), 7) == 1
    result = Trainer(mlp(), step).fit(small)
    assert [s.lr for s in result.history] == pytest.approx([0.08, 0.08, 0.04, 0.04, 0.02])


def test_extra_loss_is_added(small):
    model = mlp()
    plain = Trainer(mlp(), cfg(epochs=1)).fit(small)
    shifted = Trainer(model, cfg(epochs=1), extra_loss=lambda m, x, y, logits: torch.tensor(1.5)).fit(small)
    assert shifted.history[0].train_loss == pytest.approx(plain.history[0].train_loss + 1.5, rel=1e-6)


def test_dataloader_input_and_mapping_config(small):
    loader = DataLoader(small, batch_size=50, shuffle=False)
    trainer = Trainer(mlp(), {"epochs": 2, "lr": 0.1, "device": "cpu", "progress": False})
    assert isinstance(trainer.config, TrainConfig)
    result = trainer.fit(loader)
    assert result.history[1].train_loss < result.history[0].train_loss


def test_grad_clip_bounds_each_step(small):
    def change(clip):
        model = mlp()
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        Trainer(model, cfg(epochs=1, lr=1.0, momentum=0.0, grad_clip=clip)).fit(small)
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        return float((after - before).norm())

    steps = math.ceil(len(small) / 32)
    clipped = change(1e-3)
    assert 0 < clipped <= steps * 1e-3 * (1 + 1e-4)
    assert change(None) > 10 * steps * 1e-3


# ------------------------------------------------------------------- masks and shared weights


def test_masked_layer_keeps_pruned_entries_zero(digits):
    train, _ = digits
    model = mlp()
    layer = model[0]
    mask = torch.rand(layer.weight.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    apply_mask(layer, mask)
    kept_before = layer.weight.detach()[mask].clone()
    trainer = Trainer(model, cfg(epochs=2, weight_decay=1e-3, momentum=0.9))
    trainer.fit(train)
    assert any(p is layer.parametrizations.weight.original for p in trainer.trainable_parameters())
    w = layer.weight.detach()
    assert torch.count_nonzero(w[~mask]) == 0
    assert (w[mask] != kept_before).float().mean() > 0.9


@pytest.mark.parametrize("prune_first", [False, True])
def test_shared_weights_stay_in_codebook(digits, prune_first):
    train, _ = digits
    model = mlp()
    layer = model[0]
    mask = None
    if prune_first:
        mask = torch.rand(layer.weight.shape, generator=torch.Generator().manual_seed(2)) > 0.3
        apply_mask(layer, mask)
    w = layer.weight.detach()
    k = 4
    codebook = torch.quantile(w.flatten(), torch.linspace(0.1, 0.9, k))
    indices = (w.unsqueeze(-1) - codebook).abs().argmin(-1)
    shared = apply_sharing(layer, codebook, indices)
    original = layer.parametrizations.weight.original.detach().clone()
    codebook_before = shared.codebook.detach().clone()

    trainer = Trainer(model, cfg(epochs=2, optimizer="adam", lr=0.01))
    trainer.fit(train)

    params = trainer.trainable_parameters()
    assert any(p is shared.codebook for p in params)
    assert not any(p is layer.parametrizations.weight.original for p in params)
    assert torch.equal(layer.parametrizations.weight.original, original)
    assert not torch.equal(shared.codebook.detach(), codebook_before)
    w = layer.weight.detach()
    nonzero = w[mask] if mask is not None else w
    assert torch.unique(nonzero).numel() <= k
    assert torch.isin(nonzero, shared.codebook.detach()).all()
    if mask is not None:
        assert torch.count_nonzero(w[~mask]) == 0


# ------------------------------------------------------------------------- checkpoint, resume


def test_resume_after_interrupt_matches_straight_run(small, tmp_path):
    conf = cfg(epochs=3, optimizer="adam", lr=0.01, schedule="cosine")
    per_epoch = math.ceil(len(small) / conf.batch_size)

    straight = mlp(dropout=0.2)
    ref = Trainer(straight, conf, extra_loss=CountingLoss()).fit(small)

    model = mlp(dropout=0.2)
    stopper = CountingLoss(raise_at=per_epoch + 3)  # Ctrl-C in the middle of epoch 2
    with pytest.raises(KeyboardInterrupt):
        Trainer(model, conf, extra_loss=stopper).fit(small, checkpoint_dir=tmp_path)
    saved = ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path))
    assert saved["epochs_done"] == 1 and not saved["finished"]
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.CHECKPOINT_NAME]

    fresh = mlp(dropout=0.2, seed=99)  # other initial weights: the checkpoint must replace them
    result = Trainer(fresh, conf, extra_loss=CountingLoss()).fit(small, checkpoint_dir=tmp_path, resume=True)
    assert result.resumed_from == 1 and result.epochs_run == 2 and result.epochs_done == 3
    assert same_state(fresh, straight)
    assert [s.train_loss for s in result.history] == [s.train_loss for s in ref.history]
    assert [s.lr for s in result.history] == [s.lr for s in ref.history]


def test_extending_a_finished_run_matches_straight_run(small, digits, tmp_path):
    val = digits[1]
    conf3 = cfg(epochs=3, schedule="step", step_size=1, gamma=0.5, momentum=0.9, nesterov=True)
    straight = mlp(dropout=0.1)
    ref = Trainer(straight, conf3).fit(small, val)

    model = mlp(dropout=0.1)
    Trainer(model, cfg(**{**conf3.to_dict(), "epochs": 2})).fit(small, val, checkpoint_dir=tmp_path)
    resumed = mlp(dropout=0.1, seed=5)
    result = Trainer(resumed, conf3).fit(small, val, checkpoint_dir=tmp_path, resume=True)
    assert result.epochs_run == 1
    assert same_state(resumed, straight)
    assert [s.val_error for s in result.history] == [s.val_error for s in ref.history]


def test_resume_of_finished_run_returns_at_once(small, tmp_path):
    model = mlp()
    Trainer(model, cfg(epochs=2)).fit(small, checkpoint_dir=tmp_path)
    path = ckpt.checkpoint_path(tmp_path)
    assert ckpt.load_checkpoint(path)["finished"]
    raw = path.read_bytes()

    other = mlp(seed=7)
    counter = CountingLoss()
    result = Trainer(other, cfg(epochs=2), extra_loss=counter).fit(small, checkpoint_dir=tmp_path, resume=True)
    assert counter.calls == 0
    assert result.epochs_run == 0 and result.epochs_done == 2 and len(result.history) == 2
    assert same_state(other, model)
    assert path.read_bytes() == raw


def test_resume_without_checkpoint_starts_fresh(small, tmp_path):
    result = Trainer(mlp(), cfg(epochs=1)).fit(small, checkpoint_dir=tmp_path / "new", resume=True)
    assert result.epochs_run == 1 and result.resumed_from == 0
    assert ckpt.checkpoint_path(tmp_path / "new").exists()
    with pytest.raises(CheckpointError, match="checkpoint_dir"):
        Trainer(mlp(), cfg(epochs=1)).fit(small, resume=True)


def _assert_clean(err: pytest.ExceptionInfo) -> None:
    assert isinstance(err.value, NetshrinkError)
    assert err.value.__cause__ is None  # raised `from None` or outside any handler: no torch traceback
    assert err.value.__context__ is None or err.value.__suppress_context__
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_checkpoint_is_a_clean_error(small, tmp_path, damage):
    Trainer(mlp(), cfg(epochs=1)).fit(small, checkpoint_dir=tmp_path)
    path = ckpt.checkpoint_path(tmp_path)
    raw = path.read_bytes()
    path.write_bytes({"garbage": b"not a checkpoint at all" * 10, "truncated": raw[: len(raw) // 2], "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="corrupt") as err:
        Trainer(mlp(), cfg(epochs=2)).fit(small, checkpoint_dir=tmp_path, resume=True)
    _assert_clean(err)
    assert str(path) in str(err.value)


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_checkpoint_never_runs_code(small, tmp_path):
    marker = tmp_path / "pwned"
    path = ckpt.checkpoint_path(tmp_path)
    torch.save({"format": ckpt.FORMAT, "payload": _Evil(str(marker))}, path)
    with pytest.raises(CheckpointError) as err:
        Trainer(mlp(), cfg(epochs=1)).fit(small, checkpoint_dir=tmp_path, resume=True)
    _assert_clean(err)
    assert not marker.exists()


def test_checkpoint_of_another_model_is_a_clean_error(small, tmp_path):
    Trainer(mlp(hidden=32), cfg(epochs=1)).fit(small, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match=r"0\.weight has shape \(32, 64\) in the checkpoint, \(16, 64\)") as err:
        Trainer(mlp(hidden=16), cfg(epochs=2)).fit(small, checkpoint_dir=tmp_path, resume=True)
    _assert_clean(err)
    masked = mlp(hidden=32)
    apply_mask(masked[0], torch.ones(32, 64, dtype=torch.bool))
    with pytest.raises(CheckpointError, match="missing 0.parametrizations.weight.original") as err:
        Trainer(masked, cfg(epochs=2)).fit(small, checkpoint_dir=tmp_path, resume=True)
    _assert_clean(err)


def test_checkpoint_of_another_config_is_a_clean_error(small, tmp_path):
    Trainer(mlp(), cfg(epochs=1, lr=0.05)).fit(small, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match="lr: 0.05 in the checkpoint, 0.1 now"):
        Trainer(mlp(), cfg(epochs=2, lr=0.1)).fit(small, checkpoint_dir=tmp_path, resume=True)
    # fields that do not change the trajectory may differ
    Trainer(mlp(), cfg(epochs=2, lr=0.05, num_workers=0, progress=True)).fit(small, checkpoint_dir=tmp_path, resume=True)


def test_interrupted_save_keeps_previous_checkpoint(small, tmp_path, monkeypatch):
    Trainer(mlp(), cfg(epochs=1)).fit(small, checkpoint_dir=tmp_path)
    path = ckpt.checkpoint_path(tmp_path)
    raw = path.read_bytes()

    def dying_save(obj, f, *a, **kw):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        Trainer(mlp(), cfg(epochs=2)).fit(small, checkpoint_dir=tmp_path, resume=True)
    assert path.read_bytes() == raw
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.CHECKPOINT_NAME]


def test_divergence_is_an_error_and_keeps_last_good_checkpoint(small, tmp_path):
    per_epoch = math.ceil(len(small) / 32)
    with pytest.raises(DivergenceError, match="epoch 2"):
        Trainer(mlp(), cfg(epochs=3), extra_loss=CountingLoss(nan_at=per_epoch + 1)).fit(small, checkpoint_dir=tmp_path)
    assert ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path))["epochs_done"] == 1


# ----------------------------------------------------------------------------- logging, devices


def test_logs_a_line_per_epoch_without_a_terminal(small, digits, caplog, monkeypatch):
    monkeypatch.setattr(train_mod, "_stderr_is_tty", lambda: False)
    with caplog.at_level(logging.INFO, logger="netshrink.train"):
        Trainer(mlp(), cfg(epochs=2, progress=True)).fit(small, digits[1])
    lines = [r.getMessage() for r in caplog.records if r.name == "netshrink.train"]
    assert len(lines) == 2
    assert lines[0].startswith("epoch 1/2: train loss") and "val error" in lines[0]


def test_progress_bar_on_a_terminal(small, caplog, capsys, monkeypatch):
    monkeypatch.setattr(train_mod, "_stderr_is_tty", lambda: True)
    with caplog.at_level(logging.INFO, logger="netshrink.train"):
        Trainer(mlp(), cfg(epochs=1, progress=True)).fit(small)
    captured = capsys.readouterr()
    assert "epoch 1/1" in captured.err and captured.out == ""
    assert not [r for r in caplog.records if r.name == "netshrink.train" and r.levelno >= logging.INFO]


def test_devices():
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError) as err:
            resolve_device("cuda")
        assert err.value.field == "device"


def test_nothing_to_train_is_a_clean_error(small):
    model = mlp()
    model.requires_grad_(False)
    with pytest.raises(ModelError, match="requires grad"):
        Trainer(model, cfg(epochs=1)).fit(small)


def test_zero_epochs_measures_the_model(small, digits):
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = Trainer(model, cfg(epochs=0)).fit(small, digits[1])
    assert result.epochs_run == 0 and result.history == []
    assert result.final_val_error is not None and result.final_val_error > 0.5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# -------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "data, field",
    [
        ({"lr": -1}, "lr"),
        ({"lr": 0}, "lr"),
        ({"lr": float("inf")}, "lr"),
        ({"learning_rate": 0.1}, "learning_rate"),
        ({"epochs": "3"}, "epochs"),
        ({"epochs": -1}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"momentum": 1.0}, "momentum"),
        ({"optimizer": "adam", "nesterov": True}, "nesterov"),
        ({"momentum": 0, "nesterov": True}, "nesterov"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"schedule": "linear"}, "schedule"),
        ({"step_size": 0}, "step_size"),
        ({"gamma": 0}, "gamma"),
        ({"seed": -1}, "seed"),
        ({"device": "tpu"}, "device"),
        ({"num_workers": -2}, "num_workers"),
        ({"progress": "yes"}, "progress"),
        ({"grad_clip": 0}, "grad_clip"),
    ],
)
def test_config_errors_name_the_field(data, field):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict(data)
    assert err.value.field == field
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict(data, where="finetune")
    assert err.value.field == f"finetune.{field}"


def test_config_round_trip_and_fingerprint():
    conf = TrainConfig.from_dict({"epochs": 4, "lr": 1, "optimizer": "adam", "grad_clip": 5})
    assert conf.lr == 1.0 and isinstance(conf.lr, float) and conf.grad_clip == 5.0
    assert TrainConfig.from_dict(conf.to_dict()) == conf
    # fields that do not shape the trajectory leave the fingerprint alone; the others change it
    assert conf.fingerprint() == TrainConfig(**{**conf.to_dict(), "epochs": 9, "device": "cpu"}).fingerprint()
    assert conf.fingerprint() != TrainConfig(**{**conf.to_dict(), "lr": 0.5}).fingerprint()
    cos = TrainConfig(schedule="cosine", epochs=4)
    assert cos.fingerprint() != TrainConfig(schedule="cosine", epochs=5).fingerprint()


# ----------------------------------------------------------------------- mixed precision (amp)


def test_amp_bf16_trains_on_cpu_with_the_forward_in_bf16(digits):
    train, val = digits
    model = mlp()
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype) if m.training else None)
    res = Trainer(model, cfg(epochs=4, amp="bf16")).fit(train, val)
    assert res.history[-1].train_loss < 0.5 * res.history[0].train_loss
    assert res.final_val_error is not None and res.final_val_error < 0.1
    assert seen and set(seen) == {torch.bfloat16}  # autocast really ran the Linear in bf16
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def test_amp_fp16_trains_or_says_clearly_why_not(digits):
    train, val = digits
    model = mlp()
    try:
        res = Trainer(model, cfg(epochs=3, amp="fp16")).fit(train, val)
    except ConfigError as err:  # this torch cannot autocast to fp16 on CPU: a one-line error naming the field
        assert err.field == "amp" and "fp16" in str(err) and "\n" not in str(err)
        return
    assert res.history[-1].train_loss < res.history[0].train_loss
    assert res.final_val_error is not None and res.final_val_error < 0.2


def test_amp_is_validated_and_kept_out_of_old_fingerprints():
    with pytest.raises(ConfigError) as ei:
        TrainConfig.from_dict({"amp": "fp8"})
    assert ei.value.field == "amp"
    with pytest.raises(ConfigError) as ei:
        TrainConfig.from_dict({"amp": True})
    assert ei.value.field == "amp"
    plain = TrainConfig()
    # amp unset: the fingerprint is the one of a config without the field (checkpoints and cached baselines written before it stay valid)
    assert "amp" not in plain.to_dict() and "amp" not in train_mod._trajectory_fields(plain.to_dict())
    assert TrainConfig.from_dict(TrainConfig(amp="bf16").to_dict()).amp == "bf16"
    assert plain.fingerprint() != TrainConfig(amp="bf16").fingerprint()


def test_amp_unsupported_by_this_torch_is_a_one_line_config_error(monkeypatch, digits):
    # older torch builds warn and disable CPU autocast for an unsupported dtype: simulate that
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a: False)
    with pytest.raises(ConfigError) as ei:
        Trainer(mlp(), cfg(epochs=1, amp="fp16")).fit(digits[0])
    assert ei.value.field == "amp" and "fp16" in str(ei.value) and "\n" not in str(ei.value)
