"""Tiny non-classification setups for the task tests: a language model fed dict batches, and a
regression MLP fed tuple batches."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from netshrink.task import language_modeling, regression
from netshrink.train import TrainConfig, Trainer

VOCAB = 12


class TinyLM(nn.Module):
    """Embedding -> Linear -> ReLU -> Linear, returning a dict with the logits (an output adapter case)."""

    def __init__(self, vocab: int = VOCAB, dim: int = 10, hidden: int = 24):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU()
        self.head = nn.Linear(hidden, vocab)

    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.head(self.act(self.fc1(self.emb(input_ids))))}


class TokenDicts(Dataset):
    """Sequences of a noisy counting language (next token = previous + 1 mod V, sometimes + 2), each
    a dict ``{"input_ids": (T,)}``: the DataLoader collates them into dict batches."""

    def __init__(self, n: int, length: int = 10, vocab: int = VOCAB, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        steps = 1 + (torch.rand(n, length - 1, generator=g) < 0.2).long()
        self.ids = torch.cat([start, start + steps.cumsum(1)], dim=1) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i]}


def trained_lm(epochs: int = 6, seed: int = 0) -> tuple[TinyLM, TokenDicts, TokenDicts]:
    torch.manual_seed(seed)
    model = TinyLM()
    train, val = TokenDicts(256, seed=1), TokenDicts(64, seed=2)
    cfg = TrainConfig(epochs=epochs, lr=0.05, batch_size=32, progress=False, device="cpu", seed=seed)
    Trainer(model, cfg, task=language_modeling()).fit(train)
    return model.eval(), train, val


def regression_data(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = torch.stack([x[:, 0] * x[:, 1] + 0.5 * x[:, 2], torch.sin(x[:, 3]) - x[:, 4]], dim=1)
    return TensorDataset(x, y)


def trained_regressor(epochs: int = 25, seed: int = 0) -> tuple[nn.Sequential, TensorDataset, TensorDataset]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 2))
    train, val = regression_data(512, seed=1), regression_data(128, seed=2)
    cfg = TrainConfig(epochs=epochs, lr=0.05, batch_size=32, progress=False, device="cpu", seed=seed)
    Trainer(model, cfg, task=regression()).fit(train)
    return model.eval(), train, val


def lm_splits():
    """A recipe data factory: train / val / test splits of the token language (dict examples)."""
    from netshrink.data import Splits

    return Splits("tokens", TokenDicts(256, seed=1), TokenDicts(64, seed=2), TokenDicts(64, seed=3), num_classes=VOCAB)
