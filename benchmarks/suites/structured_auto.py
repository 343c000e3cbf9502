"""auto_channel on LeNet-5: per-layer channel ratios chosen for a MACs budget and for a measured-latency
budget, with no ratio set by hand. From the cached LeNet-5 baseline of the Deep Compression recipe:
the sweep and allocation (timed), the chosen ratios, the predicted and the measured resource, the test
error before and after a short fine-tune, and the dense and pruned latency measured in turns in one run
(`netshrink.metrics.compare_latency`, one thread).
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

from netshrink import metrics
from netshrink.data import load_dataset
from netshrink.prune.structured import AutoChannelConfig, auto_channel_prune
from netshrink.report import markdown_table
from netshrink.train import TrainConfig, Trainer

from . import SummaryRow, suite
from .distillation import _lenet_baseline

#: (budget, reduction, batch the latency budget is timed at)
CASES = (("macs", 0.5, 1), ("latency", 0.4, 64), ("latency", 0.3, 1))
FT_IMAGES, FT_EPOCHS = 10_000, 1
THREADS = 1


@suite("structured_auto")
def structured_auto(work: Path, results: Path, *, resume: bool, machine: list[str]) -> list[SummaryRow]:
    torch.manual_seed(0)
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        splits = load_dataset("mnist")
        base = _lenet_baseline()
        example = splits.test[0][0].unsqueeze(0)
        base_err = metrics.error_rate(base, splits.test)
        doc = ["# auto_channel: per-layer channel ratios under a MACs or latency budget (LeNet-5)", "", *machine,
               f"- one torch thread; load average at the start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", "",
               f"From the cached LeNet-5 baseline (test error {100 * base_err:.2f}%), default grid (0.25, 0.5, 0.75) per "
               f"channel group, L1 channel scores, 1,000 validation images per loss; fine-tune: SGD lr 0.01, "
               f"{FT_EPOCHS} epoch on the first {FT_IMAGES:,} training images. Latency: dense and pruned timed in turns "
               "(3 rounds of 20 runs, the middle round's median).", ""]
        table, rows = [], []
        for budget, reduction, batch in CASES:
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            res = auto_channel_prune(model, AutoChannelConfig(reduction=reduction, budget=budget, latency_batch=batch), data=splits)
            call = time.perf_counter() - t0
            err0 = metrics.error_rate(model, splits.test)
            cfg = TrainConfig(epochs=FT_EPOCHS, lr=0.01, momentum=0.9, batch_size=64, progress=False, device="cpu")
            Trainer(model, cfg).fit(Subset(splits.train, range(FT_IMAGES)))
            err1 = metrics.error_rate(model, splits.test)
            lat = metrics.compare_latency({"dense": base, "pruned": model}, tuple(example.shape[1:]), batch_sizes=(1, 64))
            macs_d, macs_p = metrics.macs(base, example).dense, metrics.macs(model, example).dense
            unit = "ms" if budget == "latency" else ""
            target = (1 - reduction) * res.dense_cost
            table.append([
                f"{budget} -{reduction:.0%}" + (f" at batch {batch}" if budget == "latency" else ""),
                ", ".join(f"{k} {v:g}" for k, v in res.layer_ratio.items()) or "none",
                f"{res.dense_cost:,.4g} -> {res.predicted_cost:,.4g} / {res.measured_cost:,.4g} {unit} (target {target:,.4g})",
                f"{call:.0f} s", f"{100 * err0:.2f}%", f"{100 * err1:.2f}%", f"{macs_d / macs_p:.2f}x",
                *[f"{lat['dense'][b].median_ms:.3f} / {lat['pruned'][b].median_ms:.3f} ({lat['dense'][b].median_ms / lat['pruned'][b].median_ms:.2f}x)"
                  for b in (1, 64)],
            ])
            rows.append(SummaryRow("structured_auto", f"auto_channel {budget} -{reduction:.0%} + ft", "lenet5", err1,
                                   metrics.count_params(model), metrics.count_nonzeros(model), metrics.fp32_bytes(model),
                                   metrics.fp32_bytes(base) / metrics.fp32_bytes(model), macs_p, macs_p,
                                   lat["pruned"][1].median_ms, lat["pruned"][64].median_ms))
        doc += [markdown_table(("budget", "ratios chosen", "dense -> predicted / measured", "sweep + prune", "error no FT",
                                "error after FT", "MACs fewer", "b1 ms dense / pruned", "b64 ms dense / pruned"), table), "",
                "'measured' is the budgeted resource of the pruned model (latency: one timing at the budget's batch during "
                "the allocation); the last two columns time the same models again, in turns. Savings of single groups do "
                "not add exactly (pruning a layer's outputs also shrinks the next layer's inputs; latency has fixed "
                "costs), so the allocation measures its choice and asks for the shortfall again until it fits.",
                f"Load average at the end {os.getloadavg()[0]:.1f}.", ""]
        (results / "structured_auto.md").write_text("\n".join(doc))
        return rows
    finally:
        torch.set_num_threads(previous)
