"""Fault injection for ``netshrink run`` (the reliability tests and benchmark): kill, resume, compare.

A run is started as its own process (``python -m netshrink.cli run``), killed with SIGKILL at a chosen
moment -- after a delay, or as soon as a file appears in its output folder -- and then run again with
``--resume`` to the end. :func:`check_complete` verifies that every file in the folder at the moment of
the kill is whole (each .nsk passes ``read_info``, each JSON parses, each checkpoint loads, each PNG
ends with its IEND chunk; only ``.NAME.XXXX.tmp`` temporaries may be partial), and
:func:`artifacts` reduces a finished folder to what must equal an uninterrupted run's: the bytes of
every .nsk and the measured rows without their wall-clock seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

_PNG_END = b"IEND\xaeB`\x82"


@dataclass
class Killed:
    """What a killed run left: when it was killed (seconds after start), whether it had already
    finished, and the files found then."""

    seconds: float
    finished: bool
    returncode: int | None
    files: list[str]


def cli_command(recipe: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "netshrink.cli", "run", str(recipe), "--out", str(out), "--no-progress", *extra]


def run_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(NETSHRINK_CACHE=str(cache), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    return env


def run_to_end(recipe: Path, out: Path, cache: Path, *extra: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(recipe, out, *extra), env=run_env(cache), capture_output=True, text=True, timeout=timeout)


def run_and_kill(recipe: Path, out: Path, cache: Path, *, after: float | None = None,
                 when: Callable[[Path], bool] | None = None, extra: tuple[str, ...] = (), timeout: float = 900) -> Killed:
    """Start a run and SIGKILL it ``after`` seconds, or as soon as ``when(out)`` holds (polled every 5 ms)."""
    proc = subprocess.Popen(cli_command(recipe, out, *extra), env=run_env(cache), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.perf_counter()
    while proc.poll() is None:
        now = time.perf_counter() - t0
        if (after is not None and now >= after) or (when is not None and when(out)) or now > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return Killed(now, False, proc.returncode, _listing(out))
        time.sleep(0.005)
    return Killed(time.perf_counter() - t0, True, proc.returncode, _listing(out))


def _listing(out: Path) -> list[str]:
    if not out.exists():
        return []
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(".tmp")


def check_complete(folder: Path) -> list[str]:
    """Problems with files in ``folder`` that are not whole (empty list: every file is complete)."""
    from .pack import read_info

    problems = []
    if not folder.exists():
        return problems
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or is_temporary(p) or p.name.endswith(".lock"):
            continue
        try:
            if p.suffix == ".nsk":
                read_info(p)
            elif p.suffix == ".json":
                json.loads(p.read_text())
            elif p.suffix == ".pt":
                from ._checkpoint import load_checkpoint

                load_checkpoint(p)
            elif p.suffix == ".png":
                data = p.read_bytes()
                if not (data.startswith(b"\x89PNG") and data.endswith(_PNG_END)):
                    raise ValueError("not a whole PNG")
            elif p.suffix == ".safetensors":
                from safetensors.numpy import load_file

                load_file(str(p))
            elif p.stat().st_size == 0:
                raise ValueError("empty")
        except Exception as exc:  # noqa: BLE001 - any failure to read is a half-written file
            problems.append(f"{p.relative_to(folder)}: {type(exc).__name__}: {str(exc)[:120]}")
    return problems


def temporaries(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*.tmp")) if folder.exists() else []


def _row(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if k not in ("seconds", "file")}
    if row.get("file"):
        out["file"] = Path(row["file"]).name
    return out


def artifacts(out: Path) -> dict[str, Any]:
    """What must equal an uninterrupted run's: sha256 of every .nsk, the rows (wall-clock seconds
    dropped), and the list of result files."""
    nsk = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*.nsk"))}
    results = json.loads((out / "results.json").read_text())
    stages = {str(p.relative_to(out)): _row(json.loads(p.read_text())["row"]) for p in sorted((out / "stages").glob("*.json"))}
    files = sorted(f for f in _listing(out) if not f.startswith("checkpoints") and not f.endswith(".lock"))
    return {"nsk": nsk, "rows": [_row(r) for r in results["rows"]], "stages": stages, "files": files}


def diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The keys where two :func:`artifacts` differ (empty: identical)."""
    out = []
    for key in a:
        if a[key] != b.get(key):
            if isinstance(a[key], dict):
                out += [f"{key}/{k}" for k in sorted(set(a[key]) | set(b.get(key, {}))) if a[key].get(k) != b.get(key, {}).get(k)]
            else:
                out.append(key)
    return out
