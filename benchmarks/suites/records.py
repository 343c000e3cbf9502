"""Records on the survey's LeNets (issue 16): sparse variational dropout and soft weight-sharing combined
with the existing sharing and coding stages, against the best published sizes.

Runs ``recipes/records_*.yaml`` (resuming finished stages; the trained baselines come from the cache
the Deep Compression recipes fill), then reports for the final packed model: test error, parameters
kept beside the real bytes of the whole .nsk file, per-layer coding and every entropy-coded stream
against its Shannon bound. The machine's load average is recorded at the start and the end, since
this machine is shared and the wall times depend on it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from netshrink.errors import NetshrinkError
from netshrink.pack import read_info
from netshrink.pipeline import run_recipe
from netshrink.recipe import load_recipe
from netshrink.report import markdown_table, stage_table
from netshrink.run_report import LAYER_COLUMNS, STREAM_COLUMNS, layer_rows, stream_rows

from . import SummaryRow, suite

ROOT = Path(__file__).resolve().parents[2]

#: recipe -> (target ratio, target test error, the published numbers to name beside the result)
TARGETS = {
    "records_lenet_300_100.yaml": (
        70.0, 0.0164,
        "soft weight-sharing 64x at 1.94% (Ullrich et al. 2017); sparse VD keeps 1/68 of the weights at "
        "1.92% (Molchanov et al. 2017); Deep Compression 40x at 1.58% (Han et al. 2016)",
    ),
    "records_lenet5.yaml": (
        200.0, 0.0097,
        "MIRACLE 1.52 kB (1,134x) at 0.96% (Havasi et al. 2019); soft weight-sharing 162x at 0.97% "
        "(Ullrich et al. 2017); sparse VD keeps 1/280 of the weights at 0.75% (Molchanov et al. 2017)",
    ),
}


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.1f} / {five:.1f} / {fifteen:.1f} (1/5/15 min) on {os.cpu_count()} cores"


def _run(recipe, out: Path, resume: bool):
    try:
        return run_recipe(recipe, out, resume=resume, force=not resume, progress=False)
    except NetshrinkError as err:
        if "different recipe" not in str(err):
            raise
        return run_recipe(recipe, out, force=True, progress=False)


def _candidates(folder: Path) -> list[str]:
    """Every candidate recipe run kept under ``folder/<tag>/`` (its recipe as ``recipe.yaml`` and the
    pipeline's ``results.json``), so the choice of the shipped recipe is shown with what it was chosen from."""
    import json

    found = sorted(p for p in folder.glob("*/results.json")) if folder.is_dir() else []
    if not found:
        return []
    table = []
    for res in found:
        data = json.loads(res.read_text())
        rows = data["rows"]
        base, final = rows[0], rows[-1]
        stages = " -> ".join(r["stage"] for r in rows[1:])
        table.append([res.parent.name, stages, f"{final['nonzeros']:,}", f"{final['bytes']:,}", f"{final['ratio']:.1f}x",
                      f"{100 * final['val_error']:.2f}%", f"{100 * final['test_error']:.2f}%"])
    return [
        "## Candidate recipes compared",
        "",
        "Each a full run of the pipeline from the same cached baseline (a candidate that shares its first stage with",
        "another resumed that finished stage, which is deterministic). The validation error is the one to choose by;",
        "the test error is reported.",
        "",
        markdown_table(("candidate", "stages", "non-zeros", "bytes", "ratio", "val error", "test error"), table),
        "",
    ]


@suite("records")
def records(work: Path, results: Path, *, resume: bool, machine: list[str]) -> list[SummaryRow]:
    rows: list[SummaryRow] = []
    doc = ["# Records: variational dropout / soft weight-sharing + sharing + entropy coding on the LeNets", "", *machine,
           f"- load average at the start: {_load()}", ""]
    only = os.environ.get("NETSHRINK_RECORDS")  # a comma-separated subset of the recipes, for partial runs
    if only:
        doc += [f"- recipes run: NETSHRINK_RECORDS={only}", ""]
    for fname, (ratio_target, err_target, published) in TARGETS.items():
        if only and fname not in only.split(","):
            continue
        path = ROOT / "recipes" / fname
        if not path.exists():
            continue
        recipe = load_recipe(path)
        t0 = time.perf_counter()
        res = _run(recipe, work / recipe.name, resume)
        wall = time.perf_counter() - t0
        base, final = res.rows[0], res.rows[-1]
        info = read_info(res.model_path)
        fixed = [r.file for r in res.rows if r.file and r.coding == "fixed"]
        before = read_info(fixed[-1]) if fixed else None
        streams = stream_rows(info)
        worst = max((float(r[5].rstrip("%")) for r in streams), default=0.0)
        met_ratio = final.ratio >= ratio_target
        met_err = final.test_error <= err_target
        kept = base.params / max(1, final.nonzeros)
        doc += [
            f"## {recipe.model} (`recipes/{fname}`)",
            "",
            f"Target: at least {ratio_target:.0f}x smaller in real .nsk bytes at a test error of at most {100 * err_target:.2f}%.",
            f"Published: {published}.",
            "",
            f"Result: **{final.ratio:.1f}x ({final.bytes:,} B) at {100 * final.test_error:.2f}%** from a {100 * base.test_error:.2f}% "
            f"baseline ({base.bytes:,} B); {final.nonzeros:,} of {base.params:,} parameters kept (1/{kept:.0f}) — "
            f"ratio target {'met' if met_ratio else f'MISSED by {ratio_target - final.ratio:.1f}x'}, "
            f"error target {'met' if met_err else f'MISSED by {100 * (final.test_error - err_target):.2f} points'}.",
            f"Wall time of this run (stages already done are resumed, not rerun): {wall:.0f} s; load average now {_load()}.",
            "",
            stage_table(res.rows),
            "",
            "### Parameters kept and real bytes side by side",
            "",
            markdown_table(
                ("stage", "non-zeros", "kept", "bytes (.nsk)", "ratio (bytes)", "bits per non-zero", "test error"),
                [[r.stage, f"{r.nonzeros:,}", f"1/{base.params / max(1, r.nonzeros):.1f}", f"{r.bytes:,}", f"{r.ratio:.1f}x",
                  f"{r.bits_per_nonzero:.2f}", f"{100 * r.test_error:.2f}%"] for r in res.rows],
            ),
            "",
            "### Per layer",
            "",
            markdown_table(LAYER_COLUMNS, layer_rows(info, before)),
            "",
            f"### Entropy-coded streams against the Shannon bound (worst {worst:+.2f}%)",
            "",
            markdown_table(STREAM_COLUMNS, streams),
            "",
        ]
        rows.append(SummaryRow("records", recipe.name, recipe.model, final.test_error, final.params, final.nonzeros, final.bytes,
                               final.ratio, final.macs_dense, final.macs_effective,
                               res.speed.compressed_ms[0] if res.speed else 0.0, res.speed.compressed_ms[-1] if res.speed else 0.0))
    doc += _candidates(work / "candidates")
    doc += [f"- load average at the end: {_load()}", ""]
    (results / "records.md").write_text("\n".join(doc))
    return rows
