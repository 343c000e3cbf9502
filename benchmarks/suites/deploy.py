"""Compressed means faster: every method's model in its deployed runtime form, timed against dense.

Speed does not depend on the weights' values, only on shapes, sparsity patterns and the runtime, so the
networks here are the zoo's at a fixed seed (untrained, said in each section); accuracy of the same
compressions is in the suites that train them (structured_pruning, lowrank_zoo, int8_ort). Every ratio
is two medians measured in the same run, the forms taking turns (``netshrink.deploy.time_forms``:
ROUNDS rounds of RUNS timed calls each, the round with the middle median kept), one thread fixed (the
machine is two cores shared with other jobs; the load average is recorded per section).

Sections:
1. The ResNet-50-sized network at 224x224: channel pruning to about a quarter of the parameters, in
   torch and in onnxruntime (fp32, all graph optimizations), then our int8 QDQ on top, beside
   onnxruntime's own ``quantize_static`` (QDQ, per-channel s8 weights, u8 activations) of the dense
   network; Torch-Pruning 1.6 at the same channel ratio (when installed: it is not a dependency).
2. Every structured, low-rank and compact-filter method of the earlier suites on the zoo CNNs,
   re-measured in onnxruntime: speedup against 0.8 x the MAC reduction at batch 32, and at batch 1
   where the dense model takes over 1 ms; where a row misses, the per-operator profile says why.
3. The Deep Compression LeNets (92% / 91% sparse) in every form ``netshrink.deploy`` has (torch dense,
   torch CSR, ORT fp32): the fastest against dense at batch 1 and 64.
4. Early exit (BranchyNet) on LeNet-5 with its exits as real control flow in onnxruntime
   (``netshrink.dynamic.exit_runtime``), against the network without exits, per image at batch 1.
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from netshrink import metrics
from netshrink.deploy import deploy, ort_runner, profile_onnx, time_forms, torch_runner
from netshrink.errors import NetshrinkError
from netshrink.export import export_onnx, ort_session
from netshrink.models import build_model
from netshrink.prune import MagnitudeConfig, prune_
from netshrink.prune.structured import ChannelConfig
from netshrink.report import markdown_table

from . import SummaryRow, suite

THREADS = 1
RUNS, ROUNDS = 20, 3


def _load() -> str:
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"


def _macs(model: nn.Module, x: torch.Tensor) -> int:
    """Dense MACs per example; an EquivariantConv2d (a functional conv with its expanded kernel, which
    metrics.macs does not see) counts as the dense conv it applies (lowrank_zoo's rule)."""
    from .lowrank_zoo import _macs as zoo_macs

    return zoo_macs(model, x)[0]


def _export(model: nn.Module, path: Path, x: torch.Tensor, **kw: Any) -> Any:
    export_onnx(model, path, x, **kw)
    return ort_session(path, threads=THREADS)


def _ort_quantize_static(fp32_path: Path, out: Path, x: torch.Tensor, samples: int = 16) -> Any | None:
    """onnxruntime's own static quantizer (QDQ, per-channel s8 weights, u8 activations) of ``fp32_path``."""
    try:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        return None
    sess = ort_session(fp32_path)
    name = sess.get_inputs()[0].name
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn((1, *x.shape[1:]), generator=gen).numpy() for _ in range(samples)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            b = next(self.it, None)
            return None if b is None else {name: b}

    pre = out.with_name(out.stem + "-pre.onnx")
    quant_pre_process(str(fp32_path), str(pre))
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    return ort_session(out, threads=THREADS)


def _resnet50(work: Path, doc: list[str]) -> list[SummaryRow]:
    torch.manual_seed(0)
    size = int(os.environ.get("DEPLOY_R50_SIZE", "224"))  # smaller only to debug the suite quickly
    dense = build_model("resnet50").eval()
    x = torch.randn(1, 3, size, size)
    cal = torch.utils.data.TensorDataset(torch.randn(32, 3, size, size), torch.zeros(32, dtype=torch.long))
    pruned = copy.deepcopy(dense)
    t0 = time.perf_counter()
    prune_(pruned, ChannelConfig(ratio=0.5, input_shape=[3, size, size]))
    ns_call = time.perf_counter() - t0
    p_dense, p_pruned = metrics.count_params(dense), metrics.count_params(pruned)
    m_dense, m_pruned = _macs(dense, x), _macs(pruned, x)
    runners: dict[str, Any] = {
        "dense torch": torch_runner(dense),
        "pruned torch": torch_runner(pruned),
        "dense ORT fp32": ort_runner(_export(dense, work / "r50-dense.onnx", x)),
        "pruned ORT fp32": ort_runner(_export(pruned, work / "r50-pruned.onnx", x)),
        "pruned ORT int8 (netshrink QDQ)": ort_runner(_export(pruned, work / "r50-pruned-int8.onnx", x, int8=True, calibration=cal,
                                                              calibration_samples=32)),
        "dense ORT int8 (netshrink QDQ)": ort_runner(_export(dense, work / "r50-dense-int8.onnx", x, int8=True, calibration=cal,
                                                             calibration_samples=32)),
    }
    qs = _ort_quantize_static(work / "r50-dense.onnx", work / "r50-dense-ortq.onnx", x)
    if qs is not None:
        runners["dense ORT int8 (onnxruntime quantize_static)"] = ort_runner(qs)
    tp_line = "Torch-Pruning is not installed in this environment (`pip install torch-pruning==1.6.1`): its row is missing."
    try:
        import torch_pruning as tp

        tpm = copy.deepcopy(dense)
        t0 = time.perf_counter()
        imp = tp.importance.MagnitudeImportance(p=1)
        pruner = tp.pruner.MetaPruner(tpm, x, importance=imp, pruning_ratio=0.5,
                                      ignored_layers=[m for m in tpm.modules() if isinstance(m, nn.Linear)])
        pruner.step()
        tp_call = time.perf_counter() - t0
        runners["Torch-Pruning torch"] = torch_runner(tpm)
        runners["Torch-Pruning ORT fp32"] = ort_runner(_export(tpm, work / "r50-tp.onnx", x))
        tp_line = (f"Torch-Pruning {tp.__version__} (MetaPruner, L1 magnitude, ratio 0.5, the fc layer kept): call {tp_call:.1f} s, "
                   f"params {metrics.count_params(tpm):,}, MACs {_macs(tpm, x):,}.")
    except ImportError:
        pass
    load0 = _load()
    timed = time_forms(runners, x, (1, 32), runs=RUNS, rounds=ROUNDS)
    base = timed["dense ORT fp32"]
    rows = []
    for name, t in timed.items():
        rows.append([name, f"{t[1]:.1f}", f"{base[1] / t[1]:.2f}x", f"{t[32]:.0f}", f"{base[32] / t[32]:.2f}x",
                     f"{timed['dense torch'][1] / t[1]:.2f}x", f"{timed['dense torch'][32] / t[32]:.2f}x"])
    red = m_dense / m_pruned
    sp1 = base[1] / timed["pruned ORT fp32"][1]
    sp32 = base[32] / timed["pruned ORT fp32"][32]
    i1 = base[1] / timed["pruned ORT int8 (netshrink QDQ)"][1]
    i32 = base[32] / timed["pruned ORT int8 (netshrink QDQ)"][32]
    doc += [
        f"## 1. ResNet-50-sized network at {size}x{size} (zoo `resnet50`, seed 0, untrained)",
        "",
        f"netshrink `prune_(model, ChannelConfig(ratio=0.5))`: call {ns_call:.1f} s; parameters {p_dense:,} -> {p_pruned:,} "
        f"({100 * p_pruned / p_dense:.1f}%), MACs {m_dense:,} -> {m_pruned:,} ({red:.2f}x fewer). {tp_line}",
        f"Load average at the start {load0}, at the end {_load()}; {THREADS} thread; medians of {RUNS} runs, {ROUNDS} rounds in turns.",
        "",
        markdown_table(("form", "b1 ms", "b1 vs dense ORT", "b32 ms", "b32 vs dense ORT", "b1 vs dense torch", "b32 vs dense torch"), rows),
        "",
        f"- Pruned in ORT fp32 vs dense ORT fp32: {sp1:.2f}x at batch 1, {sp32:.2f}x at batch 32; target 0.8 x {red:.2f} = "
        f"{0.8 * red:.2f}x: {'met' if sp1 >= 0.8 * red else 'MISSED'} at b1, {'met' if sp32 >= 0.8 * red else 'MISSED'} at b32.",
        f"- Pruned + int8 (ours) vs dense ORT fp32: {i1:.2f}x at batch 1, {i32:.2f}x at batch 32; target 5x: "
        f"{'met' if i1 >= 5 else 'MISSED'} at b1, {'met' if i32 >= 5 else 'MISSED'} at b32.",
    ]
    if qs is not None:
        d8 = base[1] / timed["dense ORT int8 (netshrink QDQ)"][1]
        q8 = base[1] / timed["dense ORT int8 (onnxruntime quantize_static)"][1]
        doc.append(f"- Dense int8 at batch 1: ours {d8:.2f}x, onnxruntime quantize_static {q8:.2f}x over fp32 ORT "
                   f"({'at least as fast as' if d8 >= q8 * 0.97 else 'SLOWER than'} quantize_static; 3% noise margin).")
    doc.append("")
    (work / "r50.json").write_text(json.dumps(timed))
    return [SummaryRow("deploy", f"channel 0.5 -> ORT fp32 ({sp1:.2f}x b1, {sp32:.2f}x b32)", "resnet50", float("nan"), p_pruned,
                       p_pruned, 0, 0.0, m_pruned, m_pruned, timed["pruned ORT fp32"][1], timed["pruned ORT fp32"][32])]


def _zoo_methods() -> list[tuple[str, str, Any]]:
    from netshrink.filters import CReLUConfig, EquivariantConfig
    from netshrink.lowrank import CPConfig, SeparableConfig, SvdConfig, TuckerConfig

    from .lowrank_zoo import MOBILENET_PW, RESNET_3X3, RESNET_ALL3, VGG_3X3, VGG_ALL3

    return [
        ("lenet5", "channel 0.5", ChannelConfig(ratio=0.5, input_shape=[1, 28, 28])),
        ("resnet_small", "channel 0.5", ChannelConfig(ratio=0.5, input_shape=[1, 28, 28])),
        ("resnet_small", "tucker-2 25% MACs", TuckerConfig(macs_ratio=0.25, layers=RESNET_3X3)),
        ("resnet_small", "cp 25% params", CPConfig(param_ratio=0.25, layers=RESNET_3X3)),
        ("resnet_small", "separable 40% params", SeparableConfig(param_ratio=0.4, layers=RESNET_3X3)),
        ("resnet_small", "svd rank 4 (fc)", SvdConfig(rank=4, layers=["fc"])),
        ("resnet_small", "equivariant p4", EquivariantConfig(group="p4", layers=RESNET_ALL3)),
        ("resnet_small", "crelu half filters", CReLUConfig(relu=False, layers=RESNET_ALL3)),
        ("vgg_small", "channel 0.5", ChannelConfig(ratio=0.5, input_shape=[1, 28, 28])),
        ("vgg_small", "tucker-2 25% MACs", TuckerConfig(macs_ratio=0.25, layers=VGG_3X3)),
        ("vgg_small", "cp 25% params", CPConfig(param_ratio=0.25, layers=VGG_3X3)),
        ("vgg_small", "separable 40% params", SeparableConfig(param_ratio=0.4, layers=VGG_3X3)),
        ("vgg_small", "svd rank 16 (fc1)", SvdConfig(rank=16, layers=["fc1"])),
        ("vgg_small", "equivariant p4", EquivariantConfig(group="p4", layers=VGG_ALL3)),
        ("vgg_small", "crelu half filters", CReLUConfig(relu=False, layers=VGG_ALL3)),
        ("mobilenet_small", "channel 0.5", ChannelConfig(ratio=0.5, input_shape=[1, 28, 28])),
        ("mobilenet_small", "tucker-2 50% MACs (pw)", TuckerConfig(macs_ratio=0.5, layers=MOBILENET_PW)),
        ("mobilenet_small", "crelu half filters", CReLUConfig(relu=False)),
    ]


def _apply(model: nn.Module, config: Any) -> None:
    from netshrink.filters import CReLUConfig, DepthwiseConfig, EquivariantConfig, compact_
    from netshrink.lowrank import factorize_

    if isinstance(config, ChannelConfig):
        prune_(model, config)
    elif isinstance(config, (CReLUConfig, DepthwiseConfig, EquivariantConfig)):
        compact_(model, config)
    else:
        factorize_(model, config)


def _zoo(work: Path, doc: list[str]) -> list[SummaryRow]:
    x = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    rows, out = [], []
    dense_cache: dict[str, tuple[nn.Module, Any, int]] = {}
    load0 = _load()
    for name, label, config in _zoo_methods():
        if name not in dense_cache:
            torch.manual_seed(0)
            d = build_model(name).eval()
            dense_cache[name] = (d, _export(d, work / f"{name}-dense.onnx", x), _macs(d, x))
        dense, dsess, dmacs = dense_cache[name]
        model = copy.deepcopy(dense)
        try:
            _apply(model, config)
            model.eval()
            path = work / f"{name}-{label.replace(' ', '_').replace('%', 'pct').replace('(', '').replace(')', '')}.onnx"
            sess = _export(model, path, x)
        except NetshrinkError as err:
            rows.append([name, label, "—", "—", "—", "—", "—", f"not deployed: {err}"])
            continue
        cmacs = _macs(model, x)
        t = time_forms({"dense": ort_runner(dsess), "compressed": ort_runner(sess)}, x, (1, 32), runs=RUNS, rounds=ROUNDS)
        red = dmacs / cmacs
        s1, s32 = t["dense"][1] / t["compressed"][1], t["dense"][32] / t["compressed"][32]
        ok32 = s32 >= 0.8 * red
        b1_due = t["dense"][1] > 1.0
        ok1 = s1 >= 0.8 * red
        verdict = f"b32 {'met' if ok32 else 'MISSED'}"
        verdict += f"; b1 {'met' if ok1 else 'MISSED'}" if b1_due else f"; b1 not due (dense {t['dense'][1]:.2f} ms <= 1 ms)"
        if not ok32 or (b1_due and not ok1):
            prof = profile_onnx(path, x, runs=20, threads=THREADS)
            top = ", ".join(f"{k} {100 * v:.0f}%" for k, v in list(prof.items())[:4])
            verdict += f". Profile at b1: {top}"
        rows.append([name, label, f"{red:.2f}x", f"{t['dense'][1]:.3f} / {t['compressed'][1]:.3f}", f"{s1:.2f}x",
                     f"{t['dense'][32]:.2f} / {t['compressed'][32]:.2f}", f"{s32:.2f}x", verdict])
        out.append(SummaryRow("deploy", f"{label} -> ORT fp32", name, float("nan"), metrics.count_params(model),
                              metrics.count_nonzeros(model), 0, 0.0, cmacs, cmacs, t["compressed"][1], t["compressed"][32]))
    doc += [
        "## 2. Structured, low-rank and compact-filter rows in onnxruntime fp32 (zoo CNNs at 28x28, seed 0, untrained)",
        "",
        f"Load average at the start {load0}, at the end {_load()}. Target: speedup >= 0.8 x the MAC reduction at batch 32, "
        "and at batch 1 where the dense model takes over 1 ms. Where a row misses, the per-operator profile of the compressed "
        "graph at batch 1 (shares of the measured time; '(outside nodes)' is onnxruntime's per-call overhead).",
        "",
        markdown_table(("model", "method", "MACs fewer", "b1 ms dense / comp.", "b1 x", "b32 ms dense / comp.", "b32 x", "verdict"), rows),
        "",
    ]
    return out


def _lenets(work: Path, doc: list[str]) -> list[SummaryRow]:
    rows, out = [], []
    load0 = _load()
    for name, sparsity in (("lenet_300_100", 0.92), ("lenet5", 0.91)):
        torch.manual_seed(0)
        model = build_model(name).eval()
        prune_(model, MagnitudeConfig(sparsity=sparsity))
        x = torch.randn(1, 1, 28, 28)
        res = deploy(model, work / f"dc-{name}", x, forms=("torch", "torch-sparse", "onnx-fp32"), batch_sizes=(1, 64),
                     runs=RUNS, rounds=ROUNDS, threads=THREADS, sparse_min=0.85)
        dense = res.form("torch")
        for f in res.forms:
            if f.refused:
                rows.append([name, f.name, "—", "—", "—", "—", f"refused: {f.refused}"])
                continue
            rows.append([name, f.name, f"{f.median_ms[1]:.3f}", f"{f.speedup[1]:.2f}x", f"{f.median_ms[64]:.3f}",
                         f"{f.speedup[64]:.2f}x", "**fastest**" if f.name == res.chosen else ""])
        best = res.form(res.chosen)
        out.append(SummaryRow("deploy", f"magnitude {sparsity:.0%} -> {res.chosen}", name, float("nan"), metrics.count_params(model),
                              metrics.count_nonzeros(model), 0, 0.0, 0, 0, best.median_ms[1], best.median_ms[64]))
        _ = dense
    doc += [
        "## 3. Deep Compression LeNets (magnitude-pruned to the paper's sparsity, seed 0) in every deploy form",
        "",
        f"Load average at the start {load0}, at the end {_load()}. Speedups are against the dense-kernel torch form of the "
        "same pruned model (masks baked in: dense shapes, so the speed of the unpruned network).",
        "",
        markdown_table(("model", "form", "b1 ms", "b1 x", "b64 ms", "b64 x", ""), rows),
        "",
    ]
    return out


def _per_example_ms(fns: dict[str, Any], xs: torch.Tensor, rounds: int = ROUNDS) -> dict[str, float]:
    """Mean ms per call of each fn on the single images of ``xs`` (batch 1, each image once per round), the fns
    taking turns for ``rounds`` rounds; per fn the round with the middle mean."""
    per: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for i in range(3):
                fn(xs[i : i + 1])
            t0 = time.perf_counter_ns()
            for i in range(xs.shape[0]):
                fn(xs[i : i + 1])
            per[name].append((time.perf_counter_ns() - t0) / 1e6 / xs.shape[0])
    return {k: sorted(v)[len(v) // 2] for k, v in per.items()}


def _early_exit(work: Path, doc: list[str]) -> None:
    from torch.utils.data import Subset

    from netshrink.data import load_dataset
    from netshrink.dynamic import EarlyExitNet, train_early_exit
    from netshrink.dynamic.exit_runtime import export_exit_runtime
    from netshrink.train import TrainConfig, Trainer

    splits = load_dataset("mnist")
    torch.manual_seed(0)
    base = build_model("lenet5")
    t0 = time.perf_counter()
    Trainer(base, TrainConfig(epochs=1, lr=0.05, momentum=0.9, batch_size=64, progress=False)).fit(Subset(splits.train, range(10000)))
    ex = splits.test[0][0].unsqueeze(0)
    net = EarlyExitNet.from_sequential(base, ["pool1"], ex)
    train_early_exit(net, Subset(splits.train, range(10000)), None,
                     TrainConfig(epochs=1, batch_size=64, lr=0.01, momentum=0.9, progress=False))
    t_train = time.perf_counter() - t0
    net.eval()
    val = torch.stack([splits.val[i][0] for i in range(2000)])
    val_y = torch.tensor([int(splits.val[i][1]) for i in range(2000)])
    with torch.no_grad():
        full_err = float((net(val).argmax(1) != val_y).float().mean())
        thresholds = [0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0]
        ok = [t for t in thresholds if float((net.route(val, t).logits.argmax(1) != val_y).float().mean()) <= full_err]
    chosen = max(ok) if ok else 0.0
    xs = torch.stack([splits.test[i][0] for i in range(300)])
    ys = torch.tensor([int(splits.test[i][1]) for i in range(300)])
    rt = export_exit_runtime(net, work / "early_exit", ex, chosen, threads=THREADS)
    sess = _export(base, work / "lenet5-ee-full.onnx", ex)
    full_run = ort_runner(sess)
    from netshrink.task import Inputs

    with torch.no_grad():
        routed = net.route(xs, chosen)
        got = rt.run(xs)
        early = float((routed.exit_index == 0).float().mean())
        err_r = float((torch.as_tensor(got.logits).argmax(1) != ys).float().mean())
        err_f = float((net(xs).argmax(1) != ys).float().mean())
        agree = bool(np.array_equal(got.exit_index, routed.exit_index.numpy()))
        load0 = _load()
        t = _per_example_ms({
            "torch, no exits": lambda x: net(x),
            "torch, route": lambda x: net.route(x, chosen),
            "ORT, one graph, no exits": lambda x: full_run(Inputs((x,))),
            "ORT, segments + routing": lambda x: rt.run(x),
        }, xs)
    base_ms = t["ORT, one graph, no exits"]
    rows = [[k, f"{v:.4f}", f"{t['torch, no exits'] / v:.2f}x", f"{base_ms / v:.2f}x"] for k, v in t.items()]
    doc += [
        "## 4. Early exit (BranchyNet) on LeNet-5 in its deployed form",
        "",
        f"LeNet-5 trained 1 epoch on 10,000 MNIST images, then one exit after `pool1` trained jointly 1 epoch ({t_train:.0f} s both). "
        f"Entropy threshold {chosen:g} nats: the largest of {thresholds} whose error on 2,000 validation images is no worse than "
        f"the network without exits. On the first 300 test images {100 * early:.1f}% leave early; error {100 * err_r:.2f}% routed "
        f"(ORT) vs {100 * err_f:.2f}% without exits; the ORT runtime's exits equal `EarlyExitNet.route`'s: {agree}. "
        f"Batch 1, mean ms per image over those 300 images, {ROUNDS} rounds in turns, {THREADS} thread, load {load0} -> {_load()}.",
        "",
        markdown_table(("form", "ms / image", "vs torch without exits", "vs ORT without exits"), rows),
        "",
    ]


@suite("deploy")
def deploy_suite(work: Path, results: Path, *, resume: bool, machine: list[str]) -> list[SummaryRow]:
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(THREADS)
    doc = ["# Deployed form: compressed models in the runtime where they run fastest, against dense", "", *machine, "",
           (__doc__ or "").split("\n\n", 1)[1].strip(), ""]
    rows: list[SummaryRow] = []
    only = os.environ.get("DEPLOY_SECTIONS", "1,2,3,4").split(",")
    if "4" in only:
        _early_exit(work, doc)
    if "3" in only:
        rows += _lenets(work, doc)
    if "2" in only:
        rows += _zoo(work, doc)
    if "1" in only:
        rows += _resnet50(work, doc)
    (results / "deploy.md").write_text("\n".join(doc))
    (work / "rows.json").write_text(json.dumps([r.__dict__ for r in rows], default=str))
    return []  # speed rows carry no test error: the tables live in deploy.md, not in SUMMARY.md
