"""Paper rows (issue 16, parts 3 and 4): one measured row per method beside the number its paper claims,
or the gap with the epochs run and the reason.

The cheap rows first (part 4, never recorded before): data-free neuron merging (Srinivas & Babu 2015),
AGP (Zhu & Gupta 2017), QAT (Jacob et al. 2018), bf16 / fp16 mixed-precision training (Micikevicius et
al. 2018) and stochastic depth (Huang et al. 2016), all on MNIST with the LeNet-300-100 baseline of
``recipes/lenet_300_100.yaml`` (taken from the cache of trained baselines; trained once if missing) or,
for stochastic depth, a residual MLP trained from scratch with and without it. Every row records the
epochs it ran; this machine is shared, so its load average is written beside each row's wall time.
The rows of part 3 (SSL, network slimming, BinaryConnect, BNN, TWN, Denil's fixed dictionaries, CP with
fine-tuning) live in :mod:`._paper_rows2`. ``NETSHRINK_PAPER_ROWS=ssl,twn`` runs a subset; the rows of
the other names are kept from the earlier ``paper_rows.md``.

    python -m benchmarks.run --only paper_rows
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import torch
from torch import nn

from netshrink import metrics
from netshrink.data import load_dataset
from netshrink.models import build_model
from netshrink.pipeline import baseline_cache_path, train_baseline
from netshrink.recipe import load_recipe
from netshrink.report import markdown_table
from netshrink.train import TrainConfig, Trainer

from . import SummaryRow, suite
from ._paper_rows2 import PREFIX2, ROWS2, run_row2

ROOT = Path(__file__).resolve().parents[2]
COLUMNS = ("method", "paper's claim", "setting", "epochs run", "measured", "verdict", "wall (s)", "load avg")
FT = dict(momentum=0.9, nesterov=True, batch_size=64, schedule="cosine", progress=False)


def _load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def _baseline(splits, work: Path) -> nn.Module:
    recipe = load_recipe(ROOT / "recipes" / "lenet_300_100.yaml")
    model = build_model(recipe.model, **recipe.model_args)
    train_baseline(recipe, model, splits, work / "baseline", resume=True, progress=False)
    return model


def _lenet5(splits, work: Path) -> nn.Module:
    """The cached trained LeNet-5 of ``recipes/lenet5.yaml`` (trained once if missing)."""
    recipe = load_recipe(ROOT / "recipes" / "lenet5.yaml")
    model = build_model(recipe.model, **recipe.model_args)
    train_baseline(recipe, model, splits, work / "lenet5", resume=True, progress=False)
    return model.eval()


def _err(model, data) -> float:
    return metrics.error_rate(model, data)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def merge_row(base, splits, rows, summary) -> None:
    """Data-free merging of fc1's and fc2's neurons at growing fractions; no data, no fine-tuning."""
    from netshrink.prune import MergeConfig, prune_

    t0 = time.perf_counter()
    p0 = metrics.count_params(base)
    e0 = _err(base, splits.test)
    sweep = []
    for frac in (0.1, 0.25, 0.5, 0.65, 0.75, 0.85):
        model = copy.deepcopy(base)
        prune_(model, MergeConfig(pairs={"fc1": "fc2", "fc2": "fc3"}, fraction=frac))
        removed = 1.0 - metrics.count_params(model) / p0
        sweep.append((frac, removed, _err(model, splits.test)))
    within = [s for s in sweep if s[2] <= e0 + 0.005]
    best = max(within, key=lambda s: s[1]) if within else None
    at85 = min(sweep, key=lambda s: abs(s[1] - 0.85))
    measured = "; ".join(f"{100 * r:.0f}% removed -> {_pct(e)}" for _, r, e in sweep)
    verdict = (f"largest removal within +0.5 points of the {_pct(e0)} baseline: {100 * best[1]:.0f}%" if best else "no fraction within +0.5 points")
    verdict += f"; at {100 * at85[1]:.0f}% removed the error is {_pct(at85[2])} (+{100 * (at85[2] - e0):.2f} points) — "
    verdict += "claim met" if at85[2] <= e0 + 0.005 else "claim NOT met on this LeNet-300-100 without data"
    rows.append(["data-free neuron merging (Srinivas & Babu 2015)", "up to 85% of the total parameters of an MNIST-trained network removed by pruning its dense layers, without significantly affecting performance (abstract; their network, not LeNet-300-100)",
                 "LeNet-300-100, fc1 and fc2 merged by the same fraction, no data, no fine-tuning", "0", measured, verdict,
                 f"{time.perf_counter() - t0:.0f}", _load()])
    frac, removed, err = best if best else sweep[0]
    model = copy.deepcopy(base)
    prune_(model, MergeConfig(pairs={"fc1": "fc2", "fc2": "fc3"}, fraction=frac))
    summary.append(_summary("merge (data-free)", model, err, splits))


def agp_row(base, splits, rows, summary, epochs: int = 3) -> None:
    """AGP to 90% magnitude sparsity during fine-tuning, beside one-shot pruning with the same fine-tuning."""
    from netshrink.prune import GradualPruner, MagnitudeConfig, prune_

    t0 = time.perf_counter()
    steps_per_epoch = -(-len(splits.train) // 64)
    gradual = copy.deepcopy(base)
    pruner = GradualPruner(gradual, MagnitudeConfig(sparsity=0.9), steps=10, frequency=max(1, (epochs - 1) * steps_per_epoch // 10), data=splits)
    Trainer(gradual, TrainConfig(epochs=epochs, lr=0.01, **FT), callbacks=[pruner]).fit(splits.train)
    oneshot = copy.deepcopy(base)
    prune_(oneshot, MagnitudeConfig(sparsity=0.9))
    e_pruned = _err(oneshot, splits.test)
    Trainer(oneshot, TrainConfig(epochs=epochs, lr=0.01, **FT)).fit(splits.train)
    eg, eo = _err(gradual, splits.test), _err(oneshot, splits.test)
    sg = 1.0 - metrics.count_nonzeros(gradual) / metrics.count_params(gradual)
    rows.append(["AGP (Zhu & Gupta 2017)", "gradual pruning reaches high sparsity with little loss in one training run (no LeNet row in the paper)",
                 "LeNet-300-100 from the baseline, magnitude criterion, 10 pruning steps over the first epochs, to 90% per layer",
                 str(epochs), f"AGP {_pct(eg)} at {100 * sg:.1f}% sparsity; one-shot 90% then the same fine-tuning {_pct(eo)} (before it {_pct(e_pruned)})",
                 "AGP " + ("matches or beats" if eg <= eo else "is behind") + f" one-shot ({100 * (eg - eo):+.2f} points)",
                 f"{time.perf_counter() - t0:.0f}", _load()])
    summary.append(_summary("AGP 90%", gradual, eg, splits))


def qat_row(base, splits, rows, summary, epochs: int = 2) -> None:
    """4-bit weights / 8-bit activations: post-training quantization against QAT fine-tuning."""
    from netshrink.quantize import QATConfig, UniformConfig, quantize_

    t0 = time.perf_counter()
    ptq = copy.deepcopy(base)
    quantize_(ptq, UniformConfig(bits=4), data=splits.train)
    qat = copy.deepcopy(base)
    quantize_(qat, QATConfig(bits=4), data=splits.train)
    Trainer(qat, TrainConfig(epochs=epochs, lr=0.001, **FT)).fit(splits.train)
    e0, ep, eq = _err(base, splits.test), _err(ptq, splits.test), _err(qat, splits.test)
    rows.append(["QAT (Jacob et al. 2018)", "quantization-aware training recovers the accuracy post-training quantization loses at low bit widths",
                 "LeNet-300-100 from the baseline, 4-bit per-channel weights, 8-bit activations", str(epochs),
                 f"fp32 {_pct(e0)}; PTQ {_pct(ep)}; QAT {_pct(eq)}",
                 f"QAT {'recovers' if eq < ep else 'does not recover'}: {100 * (eq - e0):+.2f} points from fp32 (PTQ {100 * (ep - e0):+.2f})",
                 f"{time.perf_counter() - t0:.0f}", _load()])
    summary.append(_summary("QAT w4a8", qat, eq, splits))


def amp_row(splits, rows, summary, epochs: int = 3) -> None:
    """LeNet-300-100 trained from scratch in fp32, bf16 and fp16 autocast, same seed and schedule."""
    t0 = time.perf_counter()
    cfg = dict(epochs=epochs, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4, batch_size=64, schedule="cosine", progress=False)
    out = {}
    for amp in (None, "bf16", "fp16"):
        torch.manual_seed(0)
        model = build_model("lenet_300_100")
        try:
            Trainer(model, TrainConfig(**cfg, amp=amp)).fit(splits.train)
            out[amp] = _err(model, splits.test)
        except Exception as err:  # fp16 autocast may be unavailable on this CPU build: say so
            out[amp] = f"not run: {str(err).splitlines()[0][:120]}"
        if amp is not None and isinstance(out[amp], float):
            summary.append(_summary(f"{amp} training", model, out[amp], splits))
    f32 = out[None]

    def cell(v):
        return _pct(v) if isinstance(v, float) else v

    gaps = [f"{k} {100 * (v - f32):+.2f} points" for k, v in out.items() if k and isinstance(v, float)]
    rows.append(["bf16 / fp16 mixed-precision training (Micikevicius et al. 2018)", "16-bit training matches fp32 accuracy",
                 "LeNet-300-100 from scratch, same seed and schedule (torch.autocast on CPU; fp16 with loss scaling)", str(epochs),
                 f"fp32 {cell(f32)}; bf16 {cell(out['bf16'])}; fp16 {cell(out['fp16'])}",
                 ("within 0.2 points of fp32: " if all(abs(v - f32) <= 0.002 for v in out.values() if isinstance(v, float)) else "gap: ") + ", ".join(gaps),
                 f"{time.perf_counter() - t0:.0f}", _load()])


def stochastic_depth_row(splits, rows, summary, epochs: int = 3) -> None:
    """A residual MLP (784-128, 8 residual blocks of 128, 10) from scratch with and without stochastic depth."""
    from netshrink.dynamic.stochastic_depth import ResidualBlock, apply_stochastic_depth, mlp_branch

    t0 = time.perf_counter()
    cfg = TrainConfig(epochs=epochs, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4, batch_size=64, schedule="cosine", progress=False)
    res = {}
    for sd in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), *[ResidualBlock(mlp_branch(128)) for _ in range(8)], nn.Linear(128, 10))
        if sd:
            apply_stochastic_depth(model, p_last=0.5, seed=0)
        t = time.perf_counter()
        Trainer(model, cfg).fit(splits.train)
        res[sd] = (_err(model, splits.test), time.perf_counter() - t)
    (e0, t0_), (e1, t1) = res[False], res[True]
    rows.append(["stochastic depth (Huang et al. 2016)", "lower test error and about 25% shorter training than the constant-depth net (ResNet-110, CIFAR-10)",
                 "residual MLP, 8 blocks of width 128, linear decay to p_L = 0.5, MNIST", str(epochs),
                 f"constant depth {_pct(e0)} in {t0_:.0f} s; stochastic depth {_pct(e1)} in {t1:.0f} s",
                 f"error {100 * (e1 - e0):+.2f} points, training time {t1 / t0_:.2f}x (shared machine: times are noisy)",
                 f"{time.perf_counter() - t0:.0f}", _load()])


def han2015_row(base, splits, rows, summary, epochs_per_round: int = 10) -> None:
    """Han et al. 2015: iterative magnitude pruning with retraining, to the paper's per-layer densities."""
    from netshrink.prune import MagnitudeConfig, prune_

    t0 = time.perf_counter()
    model = copy.deepcopy(base)
    cfg = MagnitudeConfig(layer_sparsity={"fc1": 0.92, "fc2": 0.91, "fc3": 0.74}, steps=3)
    for k, rnd in enumerate(cfg.substages(), start=1):
        prune_(model, rnd)
        Trainer(model, TrainConfig(epochs=epochs_per_round, lr=0.02, weight_decay=1e-4, seed=k, **FT)).fit(splits.train)
    e0, e = _err(base, splits.test), _err(model, splits.test)
    nnz_w = sum(int((m.weight != 0).sum()) for m in (model.fc1, model.fc2, model.fc3))
    n_w = sum(m.weight.numel() for m in (model.fc1, model.fc2, model.fc3))
    rows.append(["Han et al. 2015, LeNet-300-100", "1.64% -> 1.59% with 8% of the weights kept (12x fewer parameters; Table 1)",
                 "from the baseline: 3 rounds of per-layer magnitude pruning to fc1 8%, fc2 9%, fc3 26% kept, each retrained "
                 f"{epochs_per_round} epochs (SGD, cosine from 0.02; the paper gives no epoch count for LeNet)", str(3 * epochs_per_round),
                 f"{_pct(e0)} -> {_pct(e)} with {100 * nnz_w / n_w:.1f}% of the weights kept ({n_w / nnz_w:.1f}x)",
                 f"{'met' if e <= 0.0159 else f'gap +{100 * (e - 0.0159):.2f} points'} against 1.59%; "
                 f"{100 * (e - e0):+.2f} points from our baseline (the paper: -0.05)",
                 f"{time.perf_counter() - t0:.0f}", _load()])
    summary.append(_summary("Han 2015 pruning", model, e, splits))


