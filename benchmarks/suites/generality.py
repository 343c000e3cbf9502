"""Generality (issue 13): every method that can apply, on architectures no one here wrote the methods
for — five user networks (:mod:`benchmarks._archs`), four ``transformers`` models built from tiny
configs (GPT-2, Llama with grouped-query attention, BERT, ViT) — and on the zoo.

Each cell (:func:`benchmarks._matrix.run_cell`) is one fresh model with seeded random weights and a
small real data set (scikit-learn digits, or token sequences), one method with a fixed config, then
its output check: exact .nsk round trip, pruned vs masked-twin diff (and ``generate`` for the causal
LMs), ORT vs torch gap, sparsity or distinct values delivered, a short training step for QAT and KD.
The outcome is ``works``, ``error`` (one clear NetshrinkError, model still running), ``reported skip``
(nothing changed, and the result says why), or one of the three the issue forbids: ``crash``,
``broken``, ``silent skip``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import torch

from .._matrix import FINE, METHODS, OUTCOMES, run_cell
from .._archs import HF_ARCHS, USER_ARCHS
from . import SummaryRow, suite

ZOO = ("lenet_300_100", "lenet5", "mlp_concat", "resnet_small", "vgg_small", "mobilenet_small", "vit_tiny", "llama_tiny")
THREADS = 1
SHORT = {"works": "works", "error": "error", "reported skip": "skip (said)", "crash": "**CRASH**", "broken": "**BROKEN**",
         "silent skip": "**SILENT SKIP**"}


def _versions() -> str:
    try:
        import transformers

        return f"transformers {transformers.__version__}"
    except ImportError:  # pragma: no cover
        return "transformers not installed: its rows are absent"


def _archs() -> list[str]:
    names = list(USER_ARCHS)
    try:
        import transformers  # noqa: F401

        names += list(HF_ARCHS)
    except ImportError:  # pragma: no cover
        pass
    from netshrink.models import list_models

    return names + [f"zoo:{n}" for n in ZOO if n in list_models()]


def _table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def _int8_section(work: Path) -> list[str]:
    """int8 in onnxruntime on the BN CNNs, from the int8_ort suite's last run (its details file)."""
    path = work.parent / "int8_ort" / "details.json"
    head = ["## int8 in onnxruntime on networks with BatchNorm", ""]
    if not path.exists():
        return head + ["Not measured in this checkout: run `python -m benchmarks.run --only int8_ort` first.", ""]
    rows = []
    for d in json.loads(path.read_text()):
        lat, ours = d["latency_ms"], "ORT int8 (ours)"
        fp = lat["ORT fp32"]
        sp = [float(fp[b]) / float(lat[ours][b]) for b in ("1", "32")]  # JSON keys: the batch sizes as strings
        gap = d["gap_points"][ours]
        rows.append([d["model"], f"{100 * d['sim']:.2f}%", f"{100 * d[ours]:.2f}%", f"{gap:.2f} ({'met' if gap <= 0.1 + 1e-9 else 'MISSED'})",
                     f"{sp[0]:.2f}x / {sp[1]:.2f}x", f"{100 * d['ORT int8 (quantize_static)']:.2f}%"])
    return head + [
        "From `python -m benchmarks.run --only int8_ort` (benchmarks/results/int8_ort.md has the whole table, the machine "
        "and the load): BatchNorm folded, our int8 QDQ export in onnxruntime against the simulated (fake-quant) model "
        "(target: gap <= 0.1 point) and the measured speedup over fp32 onnxruntime, 1 thread.",
        "",
        _table(["network", "simulated int8 error", "ORT int8 error", "gap (points)", "speedup b1 / b32", "quantize_static error"], rows),
        "",
    ]


