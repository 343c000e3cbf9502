"""The output folder of a run: one writer at a time (a lock), no half-written files, clear write errors.

* :func:`run_lock` -- a run holds ``OUT/.netshrink-run.lock`` for its whole length: an advisory
  ``flock`` on the file (released by the kernel when the process ends, however it ends, so the lock of
  a killed run is stale at once and the next run takes it over) and the holder's pid written inside
  (named in the refusal). A second run into the same folder gets :class:`RunLockedError`. Where
  ``fcntl`` does not exist the file is created exclusively and a lock whose pid is dead is taken over.
* Every file of a run is written by :func:`netshrink._fileio.atomic_write` (temporary file beside the
  target, fsync, rename), so a kill leaves either the old file or the new one, plus at most a temporary
  ``.NAME.XXXX.tmp``; taking the lock removes such leftovers of a killed run.
* :func:`output_errors` turns an ``OSError`` while writing (a read-only folder, a full disk, a file in
  the way) into one :class:`OutputError` line naming the path; files written before are left intact.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from pathlib import Path
from typing import Iterator

from .errors import NetshrinkError

log = logging.getLogger("netshrink.pipeline")

LOCK_NAME = ".netshrink-run.lock"


class OutputError(NetshrinkError):
    """An output file or folder cannot be written (read-only, disk full, a file in the way)."""


class RunLockedError(OutputError):
    """Another run is writing into the same output folder."""


def describe_os_error(exc: OSError, path: str | os.PathLike | None = None) -> str:
    """``PATH: reason`` for an OSError, the reason in words (``No space left on device``)."""
    where = os.fspath(path) if path is not None else (exc.filename or "output")
    reason = exc.strerror or (errno.errorcode.get(exc.errno or 0) if exc.errno else None) or str(exc) or type(exc).__name__
    return f"{where}: {reason}"


@contextlib.contextmanager
def output_errors(path: str | os.PathLike) -> Iterator[None]:
    """Inside, an ``OSError`` becomes one :class:`OutputError` naming ``path`` (or the file it names)."""
    try:
        yield
    except OSError as exc:
        raise OutputError(f"cannot write {describe_os_error(exc, exc.filename or path)}") from None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _read_pid(path: Path) -> int:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")[:64].split()
        return int(text[0]) if text else 0
    except (OSError, ValueError):
        return 0


def remove_stale_temporaries(out_dir: Path) -> list[Path]:
    """Delete the ``.NAME.XXXX.tmp`` files that :func:`netshrink._fileio.atomic_write` leaves when the
    process is killed mid-write (call only while holding the folder's lock)."""
    removed = []
    for tmp in out_dir.rglob(".*.tmp"):
        if tmp.is_file():
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass
    if removed:
        log.info("removed %d temporary files of an interrupted run in %s", len(removed), out_dir)
    return removed


def _busy(out_dir: Path, pid: int) -> RunLockedError:
    who = f"pid {pid}" if pid else "another process"
    return RunLockedError(f"{out_dir}: another netshrink run ({who}) is writing into this folder; "
                          "wait for it to finish or choose another --out")


@contextlib.contextmanager
def run_lock(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold the lock of ``out_dir`` (made if missing) for the block; see the module docstring."""
    out = Path(out_dir)
    lock = out / LOCK_NAME
    with output_errors(out):
        out.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux/macOS
        fcntl = None  # type: ignore[assignment]
    if fcntl is None:  # pragma: no cover
        with _exclusive_lock(out, lock):
            remove_stale_temporaries(out)
            yield lock
        return
    with output_errors(lock):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)  # not ours: leave the holder's pid in place
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise _busy(out, _read_pid(lock)) from None
        raise OutputError(f"cannot lock {describe_os_error(exc, lock)}") from None
    try:
        old = _read_pid(lock)
        if old and old != os.getpid():
            log.info("taking over the lock of %s from pid %d, which no longer runs", out, old)
        with output_errors(lock):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        remove_stale_temporaries(out)
        yield lock
    finally:
        try:
            os.ftruncate(fd, 0)  # no pid: nobody holds it
        except OSError:
            pass
        os.close(fd)  # releases the flock


@contextlib.contextmanager
def _exclusive_lock(out: Path, lock: Path) -> Iterator[None]:  # pragma: no cover - platforms without fcntl
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            pid = _read_pid(lock)
            if _pid_alive(pid):
                raise _busy(out, pid) from None
            log.info("taking over the stale lock of %s (pid %d no longer runs)", out, pid)
            with contextlib.suppress(OSError):
                lock.unlink()
    else:
        raise _busy(out, _read_pid(lock))
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
