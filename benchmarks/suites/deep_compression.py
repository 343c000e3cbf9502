"""Deep Compression (Han et al., ICLR 2016) on LeNet-300-100 and LeNet-5, against the paper's targets.

Runs the shipped recipes (resuming finished stages), then measures the final packed model: test
error, size, per-layer coding, each Huffman stream against its entropy bound, and latency of the
decoded model beside the dense baseline in the same run. Also times the demo command.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from netshrink import metrics
from netshrink.data import load_dataset
from netshrink.errors import NetshrinkError
from netshrink.models import build_model
from netshrink.pack import load, read_info
from netshrink.pipeline import baseline_cache_path, run_recipe
from netshrink.recipe import load_recipe
from netshrink.report import markdown_table, stage_table
from netshrink.run_report import LAYER_COLUMNS, STREAM_COLUMNS, layer_rows, stream_rows

from . import SummaryRow, suite

ROOT = Path(__file__).resolve().parents[2]

#: recipe file -> (the issue's target ratio, target test error, what the paper reports)
TARGETS = {
    "lenet_300_100.yaml": (40.0, 0.0164, "paper: 40x at 1.58% from a 1.64% baseline; best published 64x at 1.94% (Ullrich 2017)"),
    "lenet5.yaml": (39.0, 0.0080, "paper: 39x at 0.74% from a 0.80% baseline; best published 162x at 0.97% (Ullrich 2017)"),
}


def _stream_verdict(streams: list[list[str]], worst: float) -> str:
    """One line: how many streams are within 1% of their entropy bound, and which are not."""
    over = [f"{r[0]} ({r[2]} symbols, {r[5]})" for r in streams if float(r[5].rstrip("%")) > 1.0]
    head = f"{len(streams) - len(over)} of {len(streams)} streams within 1% of their entropy bound (target: all; worst {worst:+.2f}%)"
    tail = f"; over: {', '.join(over)}" if over else ""
    return (
        head + tail + ". 'coded bits' are the codewords alone; the code-length table and the stream head are in "
        "'section bytes'. A Huffman code spends whole bits per codeword, so a short stream whose probabilities "
        "are far from powers of 1/2 stays over the bound where blocks of symbols do not pay for their table."
    )


def _run(recipe, out: Path, resume: bool):
    try:
        return run_recipe(recipe, out, resume=resume, force=not resume, progress=False)
    except NetshrinkError as err:
        if "different recipe" not in str(err):
            raise
        return run_recipe(recipe, out, force=True, progress=False)


def _latency_pair(dense, compressed, example) -> tuple[dict, dict]:
    """Latency of both models measured back to back in one run (a ratio is only fair so)."""
    shape = tuple(example.shape[1:])
    return metrics.latency(dense, shape, batch_sizes=(1, 64), runs=30), metrics.latency(compressed, shape, batch_sizes=(1, 64), runs=30)


def _init_comparison(res, splits) -> list[str]:
    """The paper's Figure 5 question on our pruned model: which centroid initialisation loses least?
    Each init shares the pruned model's weights at 2..5 bits; test error before any fine-tuning."""
    from netshrink.quantize import KMeansConfig, quantize_

    pruned = [r.file for r in res.rows if r.file and r.method == "magnitude"]
    if not pruned:
        return []
    table = []
    for bits in (2, 3, 4, 5):
        cells = [str(bits)]
        for init in ("linear", "density", "random"):
            model = load(pruned[-1], restore=True)
            quantize_(model, KMeansConfig(bits=bits, init=init))
            cells.append(f"{100 * metrics.error_rate(model, splits.test):.2f}%")
        table.append(cells)
    base = metrics.error_rate(load(pruned[-1]), splits.test)
    return [
        f"### Centroid initialisation (pruned model at {100 * base:.2f}%, shared, no fine-tuning)",
        "",
        markdown_table(("bits", "linear", "density", "random"), table),
        "",
    ]


