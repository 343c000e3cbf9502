"""Paper rows, part 2 (issue 16, part 3): SSL, network slimming, BinaryConnect, BNN, TWN, Denil's fixed
dictionaries and CP with fine-tuning, each beside its paper's claim. Imported by :mod:`.paper_rows`, which
owns the table; every function here appends one row of ``COLUMNS`` (see there) and its summary rows.

Settings are short CPU schedules on a shared 2-core machine, one torch thread; the epochs run are in each
row, and the verdict gives the gap to the paper with the reason. Paper numbers that could not be checked
against the paper itself are marked so in the row.
"""

from __future__ import annotations

import copy
import os
import time
from collections import OrderedDict

import torch
from torch import nn
from torch.utils.data import TensorDataset

from netshrink import metrics
from netshrink.train import TrainConfig, Trainer

from . import SummaryRow

SGD = dict(momentum=0.9, nesterov=True, batch_size=64, schedule="cosine", progress=False, device="cpu")


def _load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _err(model: nn.Module, data) -> float:
    return metrics.error_rate(model.eval(), data)


def _fit(model: nn.Module, data, epochs: int, lr: float, seed: int = 0, extra=None, **kw) -> float:
    """Train with the one Trainer; returns the wall seconds."""
    cfg = TrainConfig(epochs=epochs, lr=lr, seed=seed, **{**SGD, **kw})
    t = time.perf_counter()
    Trainer(model.train(), cfg, extra_loss=extra).fit(data)
    return time.perf_counter() - t


def _summary(method: str, model_name: str, model: nn.Module, err: float, example: torch.Tensor) -> SummaryRow:
    mac = metrics.macs(model, example)
    return SummaryRow("paper_rows", method, model_name, err, metrics.count_params(model), metrics.count_nonzeros(model),
                      metrics.fp32_bytes(model), 1.0, int(mac.dense), int(mac.effective), 0.0, 0.0)


def _mlp(widths=(500, 300), bn: bool = False) -> nn.Sequential:
    """784-widths-10 with layers fc1, fc2, ... (and bn1, bn2, ... before each ReLU when ``bn``)."""
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten(1))
    prev = 784
    for i, w in enumerate(widths, start=1):
        layers[f"fc{i}"] = nn.Linear(prev, w)
        if bn:
            layers[f"bn{i}"] = nn.BatchNorm1d(w)
        layers[f"relu{i}"] = nn.ReLU()
        prev = w
    layers[f"fc{len(widths) + 1}"] = nn.Linear(prev, 10)
    return nn.Sequential(layers)


def _widths(model: nn.Module) -> list[int]:
    return [m.out_features for m in model.modules() if isinstance(m, nn.Linear)]


# ------------------------------------------------------------------------------------------------ SSL


