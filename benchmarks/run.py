"""The one benchmark runner. Each suite (a module in benchmarks/suites/) registers itself with
``@suite("name")``, returns summary rows and writes its own detail file; the runner keeps each
suite's rows in results/<suite>.json and rebuilds results/SUMMARY.md from all of them, so later
methods add rows without losing earlier ones.

    python -m benchmarks.run                 # every suite
    python -m benchmarks.run --only deep_compression
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ._env import machine_lines
from .suites import SUITES, SummaryRow, load_all

RESULTS = Path(__file__).resolve().parent / "results"
WORK = Path(__file__).resolve().parent / "out"

COLUMNS = ("suite", "method", "model", "test error", "params", "non-zeros", "bytes", "ratio", "MACs dense / effective", "latency b1 / b64 (ms)")


def _error_cell(r: SummaryRow) -> str:
    """The error column: a perplexity (rows that say they carry one, stored as ppl / 100) is shown as such."""
    if "perplexity in the error column" in r.method:
        return f"ppl {100 * r.test_error:.2f}"
    return f"{100 * r.test_error:.2f}%"


def _cells(r: SummaryRow) -> list[str]:
    return [
        r.suite,
        r.method,
        r.model,
        _error_cell(r),
        f"{r.params:,}",
        f"{r.nonzeros:,}",
        f"{r.bytes:,}",
        f"{r.ratio:.1f}x",
        f"{r.macs_dense:,} / {r.macs_effective:,}",
        f"{r.latency_b1_ms:.3f} / {r.latency_b64_ms:.3f}",
    ]


def write_summary() -> Path:
    from netshrink.report import markdown_table

    rows, headers = [], []
    for path in sorted(RESULTS.glob("*.json")):
        data = json.loads(path.read_text())
        rows += [SummaryRow(**r) for r in data["rows"]]
        headers.append(f"- `{path.stem}`: {data['command']} ({data['date']})")
    text = "\n".join(
        [
            "# Benchmark summary",
            "",
            "One row per method and model; each suite's detail file in this folder has the per-stage and",
            "per-layer tables. Latency is the median of 30 timed runs of the decoded model in torch (dense",
            "fp32 kernels), after 5 warm-up runs; masks alone make nothing faster.",
            "",
            markdown_table(COLUMNS, [_cells(r) for r in rows]),
            "",
            "## Suites and the commands that produced them",
            "",
            *headers,
            "",
        ]
    )
    out = RESULTS / "SUMMARY.md"
    out.write_text(text)
    return out


def main(argv=None) -> int:
    load_all()
    p = argparse.ArgumentParser(prog="python -m benchmarks.run")
    p.add_argument("--only", nargs="+", choices=sorted(SUITES), help="run only these suites")
    p.add_argument("--fresh", action="store_true", help="do not resume earlier runs in benchmarks/out")
    args = p.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in args.only or sorted(SUITES):
        command = "python -m benchmarks.run --only " + name
        rows = SUITES[name](WORK / name, RESULTS, resume=not args.fresh, machine=machine_lines(command))
        payload = {"command": command, "date": machine_lines()[0][8:], "rows": [r.__dict__ for r in rows]}
        extra = WORK / name / "json_extra.json"  # a suite's own machine-readable results beside its rows
        if extra.exists():
            payload.update(json.loads(extra.read_text()))
            extra.unlink()
        (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2))
        print(f"suite {name}: {len(rows)} rows", file=sys.stderr)
    print(write_summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
