"""Architectures that no one on the netshrink side wrote the methods for: five user networks (plain
torch, written here as a new user would) and four ``transformers`` models built from small configs
(never fetched from a hub). Shared by the test matrix (``tests/hf/``) and the ``generality``
benchmark suite.

Each entry of :data:`ARCHS` builds ``(model, data)``: a model in eval mode with seeded weights and a
small :class:`torch.utils.data.TensorDataset` / list-of-dicts data set in the form the model eats
(images, token ids, ``{"input_ids", "attention_mask", "labels"}`` dicts), plus its task name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

# ------------------------------------------------------------------------------- the five user nets


class _ConvBNAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.SiLU())


class MixedCNN(nn.Module):
    """A CNN with a residual add, a channel concat, a grouped conv, BatchNorm, SiLU and adaptive pooling."""

    def __init__(self, in_ch: int = 1, classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = _ConvBNAct(in_ch, width)
        self.branch_a = _ConvBNAct(width, width)
        self.branch_b = _ConvBNAct(width, width, k=1)
        self.grouped = _ConvBNAct(2 * width, 2 * width, groups=4)
        self.down = _ConvBNAct(2 * width, 2 * width, stride=2)
        self.res = _ConvBNAct(2 * width, 2 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)
        x = self.down(self.grouped(x))
        x = x + self.res(x)
        return self.head(torch.flatten(self.pool(x), 1))


class PreLNBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class PreLNTransformer(nn.Module):
    """A pre-LN transformer classifier on ``nn.MultiheadAttention``: 8x8 images as 8 rows of 8 pixels."""

    def __init__(self, seq: int = 8, features: int = 8, dim: int = 32, heads: int = 4, depth: int = 2, classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(features, dim)
        self.pos = nn.Parameter(torch.randn(1, seq, dim) * 0.02)
        self.blocks = nn.Sequential(*[PreLNBlock(dim, heads, 2 * dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x.reshape(x.shape[0], self.pos.shape[1], -1)) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(1))


class HandAttention(nn.Module):
    """Self-attention written by hand: separate q/k/v/out Linear layers, view/transpose/softmax."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        split = lambda y: y.view(n, t, self.heads, c // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = q @ k.transpose(-2, -1) / (c // self.heads) ** 0.5
        scores = scores.masked_fill(~mask[:, None, None, :].bool(), float("-inf"))
        y = torch.softmax(scores, -1) @ v
        return self.out(y.transpose(1, 2).reshape(n, t, c))


class BertStyleEncoder(nn.Module):
    """A BERT-style encoder fed token ids (and an attention mask): token + position embeddings,
    post-LN blocks with hand-written attention, classification from the first token."""

    def __init__(self, vocab: int = 64, seq: int = 16, dim: int = 32, heads: int = 4, depth: int = 2, classes: int = 2):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq, dim)
        self.ln0 = nn.LayerNorm(dim)
        self.attn = nn.ModuleList([HandAttention(dim, heads) for _ in range(depth)])
        self.ln1 = nn.ModuleList([nn.LayerNorm(dim) for _ in range(depth)])
        self.ff = nn.ModuleList([nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)) for _ in range(depth)])
        self.ln2 = nn.ModuleList([nn.LayerNorm(dim) for _ in range(depth)])
        self.cls = nn.Linear(dim, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.ln0(self.tok(input_ids) + self.pos(pos))
        for attn, ln1, ff, ln2 in zip(self.attn, self.ln1, self.ff, self.ln2):
            x = ln1(x + attn(x, attention_mask))
            x = ln2(x + ff(x))
        return self.cls(x[:, 0])


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + idt)