def _tie_section() -> list[str]:
    """A tied-weight model's sizes on unique storage, measured here."""
    from netshrink import metrics
    from netshrink.pack import pack

    class TiedLM(torch.nn.Module):
        def __init__(self, vocab: int = 1000, dim: int = 64):
            super().__init__()
            self.emb = torch.nn.Embedding(vocab, dim)
            self.mix = torch.nn.Linear(dim, dim)
            self.head = torch.nn.Linear(dim, vocab, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(torch.tanh(self.mix(self.emb(ids))))

    import tempfile

    m = TiedLM()
    naive = sum(p.numel() for _, p in m.named_parameters(remove_duplicate=False))
    with tempfile.TemporaryDirectory() as tmp:
        nbytes = pack(m, Path(tmp) / "tied.nsk")
        nbytes = nbytes if isinstance(nbytes, int) else (Path(tmp) / "tied.nsk").stat().st_size
    return [
        "## Tied weights are counted once",
        "",
        f"An Embedding(1000, 64) tied to the output Linear (plus a 64x64 Linear): parameters counted per name "
        f"{naive:,}, on unique storage (`metrics.count_params`) {metrics.count_params(m):,}; fp32 bytes "
        f"{metrics.fp32_bytes(m):,}; packed raw .nsk {nbytes:,} bytes, so the compression ratio of a packed file "
        f"is {metrics.fp32_bytes(m) / nbytes:.2f}x, not the {4 * naive / nbytes:.2f}x a double count would claim "
        "(`tests/test_ties.py::test_a_tie_is_counted_once` fails if a tie is counted twice).",
        "",
    ]


@suite("generality")
def run(work: Path, results: Path, resume: bool, machine: list[str]) -> list[SummaryRow]:
    torch.set_num_threads(THREADS)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cells = []
    for arch in _archs():
        for method in METHODS:
            c = run_cell(arch, method, work)
            cells.append(c)
            print(f"  {arch} x {method}: {c.outcome} ({c.seconds:.1f} s)", flush=True)
    wall = time.perf_counter() - t0
    counts = Counter(c.outcome for c in cells)
    by = {(c.arch, c.method): c for c in cells}
    archs = list(dict.fromkeys(c.arch for c in cells))
    grid = [[a] + [SHORT[by[(a, m)].outcome] for m in METHODS] for a in archs]
    bad = [c for c in cells if c.outcome not in FINE]
    detail = [[c.arch, c.method, c.outcome, c.check or c.message, f"{c.seconds:.1f}"] for c in cells]
    text = "\n".join([
        "# Generality: architecture x method",
        "",
        "Every registered method that can apply, on five user architectures, four `transformers` models built from",
        "tiny configs, and the zoo. Each cell: a fresh model (seeded random weights), small real data (scikit-learn",
        "digits, upsampled to 28x28 for the zoo's MNIST models; token sequences for the language models), the method",
        "with a fixed config, then its output check. See `benchmarks/_matrix.py` for the configs and checks and",
        "`benchmarks/_archs.py` for the architectures.",
        "",
        *machine,
        f"- {_versions()}; cells run with {THREADS} torch thread; wall time {wall:.0f} s for {len(cells)} cells",
        "",
        "Outcomes: **works** (method ran, output check passed), **error** (one clear NetshrinkError; the model still",
        "runs), **skip (said)** (nothing changed and the result says why), and the three the issue forbids:",
        "**CRASH** (any other exception), **BROKEN** (the model no longer runs or failed its output check),",
        "**SILENT SKIP** (a weight the method applies to unchanged, and no report says why).",
        "",
        "## Counts",
        "",
        _table(["outcome", "cells"], [[o, str(counts.get(o, 0))] for o in OUTCOMES]),
        "",
        f"Crashes: {counts.get('crash', 0)}, silent skips: {counts.get('silent skip', 0)}, "
        f"broken models: {counts.get('broken', 0)} (target: zero of each).",
        "",
        "## The matrix",
        "",
        _table(["architecture"] + list(METHODS), grid),
        "",
        "## Cells that miss the target",
        "",
        _table(["architecture", "method", "outcome", "what happened"], [[c.arch, c.method, c.outcome, c.message] for c in bad])
        if bad else "None.",
        "",
        *_int8_section(work),
        *_tie_section(),
        "## Every cell: the output check, or the error it gave",
        "",
        _table(["architecture", "method", "outcome", "check / message", "s"], detail),
        "",
    ])
    (results / "generality.md").write_text(text)
    (work / "json_extra.json").write_text(json.dumps({"counts": dict(counts), "cells": [c.as_dict() for c in cells]}, indent=1))
    return []
