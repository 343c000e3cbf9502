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


# ------------------------------------------------------------------------------- bad command lines

#: the kinds of bad input of :func:`bad_input_cases`
BAD_INPUTS = ("missing file", "directory", "empty file", "wrong format", "truncated", "huge header", "unwritable output")


@dataclass
class BadInput:
    command: str
    kind: str
    argv: list[str]
    expected: int  # the exit code (2 bad input, 3 output not writable)


def _sparse_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)  # a hole: no disk used, but stat() says ``size``
    return path


def bad_input_cases(folder: Path, good_nsk: Path, good_recipe: Path) -> list[BadInput]:
    """Every subcommand x every kind of bad input, with the files made in ``folder`` (a good .nsk and a
    good recipe are given, to make the truncated, wrong-format and unwritable-output cases from)."""
    import zlib

    from .pack._format import MAGIC, PRELUDE

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adir").mkdir(exist_ok=True)
    (folder / "afile").write_text("a plain file, in the way of a folder")
    blob = good_nsk.read_bytes()
    files = {
        "missing file": {"nsk": folder / "missing.nsk", "onnx": folder / "missing.onnx", "yaml": folder / "missing.yaml"},
        "directory": {"nsk": folder / "adir", "onnx": folder / "adir", "yaml": folder / "adir"},
        "empty file": {k: folder / f"empty.{k}" for k in ("nsk", "onnx", "yaml")},
        "wrong format": {k: folder / f"wrong.{k}" for k in ("nsk", "onnx", "yaml")},
        "truncated": {k: folder / f"cut.{k}" for k in ("nsk", "onnx", "yaml")},
        "huge header": {k: folder / f"huge.{k}" for k in ("nsk", "onnx", "yaml")},
    }
    for k in ("nsk", "onnx", "yaml"):
        files["empty file"][k].write_bytes(b"")
    files["wrong format"]["nsk"].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    files["wrong format"]["onnx"].write_bytes(b"this is text, not a protobuf\n" * 20)
    files["wrong format"]["yaml"].write_text("- just\n- a list\n")
    files["truncated"]["nsk"].write_bytes(blob[: len(blob) // 2])
    files["truncated"]["onnx"].write_bytes(b"\x08\x07\x12\x07pytorch\x1a\x032.0:\xff\x01\n")
    files["truncated"]["yaml"].write_text(good_recipe.read_text()[: len(good_recipe.read_text()) // 2] + "\n  - {method: [")
    head = b'{"format": "netshrink.nsk"}'
    files["huge header"]["nsk"].write_bytes(PRELUDE.pack(MAGIC, 1, 0, 1 << 31, zlib.crc32(head)) + head)
    _sparse_file(files["huge header"]["onnx"], (2 << 30) + 1)
    files["huge header"]["yaml"].write_text("name: x\nnotes: '" + "y" * (2 << 20) + "'\n")
    out = folder / "afile" / "inside"
    cases: list[BadInput] = []
    for kind in BAD_INPUTS[:-1]:
        nsk, onnx, yml = (str(files[kind][k]) for k in ("nsk", "onnx", "yaml"))
        cases += [
            BadInput("info", kind, ["info", nsk], 2),
            BadInput("eval", kind, ["eval", nsk, "--data", "digits"], 2),
            BadInput("eval (onnx)", kind, ["eval", onnx, "--data", "digits"], 2),
            BadInput("unpack", kind, ["unpack", nsk, "-o", str(folder / "o.safetensors")], 2),
            BadInput("export", kind, ["export", nsk, "-o", str(folder / "o.onnx"), "--data", "digits"], 2),
            BadInput("run", kind, ["run", yml, "--out", str(folder / "run-out"), "--no-progress"], 2),
        ]
    kind = "unwritable output"
    cases += [
        BadInput("unpack", kind, ["unpack", str(good_nsk), "-o", str(out / "o.safetensors")], 3),
        BadInput("export", kind, ["export", str(good_nsk), "-o", str(out / "o.onnx"), "--data", "digits"], 3),
        BadInput("run", kind, ["run", str(good_recipe), "--out", str(out), "--no-progress"], 3),
    ]
    return cases


def run_cli_case(case: BadInput, folder: Path) -> dict[str, Any]:
    """Run one bad-input case in-process: exit code, stderr lines, and whether any file changed."""
    import contextlib
    import io

    from .cli import main

    def listing() -> dict[str, int]:
        return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*")}

    before = listing()
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(case.argv)
        except SystemExit as exc:  # argparse's own errors
            code = int(exc.code or 0)
    lines = [ln for ln in err.getvalue().strip().splitlines() if ln.strip()]
    return {"command": case.command, "kind": case.kind, "code": code, "expected": case.expected, "lines": len(lines),
            "message": lines[-1][:160] if lines else "", "traceback": "Traceback" in err.getvalue(), "written": listing() != before}
