"""The OBS line on a language model trained here: SparseGPT, Wanda, magnitude, GPTQ, RTN, AWQ,
SmoothQuant, SVD-LLM whitening and SparseGPT + 4-bit on ``llama_lm`` trained on the Python 3.11
documentation (Debian ``python3.11-doc``, sha256-pinned; BPE 4096 trained on the train split), test
perplexity, real bytes, compression time and peak memory; then the int4 / int8 MatMulNBits ONNX export
and a greedy KV-cache decode loop in onnxruntime against fp32 onnxruntime and torch.

    python -m benchmarks.run --only llm
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

from netshrink._fileio import atomic_write_bytes, cache_root
from netshrink.models import build_model
from netshrink.task import language_modeling
from netshrink.text import python_docs
from netshrink.train import Callback, TrainConfig, Trainer

from . import SummaryRow, suite

log = logging.getLogger(__name__)

THREADS = 2
MODEL_ARGS = {"vocab_size": 4096, "dim": 256, "depth": 4, "heads": 8, "kv_heads": 2, "hidden": 768, "max_len": 512}
SEQ = 256
TRAIN_CHUNKS = 3000  # random windows of SEQ tokens from the train split (768k tokens, 0.27 of an epoch)
TRAIN = {"epochs": 1, "batch_size": 16, "optimizer": "adam", "lr": 2e-3, "momentum": 0.9, "grad_clip": 1.0, "progress": False,
         "device": "cpu", "seed": 0}
EVAL_CHUNKS = 32  # test perplexity over the first 32 x 256 = 8,192 test tokens
CALIB = 64  # calibration sequences of SEQ tokens from the train split


class WarmupCosine(Callback):
    """Per-step learning rate: linear warm-up over ``warmup`` steps, then cosine to 10% of the peak."""

    def __init__(self, peak: float, total: int, warmup: int = 20):
        self.peak, self.total, self.warmup = peak, max(1, total), warmup

    def on_after_backward(self, trainer, step) -> None:
        s = trainer.global_step
        if s < self.warmup:
            lr = self.peak * (s + 1) / self.warmup
        else:
            frac = min(1.0, (s - self.warmup) / max(1, self.total - self.warmup))
            lr = self.peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in trainer.optimizer.param_groups:
            group["lr"] = lr


def _key() -> str:
    key = json.dumps({"model": MODEL_ARGS, "train": TRAIN, "chunks": TRAIN_CHUNKS, "seq": SEQ, "schedule": "warmup20-cosine"}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def baseline(corpus=None) -> tuple[torch.nn.Module, dict]:
    """The trained llama_lm (cached under $NETSHRINK_CACHE/baselines) and how it was obtained."""
    from safetensors.torch import load_file, save

    corpus = corpus or python_docs()
    model = build_model("llama_lm", **MODEL_ARGS)
    path = cache_root() / "baselines" / f"llama_lm-{_key()}.safetensors"
    info_path = path.with_suffix(".json")
    if path.exists() and info_path.exists():
        model.load_state_dict(load_file(str(path)))
        info = json.loads(info_path.read_text())
        info["cached"] = True
        return model.eval(), info
    torch.manual_seed(0)
    train = corpus.chunks("train", SEQ, stride=SEQ // 2)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(train), generator=g)[:TRAIN_CHUNKS].tolist()
    val = corpus.chunks("val", SEQ, max_chunks=32)
    t0 = time.perf_counter()
    steps = -(-TRAIN_CHUNKS // TRAIN["batch_size"])
    sched = WarmupCosine(TRAIN["lr"], steps)
    result = Trainer(model, TrainConfig.from_dict(TRAIN), task=language_modeling(), callbacks=[sched]).fit(Subset(train, idx), val)
    seconds = time.perf_counter() - t0
    info = {"train_seconds": seconds, "train_tokens": TRAIN_CHUNKS * SEQ, "steps": -(-TRAIN_CHUNKS // TRAIN["batch_size"]),
            "val_perplexity": result.history[-1].val_error if getattr(result, "history", None) else None, "threads": torch.get_num_threads()}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save({k: v.detach().contiguous() for k, v in model.state_dict().items()}))
    atomic_write_bytes(info_path, json.dumps(info).encode())
    info["cached"] = False
    return model.eval(), info


@suite("llm")
def llm(work: Path, results: Path, *, resume: bool, machine: list[str]) -> list[SummaryRow]:
    from ._llm_run import run

    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        return run(work, results, machine)
    finally:
        torch.set_num_threads(previous)


if __name__ == "__main__":  # train (or load) the baseline only
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(THREADS)
    m, info = baseline()
    print(info, os.getloadavg())
