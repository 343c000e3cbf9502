"""Structured matrices and compact filters: circulant FFT vs dense latency over widths (the crossover),
storage O(n) vs O(n^2), and a Table-III-style row (Cheng et al. survey 2017) on LeNet-5: error and
compression of CReLU, circulant, equivariant (and Toeplitz, hashed) variants against the dense baseline.

The variants start from the trained LeNet-5 baseline (least-squares projection of each dense layer onto
the structure) and are fine-tuned briefly: one epoch over 20,000 training images, the same for the dense
control. Short training: the survey's Table III numbers come from full training on CIFAR; ours are MNIST.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Subset

from netshrink import metrics
from netshrink.data import load_dataset
from netshrink.filters import CReLUConfig, EquivariantConfig, EquivariantConv2d, compact_
from netshrink.matrices import CirculantConfig, CirculantLinear, HashedConfig, HashedLinear, ToeplitzConfig, ToeplitzLinear, structure_
from netshrink.models import build_model
from netshrink.pack import packed_bytes
from netshrink.pipeline import baseline_cache_path
from netshrink.recipe import load_recipe
from netshrink.report import markdown_table
from netshrink.train import TrainConfig, Trainer

from . import SummaryRow, suite

ROOT = Path(__file__).resolve().parents[2]
WIDTHS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
RUNS = 30
THREADS = 1
FT_IMAGES = 20000


def _fft_macs(n: int) -> float:
    """A rough count for one real FFT of length n: n log2 n real multiply-adds (an estimate, not a measurement)."""
    return n * math.log2(max(n, 2))


def _extra_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs per example of the layers metrics.macs does not see (it counts nn.Linear / nn.Conv only)."""
    total = 0.0

    def hook(module, args, out):
        nonlocal total
        rows = args[0].numel() / args[0].shape[-1] if not isinstance(module, EquivariantConv2d) else 1
        if isinstance(module, CirculantLinear):
            p, q, b = module.weight.shape
            total += rows * ((p + q) * _fft_macs(b) + 4 * p * q * (b // 2 + 1)) + p * q * _fft_macs(b)
        elif isinstance(module, ToeplitzLinear):
            n = module.weight.shape[0] + module.in_features - 1
            total += rows * (2 * _fft_macs(n) + 4 * (n // 2 + 1)) + _fft_macs(n)
        elif isinstance(module, HashedLinear):
            total += rows * module.in_features * module.out_features
        elif isinstance(module, EquivariantConv2d):
            total += out.numel() / out.shape[1] * module.dense_weight().numel()

    kinds = (CirculantLinear, ToeplitzLinear, HashedLinear, EquivariantConv2d)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return int(total)


def _crossover() -> tuple[list[list[str]], dict[int, int | None]]:
    rows, faster_from = [], {1: None, 64: None}
    torch.manual_seed(0)
    for n in WIDTHS:
        dense, circ = nn.Linear(n, n), CirculantLinear(n, n)
        ld = metrics.latency(dense, (n,), batch_sizes=(1, 64), runs=RUNS, threads=THREADS)
        lc = metrics.latency(circ, (n,), batch_sizes=(1, 64), runs=RUNS, threads=THREADS)
        cells = [str(n), f"{n * n + n:,}", f"{sum(p.numel() for p in circ.parameters()):,}"]
        for b in (1, 64):
            s = ld[b].median_ms / lc[b].median_ms
            cells += [f"{ld[b].median_ms:.4f}", f"{lc[b].median_ms:.4f}", f"{s:.2f}x"]
            if s > 1 and faster_from[b] is None:
                faster_from[b] = n
            elif s <= 1:
                faster_from[b] = None  # the crossover is where it stays faster
        rows.append(cells)
    return rows, faster_from


def _baseline() -> nn.Module:
    recipe = load_recipe(ROOT / "recipes" / "lenet5.yaml")
    model = build_model(recipe.model, **recipe.model_args)
    model.load_state_dict(load_file(str(baseline_cache_path(recipe))))
    return model.eval()


VARIANTS = [
    ("dense baseline (same fine-tuning)", None),
    ("CReLU conv1, conv2 (half the filters)", lambda m, d: compact_(m, CReLUConfig(layers=["conv1", "conv2"]))),
    ("equivariant conv1 p4, conv2 flip", lambda m, d: (compact_(m, EquivariantConfig(group="p4", layers=["conv1"])),
                                                       compact_(m, EquivariantConfig(group="flip", layers=["conv2"])))),
    ("circulant fc1 (block 500)", lambda m, d: structure_(m, CirculantConfig(layers=["fc1"]))),
    ("Toeplitz fc1", lambda m, d: structure_(m, ToeplitzConfig(layers=["fc1"]))),
    ("hashed fc1, 1/16 of the weights", lambda m, d: structure_(m, HashedConfig(ratio=1 / 16, layers=["fc1"]))),
    ("CReLU + equivariant convs, circulant fc1", lambda m, d: (compact_(m, CReLUConfig(layers=["conv2"])),
                                                               compact_(m, EquivariantConfig(group="p4", layers=["conv1"])),
                                                               structure_(m, CirculantConfig(layers=["fc1"])))),
]


@suite("compact_layers")
def compact_layers_suite(work: Path, results: Path, *, resume: bool, machine: list[str]) -> list[SummaryRow]:
    cross, faster_from = _crossover()
    splits = load_dataset("mnist")
    example = splits.test[0][0].unsqueeze(0)
    dense = _baseline()
    dense_err = metrics.error_rate(dense, splits.test)
    dense_fp32 = metrics.fp32_bytes(dense)
    table, rows = [], []
    for label, apply in VARIANTS:
        torch.manual_seed(0)
        model = copy.deepcopy(dense)
        if apply is not None:
            apply(model, splits)
        model.eval()
        err0 = metrics.error_rate(model, splits.test)
        cfg = TrainConfig(epochs=1, lr=0.01, momentum=0.9, batch_size=128, schedule="constant", progress=False, device="cpu")
        Trainer(model, cfg).fit(Subset(splits.train, range(FT_IMAGES)))
        model.eval()
        err = metrics.error_rate(model, splits.test)
        params = metrics.count_params(model)
        nbytes = packed_bytes(model)
        mr = metrics.macs(model, example)
        macs = mr.dense + _extra_macs(model, example)
        lat = metrics.latency(model, example, batch_sizes=(1, 64), runs=RUNS, threads=THREADS)
        table.append([label, f"{100 * err0:.2f}%", f"{100 * err:.2f}%", f"{100 * (err - dense_err):+.2f}",
                      f"{params:,}", f"{nbytes:,}", f"{dense_fp32 / nbytes:.2f}x", f"{macs:,}",
                      f"{lat[1].median_ms:.3f} / {lat[64].median_ms:.3f}"])
        rows.append(SummaryRow("compact_layers", label, "lenet5", err, params, metrics.count_nonzeros(model), nbytes,
                               dense_fp32 / nbytes, macs, macs, lat[1].median_ms, lat[64].median_ms))
    cross_line = ", ".join(f"batch {b}: " + (f"from width {w} on" if w else "never within the widths measured")
                           for b, w in faster_from.items())
    doc = [
        "# Structured matrices and compact filters",
        "",
        *machine,
        f"- latency: median of {RUNS} runs after 5 warm-ups, {THREADS} torch thread. The 2-core machine was shared",
        "  with other jobs during the run: absolute times are noisy; the ratios are measured back to back.",
        "",
        "## Circulant (FFT) against dense Linear, square n x n",
        "",
        f"Crossover (the circulant FFT layer is faster, and stays faster at every larger width measured): {cross_line}.",
        "Storage: the circulant layer keeps n weights + n biases (O(n)); the dense one n^2 + n.",
        "",
        markdown_table(("n", "dense params", "circulant params", "dense b1 ms", "circ b1 ms", "b1 speedup",
                        "dense b64 ms", "circ b64 ms", "b64 speedup"), cross),
        "",
        "## Table III style: LeNet-5 on MNIST, variants against the dense baseline",
        "",
        f"Dense baseline (recipes/lenet5.yaml, trained 20 epochs): {100 * dense_err:.2f}% test error, "
        f"{metrics.count_params(dense):,} params, {dense_fp32:,} fp32 bytes.",
        f"Each variant: least-squares projection of the trained layers, then SHORT fine-tuning (1 epoch, "
        f"{FT_IMAGES:,} images, SGD lr 0.01) — the dense row gets the same fine-tuning as a control.",
        "Compression = dense fp32 bytes / .nsk bytes (raw fp32 tensors; no pruning or quantization).",
        "MACs per example: counted Linear/Conv MACs, plus for circulant/Toeplitz layers an ESTIMATE of the FFTs",
        "(n log2 n per real FFT + 4 per complex product), for hashed layers the dense product it runs, and",
        "for equivariant convs the full expanded kernel.",
        "Latency here is measured per variant at different moments of a shared machine (unlike the width table,",
        "whose pairs run back to back): rows differ by load as much as by layer type, e.g. the dense b64 time.",
        "The last row (all three changes at once from the projection) did not recover in one short epoch.",
        "",
        markdown_table(("variant", "error, no FT", "error after FT", "vs dense (points)", "params", ".nsk bytes",
                        "compression", "MACs", "latency b1 / b64 ms"), table),
        "",
    ]
    (results / "compact_layers.md").write_text("\n".join(doc))
    return rows
