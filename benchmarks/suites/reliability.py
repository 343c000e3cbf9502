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
    # warm up: one pass over the seeds (imports, first model builds) before memory is measured; meta-device
    # operations import torch._dynamo lazily, which takes long enough on a loaded machine to meet the alarm
    import torch._dynamo  # noqa: F401
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


# ------------------------------------------------------------------------------------ kill points

KILL_RECIPE = {
    "name": "digits-kill-bench",
    "model": "mlp",
    "model_args": {"in_features": 64, "hidden": [64, 32]},
    "data": "digits",
    "seed": 5,
    "train": {"epochs": 8, "lr": 0.05, "schedule": "cosine", "batch_size": 32, "progress": False},
    "stages": [
        {"method": "magnitude", "label": "prune", "sparsity": 0.8, "steps": 2,
         "finetune": {"epochs": 3, "lr": 0.01, "batch_size": 32, "progress": False}},
        {"method": "kmeans", "label": "share", "bits": 4, "finetune": {"epochs": 2, "lr": 0.001, "batch_size": 32, "progress": False}},
        {"method": "huffman"},
    ],
}

#: kill points chosen by what appears in the folder: (name, condition)
EVENTS = [
    ("run.json written", lambda o: (o / "run.json").exists()),
    ("baseline training (a checkpoint exists)", lambda o: any(o.glob("checkpoints/baseline/checkpoint.pt"))),
    ("fine-tuning stage 1", lambda o: any(o.glob("checkpoints/stage-01/checkpoint.pt"))),
    ("a temporary file before its rename", lambda o: any(o.rglob(".*.tmp"))),
    ("stage 1 packed, its row not yet written", lambda o: (o / "stages" / "01-magnitude.nsk").exists() and not (o / "stages" / "01-magnitude.json").exists()),
    ("stage 2 packed", lambda o: (o / "stages" / "02-magnitude.nsk").exists()),
    ("model.nsk renamed into place", lambda o: (o / "model.nsk").exists()),
    ("writing the report (results.json exists)", lambda o: (o / "results.json").exists()),
]


def _phase(files: list[str]) -> str:
    """Where the run was when killed, from the files it had written."""
    names = set(files)
    if any(n.endswith("report.md") for n in names):
        return "report"
    if "results.json" in names or "model.nsk" in names:
        return "final model / report"
    stages = sorted(n for n in names if n.startswith("stages/") and n.endswith(".nsk"))
    ckpt = sorted(n for n in names if n.startswith("checkpoints/"))
    if ckpt:
        return f"training ({ckpt[-1].split('/')[1]})"
    if stages:
        return f"after {stages[-1].split('/')[1]}"
    return "start-up (no file yet)" if not names - {".netshrink-run.lock"} else "set-up"


def run_kills(work: Path, n_random: int = 16, seed: int = 14) -> dict[str, Any]:
    import yaml

    from netshrink import _faults as F

    work.mkdir(parents=True, exist_ok=True)
    recipe = work / "kill.yaml"
    recipe.write_text(yaml.safe_dump(KILL_RECIPE))
    shutil.rmtree(work / "ref", ignore_errors=True)
    shutil.rmtree(work / "ref-cache", ignore_errors=True)
    t0 = time.perf_counter()
    res = F.run_to_end(recipe, work / "ref", work / "ref-cache")
    total = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"reference run failed: {res.stderr[-1000:]}")
    reference = F.artifacts(work / "ref")
    rng = random.Random(seed)
    points = [("random", f"{d:.2f} s", d, None) for d in sorted(rng.uniform(0.15 * total, 1.0 * total) for _ in range(n_random))]
    points += [("event", name, None, cond) for name, cond in EVENTS]
    rows = []
    for i, (how, what, after, cond) in enumerate(points):
        out, cache = work / f"k{i:02d}", work / f"k{i:02d}-cache"
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
        killed = F.run_and_kill(recipe, out, cache, after=after, when=cond)
        whole = F.check_complete(out) + [f"cache: {p}" for p in F.check_complete(cache)]
        temps = F.temporaries(out)
        t1 = time.perf_counter()
        resumed = F.run_to_end(recipe, out, cache, "--resume")
        ok = resumed.returncode == 0
        diff = F.diff(reference, F.artifacts(out)) if ok else ["resume failed: " + resumed.stderr.strip().splitlines()[-1][:200]]
        rows.append({"point": i, "how": how, "what": what, "killed_at_s": round(killed.seconds, 2), "finished_before_kill": killed.finished,
                     "phase": "finished" if killed.finished else _phase(killed.files), "files_at_kill": len(killed.files),
                     "temporaries_at_kill": len(temps), "incomplete_files": whole, "resume_s": round(time.perf_counter() - t1, 1),
                     "resume_exit": resumed.returncode, "differences": diff, "temporaries_after": F.temporaries(out)})
        shutil.rmtree(cache, ignore_errors=True)
        (work / "kills.json").write_text(json.dumps({"reference_s": total, "reference": reference, "rows": rows}, indent=1))
    return {"reference_s": total, "reference": reference, "rows": rows}


