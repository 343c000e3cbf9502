"""Low-rank, structured and compact-filter methods on the zoo CNNs: resnet_small (residual, BatchNorm),
vgg_small and mobilenet_small (depthwise-separable blocks), on MNIST.

Each CNN is trained briefly here (BASE_EPOCHS epoch(s) over BASE_IMAGES training images; cached in the
suite's work folder with the settings and the seconds it took, and reused while they match). Then each
method that applies is run on a copy: Tucker-2 with a MACs budget, CP, spatially separable, depthwise-
separable replacement (fitted to the layer's outputs), global rank allocation (rank_budget), SVD of the
Linear head, equivariant filter sharing, CReLU, and layer-wise Tucker with fine-tuning between layers
(the survey's Figure 2). Per method: parameters, MACs, test error before and after a SHORT fine-tune
(1 epoch over FT_IMAGES images; the dense model gets the same fine-tune as a control), latency at
batch 1 and 64 of the dense and the compressed model measured alternately in the same run (one
thread), the speedup against 0.8 x the MAC reduction, each replaced layer timed alone on its real
input, the .nsk round trip and the ONNX export (onnxruntime outputs against torch). Also checks that
naming a layer a method does not apply to (a depthwise conv, a 1x1 conv, a BatchNorm, a Linear for a
conv method) is one ConfigError line naming the field and the layer.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Subset

from netshrink import metrics
from netshrink.data import load_dataset
from netshrink.errors import ConfigError, NetshrinkError
from netshrink.export import export_onnx, ort_predict, ort_session
from netshrink.filters import CReLUConfig, DepthwiseConfig, EquivariantConfig, EquivariantConv2d, compact_
from netshrink.lowrank import CPConfig, LayerwiseConfig, RankBudgetConfig, SeparableConfig, SvdConfig, TuckerConfig, factorize_
from netshrink.lowrank._fit import layer_inputs
from netshrink.models import build_model
from netshrink.pack import load, pack
from netshrink.report import markdown_table
from netshrink.train import TrainConfig, Trainer

from . import SummaryRow, suite

MODELS = ("resnet_small", "vgg_small", "mobilenet_small")
BASE_IMAGES, BASE_EPOCHS, BASE_LR = 15000, 2, 0.05
FT_IMAGES = 2000
EVAL_IMAGES = 2000  # the rows' errors: the first 2,000 test images (CPU budget); the baselines also on all 10,000
THREADS = 1
RUNS, ROUNDS = 20, 2  # latency: median of RUNS timed runs, median over ROUNDS alternating dense / compressed rounds
SHAPE = (1, 28, 28)

#: the 3x3 convs with more than one input channel (the stems see one channel: little to factorize there)
RESNET_3X3 = ["stages.*.0.conv1", "stages.*.0.conv2"]
VGG_3X3 = ["block1.1.conv", "block2.*.conv", "block3.*.conv"]
MOBILENET_PW = ["block*.pw.conv"]
RESNET_ALL3 = ["stem.conv", *RESNET_3X3]
VGG_ALL3 = ["block*.*.conv"]
#: rank_budget scoring: the loss on 2 batches of 64 training images per candidate, 5 levels (CPU budget)
BUDGET = {"batches": 2, "batch_size": 64, "levels": [0.1, 0.2, 0.3, 0.5, 0.75]}


def _methods(name: str) -> list[tuple[str, Any]]:
    """(label, config) of every method run on ``name``."""
    if name == "resnet_small":
        return [
            ("tucker-2, 25% MACs (block 3x3 convs)", TuckerConfig(macs_ratio=0.25, layers=RESNET_3X3)),
            ("cp, 25% params (block 3x3 convs)", CPConfig(param_ratio=0.25, layers=RESNET_3X3)),
            ("separable, 40% params (block 3x3 convs)", SeparableConfig(param_ratio=0.4, layers=RESNET_3X3)),
            ("depthwise-separable, fitted (block 3x3 convs)", DepthwiseConfig(layers=RESNET_3X3, steps=100)),
            ("rank_budget, 40% MACs (all layers)", RankBudgetConfig(macs_ratio=0.4, **BUDGET)),
            ("layerwise tucker-2 25% MACs + FT between layers", LayerwiseConfig(
                method="tucker", args={"macs_ratio": 0.25}, layers=RESNET_3X3, fit_steps=50, finetune_steps=5, samples=128)),
            ("svd rank 4 (fc head)", SvdConfig(rank=4, layers=["fc"])),
            ("equivariant p4 (all 3x3 convs)", EquivariantConfig(group="p4", layers=RESNET_ALL3)),
            ("crelu, half the filters (all 3x3 convs)", CReLUConfig(relu=False, layers=RESNET_ALL3)),
        ]
    if name == "vgg_small":
        return [
            ("tucker-2, 25% MACs (3x3 convs but the first)", TuckerConfig(macs_ratio=0.25, layers=VGG_3X3)),
            ("cp, 25% params (3x3 convs but the first)", CPConfig(param_ratio=0.25, layers=VGG_3X3)),
            ("separable, 40% params (3x3 convs but the first)", SeparableConfig(param_ratio=0.4, layers=VGG_3X3)),
            ("depthwise-separable, fitted (3x3 convs but the first)", DepthwiseConfig(layers=VGG_3X3, steps=100)),
            ("rank_budget, 40% MACs (all layers)", RankBudgetConfig(macs_ratio=0.4, **BUDGET)),
            ("svd rank 16 (fc1 of the head)", SvdConfig(rank=16, layers=["fc1"])),
            ("equivariant p4 (all 3x3 convs)", EquivariantConfig(group="p4", layers=VGG_ALL3)),
            ("crelu, half the filters (all 3x3 convs)", CReLUConfig(relu=False, layers=VGG_ALL3)),
        ]
    return [
        ("tucker-2, 50% MACs (pointwise convs)", TuckerConfig(macs_ratio=0.5, layers=MOBILENET_PW)),
        ("rank_budget, 60% MACs (stem, pointwise, fc)", RankBudgetConfig(macs_ratio=0.6, **BUDGET)),
        ("separable rank 2 (stem)", SeparableConfig(rank=2, layers=["stem.conv"])),
        ("depthwise-separable, fitted (stem)", DepthwiseConfig(layers=["stem.conv"], steps=100)),
        ("svd rank 4 (fc head)", SvdConfig(rank=4, layers=["fc"])),
        ("crelu, half the filters (stem, pointwise)", CReLUConfig(relu=False)),
    ]


#: (model, config) pairs that must fail with one ConfigError line: the layer named is not one the method applies to
NOT_APPLICABLE = [
    ("mobilenet_small", TuckerConfig(rank=4, layers=["block1.dw.conv"])),
    ("mobilenet_small", CPConfig(rank=4, layers=["block2.dw.conv"])),
    ("mobilenet_small", SeparableConfig(rank=2, layers=["block1.pw.conv"])),
    ("mobilenet_small", DepthwiseConfig(layers=["block3.pw.conv"], steps=0)),
    ("mobilenet_small", RankBudgetConfig(macs_ratio=0.5, layers=["block3.dw.conv"])),
    ("mobilenet_small", LayerwiseConfig(method="separable", args={"rank": 2}, layers=["block1.dw.conv"])),
    ("mobilenet_small", CReLUConfig(layers=["block1.dw.conv"])),
    ("mobilenet_small", EquivariantConfig(layers=["block2.dw.conv"])),
    ("resnet_small", SvdConfig(rank=4, layers=["stem.conv"])),
    ("resnet_small", TuckerConfig(rank=4, layers=["fc"])),
    ("resnet_small", TuckerConfig(rank=4, layers=["stages.0.0.bn1"])),
    ("vgg_small", CPConfig(rank=4, layers=["pool1"])),
]

WHY = {
    "tucker2_conv": "one conv becomes three (1x1, the kxk core, 1x1): three calls, three passes over memory, and on "
                    "the small maps here the per-call cost is a large share of the time",
    "cp_conv": "one conv becomes four (1x1, a depthwise 3x1, a depthwise 1x3, 1x1); PyTorch's CPU depthwise convs "
               "reach a small fraction of a dense conv's throughput per MAC",
    "separable_conv": "one conv becomes two (3x1 then 1x3), each with a thinner kernel that vectorizes less well",
    "depthwise_separable_conv": "a depthwise 3x3 (groups = C: little arithmetic per byte moved) and a 1x1 conv",
    "lowrank_linear": "the head is a tiny share of the MACs: removing its MACs cannot show in the total",
    "equivariant_conv": "the MACs do not change (the full kernel is applied) and the kernel is rebuilt from the stored "
                        "filters (flips, transposes, a concatenation) on every call",
    "crelu_conv": "half the filters, but the output [z, -z] is a negation and a concatenation: an extra pass over the "
                  "output feature map",
}


# ---------------------------------------------------------------------------------------------- helpers


def _family(config: Any):
    return compact_ if isinstance(config, (CReLUConfig, DepthwiseConfig, EquivariantConfig)) else factorize_


def _macs(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(MACs, conv/linear calls) per example; an EquivariantConv2d (F.conv2d with its expanded kernel,
    which metrics.macs does not see) counts as the dense conv it applies."""
    rep = metrics.macs(model, x)
    extra = 0

    def hook(module, args, out):
        nonlocal extra
        extra += out.numel() // out.shape[1] * module.dense_weight().numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, EquivariantConv2d)]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return rep.dense + extra, sum(layer.calls for layer in rep.layers) + len(handles)


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _latency_pair(a: nn.Module, b: nn.Module, example: torch.Tensor | tuple[int, ...], runs: int = RUNS,
                  rounds: int = ROUNDS) -> tuple[dict[int, tuple[float, float]], float]:
    """Per batch size (1, 64): the median over ``rounds`` alternating rounds of each model's median of
    ``runs`` timed runs (ms); and the highest 1-minute load average seen meanwhile."""
    times: dict[int, tuple[list[float], list[float]]] = {1: ([], []), 64: ([], [])}
    load = _load()
    for _ in range(rounds):
        for i, m in enumerate((a, b)):
            for bs, st in metrics.latency(m, example, batch_sizes=(1, 64), runs=runs, warmup=3, threads=THREADS).items():
                times[bs][i].append(st.median_ms)
        load = max(load, _load())
    return {bs: (statistics.median(d), statistics.median(c)) for bs, (d, c) in times.items()}, load


