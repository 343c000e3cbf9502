"""Reliability (issue 14): hostile files, killed runs, bad command lines.

1. Structure-aware fuzzing (:mod:`netshrink.pack._fuzz`) of real packed files of every encoding: each
   case is read by ``read_info``, ``load``, ``load(restore=True)``, ``unpack_to_safetensors`` and
   ``netshrink info`` (and, for one case in 50, ``netshrink eval``); outcomes counted by reader,
   the slowest case and the growth of peak memory reported; a crash (an exception that is not a
   NetshrinkError) or a hang (past 20 s) is a failure. The cases run in worker processes started by
   ``python -m benchmarks.suites.reliability fuzz --cases N --workers W`` (progress saved every 250
   cases, so a long run can be read at any time); the suite reads their files.
2. Kill points: a digits recipe run is killed with SIGKILL at random moments (and at moments chosen by
   what appears in its folder: a training checkpoint, a packed stage, a temporary file before its
   rename, the report), every file left is checked to be whole, the run is resumed with ``--resume``,
   and its packed files and measured rows are compared with an uninterrupted run's.
3. Bad inputs to every subcommand: exit code, one stderr line, nothing written; plus a full disk
   (a 1 MiB tmpfs) and a read-only output folder (a tmpfs remounted read-only) when this machine lets
   the benchmark mount them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / "benchmarks" / "out" / "reliability"


# ---------------------------------------------------------------------------------------- fuzzing


def fuzz_worker(index: int, cases: int, seed: int, out: Path) -> None:
    """Run ``cases`` fuzz cases (seeded) and keep their statistics in ``out`` (rewritten every 250)."""
    import torch

    torch.set_num_threads(1)
    from netshrink.pack import _fuzz

    seeds = _fuzz.seed_files(seed)
    rng = random.Random(seed * 1000 + index)
    work = Path(tempfile.mkdtemp(prefix=f"fuzz{index}-"))
    counts: dict[str, dict[str, int]] = {}
    kinds: dict[str, int] = {}
    failures: list[dict[str, Any]] = []
    slowest, slowest_desc = 0.0, ""
    # warm up: one pass over the seeds (imports, first model builds) before memory is measured
    for s in seeds:
        _fuzz.run_case(s.blob, "seed", work, cli_eval=True)
    rss0 = _fuzz.peak_rss_mb()
    t_start = time.perf_counter()
    done = 0

    def save(final: bool = False) -> None:
        data = {"worker": index, "seed": seed, "cases": done, "planned": cases, "counts": counts, "kinds": kinds,
                "failures": failures[:50], "n_failures": len(failures), "slowest_s": slowest, "slowest_case": slowest_desc,
                "rss_start_mb": rss0, "rss_peak_mb": _fuzz.peak_rss_mb(), "seconds": time.perf_counter() - t_start,
                "seed_files": {s.name: len(s.blob) for s in seeds}, "final": final}
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, out)

    for i in range(cases):
        s = rng.choice(seeds)
        blob, desc = _fuzz.mutate(s.blob, rng)
        for part in desc.split("; "):
            k = part.split(":")[0]
            kinds[k] = kinds.get(k, 0) + 1
        res = _fuzz.run_case(blob, f"{s.name}: {desc}", work, time_limit=20.0, cli_eval=i % 50 == 0)
        for target, outcome in res.outcomes.items():
            counts.setdefault(target, {}).setdefault(outcome, 0)
            counts[target][outcome] += 1
        if res.seconds > slowest:
            slowest, slowest_desc = res.seconds, f"{s.name}: {desc}"[:200]
        if res.failure:
            failures.append({"case": i, "seed": s.name, "mutation": desc[:300], "failure": res.failure[-1500:]})
        done = i + 1
        if done % 250 == 0:
            save()
    save(final=True)
    shutil.rmtree(work, ignore_errors=True)


def run_fuzz(cases: int, workers: int, seed: int = 14, first: int = 0) -> list[Path]:
    """``workers`` processes numbered from ``first`` (each its own seeded stream), ``cases`` in all."""
    WORK.mkdir(parents=True, exist_ok=True)
    per = [cases // workers + (1 if i < cases % workers else 0) for i in range(workers)]
    procs, outs = [], []
    for i, n in ((first + j, n) for j, n in enumerate(per)):
        out = WORK / f"fuzz-{i}.json"
        outs.append(out)
        procs.append(subprocess.Popen([sys.executable, "-c",
                                       f"from benchmarks.suites.reliability import fuzz_worker; from pathlib import Path; "
                                       f"fuzz_worker({i}, {n}, {seed}, Path({str(out)!r}))"], cwd=ROOT))
    for p in procs:
        p.wait()
    return outs


def fuzz_summary() -> dict[str, Any] | None:
    files = sorted(WORK.glob("fuzz-*.json"))
    if not files:
        return None
    parts = [json.loads(f.read_text()) for f in files]
    counts: dict[str, dict[str, int]] = {}
    kinds: dict[str, int] = {}
    for p in parts:
        for t, c in p["counts"].items():
            for o, n in c.items():
                counts.setdefault(t, {}).setdefault(o, 0)
                counts[t][o] += n
        for k, n in p["kinds"].items():
            kinds[k] = kinds.get(k, 0) + n
    worst = max(parts, key=lambda p: p["slowest_s"])
    return {
        "cases": sum(p["cases"] for p in parts), "planned": sum(p["planned"] for p in parts), "workers": len(parts),
        "counts": counts, "kinds": kinds, "failures": [f for p in parts for f in p["failures"]],
        "n_failures": sum(p["n_failures"] for p in parts), "slowest_s": worst["slowest_s"], "slowest_case": worst["slowest_case"],
        "rss_growth_mb": max(p["rss_peak_mb"] - p["rss_start_mb"] for p in parts), "seconds": max(p["seconds"] for p in parts),
        "seed_files": parts[0]["seed_files"], "final": all(p["final"] for p in parts),
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m benchmarks.suites.reliability")
    ap.add_argument("part", choices=["fuzz"])
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--first", type=int, default=0, help="number of the first worker (to add workers to an earlier run)")
    a = ap.parse_args()
    run_fuzz(a.cases, a.workers, first=a.first)
    print(json.dumps(fuzz_summary(), indent=1)[:3000])