def run_random_kills(work: Path, n: int = 20, seed: int = 41) -> dict[str, Any]:
    """``n`` SIGKILLs at random moments that land while the run is still going: the delay is drawn from
    [0.1, 0.95] of the duration of the last run that was seen to finish (a draw that comes too late
    only updates that estimate and is drawn again), then the run is resumed and compared."""
    import yaml

    from netshrink import _faults as F

    work.mkdir(parents=True, exist_ok=True)
    recipe = work / "kill.yaml"
    recipe.write_text(yaml.safe_dump(KILL_RECIPE))
    ref = json.loads((work / "kills.json").read_text())
    reference, est = ref["reference"], ref["reference_s"]
    rng = random.Random(seed)
    rows, late = [], 0
    while len(rows) < n:
        i = len(rows)
        out, cache = work / f"r{i:02d}", work / f"r{i:02d}-cache"
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
        after = rng.uniform(0.1, 0.95) * est
        killed = F.run_and_kill(recipe, out, cache, after=after)
        if killed.finished:  # too late: the machine was faster than estimated
            est, late = killed.seconds, late + 1
            continue
        whole = F.check_complete(out) + [f"cache: {p}" for p in F.check_complete(cache)]
        temps = F.temporaries(out)
        t1 = time.perf_counter()
        resumed = F.run_to_end(recipe, out, cache, "--resume")
        ok = resumed.returncode == 0
        diff = F.diff(reference, F.artifacts(out)) if ok else ["resume failed: " + resumed.stderr.strip().splitlines()[-1][:200]]
        rows.append({"point": i, "how": "random", "what": f"{after:.2f} s", "killed_at_s": round(killed.seconds, 2),
                     "finished_before_kill": False, "phase": _phase(killed.files), "files_at_kill": len(killed.files),
                     "temporaries_at_kill": len(temps), "incomplete_files": whole, "resume_s": round(time.perf_counter() - t1, 1),
                     "resume_exit": resumed.returncode, "differences": diff, "temporaries_after": F.temporaries(out)})
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        (work / "kills-random.json").write_text(json.dumps({"rows": rows, "late_draws": late}, indent=1))
    return {"rows": rows, "late_draws": late}


# ------------------------------------------------------------------------------ bad command lines


def run_cli_table(work: Path) -> list[dict[str, Any]]:
    import torch

    from netshrink import _faults as F
    from netshrink.models import build_model
    from netshrink.pack import pack

    import yaml

    shutil.rmtree(work, ignore_errors=True)
    (work / "in").mkdir(parents=True)
    os.environ["NETSHRINK_CACHE"] = str(work / "cache")
    torch.manual_seed(0)
    good = work / "in" / "good.nsk"
    pack(build_model("mlp", in_features=64, hidden=[16]).eval(), good)
    recipe = work / "in" / "good.yaml"
    recipe.write_text(yaml.safe_dump({"name": "ok", "model": "mlp", "model_args": {"in_features": 64, "hidden": [8]},
                                      "data": "digits", "train": {"epochs": 0}, "stages": [{"method": "huffman"}]}))
    return [F.run_cli_case(c, work / "cases") for c in F.bad_input_cases(work / "cases", good, recipe)]