class _Jitter(torch.utils.data.Dataset):
    """Hinton's jitter: each training image shifted by up to ``shift`` pixels in each direction (zero fill),
    the shift drawn from a seeded generator per access."""

    def __init__(self, base, shift: int = 2, seed: int = 0):
        self.base, self.shift = base, shift
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        k = self.shift
        dx, dy = (int(v) for v in torch.randint(-k, k + 1, (2,), generator=self.gen))
        padded = torch.nn.functional.pad(x, (k, k, k, k))
        h, w = x.shape[-2:]
        return padded[..., k + dy:k + dy + h, k + dx:k + dx + w], y


def hinton_row(splits, rows, summary, teacher_epochs: int = 30, student_epochs: int = 8) -> None:
    """Hinton et al. 2015 on MNIST: a 784-1200-1200-10 teacher with dropout and jitter, a 784-800-800-10
    student alone and distilled (T = 20)."""
    from netshrink.distill.losses import DistillConfig, distill

    t0 = time.perf_counter()
    sgd = dict(lr=0.05, momentum=0.9, nesterov=True, batch_size=128, schedule="cosine", progress=False)
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(784, 1200), nn.ReLU(), nn.Dropout(0.5), nn.Linear(1200, 1200),
                            nn.ReLU(), nn.Dropout(0.5), nn.Linear(1200, 10))
    Trainer(teacher, TrainConfig(epochs=teacher_epochs, **sgd)).fit(_Jitter(splits.train))

    def student() -> nn.Module:
        torch.manual_seed(1)
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 800), nn.ReLU(), nn.Linear(800, 800), nn.ReLU(), nn.Linear(800, 10))

    alone = student()
    Trainer(alone, TrainConfig(epochs=student_epochs, **sgd)).fit(splits.train)
    distilled = student()
    distill(distilled, teacher, splits.train, None, TrainConfig(epochs=student_epochs, **sgd), DistillConfig(temperature=20.0, alpha=0.9))
    n = len(splits.test)
    et, ea, ed = (round(_err(m, splits.test) * n) for m in (teacher.eval(), alone, distilled))
    rows.append(["Hinton et al. 2015, MNIST distillation", "teacher 67 test errors, student 784-800-800 alone 146, distilled 74",
                 "teacher 784-1200-1200-10, dropout 0.2 / 0.5, jitter up to 2 px; students without regularisation; SGD, cosine from 0.05; "
                 "distillation T = 20, alpha = 0.9; 50,000 training images (the paper: 60,000)",
                 f"teacher {teacher_epochs}, students {student_epochs}",
                 f"teacher {et}, student alone {ea}, distilled {ed} test errors",
                 f"distillation {'helps' if ed < ea else 'does not help'}: {ea - ed:+d} errors against the student alone (the paper: +72); "
                 f"gap to the paper: teacher {et - 67:+d}, distilled {ed - 74:+d}, from the far shorter training",
                 f"{time.perf_counter() - t0:.0f}", _load()])
    summary.append(SummaryRow("paper_rows", "Hinton distilled student", "mlp 784-800-800", ed / n, metrics.count_params(distilled),
                              metrics.count_nonzeros(distilled), metrics.fp32_bytes(distilled), metrics.fp32_bytes(teacher) / metrics.fp32_bytes(distilled),
                              0, 0, 0.0, 0.0))