def ssl_row(splits, rows, summary, base_epochs: int = 12, ssl_epochs: int = 15, ft_epochs: int = 10, ft_lr: float = 0.02) -> None:
    """SSL (Wen et al. 2016) on the paper's MLP 784-500-300-10: group lasso on each layer's input neurons
    (fc1 columns = pixels, fc2 / fc3 columns = the hidden neurons), strengths scaled per layer, two overall
    strengths tried and the one kept chosen on the validation split; then the zero groups removed
    (hidden neurons physically, pixels by a mask on fc1) and fine-tuned."""
    from netshrink.prune import ChannelConfig, apply_mask, prune_
    from netshrink.prune.structured import group_norms, ssl_regularizer

    t0 = time.perf_counter()
    example = splits.test[0][0].unsqueeze(0)
    torch.manual_seed(0)
    base = _mlp()
    _fit(base, splits.train, base_epochs, 0.05, weight_decay=1e-4)
    e_base, v_base = _err(base, splits.test), _err(base, splits.val)
    # by hand from earlier runs (2e-3 / 1e-3 / 3e-4 gave 366-100-208, half of it 368-299-247, commit e211546;
    # 1.5e-3 / 7e-4 / 1.2e-3 gave 366-155-37 at 1.83%, x0.6 367-311-93 at 1.67% with 6 epochs of fine-tuning at 0.005)
    per_layer = {"fc1": 1.5e-3, "fc2": 6e-4, "fc3": 9e-4}
    mults = (1.0, 0.7)
    tried = []
    for mult in mults:
        model = copy.deepcopy(base)
        regs = [ssl_regularizer(s * mult, ["channel"], layers=[n]) for n, s in per_layer.items()]
        _fit(model, splits.train, ssl_epochs, 0.05, seed=1, extra=lambda m, x, y, o: sum(r(m, x, y, o) for r in regs))
        with torch.no_grad():
            cols = group_norms(model.fc1.weight, "channel")
            keep_px = cols >= 0.01 * cols.max()
            for name, nxt in (("fc1", "fc2"), ("fc2", "fc3")):  # a neuron is dead when its outgoing weights are
                out = group_norms(getattr(model, nxt).weight, "channel")
                dead = out < 0.01 * out.max()
                getattr(model, nxt).weight[:, dead] = 0
                getattr(model, name).weight[dead] = 0
                getattr(model, name).bias[dead] = 0
        prune_(model, ChannelConfig(ratio=0.0, threshold=1e-12, input_shape=[1, 28, 28]))
        apply_mask(model.fc1, keep_px.expand_as(model.fc1.weight).clone())
        e_cut = _err(model, splits.test)
        _fit(model, splits.train, ft_epochs, ft_lr, seed=2)
        arch = "-".join(str(v) for v in [int(keep_px.sum()), *_widths(model)])
        w_nnz = sum(int((m.weight != 0).sum()) for m in model.modules() if isinstance(m, nn.Linear))
        tried.append(dict(mult=mult, model=model, arch=arch, cut=e_cut, val=_err(model, splits.val), test=_err(model, splits.test),
                          nnz=w_nnz))
    ok = [t for t in tried if t["val"] <= v_base + 0.001]
    best = min(ok, key=lambda t: t["nnz"]) if ok else min(tried, key=lambda t: t["val"])
    dense = sum(m.weight.numel() for m in base.modules() if isinstance(m, nn.Linear))
    paper_x = dense / (434 * 174 + 174 * 78 + 78 * 10)  # the paper's 434-174-78-10, weights only
    measured = f"baseline {_pct(e_base)} (784-500-300-10); " + "; ".join(
        f"lambda x{t['mult']:g}: {t['arch']} at {_pct(t['test'])} (val {_pct(t['val'])}; before fine-tuning {_pct(t['cut'])}; "
        f"{dense / t['nnz']:.1f}x fewer weights)" for t in tried)
    gap = best["test"] - 0.0153
    verdict = (f"kept (by validation): lambda x{best['mult']:g}, {best['arch']} at {_pct(best['test'])}: "
               + ("error met against 1.53%" if gap <= 0 else f"error gap +{100 * gap:.2f} points against 1.53%")
               + f" ({100 * (best['test'] - e_base):+.2f} from our baseline; the paper: baseline 1.43%) with {dense / best['nnz']:.1f}x fewer "
               f"weights than 784-500-300-10 (the paper's 434-174-78: {paper_x:.1f}x; "
               + "; ".join(f"lambda x{t['mult']:g}: {dense / t['nnz']:.1f}x at {_pct(t['test'])}" for t in tried) + "); "
               f"{base_epochs}+{ssl_epochs}+{ft_epochs} epochs here, the paper's schedule is far longer and its lambda tuned")
    rows.append(["SSL (Wen et al. 2016), MNIST MLP", "784-500-300-10: 1.43% -> 434-174-78 (input pixels-hidden-hidden) at 1.53% "
                 "(the brief's numbers; Neklyudov et al. 2017 quote SSL at 434-174-78 with 1.49%; earlier notes here give a "
                 "469-294-166 row at 1.34%: NOT verified against the paper itself)",
                 f"784-500-300-10 from scratch ({base_epochs} epochs, SGD cosine from 0.05), then group lasso on the input neurons of "
                 f"fc1 / fc2 / fc3 with strengths {' / '.join(f'{v:g}' for v in per_layer.values())} times {' or '.join(f'{m:g}' for m in mults)} "
                 "(from the baseline, cosine from 0.05); groups below 1% "
                 f"of their layer's largest norm removed; fine-tuned (cosine from {ft_lr:g})", f"{base_epochs}+{ssl_epochs}+{ft_epochs} per lambda",
                 measured, verdict, f"{time.perf_counter() - t0:.0f}", _load()])
    summary.append(_summary("SSL (Wen 2016)", f"mlp 784-500-300-10 -> {best['arch']}", best["model"], best["test"], example))