def run_disk_faults(work: Path) -> list[dict[str, Any]]:
    """A 1 MiB tmpfs (full disk) and a tmpfs remounted read-only as output folders, when mounting works."""
    import yaml

    from netshrink import _faults as F

    rows = []
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    recipe = work / "kill.yaml"
    recipe.write_text(yaml.safe_dump(KILL_RECIPE))
    for name, size, ro in (("full disk (64 KiB tmpfs)", "64k", False), ("read-only folder (tmpfs remounted ro)", "16m", True)):
        mnt = work / ("full" if not ro else "ro")
        mnt.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True).returncode != 0:
            rows.append({"case": name, "skipped": "this machine does not let the benchmark mount a tmpfs"})
            continue
        try:
            out = mnt / "out"
            if ro:  # an earlier finished run in the folder, then the folder becomes read-only
                first = F.run_to_end(recipe, out, work / "cache")
                before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
                subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
                res = F.run_to_end(recipe, out, work / "cache", "--force")
                intact = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before and first.returncode == 0
            else:
                res = F.run_to_end(recipe, out, work / "cache")
                intact = F.check_complete(out) == [] and F.temporaries(out) == []
            lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("netshrink:")]
            rows.append({"case": name, "exit": res.returncode, "lines": len(lines), "message": lines[-1][:200] if lines else "",
                         "traceback": "Traceback" in res.stderr, "earlier_files_intact": intact,
                         "files_left": sorted(str(p.relative_to(mnt)) for p in mnt.rglob("*") if p.is_file())})
        finally:
            subprocess.run(["umount", str(mnt)], capture_output=True)
    return rows


# ---------------------------------------------------------------------------------------- report


def _table(cols: list[str], rows: list[list[Any]]) -> str:
    from netshrink.report import markdown_table

    return markdown_table(tuple(cols), [[str(c) for c in r] for r in rows])


def _fuzz_section(f: dict[str, Any] | None) -> list[str]:
    if f is None:
        return ["No fuzzing results: run `python -m benchmarks.suites.reliability fuzz` first."]
    outcomes = sorted({o for c in f["counts"].values() for o in c})
    rows = [[t, f"{sum(c.values()):,}"] + [f"{c.get(o, 0):,}" for o in outcomes] for t, c in f["counts"].items()]
    crashes = sum(c.get("crash", 0) for c in f["counts"].values())
    hangs = sum(c.get("hang", 0) for c in f["counts"].values())
    lines = [
        f"**{f['cases']:,} structure-aware cases** ({f['planned']:,} planned, {f['workers']} worker processes, "
        f"{f['seconds'] / 60:.0f} min): **{crashes} crashes, {hangs} hangs** (a hang = past 20 s). Slowest case: "
        f"**{f['slowest_s']:.2f} s** (`{f['slowest_case'][:120]}`); largest growth of a worker's peak memory after its "
        f"warm-up: **{f['rss_growth_mb']:.1f} MiB**.",
        "",
        "Seed files (real packed digits MLPs, every encoding; bytes): "
        + ", ".join(f"{k} {v:,}" for k, v in f["seed_files"].items()) + ".",
        "",
        "Outcomes by reader (`exit N` = the CLI's exit code; `ok` = the mutation was harmless and the file read):",
        "",
        _table(["reader", "cases"] + outcomes, rows),
        "",
        "Mutations applied (a case applies 1-3): " + ", ".join(f"{k} {v:,}" for k, v in sorted(f["kinds"].items())) + ".",
    ]
    excluded = [json.loads(x.read_text()) for x in sorted(WORK.glob("excluded-fuzz-*.json"))]
    if excluded:
        lines += ["", f"Not counted above: {sum(x['cases'] for x in excluded):,} cases of a first run with an earlier harness "
                  f"({', '.join(str(x['cases']) for x in excluded)} cases in its two workers). One worker stopped on a bug of a "
                  "mutator (not of the reader); in the other, the 20 s alarm fired during the first lazy import of "
                  "torch._dynamo (slow on this loaded machine), torch swallowed it as an ordinary exception and left the "
                  f"module half-imported, so {sum(x['n_failures'] for x in excluded)} later cases failed with the same "
                  "AttributeError. The harness now raises its alarm as a BaseException and imports torch._dynamo in its warm-up."]
    if f["failures"]:
        lines += ["", "Failures:", ""] + [f"- case {x['case']} ({x['seed']}: {x['mutation'][:100]}): "
                                           f"{x['failure'].strip().splitlines()[-1][:200]}" for x in f["failures"][:20]]
    return lines