def _train(model: nn.Module, data, epochs: int, lr: float, seed: int) -> float:
    cfg = TrainConfig(epochs=epochs, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4, batch_size=64,
                      schedule="cosine" if epochs > 1 else "constant", seed=seed, progress=False, device="cpu")
    t0 = time.perf_counter()
    Trainer(model, cfg).fit(data)
    model.eval()
    return time.perf_counter() - t0


def _baseline(name: str, splits, work: Path) -> tuple[nn.Module, str]:
    """The briefly trained CNN, cached in ``work`` with the settings it was trained with."""
    from safetensors.torch import load_file, save_file

    model = build_model(name)
    path, meta = work / f"{name}-baseline.safetensors", work / f"{name}-baseline.json"
    want = {"images": BASE_IMAGES, "epochs": BASE_EPOCHS, "lr": BASE_LR, "batch_size": 64, "seed": 0}
    if path.exists() and meta.exists():
        info = json.loads(meta.read_text())
        if info.get("train") == want:
            model.load_state_dict(load_file(str(path)))
            return model.eval(), (f"trained by an earlier run of this suite ({BASE_EPOCHS} epoch(s) over {BASE_IMAGES:,} "
                                  f"training images in {info['seconds']:.0f} s), loaded from the cache")
    torch.manual_seed(0)
    secs = _train(model, Subset(splits.train, range(BASE_IMAGES)), BASE_EPOCHS, BASE_LR, seed=0)
    work.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    meta.write_text(json.dumps({"train": want, "seconds": secs}))
    return model.eval(), f"trained in this run: {BASE_EPOCHS} epoch(s) over {BASE_IMAGES:,} training images, {secs:.0f} s"


