"""Fixed-point training (Gupta et al., "Deep Learning with Limited Numerical Precision", ICML 2015) on MNIST
at CPU scale, and mixed-precision bits per layer under a size budget.

Table 1: 16-bit words ⟨IL, FL⟩ = ⟨16 - FL, FL⟩ for FL in FLS, round-to-nearest against stochastic
rounding, for weights and biases, every Linear/Conv layer's output and the gradients (the error at each
layer output and the weight gradients) -- ``FixedPointConfig(activations=True, gradients=True)`` --
against float trained the same way (same init, same batches, same optimizer: plain SGD, no momentum).
Test error after a short training (EPOCHS epochs on TRAIN_SAMPLES training images: CPU scale, far from
the paper's runs), for an MLP 784-1000-1000-10 as Gupta's and for LeNet-5.

Table 2: mixed precision (``MixedPrecisionConfig``) on the float model of table 1: a budget equal to the
bytes of the uniform k-bit model, against that uniform k-bit model (post-training, no fine-tuning).
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

from netshrink import metrics
from netshrink.data import load_dataset
from netshrink.models import build_model
from netshrink.pack import load as nsk_load
from netshrink.pack import pack
from netshrink.quantize import FixedPointConfig, MixedPrecisionConfig, UniformConfig, quantize_
from netshrink.quantize.mixed import layer_bytes
from netshrink.report import markdown_table
from netshrink.train import DivergenceError, TrainConfig, Trainer
from netshrink._layers import weight_layers

from . import SummaryRow, suite

WL = 16
FLS = (14, 12, 10, 8, 6)
ROUNDINGS = ("nearest", "stochastic")
EPOCHS = 2
TRAIN_SAMPLES = 30_000
TRAIN = dict(epochs=EPOCHS, lr=0.1, momentum=0.0, batch_size=100, schedule="constant", progress=False, seed=0, device="cpu")
MODELS = {
    "mlp 784-1000-1000-10": ("mlp", {"in_features": 784, "hidden": [1000, 1000]}),
    "lenet5": ("lenet5", {}),
}
UNIFORM_BITS = (2, 2.5, 3, 4)  # 2.5: a budget between two uniform sizes
SWEEP_SAMPLES = 2000
RUNS = 30


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _pct(e: float | None) -> str:
    return f"{100 * e:.2f}%" if e is not None else "-"


def _fresh(zoo: str, args: dict):
    torch.manual_seed(0)
    return build_model(zoo, **args)


def _train_run(name: str, zoo: str, args: dict, fl: int | None, rounding: str | None, splits, train_set, d: Path, resume: bool) -> dict:
    """Train one variant (fl None: float); cached as JSON (and the float model's weights) in ``d``."""
    label = "float" if fl is None else f"fl{fl}_{rounding}"
    out = d / f"{label}.json"
    if resume and out.exists():
        return dict(json.loads(out.read_text()), cached=True)
    model = _fresh(zoo, args)
    if fl is not None:
        quantize_(model, FixedPointConfig(il=WL - fl, fl=fl, rounding=rounding, activations=True, gradients=True, seed=0))
    t0, load0 = time.perf_counter(), _load()
    diverged = None
    try:
        res = Trainer(model, TrainConfig(**TRAIN)).fit(train_set, splits.val)
        hist = [h.train_loss for h in res.history]
        val = res.final_val_error
    except DivergenceError as err:
        diverged, hist, val = str(err), [], None
    seconds = time.perf_counter() - t0
    test = metrics.error_rate(model.eval(), splits.test) if diverged is None else None
    rec = {"label": label, "fl": fl, "rounding": rounding, "test_error": test, "val_error": val, "train_loss": hist,
           "seconds": seconds, "load": [load0, _load()], "diverged": diverged}
    d.mkdir(parents=True, exist_ok=True)
    if fl is None:
        torch.save(model.state_dict(), d / "float.pt")
    elif fl == FLS[0] and rounding == "stochastic":
        pack(model, d / f"{label}.nsk")
        rec["nsk_bytes"] = (d / f"{label}.nsk").stat().st_size
    out.write_text(json.dumps(rec, indent=2))
    print(f"fixed_point {name} {label}: test {_pct(test)} in {seconds:.0f} s", flush=True)
    return rec


def _images(a: float, b: float, n: int) -> str:
    """The difference of two error rates on ``n`` examples, in examples."""
    return f"{abs(round((a - b) * n))} of {n:,} test images"


def _mixed_section(name: str, zoo: str, args: dict, splits, d: Path) -> tuple[list[str], list[dict]]:
    base = _fresh(zoo, args)
    base.load_state_dict(torch.load(d / "float.pt", weights_only=True))
    base.eval()
    layers = weight_layers(base)
    n_test = len(splits.test)
    rows, recs, uniform = [], [], {}
    err_fp = metrics.error_rate(base, splits.test)
    for k in UNIFORM_BITS:
        budget = sum(layer_bytes(m.weight.numel(), k, m.weight.shape[0]) for m in layers.values()) if k == int(k) else \
            sum(-(-int(m.weight.numel() * k * 2) // 16) + 4 * m.weight.shape[0] for m in layers.values())
        if k == int(k):
            uni = copy.deepcopy(base)
            quantize_(uni, UniformConfig(bits=int(k), activations=False))
            e_uni = metrics.error_rate(uni.eval(), splits.test)
            v_uni = metrics.error_rate(uni, splits.val)
            nsk_u = pack(uni, d / f"uniform{k}.nsk", coding="fixed").total_bytes
            uniform[k] = (e_uni, v_uni, budget)
            rows.append([f"{budget:,} (= uniform {k}-bit)", f"uniform {k} bits", _pct(v_uni), _pct(e_uni), f"{budget:,}", f"{nsk_u:,}", "-"])
        else:
            rows.append([f"{budget:,} ({k} bits per weight)", "no uniform model of this size", "-", "-", "-", "-", "-"])
        mix = copy.deepcopy(base)
        t0 = time.perf_counter()
        res = quantize_(mix, MixedPrecisionConfig(budget_bytes=budget, samples=SWEEP_SAMPLES), data=splits)
        secs = time.perf_counter() - t0
        e_mix = metrics.error_rate(mix.eval(), splits.test)
        v_mix = metrics.error_rate(mix, splits.val)
        nsk_m = pack(mix, d / f"mixed{k}.nsk", coding="fixed").total_bytes
        bits = ", ".join(f"{n}: {b}" for n, b in res.bits.items())
        rows.append(["", f"mixed ({bits})", _pct(v_mix), _pct(e_mix), f"{res.weight_bytes:,}", f"{nsk_m:,}", f"{secs:.1f}"])
        recs.append({"k": k, "budget": budget, "mixed_test": e_mix, "mixed_val": v_mix, "bits": res.bits, "mixed_bytes": res.weight_bytes,
                     "nsk_mixed": nsk_m, "predicted_rise": res.allocation.predicted_rise})
    lines = [
        f"### {name}: mixed precision vs uniform bits at the same size",
        "",
        f"The float model of the table above (test error {_pct(err_fp)}), quantized after training (weights only, per-channel "
        f"symmetric, min-max range; no fine-tuning). Mixed: bits per layer from {{2, 3, 4, 6, 8}} by the sensitivity sweep "
        f"({SWEEP_SAMPLES} validation images, validation cross-entropy) and the knapsack allocation, under a budget equal to the "
        "uniform model's weight bytes (or to 2.5 bits per weight, a size no uniform model has). Weight bytes = codes at b bits + "
        "one fp32 scale per output channel; .nsk = the whole file, fixed-width codes (biases fp32).",
        "",
        markdown_table(("budget (weight bytes)", "quantization", "val error", "test error", "weight bytes", ".nsk bytes", "sweep + allocation (s)"), rows),
        "",
    ]
    for r in recs:
        e, k = r["mixed_test"], r["k"]
        if k in uniform:
            eu, vu, _ = uniform[k]
            word = "better than" if e < eu else ("ties" if e == eu else "WORSE than")
            lines.append(f"- budget = uniform {k}-bit: mixed {_pct(e)} {word} uniform {_pct(eu)} ({_images(e, eu, n_test)}; validation "
                         f"{_pct(r['mixed_val'])} vs {_pct(vu)}){'; the only choice that fits is every layer at 2 bits' if k == min(UNIFORM_BITS) else ''}.")
        else:
            lo, hi = uniform[int(k)], uniform[int(k) + 1]
            lines.append(f"- budget of {k} bits per weight ({r['budget']:,} bytes): mixed {_pct(e)}, between uniform {int(k)} bits "
                         f"({_pct(lo[0])}, {lo[2]:,} bytes) and uniform {int(k) + 1} bits ({_pct(hi[0])}, {hi[2]:,} bytes).")
    lines.append("- Differences of a few test images are within the noise of a 2,000-image sweep: the allocation minimises the "
                 "sum of single-layer validation losses (an additive model), not the test error.")
    lines.append("")
    return lines, recs


def _summary(suite_name: str, label: str, name: str, model, test_error: float, nsk_bytes: int, shape: tuple[int, ...]) -> SummaryRow:
    lat = metrics.latency(model, shape, batch_sizes=(1, 64), runs=RUNS)
    rep = metrics.macs(model, torch.zeros(1, *shape))
    params = metrics.count_params(model)
    return SummaryRow(suite_name, label, name, test_error, params, metrics.count_nonzeros(model), nsk_bytes, 4 * params / nsk_bytes,
                      rep.dense, rep.effective, lat[1].median_ms, lat[64].median_ms)


@suite("fixed_point")
def fixed_point(work: Path, results: Path, *, resume: bool, machine: list[str]) -> list[SummaryRow]:
    t_start = time.perf_counter()
    splits = load_dataset("mnist")
    idx = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(0))[:TRAIN_SAMPLES].tolist()
    train_set = Subset(splits.train, idx)
    shape = tuple(splits.test[0][0].shape)
    doc = [
        "# Fixed-point training (Gupta et al. 2015) and mixed-precision bits per layer",
        "",
        *machine,
        "",
        f"Training: plain SGD (lr {TRAIN['lr']}, no momentum, batch {TRAIN['batch_size']}, constant rate), {EPOCHS} epoch(s) on "
        f"{TRAIN_SAMPLES:,} of the 50,000 MNIST training images (a fixed seeded subset) -- CPU scale: Gupta et al. train for many "
        "more epochs, so every error here is higher than theirs. Same initialisation (seed 0) and the same batches for every "
        "variant. Fixed point: weights and biases, every Linear/Conv output and the gradients (errors at the layer outputs, "
        f"weight gradients) in ⟨IL, FL⟩ with IL + FL = {WL}, accumulation in float32 (as the paper's hardware). Test "
        "error in eval mode (outputs rounded to nearest); validation error after the last epoch. The learning rate was not tuned "
        "(fixed before the runs).",
        "",
    ]
    rows: list[SummaryRow] = []
    all_recs: dict[str, dict] = {}
    for name, (zoo, args) in MODELS.items():
        d = work / zoo
        recs = {"float": _train_run(name, zoo, args, None, None, splits, train_set, d, resume)}
        for fl in FLS:
            for rounding in ROUNDINGS:
                recs[f"fl{fl}_{rounding}"] = _train_run(name, zoo, args, fl, rounding, splits, train_set, d, resume)
        all_recs[name] = recs
        fp = recs["float"]
        table = [["float32", "-", _pct(fp["val_error"]), _pct(fp["test_error"]), "-", " → ".join(f"{x:.3f}" for x in fp["train_loss"]),
                  f"{fp['seconds']:.0f}", f"{fp['load'][0]:.1f} / {fp['load'][1]:.1f}"]]
        for fl in FLS:
            for rounding in ROUNDINGS:
                r = recs[f"fl{fl}_{rounding}"]
                delta = f"{100 * (r['test_error'] - fp['test_error']):+.2f}" if r["test_error"] is not None else "diverged"
                table.append([f"⟨{WL - fl}, {fl}⟩", rounding, _pct(r["val_error"]), _pct(r["test_error"]), delta,
                              " → ".join(f"{x:.3f}" for x in r["train_loss"]) or "-", f"{r['seconds']:.0f}",
                              f"{r['load'][0]:.1f} / {r['load'][1]:.1f}"])
        doc += [f"## {name}", "", markdown_table(("format ⟨IL, FL⟩", "rounding", "val error", "test error", "Δ vs float (points)",
                                                  "train loss per epoch", "train s", "load avg start / end"), table), ""]
        s14, n14 = recs[f"fl{FLS[0]}_stochastic"], recs[f"fl{FLS[0]}_nearest"]
        gap = 100 * (s14["test_error"] - fp["test_error"]) if s14["test_error"] is not None else float("inf")
        doc.append(f"- FL = {FLS[0]}, stochastic rounding: {_pct(s14['test_error'])} vs float {_pct(fp['test_error'])} "
                   f"({gap:+.2f} points): {'at least as good as float (no more than 0.3 points worse)' if gap <= 0.3 else 'NOT as good as float (more than 0.3 points worse)'}.")
        near = [recs[f"fl{fl}_nearest"]["test_error"] for fl in FLS]
        stoch = [recs[f"fl{fl}_stochastic"]["test_error"] for fl in FLS]
        mono = all(b is None or a is None or b >= a or min(a, b) > 0.8 for a, b in zip(near, near[1:]))  # > 80%: chance
        doc.append(f"- Round-to-nearest as FL shrinks ({', '.join(str(f) for f in FLS)}): {', '.join(_pct(e) for e in near)} "
                   f"({'degrades monotonically' if mono else 'does not degrade monotonically'}); stochastic: {', '.join(_pct(e) for e in stoch)}.")
        broke = [fl for fl, e in zip(FLS, near) if e is None or e - fp["test_error"] > 0.02]
        broke_s = [fl for fl, e in zip(FLS, stoch) if e is None or e - fp["test_error"] > 0.02]
        doc.append(f"- More than 2 points worse than float: nearest at FL in {broke or 'none'}, stochastic at FL in {broke_s or 'none'} "
                   f"(n14 nearest {_pct(n14['test_error'])}).")
        doc.append("")
        lines, mixed = _mixed_section(name, zoo, args, splits, d)
        doc += lines
        # summary rows: float, ⟨2, 14⟩ stochastic (16-bit .nsk), mixed at the uniform-3-bit budget
        base = _fresh(zoo, args)
        base.load_state_dict(torch.load(d / "float.pt", weights_only=True))
        fp_bytes = pack(base, d / "float.nsk").total_bytes
        rows.append(_summary("fixed_point", f"float32, {EPOCHS} epoch(s) on {TRAIN_SAMPLES:,} images", name, base.eval(), fp["test_error"], fp_bytes, shape))
        fx_model = nsk_load(d / f"fl{FLS[0]}_stochastic.nsk", _fresh(zoo, args)).eval()
        fx_err = metrics.error_rate(fx_model, splits.test)
        doc.append(f"- {name}: the ⟨{WL - FLS[0]}, {FLS[0]}⟩ stochastic model loaded back from its .nsk ({s14['nsk_bytes']:,} bytes; "
                   f"16-bit weights, float activations): test error {_pct(fx_err)} (with its fixed-point outputs: {_pct(s14['test_error'])})"
                   + (f": it trained with its outputs saturating at {2 ** (WL - FLS[0] - 1)}, which float activations do not do -- run it with "
                      "its output format (the .nsk does not store it)." if fx_err - s14["test_error"] > 0.003 else "."))
        doc.append("")
        rows.append(_summary("fixed_point", f"fixed point <{WL - FLS[0]},{FLS[0]}> stochastic, loaded from .nsk", name,
                             fx_model, fx_err, s14["nsk_bytes"], shape))
        m3 = next(r for r in mixed if r["k"] == 2.5)
        m3_model = nsk_load(d / "mixed2.5.nsk", _fresh(zoo, args)).eval()  # decoded: float32 weights on the b-bit grids
        rows.append(_summary("fixed_point", "mixed precision (PTQ), budget 2.5 bits per weight", name, m3_model,
                             metrics.error_rate(m3_model, splits.test), m3["nsk_mixed"], shape))
    load = _load()
    cached = sum(1 for recs in all_recs.values() for r in recs.values() if r.get("cached"))
    total = sum(len(recs) for recs in all_recs.values())
    doc += [
        "## Notes",
        "",
        "- The .nsk of a fixed-point model stores the weights as 16-bit affine codes (scale 2^-FL); the output and gradient "
        "formats are training-time settings and are not stored: the summary rows' fixed-point model is the one loaded back "
        "from .nsk (float activations), so its test error there is that of the stored weights with float activations, and the "
        "latency of the summary rows is that of the decoded float32 model in torch.",
        f"- Latency (summary): median of {RUNS} runs, batch 1 / 64, {torch.get_num_threads()} torch threads; load average at the end "
        f"{load:.1f} on {os.cpu_count()} cores (the machine is shared).",
        f"- Suite wall time: {time.perf_counter() - t_start:.0f} s"
        + (f"; {cached} of {total} training runs were read from the cache of an earlier run of the same command "
           "(benchmarks/out/fixed_point; their train seconds and load are those of that run)" if cached else "")
        + f"; the training runs took {sum(r['seconds'] for recs in all_recs.values() for r in recs.values()):.0f} s in all.",
        "",
    ]
    (results / "fixed_point.md").write_text("\n".join(doc))
    return rows