# ------------------------------------------------------------------------------------------ slimming


def slimming_row(splits, rows, summary, epochs: int = 20, ft_epochs: int = 15, lam: float = 1e-3) -> None:
    """Network slimming (Liu et al. 2017) on an MLP with BatchNorm: L1 on the BN scales from scratch, the
    80% of each hidden layer with the smallest |gamma| removed (784-500-300-10 -> 784-100-60-10), fine-tuned."""
    from netshrink.prune import ChannelConfig, prune_
    from netshrink.prune.structured import slimming_regularizer

    t0 = time.perf_counter()
    example = splits.test[0][0].unsqueeze(0)
    torch.manual_seed(0)
    model = _mlp(bn=True)
    _fit(model, splits.train, epochs, 0.05, extra=slimming_regularizer(lam))
    e_sparse = _err(model, splits.test)
    gammas = torch.cat([model.bn1.weight.detach().abs(), model.bn2.weight.detach().abs()])
    small = float((gammas < 0.01 * gammas.max()).float().mean())
    prune_(model, ChannelConfig(ratio=0.0, criterion="bn_scale", layer_ratio={"fc1": 0.8, "fc2": 0.8}, input_shape=[1, 28, 28]))
    e_cut = _err(model, splits.test)
    _fit(model, splits.train, ft_epochs, 0.01, seed=3)
    e = _err(model, splits.test)
    arch = "-".join(str(v) for v in [784, *_widths(model)])
    gap = e - 0.0149
    torch.manual_seed(0)
    alone = _mlp(widths=tuple(_widths(model)[:-1]), bn=True)  # the same small net from scratch, as many epochs in all
    _fit(alone, splits.train, epochs + ft_epochs, 0.05)
    e_small = _err(alone, splits.test)
    rows.append(["network slimming (Liu et al. 2017), MNIST MLP with BatchNorm",
                 "no MLP row verified in the paper (its tables are CIFAR / SVHN / ImageNet CNNs; the search tool found no MNIST row); "
                 "the target in this repository's notes: 784-500-300-10 -> 784-100-60-10 at 1.49%",
                 f"784-500-300-10 with BN, from scratch with L1 {lam:g} on the BN scales (SGD, cosine from 0.05), the 400 and 240 "
                 "hidden neurons of smallest abs(gamma) removed (criterion bn_scale), fine-tuned at 0.01", f"{epochs}+{ft_epochs}",
                 f"after sparse training {_pct(e_sparse)} ({100 * small:.0f}% of gammas below 1% of the largest); pruned to {arch}: "
                 f"{_pct(e_cut)}; fine-tuned {_pct(e)}; control: {arch} with BN from scratch, {epochs + ft_epochs} epochs: {_pct(e_small)}",
                 ("met against 1.49%" if gap <= 0 else f"gap +{100 * gap:.2f} points against 1.49%")
                 + f" with {epochs}+{ft_epochs} epochs (short CPU schedule; lambda set by hand; earlier runs: lambda 2e-3 gave 1.94% "
                 f"at 12+8 and 1.98% at 20+15); slimming {'beats' if e < e_small else 'does not beat'} the small net trained alone "
                 f"({100 * (e - e_small):+.2f} points)",
                 f"{time.perf_counter() - t0:.0f}", _load()])
    summary.append(_summary("slimming 784-100-60-10", "mlp_bn 784-500-300-10", model, e, example))


# ------------------------------------------------------------------------------- BinaryConnect, BNN


BIN_TRAIN = dict(batch_size=100, optimizer="adam", momentum=0.9, schedule="cosine", progress=False, device="cpu")