def _round_trips(model: nn.Module, xb: torch.Tensor, work: Path) -> tuple[int, str, str]:
    """(.nsk bytes, the .nsk round trip verdict, the ONNX verdict)."""
    with torch.no_grad():
        want = model.eval()(xb)
    path = work / "compressed.nsk"
    try:
        nbytes = pack(model, path).total_bytes
        with torch.no_grad():
            same = torch.equal(load(path).eval()(xb), want)
        nsk = "equal" if same else "DIFFERENT"
    except NetshrinkError as exc:
        nbytes, nsk = 0, f"FAILED: {exc}"
    try:
        res = export_onnx(model, work / "compressed.onnx", SHAPE)
        got = torch.from_numpy(ort_predict(ort_session(res.path, threads=THREADS), xb))
        diff = float((got - want).abs().max())
        agree = bool((got.argmax(1) == want.argmax(1)).all())
        onnx = f"max abs diff {diff:.1e}" + ("" if agree else ", argmax DIFFERS")
    except NetshrinkError as exc:
        onnx = f"FAILED: {exc}"
    return nbytes, nsk, onnx


def _layer_rows(dense: nn.Module, model: nn.Module, layers: list[str], example: torch.Tensor) -> list[list[str]]:
    """Each replaced layer alone on the input it sees in the dense model: MACs and latency, old vs new."""
    rows = []
    for name in layers:
        old, new = dense.get_submodule(name), model.get_submodule(name)
        x = layer_inputs(dense, old, [example])[0]
        (m_old, c_old), (m_new, c_new) = _macs(old, x), _macs(new, x)
        lat, _ = _latency_pair(old, new, x, rounds=1)
        red = m_old / m_new
        s1, s64 = lat[1][0] / lat[1][1], lat[64][0] / lat[64][1]
        rows.append([name, getattr(type(new), "netshrink_type", type(new).__name__), f"{c_old} -> {c_new}", f"{red:.2f}x",
                     f"{lat[1][0]:.4f} / {lat[1][1]:.4f} ({s1:.2f}x)", f"{lat[64][0]:.3f} / {lat[64][1]:.3f} ({s64:.2f}x)",
                     f"{0.8 * red:.2f}x", _verdict(s1, s64, red)])
    return rows


