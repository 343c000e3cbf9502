"""Bounded, typed reading of the files a user hands in (besides .nsk): YAML recipes, ONNX models,
.npz arrays, IDX (and gzip) files.

Each check runs before the file's content is used and ends in one line naming the file:

* :func:`read_bounded` -- the bytes of a file no larger than a limit (a folder, a missing file or a
  device is one error), gunzipped with the same limit on the output (a gzip bomb stops at the limit).
* :func:`load_yaml` -- a YAML document of at most :data:`MAX_YAML_BYTES`, read with a safe loader that
  refuses aliases (``*ref``: the "billion laughs" expansion) and nesting deeper than
  :data:`MAX_YAML_DEPTH`; tags other than the standard ones are refused by the safe loader.
* :func:`check_onnx` -- an ONNX file of at most :data:`MAX_ONNX_BYTES` (protobuf's own limit) that
  parses, holds no external-data references (a model file may not point the reader at other files),
  and passes ``onnx.checker.check_model``.
* :func:`check_npz` -- an .npz archive whose members are ``.npy`` arrays whose headers declare at most
  :data:`MAX_ARRAY_BYTES` in all, and whose unpacked sizes add up to no more than that (checked from
  the zip directory before a byte is inflated).
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError, DataError, ModelError, NetshrinkError

MAX_YAML_BYTES = 1 << 20
MAX_YAML_DEPTH = 32
MAX_ONNX_BYTES = 2 << 30
MAX_ARRAY_BYTES = 8 << 30
MAX_IDX_BYTES = 2 << 30


def read_bounded(path: str | os.PathLike, limit: int, error: Callable[[str], NetshrinkError] = DataError, what: str = "file",
                 gunzip: bool = False) -> bytes:
    """The bytes of ``path`` (gunzipped when ``gunzip`` and it starts with ``1f 8b``), at most ``limit``;
    ``error(message)`` makes the exception raised."""
    p = Path(path)
    try:
        if p.is_dir():
            raise error(f"{p}: is a folder, not a {what}")
        size = p.stat().st_size
        if size > limit:
            raise error(f"{p}: {size} bytes exceed the {limit}-byte limit for a {what}")
        with open(p, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise error(f"{p}: file not found") from None
    except OSError as exc:
        raise error(f"{p}: cannot read ({exc.strerror or exc})") from None
    if len(data) > limit:
        raise error(f"{p}: more than the {limit}-byte limit for a {what}")
    if gunzip and data[:2] == b"\x1f\x8b":
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out = d.decompress(data, limit + 1)
        except zlib.error as exc:
            raise error(f"{p}: not a valid gzip file ({exc})") from None
        if len(out) > limit or d.unconsumed_tail:
            raise error(f"{p}: gunzips past the {limit}-byte limit for a {what}")
        if not d.eof:
            raise error(f"{p}: truncated gzip file")
        data = out
    return data


def load_yaml(path: str | os.PathLike, what: str = "recipe") -> Any:
    """The YAML document in ``path`` (bounded size, no aliases, bounded depth); errors are :class:`ConfigError`."""
    import yaml

    p = Path(path)
    raw = read_bounded(p, MAX_YAML_BYTES, lambda m: ConfigError(what, m), f"{what} (YAML)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(what, f"{p}: not UTF-8 text (byte {exc.start})") from None

    class _Loader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:  # noqa: D401 - yaml hook
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise ConfigError(what, f"{p}: YAML aliases (*name) are not allowed (line {mark.line + 1})")
            self._depth = getattr(self, "_depth", 0) + 1
            try:
                if self._depth > MAX_YAML_DEPTH:
                    mark = self.peek_event().start_mark
                    raise ConfigError(what, f"{p}: nested deeper than {MAX_YAML_DEPTH} levels (line {mark.line + 1})")
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(what, f"{p}: not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise ConfigError(what, f"{p}: nested too deeply") from None


def check_onnx(path: str | os.PathLike) -> None:
    """Refuse (one :class:`ModelError` line) an ONNX file that is too large, does not parse, refers to
    external data, or fails ``onnx.checker``."""
    from ._extras import require

    onnx = require("onnx", "onnx")
    p = Path(path)
    raw = read_bounded(p, MAX_ONNX_BYTES, ModelError, "ONNX model")
    try:
        model = onnx.load_from_string(raw)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several kinds on garbage
        raise ModelError(f"{p}: not an ONNX model ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    for t in list(model.graph.initializer):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            raise ModelError(f"{p}: initializer {t.name[:80]!r} refers to external data; only self-contained ONNX files are read")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 - onnx.checker.ValidationError and friends
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{p}: invalid ONNX model: {first[:300]}") from None


def check_npz(path: str | os.PathLike, limit: int = MAX_ARRAY_BYTES) -> None:
    """Refuse (one :class:`DataError` line) an .npz whose arrays would unpack past ``limit`` bytes,
    judged from the zip directory and each ``.npy`` header before anything is inflated."""
    import zipfile

    import numpy as np

    p = Path(path)
    if not p.is_file():
        return  # the reader reports a missing file or a folder
    try:
        with zipfile.ZipFile(p) as z:
            infos = z.infolist()
            if len(infos) > 100_000:
                raise DataError(f"{p}: {len(infos)} members exceed the limit of 100000")
            total = sum(i.file_size for i in infos)
            if total > limit:
                raise DataError(f"{p}: arrays of {total} bytes exceed the {limit}-byte limit")
            declared = 0
            for info in infos:
                with z.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    shape, _, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                       else np.lib.format.read_array_header_2_0(f))
                    if dtype.hasobject:
                        continue  # refused by the reader (allow_pickle=False), with its own message
                    n = 1
                    for d in shape:
                        n *= int(d)
                    declared += n * dtype.itemsize
                    if declared > limit or n * dtype.itemsize > info.file_size:
                        raise DataError(f"{p}: array {info.filename[:80]!r} declares {n * dtype.itemsize} bytes, "
                                        f"more than its {info.file_size} stored bytes or the {limit}-byte limit")
    except DataError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, zlib.error):
        return  # not a zip / not .npy members: the reader's own error names it
