"""Atomic writes and the cache folder."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Callable


def cache_root(path: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder (data, trained baselines): ``path``, else ``$NETSHRINK_CACHE``, else ``~/.cache/netshrink``."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get("NETSHRINK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "netshrink"


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    On any error (or an interrupt) the temporary file is removed and an existing ``path`` is intact.
    The folder must exist (a caller that wants it made says so).
    """
    path = Path(path)
    mode = path.stat().st_mode & 0o777 if path.is_file() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable where the platform lets a folder be opened."""
    try:
        dfd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