def _verdict(s1: float, s64: float, red: float) -> str:
    target = 0.8 * red
    if s1 >= target and s64 >= target:
        return "met"
    if s64 >= target:
        return "met at b64 only"
    if s1 >= target:
        return "met at b1 only"
    return "MISSED"


def _not_applicable() -> list[list[str]]:
    rows = []
    for model_name, config in NOT_APPLICABLE:
        model = build_model(model_name).eval()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            _family(config)(model, config, data=torch.randn(8, *SHAPE))
            verdict, text = "NO ERROR (bug)", "-"
        except ConfigError as exc:
            text = str(exc)
            unchanged = not getattr(model, "netshrink_edits", []) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
            verdict = "one line, model unchanged" if "\n" not in text and unchanged else "MULTI-LINE or model changed"
        except Exception as exc:  # anything else is the failure this check looks for
            verdict, text = f"WRONG ERROR {type(exc).__name__}", str(exc).splitlines()[0][:200]
        rows.append([model_name, config.method, ", ".join(config.layers), f"`{text}`", verdict])
    return rows


# ---------------------------------------------------------------------------------------------- one model


def _one(name: str, splits, work: Path, doc: list[str]) -> list[SummaryRow]:
    work.mkdir(parents=True, exist_ok=True)
    dense, how = _baseline(name, splits, work)
    example = splits.test[0][0].unsqueeze(0)
    xb = torch.stack([splits.test[i][0] for i in range(16)])
    ft_data = Subset(splits.train, range(FT_IMAGES))
    test = Subset(splits.test, range(EVAL_IMAGES))
    base_full = metrics.error_rate(dense, splits.test)
    base_err = metrics.error_rate(dense, test)
    base_params = metrics.count_params(dense)
    base_macs, base_calls = _macs(dense, example)
    base_bytes, _, base_onnx = _round_trips(dense, xb, work)

    control = copy.deepcopy(dense)
    ft_secs = _train(control.train(), ft_data, 1, 0.01, seed=1)
    control_err = metrics.error_rate(control, test)

    table, layer_table, slower, rows = [], [], [], []
    d_lat_all = []
    for label, config in _methods(name):
        torch.manual_seed(0)
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        result = _family(config)(model, config, data=splits)
        secs = time.perf_counter() - t0
        model.eval()
        replaced = list(result.layers)
        err0 = metrics.error_rate(model, test)
        macs, calls = _macs(model, example)
        lat, load = _latency_pair(dense, model, SHAPE)
        d_lat_all.append(lat)
        layer_rows = _layer_rows(dense, model, replaced, example)
        layer_table += [[label, *r] for r in layer_rows]
        _train(model.train(), ft_data, 1, 0.01, seed=1)
        err1 = metrics.error_rate(model, test)
        nbytes, nsk, onnx = _round_trips(model, xb, work)
        params = metrics.count_params(model)
        red = base_macs / macs
        s1, s64 = lat[1][0] / lat[1][1], lat[64][0] / lat[64][1]
        ranks = [f"{n}: {list(f.ranks)}" for n, f in result.layers.items() if hasattr(f, "ranks")]
        table.append([label, str(len(replaced)), f"{secs:.1f}", f"{base_params:,} -> {params:,}",
                      f"{base_macs:,} -> {macs:,} ({red:.2f}x)", f"{base_calls} -> {calls}",
                      f"{100 * err0:.2f}%", f"{100 * err1:.2f}%",
                      f"{lat[1][0]:.3f} / {lat[1][1]:.3f} ({s1:.2f}x)", f"{lat[64][0]:.2f} / {lat[64][1]:.2f} ({s64:.2f}x)",
                      f"{0.8 * red:.2f}x", _verdict(s1, s64, red), f"{load:.1f}", f"{nbytes:,}", nsk, onnx])
        kinds = sorted({getattr(type(model.get_submodule(n)), "netshrink_type", "") for n in replaced})
        if s1 < 1.0 or s64 < 1.0:
            at = " and ".join(f"batch {b}" for b, s in ((1, s1), (64, s64)) if s < 1.0)
            noise = " (by less than 5%: within the run-to-run noise here)" if min(s1, s64) >= 0.95 else ""
            slower.append(f"- **{label}** is SLOWER than dense at {at} ({s1:.2f}x / {s64:.2f}x){noise}: "
                          + "; ".join(WHY.get(k, k) for k in kinds) + ".")
        if ranks and len(ranks) <= 10:
            doc_ranks = "; ".join(ranks)
            table[-1][0] += f" <br>ranks {doc_ranks}"
        rep = metrics.macs(model, example)
        rows.append(SummaryRow("lowrank_zoo", label, name, err1, params, metrics.count_nonzeros(model), nbytes,
                               4 * base_params / nbytes if nbytes else 0.0, macs, rep.effective + (macs - rep.dense),
                               lat[1][1], lat[64][1]))
    d1 = statistics.median(l[1][0] for l in d_lat_all)
    d64 = statistics.median(l[64][0] for l in d_lat_all)
    rows.insert(0, SummaryRow("lowrank_zoo", "dense baseline (briefly trained)", name, base_full, base_params,
                              metrics.count_nonzeros(dense), base_bytes, 4 * base_params / base_bytes, base_macs, base_macs, d1, d64))
    doc += [
        f"## {name}",
        "",
        f"Baseline: {how}. Test error {100 * base_full:.2f}% on all 10,000 test images, {100 * base_err:.2f}% on the "
        f"first {EVAL_IMAGES:,} (the rows' errors are on these), {base_params:,} parameters, {base_macs:,} MACs per example, "
        f"{base_calls} conv/linear calls, .nsk {base_bytes:,} B, ONNX: {base_onnx}.",
        f"Dense control, the same short fine-tune as every row (1 epoch over {FT_IMAGES:,} images, {ft_secs:.0f} s): "
        f"test error {100 * control_err:.2f}% — compare each row's error after fine-tuning with this, not with the baseline.",
        f"Dense latency over the rows (median of the per-row medians): {d1:.3f} ms at batch 1, {d64:.2f} ms at batch 64.",
        "",
        markdown_table(("method", "layers", "replace s", "params", "MACs (reduction)", "calls", "error, no FT",
                        "error after FT", "b1 ms dense / comp. (speedup)", "b64 ms dense / comp. (speedup)",
                        "target 0.8 x MAC red.", "verdict", "load avg", ".nsk B", ".nsk round trip", "ONNX vs torch"), table),
        "",
        "Slower than dense, and why:" if slower else "No method was slower than dense at either batch size.",
        "",
        *slower,
        "",
        "### Each replaced layer alone (its real input from the dense model; one round of "
        f"{RUNS} timed runs per batch size)",
        "",
        markdown_table(("method", "layer", "module", "calls", "MAC red.", "b1 ms old / new (speedup)",
                        "b64 ms old / new (speedup)", "target", "verdict"), layer_table),
        "",
    ]
    return rows