def _binary_mlp(qcfg, epochs: int, splits, seed: int = 0) -> tuple[nn.Module, float]:
    from netshrink.models import build_model
    from netshrink.quantize import quantize_

    torch.manual_seed(seed)
    model = build_model("mlp_bn", in_features=784, hidden=[1024, 1024, 1024], num_classes=10)
    quantize_(model, qcfg)
    t = time.perf_counter()
    Trainer(model, TrainConfig(epochs=epochs, lr=0.003, seed=seed, **BIN_TRAIN)).fit(splits.train)
    return model.eval(), time.perf_counter() - t


def binaryconnect_row(splits, rows, summary, epochs: int = 5) -> None:
    """BinaryConnect (Courbariaux et al. 2015), MNIST permutation-invariant 784-1024x3-10 + BN: deterministic
    sign, and stochastic (hard-sigmoid sampling, XNOR-Net alpha; BN statistics re-estimated with the
    deterministic weights before testing, as the binary suite does)."""
    from netshrink.quantize import BinaryConfig

    from .binary import _recalibrate_bn

    t0 = time.perf_counter()
    example = splits.test[0][0].unsqueeze(0)
    det, t_det = _binary_mlp(BinaryConfig(stochastic=False, scale=False), epochs, splits)
    e_det = _err(det, splits.test)
    sto, t_sto = _binary_mlp(BinaryConfig(stochastic=True, scale=True), epochs, splits)
    e_sto_raw = _err(sto, splits.test)
    _recalibrate_bn(sto, splits)
    e_sto = _err(sto, splits.test)
    rows.append(["BinaryConnect (Courbariaux et al. 2015), MNIST MLP", "784-1024-1024-1024-10, permutation-invariant: det. 1.29%, "
                 "stoch. 1.18% (1000 epochs, square hinge loss, no data augmentation)",
                 "same net with BN, binary weights +-1 (det.) / hard-sigmoid draws with alpha = mean abs(W) (stoch.), Adam lr 0.003 cosine, "
                 "batch 100, cross-entropy; test with the deterministic sign", f"{epochs} each",
                 f"det. {_pct(e_det)} ({t_det:.0f} s); stoch. {_pct(e_sto)} after BN re-estimation ({_pct(e_sto_raw)} before; {t_sto:.0f} s)",
                 f"gap det. +{100 * (e_det - 0.0129):.2f}, stoch. +{100 * (e_sto - 0.0118):.2f} points with {epochs} epochs against the "
                 "paper's 1000 (the binary suite at 2 epochs: 2.49% / 2.25%; this row at 3 epochs, commit 3e2883e: 1.66% / 1.65%)",
                 f"{time.perf_counter() - t0:.0f}", _load()])
    summary.append(_summary("BinaryConnect det.", "mlp_bn 3x1024", det, e_det, example))
    summary.append(_summary("BinaryConnect stoch.", "mlp_bn 3x1024", sto, e_sto, example))


def bnn_row(splits, rows, summary, epochs: int = 8) -> None:
    """BNN (Hubara et al. 2016): binary weights and sign activations, 784-1024x3-10 + BN."""
    from netshrink.quantize import BnnConfig

    t0 = time.perf_counter()
    example = splits.test[0][0].unsqueeze(0)
    model, t = _binary_mlp(BnnConfig(), epochs, splits)
    e = _err(model, splits.test)
    rows.append(["BNN (Hubara et al. 2016), MNIST MLP", "0.96% (784-4096x3-10, Theano; 1.40% at 3x2048 per the binary suite's notes; not re-checked against the paper here)",
                 "784-1024x3-10 with BN (narrower than the paper), weights and hidden activations +-1, Adam lr 0.003 cosine, batch 100, "
                 "cross-entropy", str(epochs), f"{_pct(e)} ({t:.0f} s training)",
                 f"gap +{100 * (e - 0.0096):.2f} points against 0.96% with {epochs} epochs at a quarter of the width (the paper: "
                 "hundreds of epochs); the binary suite at 5 epochs: 1.98%", f"{time.perf_counter() - t0:.0f}", _load()])
    summary.append(_summary("BNN 3x1024", "mlp_bn 3x1024", model, e, example))


# ------------------------------------------------------------------------------------------------ TWN