def _kill_section(k: dict[str, Any] | None) -> list[str]:
    if k is None:
        return ["No kill results: run `python -m benchmarks.suites.reliability kills` first."]
    late = [r for r in k["rows"] if r["finished_before_kill"]]
    rows = [r for r in k["rows"] if not r["finished_before_kill"]]
    extra_file = WORK / "kills" / "kills-random.json"
    extra = json.loads(extra_file.read_text()) if extra_file.exists() else {"rows": [], "late_draws": 0}
    for j, r in enumerate(extra["rows"]):
        rows.append(dict(r, point=f"r{j}"))
    n_late = len(late) + extra["late_draws"]
    same = sum(1 for r in rows if not r["differences"])
    whole = sum(1 for r in rows if not r["incomplete_files"])
    table = [[r["point"], r["how"], r["what"], f"{r['killed_at_s']:.2f}", r["phase"], r["files_at_kill"], r["temporaries_at_kill"],
              "yes" if not r["incomplete_files"] else "; ".join(r["incomplete_files"])[:80], r["resume_exit"],
              "identical" if not r["differences"] else ", ".join(r["differences"])[:80]] for r in rows]
    return [
        f"Uninterrupted reference run: {k['reference_s']:.1f} s wall (most of it process start-up and imports on this "
        f"loaded machine). **{len(rows)} kill points** ({sum(r['how'] == 'random' for r in rows)} at random times, "
        f"{sum(r['how'] == 'event' for r in rows)} when a file appeared): **{whole}/{len(rows)}** left only whole files "
        f"(temporaries aside), **{same}/{len(rows)}** resumed to artifacts identical to the reference (sha256 of every .nsk, "
        "every measured row but its wall-clock seconds, the same file list), "
        f"{sum(1 for r in rows if not r['temporaries_after'])}/{len(rows)} without a temporary file left after the resume. "
        f"Not counted: {n_late} random draws that came after the run had already finished (the first random points were "
        "drawn from the reference run's duration, which a busier moment of this shared machine had stretched; later ones "
        f"from the duration of the last run seen to finish); the {len(late)} of the first series were run with `--resume` "
        f"as well and {sum(1 for r in late if not r['differences'])} of them came out identical."
        if n_late else "",
        "",
        _table(["#", "how", "kill point", "killed at (s)", "phase", "files", "temporaries", "all files whole", "resume exit", "vs reference"], table),
    ]