@suite("lowrank_zoo")
def lowrank_zoo_suite(work: Path, results: Path, *, resume: bool, machine: list[str]) -> list[SummaryRow]:
    torch.manual_seed(0)
    if not resume:
        for p in work.glob("*/*-baseline.*"):
            p.unlink()
    t_start = time.perf_counter()
    splits = load_dataset("mnist")
    doc = [
        "# Low-rank, structured-matrix and compact-filter methods on the zoo CNNs",
        "",
        *machine,
        f"- latency: {THREADS} torch thread; each number is the median over {ROUNDS} rounds, alternating dense and",
        f"  compressed, of the median of {RUNS} timed runs after 3 warm-ups; the speedup is the ratio of the two,",
        "  measured in the same run. The 2-core machine is shared: the 1-minute load average seen while timing",
        "  is in each row.",
        f"- training: SHORT. Each CNN is trained {BASE_EPOCHS} epoch(s) over the first {BASE_IMAGES:,} training images",
        f"  (SGD, Nesterov momentum 0.9, lr {BASE_LR}, weight decay 5e-4, batch 64); every method is then fine-tuned",
        f"  1 epoch over the first {FT_IMAGES:,} training images (lr 0.01), and so is the dense control. Settings",
        "  were set by hand, not tuned on the validation split.",
        "- MACs: per example, every Linear/Conv call (the small convs inside a replaced layer included); an",
        "  equivariant conv counts as the dense conv it applies (it builds the full kernel). calls: Linear/Conv",
        "  calls per forward pass.",
        f"- errors: the rows' test errors are on the first {EVAL_IMAGES:,} test images (one standard error is about",
        "  0.5 points at 5% error); the summary rows of the compressed models carry that error, the dense baselines'",
        "  the full test set's.",
        "- .nsk round trip: pack, load into a fresh zoo model, outputs on 16 test images compared with",
        "  torch.equal. ONNX: netshrink.export.export_onnx, run in onnxruntime on the same 16 images.",
        "",
    ]
    rows = []
    for name in MODELS:
        rows += _one(name, splits, work / name, doc)
    na = _not_applicable()
    doc += [
        "## A method named on a layer it does not apply to",
        "",
        "Each call must fail with one ConfigError line that names the config field and the layer, and leave the",
        "model unchanged.",
        "",
        markdown_table(("model", "method", "layers", "error", "verdict"), na),
        "",
        f"Suite wall time: {time.perf_counter() - t_start:.0f} s.",
        "",
    ]
    (results / "lowrank_zoo.md").write_text("\n".join(doc))
    return rows