def twn_row(splits, rows, summary, lenet5: nn.Module, epochs: int = 5) -> None:
    """TWN (Li & Liu 2016): ternary weights {-a, 0, a}, Delta = 0.7 mean|W|, on the cached LeNet-5, fine-tuned."""
    from netshrink.quantize import TernaryConfig, quantize_

    t0 = time.perf_counter()
    example = splits.test[0][0].unsqueeze(0)
    e_fp = _err(lenet5, splits.test)
    model = copy.deepcopy(lenet5)
    res = quantize_(model, TernaryConfig())
    e0 = _err(model, splits.test)
    t = _fit(model, splits.train, epochs, 0.01)
    e = _err(model, splits.test)
    zeros = ", ".join(f"{k} {100 * v:.0f}%" for k, v in res.zeros.items())
    rows.append(["TWN (Li & Liu 2016), LeNet-5", "0.65% on MNIST (their LeNet-5 32C5-64C5-512, trained ternary from scratch)",
                 f"Caffe LeNet-5 (20C5-50C5-500) from the cached baseline ({_pct(e_fp)}), ternarized per layer (zeros: {zeros}), "
                 "fine-tuned with SGD, cosine from 0.01", str(epochs), f"no fine-tuning {_pct(e0)}; fine-tuned {_pct(e)} ({t:.0f} s)",
                 ("met against 0.65%" if e <= 0.0065 else f"gap +{100 * (e - 0.0065):.2f} points against 0.65%")
                 + f" with {epochs} epochs of fine-tuning on a narrower LeNet-5 (the binary suite at 2 epochs: 0.81%)",
                 f"{time.perf_counter() - t0:.0f}", _load()])
    summary.append(_summary("TWN ternary", "lenet5", model, e, example))


# ---------------------------------------------------------------------------------------------- Denil


def denil_row(splits, rows, summary, base: nn.Module, ranks=(40, 30), epochs: int = 4, scratch_epochs: int = 8) -> None:
    """Denil et al. 2013 on LeNet-300-100: W ~ U V for fc1 / fc2 with V a fixed dictionary (Gaussian random, or
    the identity columns of the largest-norm inputs), only U learned; beside the learned SVD (both factors
    trained). From the baseline with fine-tuning, and the random-V net trained from scratch (the paper's setting)."""
    from netshrink.lowrank import SvdConfig, factorize_
    from netshrink.models import build_model

    t0 = time.perf_counter()
    example = splits.test[0][0].unsqueeze(0)
    layer_rank = {"fc1": ranks[0], "fc2": ranks[1]}
    n_dense = sum(getattr(base, n).weight.numel() for n in ("fc1", "fc2", "fc3"))
    out = {}
    for train in ("both", "fixed_random", "fixed_identity"):
        model = copy.deepcopy(base)
        factorize_(model, SvdConfig(layer_rank=layer_rank, layers=["fc1", "fc2"], train=train))
        e0 = _err(model, splits.test)
        _fit(model, splits.train, epochs, 0.01, seed=4)
        learned = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
        out[train] = (e0, _err(model, splits.test), learned, model)
    torch.manual_seed(5)
    dense = build_model("lenet_300_100")
    _fit(dense, splits.train, scratch_epochs, 0.05, seed=5)
    e_dense = _err(dense, splits.test)
    sweep = []
    for r1, r2 in (ranks, (100, 50), (200, 100)):  # random V from scratch (Denil's setting) at growing ranks
        torch.manual_seed(5)
        scratch = build_model("lenet_300_100")
        factorize_(scratch, SvdConfig(layer_rank={"fc1": r1, "fc2": r2}, layers=["fc1", "fc2"], train="fixed_random"))
        _fit(scratch, splits.train, scratch_epochs, 0.05, seed=5)
        learned = sum(p.numel() for n, p in scratch.named_parameters() if n.endswith("weight"))
        sweep.append((r1, r2, 1 - learned / n_dense, _err(scratch, splits.test)))
    e_s = sweep[0][3]
    e_base = _err(base, splits.test)

    def cell(k: str, label: str) -> str:
        e0, e, learned, _ = out[k]
        return f"{label} {_pct(e0)} -> {_pct(e)} ({100 * (1 - learned / n_dense):.0f}% of the weights predicted)"

    _, e_r, learned_r, _ = out["fixed_random"]
    rows.append(["Denil et al. 2013, predicting parameters (LeNet-300-100)", "in the best case more than 95% of the weights predicted "
                 "without any drop in accuracy (abstract; their MNIST MLP and convnets)",
                 f"fc1 / fc2 as U V at ranks {ranks[0]} / {ranks[1]}, fc3 dense; from the {_pct(e_base)} baseline, fine-tuned "
                 f"(SGD, cosine from 0.01); random V also from scratch (cosine from 0.05). netshrink has no kernel (smoothness) dictionary "
                 "nor a random subset of columns: 'identity' takes the largest-norm input columns",
                 f"{epochs} fine-tuning; {scratch_epochs} from scratch (dense and each rank)",
                 "; ".join([cell("both", "learned SVD (U and V trained)"), cell("fixed_random", "random V fixed"),
                            cell("fixed_identity", "identity columns V fixed")])
                 + f"; from scratch ({scratch_epochs} epochs): dense {_pct(e_dense)}, random V "
                 + ", ".join(f"rank {a}/{b} {_pct(e)} ({100 * f:.0f}% predicted)" for a, b, f, e in sweep),
                 f"random V at {100 * (1 - learned_r / n_dense):.0f}% predicted: {_pct(min(e_r, e_s))} (best of fine-tuned / scratch), "
                 f"{100 * (min(e_r, e_s) - e_base):+.2f} points from the dense baseline: "
                 + ("claim met" if min(e_r, e_s) <= e_base + 0.001 else "claim NOT met at this rank and schedule")
                 + "; from scratch against the dense net of the same schedule: "
                 + ", ".join(f"{100 * f:.0f}% predicted {100 * (e - e_dense):+.2f} points" for a, b, f, e in sweep),
                 f"{time.perf_counter() - t0:.0f}", _load()])
    summary.append(_summary("Denil random V", "lenet_300_100", out["fixed_random"][3], e_r, example))