def _summary(method: str, model: nn.Module, err: float, splits) -> SummaryRow:
    example = splits.test[0][0].unsqueeze(0)
    mac = metrics.macs(model, example)
    return SummaryRow("paper_rows", method, "lenet_300_100", err, metrics.count_params(model), metrics.count_nonzeros(model),
                      metrics.fp32_bytes(model), 1.0, int(mac.dense), int(mac.effective), 0.0, 0.0)


ROWS = ("merge", "agp", "qat", "amp", "stochastic_depth", "han2015", "hinton", *ROWS2)
#: the first cell of each row's line in the table (to keep rows of earlier partial runs)
_PREFIX = {"merge": "data-free neuron merging", "agp": "AGP", "qat": "QAT", "amp": "bf16 / fp16", "stochastic_depth": "stochastic depth", "han2015": "Han et al. 2015", "hinton": "Hinton et al. 2015", **PREFIX2}


def _earlier_rows(md: Path) -> dict[str, list[str]]:
    """The table rows of an earlier paper_rows.md, by row name (a partial run keeps the others)."""
    out: dict[str, list[str]] = {}
    if not md.exists():
        return out
    for line in md.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        for name, prefix in _PREFIX.items():
            if line.startswith("| ") and cells[0].startswith(prefix):
                out[name] = cells
    return out