def _demo_time(work: Path) -> list[str]:
    """Wall time of the demo's command with the baseline cached and with it trained from scratch."""
    lines = []
    for label, cold in (("baseline cached", False), ("baseline trained from scratch", True)):
        env = dict(os.environ)
        tmp_cache = None
        if cold:
            tmp_cache = Path(tempfile.mkdtemp(prefix="netshrink-cold-"))
            for npz in Path(env.get("NETSHRINK_CACHE", Path.home() / ".cache" / "netshrink")).glob("mnist-*.npz"):
                shutil.copy(npz, tmp_cache / npz.name)  # data stays cached: only the training is cold
            env["NETSHRINK_CACHE"] = str(tmp_cache)
        cmd = [sys.executable, "-m", "netshrink.cli", "run", "recipes/lenet_300_100.yaml", "--out", str(work / "demo"), "--force", "--no-progress"]
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
        lines.append(f"- `netshrink run recipes/lenet_300_100.yaml --out DIR --force` ({label}): {time.perf_counter() - t0:.0f} s wall")
        if tmp_cache is not None:
            shutil.rmtree(tmp_cache, ignore_errors=True)
    return lines


@suite("deep_compression")
def deep_compression(work: Path, results: Path, *, resume: bool, machine: list[str]) -> list[SummaryRow]:
    rows: list[SummaryRow] = []
    doc = ["# Deep Compression: prune -> share -> Huffman", "", *machine, ""]
    for fname, (ratio_target, err_target, paper) in TARGETS.items():
        recipe = load_recipe(ROOT / "recipes" / fname)
        res = _run(recipe, work / recipe.name, resume)
        splits = load_dataset(recipe.data)
        example = splits.test[0][0].unsqueeze(0)
        dense = build_model(recipe.model, **recipe.model_args)
        from safetensors.torch import load_file

        dense.load_state_dict(load_file(str(baseline_cache_path(recipe))))
        compressed = load(res.model_path)
        lat_dense, lat_comp = _latency_pair(dense, compressed, example)
        base, final = res.rows[0], res.rows[-1]
        info = read_info(res.model_path)
        fixed = [r.file for r in res.rows if r.file and r.coding == "fixed"]
        before = read_info(fixed[-1]) if fixed else None
        streams = stream_rows(info)
        worst = max((float(r[5].rstrip("%")) for r in streams), default=0.0)
        met_ratio = final.ratio >= ratio_target
        met_err = final.test_error <= err_target
        doc += [
            f"## {recipe.model} (`recipes/{fname}`)",
            "",
            f"Target: at least {ratio_target:.0f}x at a test error of at most {100 * err_target:.2f}% ({paper}).",
            f"Result: **{final.ratio:.1f}x at {100 * final.test_error:.2f}%** from a {100 * base.test_error:.2f}% baseline — "
            f"ratio target {'met' if met_ratio else f'MISSED by {ratio_target - final.ratio:.1f}x'}, "
            f"error target {'met' if met_err else f'MISSED by {100 * (final.test_error - err_target):.2f} points'}.",
            "",
            stage_table(res.rows),
            "",
            "### Per layer (like Table 2 of the paper)",
            "",
            markdown_table(LAYER_COLUMNS, layer_rows(info, before)),
            "",
            "### Huffman streams against the Shannon entropy bound",
            "",
            _stream_verdict(streams, worst),
            "",
            markdown_table(STREAM_COLUMNS, streams),
            "",
            "### Latency (decoded model in torch, dense fp32 kernels; median of 30 runs)",
            "",
            markdown_table(
                ("model", "batch 1 (ms)", "batch 64 (ms)", "threads"),
                [
                    ["dense baseline", f"{lat_dense[1].median_ms:.3f}", f"{lat_dense[64].median_ms:.3f}", str(lat_dense[1].threads)],
                    ["compressed, decoded", f"{lat_comp[1].median_ms:.3f}", f"{lat_comp[64].median_ms:.3f}", str(lat_comp[1].threads)],
                ],
            ),
            "",
            "The decoded model runs the same dense kernels, so it is not faster: Deep Compression shrinks storage,",
            "not compute, unless a sparse kernel runs it (see the pruning benchmarks).",
            "",
            *_init_comparison(res, splits),
        ]
        for r, lat, model in ((base, lat_dense, "baseline"), (final, lat_comp, "deep compression")):
            rows.append(
                SummaryRow("deep_compression", model, recipe.model, r.test_error, r.params, r.nonzeros, r.bytes, r.ratio,
                           r.macs_dense, r.macs_effective, lat[1].median_ms, lat[64].median_ms)
            )
    doc += ["## Demo wall time (this machine, after setup)", "", *_demo_time(work), ""]
    (results / "deep_compression.md").write_text("\n".join(doc))
    return rows