# ------------------------------------------------------------------------------------------- CP + FT


def _cp_degeneracy(cp: nn.Module) -> float:
    """Sum of the CP terms' norms over the norm of their sum: 1 for orthogonal-like terms, large when
    big terms cancel (a degenerate decomposition that gradient steps tear apart)."""
    with torch.no_grad():
        a = cp.first.weight.flatten(1).T  # (C, R)
        v = cp.vertical.weight.flatten(1)  # (R, kh)
        h = cp.horizontal.weight.flatten(1)  # (R, kw)
        d = cp.last.weight.flatten(1)  # (N, R)
        terms = a.norm(dim=0) * v.norm(dim=1) * h.norm(dim=1) * d.norm(dim=0)
        kernel = torch.einsum("nr,cr,ri,rj->ncij", d, a, v, h)
        return float(terms.sum() / kernel.norm())


def cp_ft_row(splits, rows, summary, lenet5: nn.Module, rank: int = 16) -> None:
    """CP (Lebedev et al. 2015) of LeNet-5's conv2 at rank 16, fine-tuned three ways: as the lowrank suite
    did (SGD lr 0.01, momentum 0.9, batch 128, 1 epoch over 20,000 images), at lr 0.001, and with the CP
    factors frozen for the first epoch (lr 0.01) then all layers at lr 0.001; the dense net gets the first
    fine-tuning as a control."""
    from netshrink.lowrank import CPConfig, factorize_

    t0 = time.perf_counter()
    example = splits.test[0][0].unsqueeze(0)
    ft = TensorDataset(*(t[:20_000] for t in splits.train.tensors))
    kw = dict(batch_size=128, nesterov=False)
    e_base = _err(lenet5, splits.test)
    control = copy.deepcopy(lenet5)
    _fit(control, ft, 1, 0.01, seed=1, **kw)
    e_control = _err(control, splits.test)
    cp0 = copy.deepcopy(lenet5)
    res = factorize_(cp0, CPConfig(rank=rank, layers=["conv2"]))
    rel = res.layers["conv2"].rel_error if hasattr(res, "layers") else float("nan")
    e0 = _err(cp0, splits.test)
    degen = _cp_degeneracy(cp0.conv2)
    out = {}
    for name in ("lr 0.01 (as the lowrank suite)", "lr 0.001", "factors frozen 1 epoch at lr 0.01, then all at 0.001"):
        m = copy.deepcopy(cp0)
        if name.startswith("factors"):
            for p in m.conv2.parameters():
                p.requires_grad_(False)
            _fit(m, ft, 1, 0.01, seed=1, **kw)
            for p in m.conv2.parameters():
                p.requires_grad_(True)
            _fit(m, ft, 1, 0.001, seed=2, **kw)
        else:
            _fit(m, ft, 1, 0.01 if "0.01" in name else 0.001, seed=1, **kw)
        out[name] = (_err(m, splits.test), _cp_degeneracy(m.conv2), m)
    best = min(out, key=lambda k: out[k][0])
    e_first = out["lr 0.01 (as the lowrank suite)"][0]
    rows.append(["CP decomposition + fine-tuning (Lebedev et al. 2015), LeNet-5",
                 "character CNN: 8.5x CPU speedup of the whole net for 1% accuracy (91% -> 90%); AlexNet conv2 4x faster for +1% top-5 "
                 "error, after fine-tuning the whole net (abstract; no MNIST row)",
                 f"conv2 of the cached LeNet-5 ({_pct(e_base)}) as CP rank {rank} (relative kernel error {rel:.3f}; terms' norms / "
                 f"kernel norm {degen:.2f}); fine-tuned on the first 20,000 training images, SGD momentum 0.9, batch 128; "
                 f"dense control with the first fine-tuning: {_pct(e_control)}", "1 (the frozen variant 2)",
                 f"no fine-tuning {_pct(e0)}; " + "; ".join(f"{k}: {_pct(v[0])} (terms/kernel {v[1]:.2f})" for k, v in out.items()),
                 f"before (the lowrank suite's fine-tuning): {_pct(e0)} -> {_pct(e_first)}; best fix, {best}: {_pct(out[best][0])} "
                 f"({100 * (out[best][0] - e_base):+.2f} points from the dense net"
                 + (", no collapse" if out[best][0] <= e0 else ", still worse than before fine-tuning") + "). Cause: the rank-"
                 f"{rank} CP is degenerate (its terms' norms add up to {degen:.0f}x the kernel's norm: large terms cancel); at lr 0.01 "
                 f"the steps pull them apart (ratio -> {out['lr 0.01 (as the lowrank suite)'][1]:.0f}) and the error rises, at lr 0.001 "
                 f"they stay ({out['lr 0.001'][1]:.0f}). The resnet_small collapse of lowrank_zoo.md (8.90% -> 71.50%) is not re-run here",
                 f"{time.perf_counter() - t0:.0f}", _load()])
    summary.append(_summary(f"CP rank {rank} conv2 + FT", "lenet5", out[best][2], out[best][0], example))