@suite("paper_rows")
def paper_rows(work: Path, results: Path, *, resume: bool, machine: list[str]) -> list[SummaryRow]:
    splits = load_dataset("mnist")
    only = os.environ.get("NETSHRINK_PAPER_ROWS")  # a comma-separated subset of ROWS, for partial runs
    wanted = [r for r in ROWS if not only or r in only.split(",")]
    base = _baseline(splits, work) if {"merge", "agp", "qat", "han2015", "denil"} & set(wanted) else None
    earlier = _earlier_rows(results / "paper_rows.md")
    rows: list[list[str]] = []
    summary: list[SummaryRow] = []
    for name in wanted:
        fn = {"merge": lambda: merge_row(base, splits, rows, summary), "agp": lambda: agp_row(base, splits, rows, summary),
              "qat": lambda: qat_row(base, splits, rows, summary), "amp": lambda: amp_row(splits, rows, summary),
              "stochastic_depth": lambda: stochastic_depth_row(splits, rows, summary),
              "han2015": lambda: han2015_row(base, splits, rows, summary), "hinton": lambda: hinton_row(splits, rows, summary),
              **{n: (lambda n=n: run_row2(n, splits, rows, summary, base, lambda: _lenet5(splits, work))) for n in ROWS2}}[name]
        fn()
        earlier[name] = rows[-1]
    kept = [n for n in ROWS if n in earlier and n not in wanted]
    rows = [earlier[n] for n in ROWS if n in earlier]
    doc = ["# Paper rows: each method beside its paper's claim", "", *machine,
           f"- rows run now: {', '.join(wanted)}; rows kept from the earlier run of this file: {', '.join(kept) or 'none'} (their date and load are in git history); baseline: the cached LeNet-300-100 of `recipes/lenet_300_100.yaml` "
           f"({_pct(_err(base, splits.test)) if base is not None else 'not used'})", "",
           markdown_table(COLUMNS, rows), ""]
    (results / "paper_rows.md").write_text("\n".join(doc))
    import json

    done = {r.method for r in summary}
    old = results / "paper_rows.json"
    if old.exists():  # the summary rows of the rows not run now stay
        summary = [SummaryRow(**r) for r in json.loads(old.read_text())["rows"] if r["method"] not in done] + summary
    return summary
