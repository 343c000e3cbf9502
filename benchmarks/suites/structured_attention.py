"""Head-wise pruning of attention on MNIST: the ``vit_tiny`` patch transformer (16 patches of 7x7, width
64, 2 blocks of 8 heads) with ``nn.MultiheadAttention`` and with grouped-query attention (8 query heads
sharing 2 key/value heads).

For each: a trained baseline (trained here, cached), head ratios 0.25 / 0.5 / 0.75 pruned by L1 and
Taylor without fine-tuning (heads only: ``ratio 0``, ``head_ratio r``), for GQA both ways of keeping
the groups consistent (``gqa_heads: kv`` / ``query``), then heads 0.5 together with half of every MLP's
hidden units and a short fine-tune (the criterion chosen on the validation split). MACs are counted by
hand for the attention layers (projections, ``QKᵀ`` and ``AV``; ``metrics.macs`` sees only Linear
layers it can hook) plus ``metrics.macs`` for the other layers. Latency: dense vs pruned measured back
to back, one thread, batch 1 and 64, median of medians over alternating rounds; the 1-minute load
average is recorded beside it. Also: the masked (zeroed heads) twin vs the pruned model, and a
.nsk round trip.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

from netshrink import metrics
from netshrink.data import load_dataset
from netshrink.models import build_model
from netshrink.pack.nsk import load, pack
from netshrink.prune import prune_
from netshrink.prune.structured import ChannelConfig
from netshrink.prune.structured.attention import ATTENTION_TYPES, attn_shape
from netshrink.report import markdown_table
from netshrink.train import TrainConfig, Trainer

from . import SummaryRow, suite

THREADS = 1
EPOCHS = 4  # baseline training epochs on the 50,000 training images
FT_EPOCHS = 1
HEAD_RATIOS = (0.25, 0.5, 0.75)
VARIANTS = {"mha": None, "gqa": 2}  # kv_heads


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _train(model, data, epochs: int, lr: float, seed: int = 0) -> float:
    cfg = TrainConfig(epochs=epochs, lr=lr, optimizer="adam", batch_size=128, schedule="cosine", seed=seed, progress=False,
                      device="cpu")
    t0 = time.perf_counter()
    Trainer(model, cfg).fit(data)
    return time.perf_counter() - t0


def _err(model, data) -> float:
    with torch.no_grad():
        return metrics.error_rate(model.eval(), data)


def attention_macs(model, x) -> int:
    """MACs of one forward pass on ``x``: attention layers by hand (q/k/v/out projections, ``QKᵀ``,
    ``AV``), every other Linear / Conv by :func:`netshrink.metrics.macs`."""
    attn = {n: m for n, m in model.named_modules() if isinstance(m, ATTENTION_TYPES)}
    total = 0
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: shapes.__setitem__(n, tuple(inp[0].shape)))
             for n, m in attn.items()]
    try:
        rep = metrics.macs(model, x)
    finally:
        for h in hooks:
            h.remove()
    for layer in rep.layers:
        if not any(layer.name == a or layer.name.startswith(a + ".") for a in attn):
            total += layer.dense
    for n, m in attn.items():
        s = attn_shape(m)
        batch, seq = shapes[n][0], shapes[n][1]  # batch first in vit_tiny, self-attention
        per = seq * (s.q_in * s.heads * s.head_dim + (s.k_in + s.v_in) * s.kv_heads * s.head_dim
                     + 2 * seq * s.heads * s.head_dim + s.heads * s.head_dim * s.out)
        total += batch * per
    return total


def _latency(dense, pruned, rounds: int = 3) -> dict[int, tuple[float, float]]:
    out: dict[int, tuple[list, list]] = {1: ([], []), 64: ([], [])}
    for _ in range(rounds):
        for i, m in enumerate((dense, pruned)):
            for b, st in metrics.latency(m, (1, 28, 28), batch_sizes=(1, 64), runs=30, warmup=5, threads=THREADS).items():
                out[b][i].append(st.median_ms)
    return {b: (statistics.median(d), statistics.median(p)) for b, (d, p) in out.items()}


def _baseline(variant: str, splits, work: Path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = build_model("vit_tiny", kv_heads=VARIANTS[variant])
    path = work / f"vit_tiny-{variant}-baseline.safetensors"
    meta = work / f"vit_tiny-{variant}-baseline.json"
    if path.exists() and meta.exists():
        model.load_state_dict(load_file(str(path)))
        return model, json.loads(meta.read_text())["how"] + " (cached)"
    secs = _train(model, splits.train, EPOCHS, 2e-3)
    work.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    how = f"trained here: Adam, lr 2e-3 cosine, batch 128, {EPOCHS} epoch(s) on 50,000 images, {secs:.0f} s (load {_load():.1f})"
    meta.write_text(json.dumps({"how": how}))
    return model, how


def _one(variant: str, splits, work: Path, doc: list[str]) -> list[SummaryRow]:
    model, how = _baseline(variant, splits, work)
    model.eval()
    x1 = splits.test[0][0].unsqueeze(0)
    xb = torch.stack([splits.test[i][0] for i in range(64)])
    base_err, base_val = _err(model, splits.test), _err(model, splits.val)
    dense_macs = attention_macs(model, x1)
    train_sub = Subset(splits.train, range(min(10000, len(splits.train))))
    modes = ("kv", "query") if VARIANTS[variant] else ("kv",)

    sweep = []
    for mode in modes:
        for r in HEAD_RATIOS:
            for crit in ("l1", "taylor"):
                m = copy.deepcopy(model)
                t0 = time.perf_counter()
                res = prune_(m, ChannelConfig(ratio=0.0, head_ratio=r, criterion=crit, gqa_heads=mode, input_shape=[1, 28, 28],
                                              batches=4, batch_size=128), data=train_sub)
                secs = time.perf_counter() - t0
                a = m.blocks[0].attn
                kv = getattr(a, "num_kv_heads", a.num_heads)
                sweep.append([mode if VARIANTS[variant] else "-", str(r), crit, f"{a.num_heads}/{kv}",
                              f"{attention_macs(m, x1):,}", f"{100 * _err(m, splits.val):.2f}%", f"{100 * _err(m, splits.test):.2f}%",
                              f"{secs:.2f}"])
                del res

    # heads 0.5 + MLP hidden 0.5, both criteria, chosen on validation, then a short fine-tune
    cands = {}
    for crit in ("l1", "taylor"):
        m = copy.deepcopy(model)
        res = prune_(m, ChannelConfig(ratio=0.5, criterion=crit, input_shape=[1, 28, 28], batches=4, batch_size=128), data=train_sub)
        cands[crit] = (_err(m, splits.val), m, res)
    best = min(cands, key=lambda c: cands[c][0])
    pruned, res = cands[best][1], cands[best][2]
    cut_err = _err(pruned, splits.test)
    ft_secs = _train(pruned.train(), splits.train, FT_EPOCHS, 5e-4, seed=1)
    pruned.eval()
    ft_err = _err(pruned, splits.test)
    pruned_macs = attention_macs(pruned, x1)

    twin, small = copy.deepcopy(model), copy.deepcopy(model)
    prune_(twin, ChannelConfig(ratio=0.5, input_shape=[1, 28, 28], mode="zero"))
    prune_(small, ChannelConfig(ratio=0.5, input_shape=[1, 28, 28]))
    with torch.no_grad():
        twin_diff = (twin(xb) - small(xb)).abs().max().item()

    work.mkdir(parents=True, exist_ok=True)
    dense_stats = pack(model, work / f"{variant}-dense.nsk")
    stats = pack(pruned, work / f"{variant}-pruned.nsk")
    loaded = load(work / f"{variant}-pruned.nsk").eval()
    with torch.no_grad():
        exact = torch.equal(loaded(xb), pruned(xb))

    load_before = _load()
    lat = _latency(model, pruned)
    load_after = _load()
    sp = {b: d / p for b, (d, p) in lat.items()}
    mac_red = dense_macs / pruned_macs
    channels = ", ".join(f"{k} {a}->{b}" for k, (a, b) in res.channels.items())
    label = "nn.MultiheadAttention, 8 heads" if VARIANTS[variant] is None else "grouped-query, 8 query / 2 key-value heads"
    doc += [
        f"## vit_tiny, {label}",
        "",
        f"Baseline: {how}; test error {100 * base_err:.2f}% (validation {100 * base_val:.2f}%), "
        f"{metrics.count_params(model):,} parameters, {dense_macs:,} MACs per image.",
        "",
        "### Heads only, no fine-tuning (`ChannelConfig(ratio=0, head_ratio=r)`; heads per layer after pruning)",
        "",
        markdown_table(("gqa_heads", "head ratio", "criterion", "query/kv heads", "MACs", "val error", "test error", "call (s)"), sweep),
        "",
        "### Heads 0.5 and half of every MLP's hidden units, then fine-tuning",
        "",
        f"Criterion chosen on validation: **{best}** (val {', '.join(f'{c} {100 * v[0]:.2f}%' for c, v in cands.items())}). "
        f"Test error {100 * base_err:.2f}% -> {100 * cut_err:.2f}% after pruning -> **{100 * ft_err:.2f}%** after "
        f"{FT_EPOCHS} epoch of fine-tuning ({ft_secs:.0f} s). Parameters {metrics.count_params(model):,} -> "
        f"{metrics.count_params(pruned):,}; MACs {dense_macs:,} -> {pruned_macs:,} ({mac_red:.2f}x fewer).",
        f"Changes: {channels}.",
        "",
        f"Latency, dense vs pruned, one thread (load average {load_before:.1f} before, {load_after:.1f} after):",
        "",
        markdown_table(("batch", "dense (ms)", "pruned (ms)", "speedup", "MAC reduction"),
                       [[str(b), f"{d:.3f}", f"{p:.3f}", f"{sp[b]:.2f}x", f"{mac_red:.2f}x"] for b, (d, p) in lat.items()]),
        "",
        f"Masked twin (heads and hidden units zeroed) vs the physically pruned model, max |diff| on 64 test images: "
        f"{twin_diff:.2e} (target <= 1e-5). Packed: dense {dense_stats.total_bytes:,} B, pruned {stats.total_bytes:,} B; "
        f"the .nsk loads back into a fresh zoo model with the resized attention layers and gives "
        f"{'identical' if exact else 'DIFFERENT'} outputs.",
        "",
    ]
    rows = []
    for lbl, m, err, (l1, l64), macs_, nbytes in (
        ("baseline", model, base_err, (lat[1][0], lat[64][0]), dense_macs, dense_stats.total_bytes),
        (f"heads+mlp {best} r=0.5 + ft", pruned, ft_err, (lat[1][1], lat[64][1]), pruned_macs, stats.total_bytes),
    ):
        rows.append(SummaryRow("structured_attention", lbl, f"vit_tiny {variant}", err, metrics.count_params(m),
                               metrics.count_nonzeros(m), nbytes, dense_stats.total_bytes / nbytes, macs_, macs_, l1, l64))
    return rows


@suite("structured_attention")
def structured_attention(work: Path, results: Path, *, resume: bool, machine: list[str]) -> list[SummaryRow]:
    torch.manual_seed(0)
    if not resume:
        for p in work.glob("*.safetensors"):
            p.unlink()
    splits = load_dataset("mnist")
    t0 = time.perf_counter()
    doc = [
        "# Head-wise pruning of attention: vit_tiny on MNIST",
        "",
        *machine,
        "",
        "Short training on a shared two-core CPU, one thread throughout: the baselines are far from a well-trained",
        "transformer, and the errors after one epoch of fine-tuning are upper bounds. Latencies are ratios of medians",
        "measured in the same run.",
        "",
    ]
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on a shared two-core CPU spin and run tens of times slower
    try:
        for variant in VARIANTS:
            rows += _one(variant, splits, work, doc)
    finally:
        torch.set_num_threads(threads)
    doc.append(f"Suite wall time: {time.perf_counter() - t0:.0f} s.")
    (results / "structured_attention.md").write_text("\n".join(doc))
    return rows
