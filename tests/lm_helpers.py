"""A tiny Llama-style LM trained in seconds on the bytes of netshrink's own source (shared by the LM tests)."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch

from netshrink.models import build_model
from netshrink.text import TokenChunks

SEQ = 64


@functools.lru_cache(maxsize=1)
def _corpus() -> tuple[torch.Tensor, torch.Tensor]:
    root = Path(__file__).resolve().parents[1] / "netshrink"
    text = "\n".join(p.read_text("utf-8") for p in sorted(root.glob("*.py")))
    ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    cut = int(0.9 * ids.numel())
    return ids[:cut], ids[cut:]


@functools.lru_cache(maxsize=1)
def _trained() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("llama_tiny")
    train, _ = _corpus()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(120):
        starts = torch.randint(0, train.numel() - SEQ - 1, (16,), generator=g)
        x = torch.stack([train[s : s + SEQ] for s in starts])
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def tiny_lm() -> torch.nn.Module:
    """A fresh copy of the trained tiny LM."""
    return copy.deepcopy(_trained())


def calib(n: int = 32) -> TokenChunks:
    return TokenChunks(_corpus()[0], SEQ, max_chunks=n, stride=97)


def heldout(n: int = 16) -> TokenChunks:
    return TokenChunks(_corpus()[1], SEQ, max_chunks=n)


def perplexity(model: torch.nn.Module, n: int = 16) -> float:
    from netshrink.task import language_modeling

    return language_modeling().evaluate(model, heldout(n), batch_size=8)
