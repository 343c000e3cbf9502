"""Tasks: batch forms, output adapters, losses and metrics; the Trainer on any task, with callbacks."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from netshrink.errors import ConfigError, DataError, ModelError
from netshrink.metrics import error_rate
from netshrink.task import IGNORE_INDEX, Inputs, output_tensor, resolve_task, shift_targets
from netshrink.train import Callback, TrainConfig, Trainer


class TinyLM(nn.Module):
    """Embedding -> Linear language model returning a dict (like a transformers ModelOutput)."""

    def __init__(self, vocab: int = 12, dim: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        return {"logits": self.head(h), "hidden": h}


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i])}


def _cyclic_ids(n: int = 64, length: int = 10, vocab: int = 12) -> torch.Tensor:
    """Token t+1 = token t + 1 (mod vocab): a sequence an Embedding->Linear model learns exactly."""
    start = torch.randint(0, vocab, (n, 1), generator=torch.Generator().manual_seed(0))
    return (start + torch.arange(length)) % vocab


def test_split_forms():
    task = resolve_task()
    x, y = torch.randn(4, 3), torch.arange(4)
    inp, t = task.split((x, y))
    assert inp.args[0] is x and t is y and inp.kwargs == {}
    inp, t = task.split((x, x, y))
    assert len(inp.args) == 2 and t is y
    inp, t = task.split({"pixels": x, "label": y})
    assert inp.kwargs == {"pixels": x} and t is y
    with pytest.raises(DataError, match="no target"):
        task.split({"pixels": x})
    with pytest.raises(DataError, match="bare tensor"):
        task.split(x)
    with pytest.raises(DataError, match="inputs..., target"):
        task.split((x,))


def test_language_model_targets_are_shifted():
    ids = torch.tensor([[1, 2, 3, 4]])
    assert shift_targets(ids).tolist() == [[2, 3, 4, IGNORE_INDEX]]
    lm = resolve_task("language_modeling")
    inp, t = lm.split(ids)
    assert inp.args[0] is ids and t.tolist() == [[2, 3, 4, IGNORE_INDEX]]
    inp, t = lm.split({"input_ids": ids, "labels": ids})  # transformers convention: labels = inputs
    assert "labels" not in inp.kwargs and t.tolist() == [[2, 3, 4, IGNORE_INDEX]]
    inp, t = lm.split({"input_ids": ids})
    assert t.tolist() == [[2, 3, 4, IGNORE_INDEX]]


def test_output_adapter():
    z = torch.randn(2, 3)
    assert output_tensor(z) is z
    assert output_tensor((z, torch.zeros(1))) is z
    assert output_tensor({"loss": torch.zeros(()), "logits": z}) is z
    assert output_tensor({"out": z}) is z
    with pytest.raises(ModelError, match="no tensor"):
        output_tensor({"a": 1})
    with pytest.raises(ModelError, match="returned int"):
        output_tensor(3)


def test_perplexity_is_exp_of_token_mean_nll():
    torch.manual_seed(0)
    model = TinyLM()
    ids = _cyclic_ids(10)
    lm = resolve_task("language_modeling")
    got = lm.evaluate(model, DictDataset(ids), batch_size=3)  # uneven batches: must not average per batch
    with torch.no_grad():
        logits = model(ids)["logits"][:, :-1]
    nll = nn.functional.cross_entropy(logits.reshape(-1, 12), ids[:, 1:].reshape(-1))
    assert got == pytest.approx(math.exp(float(nll)), rel=1e-5)


def test_error_matches_classification_and_mse():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    x, y = torch.randn(50, 5), torch.randint(0, 3, (50,))
    want = float((model(x).argmax(1) != y).float().mean())
    assert error_rate(model, TensorDataset(x, y), batch_size=7) == pytest.approx(want)
    reg = resolve_task("regression")
    t = torch.randn(50, 3)
    with torch.no_grad():
        want_mse = float(((model(x) - t) ** 2).mean())
    assert reg.evaluate(model, TensorDataset(x, t), batch_size=8) == pytest.approx(want_mse, rel=1e-5)


def test_bad_loss_and_metric_are_one_clear_error():
    task = dataclasses.replace(resolve_task(), loss=lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"))
    with pytest.raises(DataError, match="scalar tensor"):
        task.compute_loss(torch.randn(4, 3), torch.arange(3).repeat(2)[:4])
    reg = resolve_task("regression")
    with pytest.raises(DataError, match="mse"):
        reg.evaluate(nn.Linear(5, 3), TensorDataset(torch.randn(4, 5), torch.randn(4, 2)))


def test_resolve_task_errors():
    with pytest.raises(ConfigError, match="unknown task 'translation'"):
        resolve_task("translation")
    with pytest.raises(ConfigError, match="task.bogus"):
        resolve_task({"name": "regression", "bogus": 1})
    with pytest.raises(ConfigError, match="task"):
        resolve_task(3)


def test_inputs_helpers():
    x, m = torch.zeros(4, 2, dtype=torch.long), torch.ones(4, 2)
    inp = Inputs((x,), {"attention_mask": m})
    assert inp.batch_size == 4 and inp.take(1).args[0].shape == (1, 2) and inp.take(1).kwargs["attention_mask"].shape == (1, 2)
    assert inp.as_tuple()[-1]["attention_mask"] is m
    assert Inputs.of({"a": x}).kwargs == {"a": x}
    with pytest.raises(ConfigError):
        Inputs.of(3)


class Recorder(Callback):
    def __init__(self):
        self.events: list[str] = []
        self.steps: list[int] = []

    def on_fit_start(self, trainer):
        self.events.append("fit_start")

    def on_epoch_start(self, trainer, epoch):
        self.events.append(f"epoch_start{epoch}")

    def on_after_backward(self, trainer, step):
        assert any(p.grad is not None for p in trainer.model.parameters())
        self.events.append("backward")

    def on_step_end(self, trainer, step):
        self.steps.append(trainer.global_step)

    def on_epoch_end(self, trainer, epoch, stats):
        self.events.append(f"epoch_end{epoch}:{stats.steps}")

    def on_fit_end(self, trainer):
        self.events.append("fit_end")


def test_trainer_learns_a_language_model_from_dict_batches_with_callbacks(tmp_path):
    torch.manual_seed(0)
    model = TinyLM()
    data = DictDataset(_cyclic_ids(64))
    lm = resolve_task("language_modeling")
    before = lm.evaluate(model, data)
    rec = Recorder()
    cfg = TrainConfig(epochs=2, lr=0.05, batch_size=16, optimizer="adam", momentum=0.9, progress=False)
    result = Trainer(model, cfg, task="language_modeling", callbacks=[rec]).fit(data, data, checkpoint_dir=tmp_path)
    after = result.final_val_error
    assert after < before / 3 and after == pytest.approx(lm.evaluate(model, data))
    assert rec.events[0] == "fit_start" and rec.events[-1] == "fit_end"
    assert rec.events.count("backward") == 8 and "epoch_end0:4" in rec.events and "epoch_end1:4" in rec.events
    assert rec.steps == list(range(1, 9))
    # resuming a finished run continues the step count from the checkpoint's history
    cfg3 = TrainConfig(epochs=3, lr=0.05, batch_size=16, optimizer="adam", momentum=0.9, progress=False)
    rec3 = Recorder()
    Trainer(model, cfg3, task="language_modeling", callbacks=[rec3]).fit(data, None, checkpoint_dir=tmp_path, resume=True)
    assert rec3.steps == [9, 10, 11, 12]


def test_trainer_rejects_a_non_callback():
    with pytest.raises(TypeError, match="Callback"):
        Trainer(nn.Linear(2, 2), TrainConfig(), callbacks=[object()])


def test_trainer_regression_task_on_a_dataloader():
    torch.manual_seed(0)
    x = torch.randn(128, 4)
    y = x @ torch.randn(4, 2)
    model = nn.Linear(4, 2)
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    before = resolve_task("regression").evaluate(model, loader)
    res = Trainer(model, TrainConfig(epochs=30, lr=0.1, progress=False), task="regression").fit(loader, loader)
    assert res.final_val_error < 0.01 * before
