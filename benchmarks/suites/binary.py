"""Binary and ternary networks on MNIST: the papers' rows, the 1-bit file, and XNOR–popcount against float.

1. XNOR–popcount Linear (:class:`netshrink.quantize.XnorLinear`, numpy ``bitwise_count``) against a torch
   fp32 ``nn.Linear`` of the same size, n x n for n = 1024, 2048, 4096, batch 1 and 64, one thread,
   timed alternately (as the sparse_exec suite does); outputs checked equal to the float computation.
2. BinaryConnect MLP, deterministic and stochastic (Courbariaux et al. 2015: 1.29% / 1.18%),
   784-1024-1024-1024-10 with BN, trained from scratch for a few epochs.
3. BNN MLP (Hubara et al. 2016: 0.96% at 3x4096, 1.40% at 3x2048), binary weights and activations,
   at a smaller width and few epochs; its XNOR form checked equal and timed.
4. TWN on Caffe's LeNet-5 (Li & Liu 2016: 0.65% on their 32C5-64C5-512 LeNet-5), from the cached
   trained baseline, ternarized and fine-tuned briefly.
5. The memory row: .nsk bytes of the 1-bit models against fp32 (target: 1/32 of the weight bytes plus
   the scales).

Trained models are cached under benchmarks/out/binary (safetensors, with their training wall time), so a
rerun only re-measures; ``--fresh`` retrains.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from netshrink import metrics
from netshrink.data import load_dataset
from netshrink.models import build_model
from netshrink.pack import load, pack, read_info
from netshrink.quantize import BinaryConfig, BnnConfig, TernaryConfig, XnorLinear, quantize_, to_xnor_
from netshrink.quantize.xnor import pack_signs, reference_forward, xnor_dot_t
from netshrink.report import markdown_table
from netshrink.train import TrainConfig, Trainer

from . import SummaryRow, suite
from .pruning_criteria import cached_baseline

THREADS = 1
#: training threads: one, since the 2 shared cores are oversubscribed (a probe at load 5-7: 2 threads 1011 ms/step, 1 thread 148 ms/step)
TRAIN_THREADS = 1
WIDTHS = (1024, 2048, 4096)
BATCHES = (1, 64)
PAIRS = 30
#: BinaryConnect's MNIST MLP (3 x 1024, BN); BNN at a smaller width than the paper's 2048/4096 (CPU time)
BC_HIDDEN = [1024, 1024, 1024]
BNN_HIDDEN = [1024, 1024, 1024]
#: few epochs (the papers train for hundreds); Adam with a cosine decay, batch 100 as in the BNN paper
BC_TRAIN = TrainConfig(epochs=2, batch_size=100, optimizer="adam", lr=0.003, momentum=0.9, schedule="cosine", progress=False, seed=0)
BNN_TRAIN = TrainConfig(epochs=5, batch_size=100, optimizer="adam", lr=0.003, momentum=0.9, schedule="cosine", progress=False, seed=0)
TWN_FT = TrainConfig(epochs=2, batch_size=64, lr=0.01, momentum=0.9, nesterov=True, schedule="cosine", progress=False, seed=0)
PAPER = {"BinaryConnect det.": 0.0129, "BinaryConnect stoch.": 0.0118, "BNN 3x4096": 0.0096, "BNN 3x2048": 0.0140, "TWN": 0.0065}


def _load() -> str:
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"


def _pct(e: float) -> str:
    return f"{100 * e:.2f}%"


# ------------------------------------------------------------------------------------ XNOR vs float


def _interleaved(fa, fb, pairs: int = PAIRS, warmup: int = 3) -> tuple[float, float, float]:
    """Median ms of ``fa`` and ``fb`` and the median per-pair ratio ``t_a / t_b`` (called alternately)."""
    ta, tb = [], []
    for _ in range(warmup):
        fa()
        fb()
    for i in range(pairs):
        for f, acc in ((fa, ta), (fb, tb)) if i % 2 == 0 else ((fb, tb), (fa, ta)):
            t0 = time.perf_counter_ns()
            f()
            acc.append((time.perf_counter_ns() - t0) / 1e6)
    return statistics.median(ta), statistics.median(tb), statistics.median(sorted(a / b for a, b in zip(ta, tb)))


def _xnor_sweep() -> tuple[list[str], dict]:
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    rows, wins = [], {}
    try:
        for n in WIDTHS:
            torch.manual_seed(0)
            lin = nn.Linear(n, n)
            quantize_(lin, BinaryConfig(scale=True))
            xl = XnorLinear.from_linear(lin)
            dense = nn.Linear(n, n)
            with torch.no_grad():
                dense.weight.copy_(lin.weight)
                dense.bias.copy_(lin.bias)
            wbits = xl._words_t()  # word-major, as XnorLinear keeps them
            for b in BATCHES:
                x = torch.where(torch.randn(b, n) >= 0, 1.0, -1.0)
                with torch.no_grad():
                    exact = torch.equal(xl(x), reference_forward(lin, x))
                    diff = float((xl(x) - dense(x)).abs().max())
                    xb = pack_signs(x)
                    md, mx, r = _interleaved(lambda: dense(x), lambda: xl(x))
                    _, mk, rk = _interleaved(lambda: dense(x), lambda: xnor_dot_t(xb, wbits, n))
                wins[(n, b)] = (r, rk)
                rows.append([f"{n}x{n}", str(b), f"{md:.3f}", f"{mx:.3f}", f"{r:.2f}x", f"{mk:.3f}", f"{rk:.2f}x",
                             "yes" if exact else "NO", f"{diff:.1e}", f"{4 * n * n:,} / {n * n // 8:,}"])
    finally:
        torch.set_num_threads(before)
    header = ["layer", "batch", "torch fp32 (ms)", "XNOR layer (ms)", "speedup", "XNOR kernel only (ms)", "speedup",
              "equal to float α(sign x · sign W)+b", "max diff to fp32 Linear", "weight bytes fp32 / packed"]
    return [markdown_table(header, rows)], wins


# ------------------------------------------------------------------------------------ training


def _fit(name: str, model: nn.Module, cfg: TrainConfig, splits, work: Path, resume: bool) -> dict:
    """Train ``model`` (already quantized), or load it from the cache with the wall time it took then."""
    from safetensors.torch import load_file, save_file

    d = work / name
    state_path, meta_path = d / "model.safetensors", d / "meta.json"
    if resume and state_path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("epochs") == cfg.epochs:  # a cache of another epoch count is trained again
            model.load_state_dict(load_file(str(state_path)))
            meta["cached"] = True
            return meta
    load_before = _load()
    t0 = time.perf_counter()
    res = Trainer(model, cfg).fit(splits.train, splits.val)
    wall = time.perf_counter() - t0
    meta = {"epochs": cfg.epochs, "wall_s": wall, "load_before": load_before, "load_after": _load(),
            "val_errors": [h.val_error for h in res.history], "cached": False}
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(state_path))
    meta_path.write_text(json.dumps(meta))
    return meta


def _weight_bytes(info, names: list[str]) -> tuple[int, int, int]:
    """(fp32 bytes of these weights, bytes of their sign sections, bytes of their scale sections)."""
    fp32 = signs = scales = 0
    for n in names:
        t = info.tensor(n)
        fp32 += 4 * t.numel
        for s in t.sections:
            if s.part in ("signs", "trits"):
                signs += s.nbytes
            elif s.part == "scale":
                scales += s.nbytes
    return fp32, signs, scales


def _deployed(model: nn.Module, path: Path) -> tuple[nn.Module, int, bool]:
    """Pack ``model``; load the file back (plain weights) and check the outputs are equal."""
    stats = pack(model, path)
    back = load(path).eval()
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        same = torch.equal(back(x), model.eval()(x))
    return back, stats.total_bytes, same


def _row(method: str, model_name: str, deployed: nn.Module, err: float, nbytes: int) -> SummaryRow:
    example = torch.zeros(1, 1, 28, 28)
    rep = metrics.macs(deployed, example)
    lat = metrics.latency(deployed, (1, 28, 28), batch_sizes=BATCHES, runs=30, threads=THREADS)
    params = metrics.count_params(deployed)
    return SummaryRow("binary", method, model_name, err, params, metrics.count_nonzeros(deployed), nbytes, 4 * params / nbytes,
                      rep.dense, rep.effective, lat[1].median_ms, lat[64].median_ms)


RECAL_IMAGES = 10_000


@torch.no_grad()
def _recalibrate_bn(model: nn.Module, splits, n: int = RECAL_IMAGES, batch: int = 500) -> None:
    """Re-estimate every BN's running statistics (cumulative average over the first ``n`` training
    images) with the weight quantizers in eval mode, i.e. with the deterministic binary weights."""
    from netshrink.quantize._common import WeightQuantizer

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [b.momentum for b in bns]
    for b in bns:
        b.reset_running_stats()
        b.momentum = None
    model.train()
    for m in model.modules():
        if isinstance(m, WeightQuantizer):
            m.eval()
    for xb in splits.train.tensors[0][:n].split(batch):
        model(xb)
    for b, mom in zip(bns, momenta):
        b.momentum = mom
    model.eval()


def _mlp_section(splits, work: Path, resume: bool) -> tuple[list[str], list[SummaryRow], dict]:
    runs = {
        "BinaryConnect det.": ("bc_det", BC_HIDDEN, BinaryConfig(stochastic=False, scale=False), BC_TRAIN),
        "BinaryConnect stoch.": ("bc_stoch_scaled", BC_HIDDEN, BinaryConfig(stochastic=True, scale=True), BC_TRAIN),
        f"BNN {len(BNN_HIDDEN)}x{BNN_HIDDEN[0]}": ("bnn", BNN_HIDDEN, BnnConfig(), BNN_TRAIN),
    }
    table, rows, out = [], [], {}
    for label, (key, hidden, qcfg, tcfg) in runs.items():
        torch.manual_seed(0)
        model = build_model("mlp_bn", in_features=784, hidden=hidden, num_classes=10)
        quantize_(model, qcfg)
        meta = _fit(key, model, tcfg, splits, work, resume)
        model.eval()
        if qcfg.stochastic:  # BN statistics were gathered under random draws; eval uses the deterministic sign
            out["stoch_before_recal"] = (metrics.error_rate(model, splits.val), metrics.error_rate(model, splits.test))
            _recalibrate_bn(model, splits)
        err = metrics.error_rate(model, splits.test)
        val = metrics.error_rate(model, splits.val)
        deployed, nbytes, same = _deployed(model, work / key / f"{key}.nsk")
        paper_key = label if label in PAPER else ("BNN 3x2048" if BNN_HIDDEN[0] <= 2048 else "BNN 3x4096")
        paper = PAPER[paper_key]
        table.append([label, f"784-{'-'.join(map(str, hidden))}-10 + BN", f"{meta['epochs']} ({tcfg.optimizer}, lr {tcfg.lr:g}, {tcfg.schedule})",
                      f"{meta['wall_s']:.0f} s (load {meta['load_before']} → {meta['load_after']}){', cached run' if meta.get('cached') else ''}", _pct(val), _pct(err),
                      f"{_pct(paper)} ({paper_key})", f"{100 * (err - paper):+.2f}", "yes" if same else "NO"])
        if key == "bnn":
            xn = copy.deepcopy(deployed)
            converted = to_xnor_(xn)
            x = splits.test.tensors[0]
            with torch.no_grad():
                xn_same = torch.equal(xn(x), deployed(x))
            out["bnn_xnor"] = (xn, deployed, converted, xn_same, metrics.error_rate(xn, splits.test))
        rows.append(_row(label, "mlp_bn", deployed, err, nbytes))
        out[key] = (model, deployed, nbytes, err)
    header = ["method", "model", "epochs", "training wall", "val error", "test error", "paper", "Δ points vs paper", ".nsk round trip exact"]
    return [markdown_table(header, table)], rows, out


def _twn_section(splits, work: Path, resume: bool) -> tuple[list[str], SummaryRow]:
    base = cached_baseline("lenet5.yaml", splits, work)
    base.eval()
    err_fp = metrics.error_rate(base, splits.test)
    model = copy.deepcopy(base)
    res = quantize_(model, TernaryConfig())
    err_0 = metrics.error_rate(model.eval(), splits.test)
    meta = _fit("twn_lenet5", model, TWN_FT, splits, work, resume)
    model.eval()
    err = metrics.error_rate(model, splits.test)
    val = metrics.error_rate(model, splits.val)
    deployed, nbytes, same = _deployed(model, work / "twn_lenet5" / "twn.nsk")
    zeros = ", ".join(f"{k} {100 * v:.0f}%" for k, v in res.zeros.items())
    lines = [
        markdown_table(["model", "float baseline", "ternary, no FT", f"ternary + {meta['epochs']} epochs FT", "val error", "FT wall", "paper (TWN)",
                        "Δ points vs paper", ".nsk bytes (fp32 bytes)", "round trip exact"],
                       [["Caffe LeNet-5 (20C5-50C5-500)", _pct(err_fp), _pct(err_0), _pct(err), _pct(val),
                         f"{meta['wall_s']:.0f} s (load {meta['load_before']} → {meta['load_after']}){', cached run' if meta.get('cached') else ''}", "0.65% (32C5-64C5-512)",
                         f"{100 * (err - PAPER['TWN']):+.2f}", f"{nbytes:,} ({4 * metrics.count_params(deployed):,})", "yes" if same else "NO"]]),
        "",
        f"Zeros after ternarization (Δ = 0.7 mean|W| per layer): {zeros}. Fine-tuning: SGD, lr {TWN_FT.lr:g}, Nesterov, cosine, "
        f"batch {TWN_FT.batch_size}, from the cached trained baseline of `recipes/lenet5.yaml` (the paper trains its own, wider LeNet-5 "
        "from scratch, so the rows are not the same network).",
    ]
    return lines, _row("TWN ternary + FT", "lenet5", deployed, err, nbytes)


def _memory_section(out: dict, work: Path) -> list[str]:
    rows = []
    for key, label in (("bc_det", "BinaryConnect det. (α = 1)"), ("bnn", "BNN (α = 1)")):
        model, deployed, nbytes, _ = out[key]
        info = read_info(work / key / f"{key}.nsk")
        names = [t.name for t in info.tensors if t.encoding == "binary"]
        fp32_w, signs, scales = _weight_bytes(info, names)
        target = fp32_w / 32
        total_fp32 = 4 * metrics.count_params(deployed)
        rows.append([label, ", ".join(names), f"{fp32_w:,}", f"{signs:,}", f"{scales:,}", f"{fp32_w / (signs + scales):.2f}x",
                     f"{target:,.0f} + {scales:,}", f"{signs - target:+,.0f}", f"{nbytes:,}", f"{total_fp32:,}", f"{total_fp32 / nbytes:.1f}x"])
    # an XNOR-Net-scaled layer: one fp32 α per output row
    torch.manual_seed(0)
    xnet = build_model("mlp_bn", in_features=784, hidden=BNN_HIDDEN, num_classes=10)
    quantize_(xnet, BnnConfig(scale=True))
    stats = pack(xnet, work / "xnor_scaled.nsk")
    info = read_info(work / "xnor_scaled.nsk")
    names = [t.name for t in info.tensors if t.encoding == "binary"]
    fp32_w, signs, scales = _weight_bytes(info, names)
    total_fp32 = 4 * metrics.count_params(xnet)
    rows.append(["BNN with XNOR-Net α per row (untrained)", ", ".join(names), f"{fp32_w:,}", f"{signs:,}", f"{scales:,}",
                 f"{fp32_w / (signs + scales):.2f}x", f"{fp32_w / 32:,.0f} + {scales:,}", f"{signs - fp32_w / 32:+,.0f}",
                 f"{stats.total_bytes:,}", f"{total_fp32:,}", f"{total_fp32 / stats.total_bytes:.1f}x"])
    header = ["model", "binary tensors", "fp32 weight bytes", "sign bytes", "scale bytes", "weights: fp32 / (signs + scales)",
              "target: fp32/32 + scales", "signs − fp32/32", ".nsk file bytes", "fp32 model bytes", "whole-file ratio"]
    return [markdown_table(header, rows), "",
            "Sign bytes at or below fp32/32: one bit per weight, or less where the auto coding found a block Huffman code of a "
            "skewed sign stream smaller (the 'signs − fp32/32' column). The whole-file ratio is lower than 32x because the BN parameters and running statistics, "
            "the header and the section table stay as they are (fp32 / JSON)."]


@suite("binary")
def binary(work: Path, results: Path, *, resume: bool, machine: list[str]) -> list[SummaryRow]:
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    load_start = _load()
    sweep, wins = _xnor_sweep()
    splits = load_dataset("mnist")
    threads_train = TRAIN_THREADS
    before = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        mlp_lines, rows, out = _mlp_section(splits, work, resume)
        twn_lines, twn_row = _twn_section(splits, work, resume)
    finally:
        torch.set_num_threads(before)
    rows.append(twn_row)
    mem = _memory_section(out, work)

    xn, deployed, converted, xn_same, xn_err = out["bnn_xnor"]
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        x = splits.test.tensors[0]
        with torch.no_grad():
            whole = {b: _interleaved(lambda: deployed(x[:b]), lambda: xn(x[:b])) for b in BATCHES}
    finally:
        torch.set_num_threads(before)
    bnn_err = out["bnn"][3]
    rows.append(SummaryRow("binary", f"BNN {len(BNN_HIDDEN)}x{BNN_HIDDEN[0]}, XNOR popcount layers", "mlp_bn", xn_err, rows[2].params,
                           rows[2].nonzeros, rows[2].bytes, rows[2].ratio, rows[2].macs_dense, rows[2].macs_effective,
                           whole[1][1], whole[64][1]))

    def verdict(r: float) -> str:
        return "XNOR faster" if r > 1.0 else "float faster"

    win_lines = [f"- {n}x{n}, batch {b}: XNOR layer {r:.2f}x ({verdict(r)}); kernel only {rk:.2f}x ({verdict(rk)})" for (n, b), (r, rk) in wins.items()]
    won = ", ".join(f"{n}x{n} at batch {b} ({r:.2f}x)" for (n, b), (r, _) in wins.items() if r > 1.0)
    lost = ", ".join(f"{n}x{n} at batch {b} ({r:.2f}x)" for (n, b), (r, _) in wins.items() if r <= 1.0)
    total = time.perf_counter() - t_start
    doc = [
        "# Binary and ternary networks: BinaryConnect, BNN, XNOR–popcount, TWN",
        "",
        *machine,
        f"- load average: {load_start} at the start, {_load()} at the end (2 cores shared with other jobs)",
        f"- suite wall time: {total / 60:.1f} min (a model trained in an earlier run of this suite is loaded from benchmarks/out/binary: "
        "'cached run' in its row, with the wall time and load of the run that trained it)",
        "",
        "## XNOR–popcount Linear against torch fp32",
        "",
        f"One n x n binarized Linear (XNOR-Net α per row, bias), inputs ±1. torch fp32 `nn.Linear` with the same ±α weights against "
        f"`XnorLinear` (sign bits in uint64 words; per word one XOR, `np.bitwise_count` and add over a cache-sized block); **{THREADS} thread** for torch "
        f"(numpy's ufuncs are single-threaded), {PAIRS} alternating pairs after 3 warm-ups, speedup = median per-pair ratio "
        "fp32 / XNOR. 'XNOR layer' is the whole forward from a float input (packing the signs, popcounts, α and bias); "
        "'kernel only' takes pre-packed inputs (what a chain of binary layers would pass on) and returns the integer dot products.",
        "",
        *sweep,
        "",
        *win_lines,
        "",
        f"Where XNOR wins (whole layer from a float input): {won or 'nowhere in this grid'}; where fp32 wins: {lost or 'nowhere in this grid'}. "
        "At batch 1 the fp32 layer is a matrix-vector product bound by reading 4n² bytes of weights, and the packed weights "
        "are 32x smaller. At batch 64 fp32 GEMM reuses each weight 64 times at full SIMD FMA throughput, while numpy makes "
        "three passes (XOR, popcount, add) over a (batch, rows) block per 64-bit word: 64x fewer operations than the "
        "MACs, but each a separate memory pass and a Python-level call. At small n the fixed cost of packing the input signs "
        "and of n/64 x 3 ufunc calls weighs most. A fused kernel (XOR and popcount accumulated in registers, "
        "e.g. AVX-512 VPOPCNTQ) would remove the passes.",
        "",
        "## MLPs on MNIST: BinaryConnect and BNN",
        "",
        f"Trained from scratch on the 50,000 training images (validation: the 10,000 held out; test reported once), torch "
        f"{threads_train} thread(s). Few epochs, not the papers' hundreds (CPU budget): the gap to the papers is mostly that. "
        f"The BNN is {len(BNN_HIDDEN)}x{BNN_HIDDEN[0]}, smaller than the paper's 3x2048 / 3x4096; it is compared with the 3x2048 row. "
        "Weights ±1 (α = 1; BN after every layer; the stochastic row: see below), the real-valued weights clipped to [-1, 1] after each update; the loss is "
        "cross-entropy (the papers use a square hinge loss). Test error is measured with binary weights (the deterministic sign "
        "in eval, also for the stochastic run; BinaryConnect reports its stochastic row with the real-valued weights at test time).",
        "",
        *mlp_lines,
        "",
        f"Stochastic BinaryConnect: the row above samples with XNOR-Net's α per row, P(+1) = hσ(w / α) (`BinaryConfig(stochastic=True, "
        f"scale=True)`), and its BN statistics were re-estimated with the deterministic weights on {RECAL_IMAGES:,} training images "
        f"before testing (BN collected them under random draws; as trained: val {_pct(out['stoch_before_recal'][0])}, test "
        f"{_pct(out['stoch_before_recal'][1])}). A first run with the paper's α = 1, P(+1) = hσ(w), did not learn in 2 epochs: "
        "the weights start near ±0.04, so P(+1) ≈ 0.5 and the draws are near coin flips (after 2 epochs of Adam, mean |w| was "
        "0.047; val error 90.08% as trained, 79.81% with BN re-estimated). The paper trains for far more epochs with Glorot-scaled "
        "learning rates.",
        "",
        f"BNN with its hidden Linear layers ({', '.join(converted)}) swapped for `XnorLinear` (`to_xnor_`; fc1 sees the real pixels and "
        f"stays float): logits on the 10,000 test images **{'equal' if xn_same else 'NOT equal'}** to the float BNN's bit for bit; test error "
        f"{_pct(xn_err)} (float {_pct(bnn_err)}). Whole model, one thread, alternating pairs: batch 1 float {whole[1][0]:.3f} ms vs XNOR "
        f"{whole[1][1]:.3f} ms ({whole[1][2]:.2f}x); batch 64 float {whole[64][0]:.3f} ms vs XNOR {whole[64][1]:.3f} ms ({whole[64][2]:.2f}x).",
        "",
        "## TWN: ternary LeNet-5",
        "",
        *twn_lines,
        "",
        "## Memory: 1 bit per weight",
        "",
        *mem,
        "",
        "Latency in the summary rows: the model loaded back from its .nsk (plain dense fp32 weights; torch kernels, one thread); "
        "for the XNOR row, the BNN with XnorLinear layers.",
        "",
    ]
    (results / "binary.md").write_text("\n".join(doc))
    return rows