class ResNet18(nn.Module):
    """torchvision-style ResNet-18 (4 stages of 2 basic blocks, stride-2 1x1-conv shortcuts), written
    without torchvision; ``width`` scales the stage widths (64 in torchvision)."""

    def __init__(self, in_ch: int = 1, classes: int = 10, width: int = 8):
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width]
        self.conv1 = nn.Conv2d(in_ch, w[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        self.relu = nn.ReLU(inplace=True)
        cin, stages = w[0], []
        for i, c in enumerate(w):
            stages.append(nn.Sequential(BasicBlock(cin, c, 1 if i == 0 else 2), BasicBlock(c, c, 1)))
            cin = c
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(w[3], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TorchvisionResNet18(nn.Module):
    """torchvision's resnet18 layout exactly (7x7/2 stem conv + BN + ReLU, 3x3/2 max-pool, four stages of two
    basic blocks, stride-2 1x1-conv + BN shortcuts, global average pooling, one Linear), written without
    torchvision; ``width`` is the first stage's width (64 in torchvision)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], width
        for i, c in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stages.append(nn.Sequential(BasicBlock(cin, c, 1 if i == 0 else 2), BasicBlock(c, c, 1)))
            cin = c
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class LNMLP(nn.Module):
    """An MLP with LayerNorm and GELU, and a layer (``unused``) that forward never calls."""

    def __init__(self, in_features: int = 64, hidden: int = 64, classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.ln1 = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.ln2 = nn.LayerNorm(hidden)
        self.unused = nn.Linear(hidden, hidden)  # built, never called
        self.out = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.ln1(self.fc1(x.flatten(1))))
        x = F.gelu(self.ln2(self.fc2(x)))
        return self.out(x)


# ------------------------------------------------------------------------------------ data and specs


class Records(torch.utils.data.Dataset):
    """A map-style data set of dict examples (a DataLoader collates them into dicts of batches)."""

    def __init__(self, rows: list[dict[str, torch.Tensor]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def digits(n: int = 256, image: bool = True, seed: int = 0) -> torch.utils.data.TensorDataset:
    """scikit-learn's 8x8 digits (real data): ``n`` examples, (1, 8, 8) images or 64 features in [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(d.target), generator=g)[:n]
    x = torch.tensor(d.data, dtype=torch.float32)[idx] / 16.0
    y = torch.tensor(d.target, dtype=torch.long)[idx]
    return torch.utils.data.TensorDataset(x.reshape(-1, 1, 8, 8) if image else x, y)


def token_pairs(n: int = 128, vocab: int = 64, seq: int = 16, seed: int = 0) -> Records:
    """A token classification set: label 1 when the sequence holds more even than odd tokens below
    a random padding cut. Dicts of ``input_ids``, ``attention_mask`` (1 = token), ``labels``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, seq), generator=g)
    lengths = torch.randint(seq // 2, seq + 1, (n,), generator=g)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    labels = (((ids % 2 == 0) & (mask == 1)).sum(1) * 2 > lengths).long()
    return Records([{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(n)])


def token_stream(n: int = 64, vocab: int = 64, seq: int = 16, seed: int = 0) -> Records:
    """Causal LM data with structure to learn: each sequence counts up by a random step modulo
    ``vocab``. Dicts of ``input_ids`` (the task shifts them into targets)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    ids = (start + step * torch.arange(seq)[None, :]) % vocab
    return Records([{"input_ids": ids[i]} for i in range(n)])


@dataclass
class Arch:
    """One architecture of the matrix: a name, a builder of ``(model, data)``, the task name, whether
    it comes from ``transformers``, and whether it is a causal LM (``generate`` is checked)."""

    name: str
    build: Callable[[], tuple[nn.Module, Any]]
    task: str = "classification"
    hf: bool = False
    causal_lm: bool = False


def _seeded(fn: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    model = fn()
    with torch.no_grad():  # non-trivial BatchNorm statistics, as after training
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model.eval()


def _hf_quiet() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def gpt2(vocab: int = 64) -> nn.Module:
    """GPT2LMHeadModel: Conv1D layers, tied input/output embeddings; 2 layers of 4 heads, width 32."""
    _hf_quiet()
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0,
                     pad_token_id=0, attn_implementation="eager")
    return GPT2LMHeadModel(cfg)


def llama(vocab: int = 64) -> nn.Module:
    """LlamaForCausalLM: grouped-query attention (4 query heads on 2 key/value heads), rotary
    embeddings, SwiGLU MLP, RMSNorm; 2 layers, width 32."""
    _hf_quiet()
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                      attn_implementation="eager")
    return LlamaForCausalLM(cfg)


def bert(vocab: int = 64, classes: int = 2) -> nn.Module:
    """BertForSequenceClassification (token ids + attention_mask dict inputs); 2 layers of 4 heads."""
    _hf_quiet()
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                     max_position_embeddings=32, num_labels=classes, pad_token_id=0, attn_implementation="eager")
    return BertForSequenceClassification(cfg)


def vit(classes: int = 10) -> nn.Module:
    """ViTForImageClassification on 8x8 one-channel images, patches of 2; 2 layers of 4 heads."""
    _hf_quiet()
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=48, num_labels=classes, attn_implementation="eager")
    return ViTForImageClassification(cfg)


USER_ARCHS: dict[str, Arch] = {
    "mixed_cnn": Arch("mixed_cnn", lambda: (_seeded(MixedCNN), digits())),
    "preln_transformer": Arch("preln_transformer", lambda: (_seeded(PreLNTransformer), digits())),
    "bert_style": Arch("bert_style", lambda: (_seeded(BertStyleEncoder), token_pairs())),
    "resnet18": Arch("resnet18", lambda: (_seeded(ResNet18), digits())),
    "ln_mlp": Arch("ln_mlp", lambda: (_seeded(LNMLP), digits(image=False))),
}

HF_ARCHS: dict[str, Arch] = {
    "hf_gpt2": Arch("hf_gpt2", lambda: (_seeded(gpt2), token_stream()), "language_modeling", hf=True, causal_lm=True),
    "hf_llama": Arch("hf_llama", lambda: (_seeded(llama), token_stream()), "language_modeling", hf=True, causal_lm=True),
    "hf_bert": Arch("hf_bert", lambda: (_seeded(bert), token_pairs()), hf=True),
    "hf_vit": Arch("hf_vit", lambda: (_seeded(vit), digits()), hf=True),
}

ARCHS: dict[str, Arch] = {**USER_ARCHS, **HF_ARCHS}

__all__ = ["ARCHS", "Arch", "BertStyleEncoder", "HF_ARCHS", "LNMLP", "MixedCNN", "PreLNTransformer", "ResNet18",
           "Records", "USER_ARCHS", "bert", "digits", "gpt2", "llama", "token_pairs", "token_stream", "vit"]