ROWS2 = ("ssl", "slimming", "binaryconnect", "twn", "denil", "cp_ft", "bnn")
#: the first cell of each row's line in the table (to keep rows of earlier partial runs)
PREFIX2 = {"ssl": "SSL (Wen", "slimming": "network slimming", "binaryconnect": "BinaryConnect", "bnn": "BNN (Hubara",
           "twn": "TWN (Li", "denil": "Denil et al. 2013", "cp_ft": "CP decomposition"}


def run_row2(name: str, splits, rows, summary, base: nn.Module | None, lenet5_loader) -> None:
    """Run the row ``name`` of :data:`ROWS2`; ``lenet5_loader()`` gives the cached LeNet-5 baseline."""
    if name == "ssl":
        ssl_row(splits, rows, summary)
    elif name == "slimming":
        slimming_row(splits, rows, summary)
    elif name == "binaryconnect":
        binaryconnect_row(splits, rows, summary)
    elif name == "bnn":
        bnn_row(splits, rows, summary)
    elif name == "twn":
        twn_row(splits, rows, summary, lenet5_loader())
    elif name == "denil":
        denil_row(splits, rows, summary, base)
    elif name == "cp_ft":
        cp_ft_row(splits, rows, summary, lenet5_loader())
    else:
        raise KeyError(name)


__all__ = ["PREFIX2", "ROWS2", "run_row2"]