def _cli_section(rows: list[dict[str, Any]], disk: list[dict[str, Any]]) -> list[str]:
    from netshrink import _faults as F
    from netshrink.cli import EXIT_CODES

    commands = list(dict.fromkeys(r["command"] for r in rows))
    cell = {(r["command"], r["kind"]): r for r in rows}

    def show(r: dict[str, Any] | None) -> str:
        if r is None:
            return "-"
        ok = r["lines"] == 1 and not r["traceback"] and not r["written"] and r["code"] == r["expected"]
        return f"{r['code']}{'' if ok else ' (!)'}"

    good = sum(1 for r in rows if r["lines"] == 1 and not r["traceback"] and not r["written"] and r["code"] == r["expected"])
    table = [[c] + [show(cell.get((c, k))) for k in F.BAD_INPUTS] for c in commands]
    lines = [
        f"Exit code of every subcommand on every kind of bad input; **{good}/{len(rows)}** were one stderr line, the expected "
        "code, no traceback and nothing written ((!) marks any that was not). Exit codes: "
        + "; ".join(f"{c} {t}" for c, t in EXIT_CODES.items()) + ".",
        "",
        _table(["subcommand"] + list(F.BAD_INPUTS), table),
        "",
        "The messages:",
        "",
    ] + [f"- {r['command']} / {r['kind']}: `{r['message'][:150]}`" for r in rows]
    lines += ["", "Real write faults during `netshrink run` (tmpfs mounts):", ""]
    for d in disk:
        if "skipped" in d:
            lines.append(f"- {d['case']}: skipped ({d['skipped']})")
        else:
            lines.append(f"- {d['case']}: exit {d['exit']}, {d['lines']} line, traceback {d['traceback']}, earlier files intact "
                         f"{d['earlier_files_intact']}: `{d['message'][:160]}`")
    return lines


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.1f} / {five:.1f} / {fifteen:.1f}"


from . import SummaryRow, suite  # noqa: E402


@suite("reliability")
def reliability(work: Path, results: Path, *, resume: bool, machine: list[str]) -> list[SummaryRow]:
    """Reads the fuzzing and kill results (run beforehand in the background, see the module docstring),
    runs the bad-command-line table and the disk faults, and writes results/reliability.md."""
    load0 = _load()
    fuzz = fuzz_summary()
    kills_file = WORK / "kills" / "kills.json"
    kills = json.loads(kills_file.read_text()) if kills_file.exists() else None
    cli = run_cli_table(work / "cli")
    disk = run_disk_faults(work / "disk")
    doc = [
        "# Reliability: hostile files, killed runs, bad command lines (issue 14)", "", *machine,
        f"- load average (1/5/15 min; this machine is shared) at the start of the table part: {load0}; at its end: {_load()}",
        "", "Commands: `nice -n 5 python -m benchmarks.suites.reliability fuzz --cases 95000 --workers 2 --first 2` and `... fuzz --cases 5000 --workers 2 --first 4` (added to the same run), "
        "`nice -n 5 python -m benchmarks.suites.reliability kills --random 16`, "
        "`nice -n 5 python -m benchmarks.suites.reliability random-kills --random 20`, then `python -m benchmarks.run --only reliability` "
        "(which reads both and runs the rest).", "",
        "## 1. Structure-aware fuzzing of .nsk files", "", *_fuzz_section(fuzz), "",
        "## 2. SIGKILL at random moments of `netshrink run`, then `--resume`", "", *_kill_section(kills), "",
        "## 3. Every subcommand x every bad input", "", *_cli_section(cli, disk), "",
    ]
    results.mkdir(parents=True, exist_ok=True)
    (results / "reliability.md").write_text("\n".join(doc))
    return []


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m benchmarks.suites.reliability")
    ap.add_argument("part", choices=["fuzz", "kills", "random-kills"])
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--first", type=int, default=0, help="number of the first worker (to add workers to an earlier run)")
    ap.add_argument("--random", type=int, default=16, help="random kill points (8 more are chosen by file events)")
    a = ap.parse_args()
    if a.part == "fuzz":
        run_fuzz(a.cases, a.workers, first=a.first)
        print(json.dumps(fuzz_summary(), indent=1)[:3000])
    elif a.part == "random-kills":
        res = run_random_kills(WORK / "kills", n=a.random)
        print(json.dumps([{k: r[k] for k in ("point", "what", "phase", "differences")} for r in res["rows"]], indent=1))
    else:
        res = run_kills(WORK / "kills", n_random=a.random)
        print(json.dumps([{k: r[k] for k in ("point", "what", "phase", "differences")} for r in res["rows"]], indent=1))
