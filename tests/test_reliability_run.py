"""Runs that survive any kill, a full disk and a second run into the same folder (issue 14 part 4).

Real processes: each run is ``python -m netshrink.cli run`` on the digits data set, killed with SIGKILL
at moments chosen by what appears in its folder, then resumed; the resumed run's packed files must be
bit-identical to an uninterrupted run's and its measured rows equal.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from netshrink import _faults as F
from netshrink._outdir import LOCK_NAME, RunLockedError, run_lock
from netshrink.cli import main

RECIPE = {
    "name": "digits-kill",
    "model": "mlp",
    "model_args": {"in_features": 64, "hidden": [32]},
    "data": "digits",
    "seed": 3,
    "train": {"epochs": 3, "lr": 0.05, "schedule": "cosine", "batch_size": 32, "progress": False},
    "stages": [
        {"method": "magnitude", "label": "prune", "sparsity": 0.75, "finetune": {"epochs": 2, "lr": 0.01, "batch_size": 32, "progress": False}},
        {"method": "kmeans", "label": "share", "bits": 4, "finetune": {"epochs": 1, "lr": 0.001, "batch_size": 32, "progress": False}},
        {"method": "huffman"},
    ],
}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    p = tmp_path_factory.mktemp("r") / "kill.yaml"
    p.write_text(yaml.safe_dump(RECIPE))
    return p


@pytest.fixture(scope="module")
def reference(recipe, tmp_path_factory):
    """The artifacts of an uninterrupted run (its own process, as the killed runs)."""
    base = tmp_path_factory.mktemp("ref")
    res = F.run_to_end(recipe, base / "out", base / "cache")
    assert res.returncode == 0, res.stderr[-2000:]
    return F.artifacts(base / "out")


def _holder(out):
    """A process that holds the run lock of ``out`` until killed."""
    code = ("import sys, time; from netshrink._outdir import run_lock\n"
            f"with run_lock({str(out)!r}):\n    print('locked', flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_is_refused_and_a_killed_runs_lock_is_taken_over(recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NETSHRINK_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    holder = _holder(out)
    try:
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            with run_lock(out):
                pass
        assert main(["run", str(recipe), "--out", str(out), "--no-progress"]) == 4
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"pid {holder.pid}" in err and "another netshrink run" in err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # the refused run wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder died without releasing anything: its lock (and a temporary it left) are taken over
    (out / "stages").mkdir()
    leftover = out / "stages" / ".01-magnitude.nsk.x1y2.tmp"
    leftover.write_bytes(b"half a file")
    assert (out / LOCK_NAME).read_text().strip() == str(holder.pid)
    with run_lock(out) as lock:
        assert lock.read_text().strip() == str(os.getpid())
        assert not leftover.exists()
    assert (out / LOCK_NAME).read_text() == ""  # released


def _has_checkpoint(out):
    return any(out.glob("checkpoints/*/checkpoint.pt"))


def _stage_packed(out):
    return (out / "stages" / "01-magnitude.nsk").exists()


def _report_phase(out):
    return (out / "results.json").exists()


@pytest.mark.parametrize("when", [_has_checkpoint, _stage_packed, _report_phase], ids=["training", "packing", "report"])
def test_a_killed_run_resumes_to_the_same_artifacts(recipe, reference, tmp_path, when):
    out, cache = tmp_path / "out", tmp_path / "cache"
    killed = F.run_and_kill(recipe, out, cache, when=when)
    assert not killed.finished, "the run ended before the kill point"
    assert F.check_complete(out) == []  # every file left behind is whole (temporaries aside)
    res = F.run_to_end(recipe, out, cache, "--resume")
    assert res.returncode == 0, res.stderr[-2000:]
    assert F.diff(reference, F.artifacts(out)) == []
    assert F.temporaries(out) == [] and F.check_complete(out) == []


def _limited_run(recipe, out, cache, limit):
    """The CLI in a process whose files may not grow past ``limit`` bytes (writes fail as on a full disk)."""
    code = ("import resource, sys\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
            "from netshrink.cli import main\n"
            f"sys.exit(main(['run', {str(recipe)!r}, '--out', {str(out)!r}, '--no-progress']))\n")
    return subprocess.run([sys.executable, "-c", code], env=F.run_env(cache), capture_output=True, text=True, timeout=900)


def test_a_failing_write_is_one_line_and_keeps_the_earlier_files(recipe, reference, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    res = _limited_run(recipe, out, cache, 12_000)
    assert res.returncode == 3, res.stderr[-2000:]
    err = [line for line in res.stderr.strip().splitlines() if line.startswith("netshrink:")]
    assert len(err) == 1 and "cannot write" in err[0] and "Traceback" not in res.stderr
    assert F.temporaries(out) == [] and F.check_complete(out) == []
    done = F.run_to_end(recipe, out, cache, "--resume")  # with room again, the run finishes as if never stopped
    assert done.returncode == 0, done.stderr[-2000:]
    assert F.diff(reference, F.artifacts(out)) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_one_line(recipe, reference, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NETSHRINK_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert main(["run", str(recipe), "--out", str(out), "--no-progress"]) == 3
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "cannot write" in err
    finally:
        out.chmod(0o755)
    assert list(out.iterdir()) == []
