"""The .nsk container: prelude, JSON header, checksummed binary sections; atomic writing; safe reading.

Layout (all integers little-endian)::

    offset 0   8 bytes  magic b"\\x89NSK\\r\\n\\x1a\\n"
    offset 8   u16      format version (1)
    offset 10  u16      flags: bit 0 = the header is zlib-deflated; other bits must be 0
    offset 12  u32      header length H (as stored)
    offset 16  u32      CRC32 (zlib) of the header bytes as stored
    offset 20  H bytes  UTF-8 JSON header (deflated when flag bit 0 is set: a third of the bytes)
    20 + H     sections, back to back; header["sections"][i] = {name, offset, length, crc32},
               offsets relative to 20 + H; the file ends exactly after the last section.

Reading checks the prelude, the header checksum, every section's extent and checksum before any
section is decoded, and every failure is one :class:`FormatError` naming the path and the place.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from typing import Any, BinaryIO, Callable

from .._fileio import atomic_write as _atomic_write
from .._outdir import OutputError
from ..errors import FormatError

log = logging.getLogger(__name__)

MAGIC = b"\x89NSK\r\n\x1a\n"
VERSION = 1
PRELUDE = struct.Struct("<8sHHII")
FLAG_DEFLATE = 0x0001
#: sane limits checked before anything is allocated
MAX_HEADER_BYTES = 64 << 20
MAX_FILE_BYTES = 1 << 36
MAX_SECTIONS = 1 << 20
MAX_DIMS = 16


def serialize(header: dict[str, Any], sections: list[tuple[str, bytes]]) -> tuple[bytes, dict[str, Any], int]:
    """``(file bytes, final header, header length)``; the final header gains ``sections`` and
    ``data_bytes`` from ``sections`` (name, bytes)."""
    table, offset = [], 0
    for name, data in sections:
        table.append({"name": name, "offset": offset, "length": len(data), "crc32": zlib.crc32(data)})
        offset += len(data)
    header = dict(header, sections=table, data_bytes=offset)
    try:
        text = json.dumps(header, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise FormatError(f"header is not JSON-serializable: {exc}") from None
    if len(text) > MAX_HEADER_BYTES:
        raise FormatError(f"header of {len(text)} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
    packed = zlib.compress(text, 9)
    flags = 0
    if len(packed) < len(text):
        text, flags = packed, FLAG_DEFLATE
    prelude = PRELUDE.pack(MAGIC, VERSION, flags, len(text), zlib.crc32(text))
    return b"".join([prelude, text] + [data for _, data in sections]), header, len(text)


class PackWriteError(OutputError, FormatError):
    """A packed or unpacked file cannot be written (an :class:`OutputError`; a :class:`FormatError` too,
    as before)."""


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """:func:`netshrink._fileio.atomic_write`, with an ``OSError`` turned into a one-line
    :class:`PackWriteError` naming ``path`` (an existing file there is left intact)."""
    try:
        _atomic_write(path, write)
    except OSError as exc:
        raise PackWriteError(f"cannot write {os.fspath(path)}: {exc.strerror or exc}") from None


def read_file(path: str | os.PathLike) -> bytes:
    """The bytes of ``path``; unreadable or absurdly large files raise :class:`FormatError`."""
    target = os.fspath(path)
    try:
        size = os.path.getsize(target)
        if size > MAX_FILE_BYTES:
            raise FormatError(f"{target}: {size} bytes exceeds the {MAX_FILE_BYTES}-byte limit")
        with open(target, "rb") as f:
            return f.read(size + 1)
    except OSError as exc:
        raise FormatError(f"cannot read {target}: {exc.strerror or exc}") from None


def _int(obj: Any, where: str, lo: int = 0, hi: int = 1 << 62) -> int:
    if not isinstance(obj, int) or isinstance(obj, bool) or not lo <= obj <= hi:
        raise FormatError(f"{where}: expected an integer in [{lo}, {hi}], got {_short(obj)}")
    return obj


def _short(obj: Any) -> str:
    text = repr(obj)
    return text if len(text) <= 60 else text[:57] + "..."


def field(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``obj[key]`` checked to be of ``kind``; missing or mistyped raises :class:`FormatError`."""
    if not isinstance(obj, dict):
        raise FormatError(f"{where}: expected an object, got {_short(obj)}")
    if key not in obj:
        raise FormatError(f"{where}: missing key {key!r}")
    value = obj[key]
    if kind is int:
        return _int(value, f"{where}.{key}")
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise FormatError(f"{where}.{key}: expected {getattr(kind, '__name__', kind)}, got {_short(value)}")
    return value


def int_field(obj: dict[str, Any], key: str, where: str, lo: int = 0, hi: int = 1 << 62) -> int:
    if not isinstance(obj, dict) or key not in obj:
        raise FormatError(f"{where}: missing key {key!r}")
    return _int(obj[key], f"{where}.{key}", lo, hi)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


#: a deflated header may inflate to at most ``2**20 + INFLATE_RATIO * its stored length`` (the writer's
#: JSON deflates about 3-5x; a bomb of 100 KB cannot ask for 64 MB of JSON to parse)
INFLATE_RATIO = 32


def _inflate(raw: bytes, where: str) -> bytes:
    """The deflated header, inflated with a cap proportional to its stored size: a small bomb cannot
    allocate (or make the JSON parser build) more than the limit."""
    limit = min(MAX_HEADER_BYTES, (1 << 20) + INFLATE_RATIO * len(raw))
    d = zlib.decompressobj()
    try:
        out = d.decompress(raw, limit + 1)
    except zlib.error as exc:
        raise FormatError(f"{where}: deflated header at offset {PRELUDE.size} is corrupt: {exc}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise FormatError(f"{where}: header inflates past the {limit}-byte limit for its {len(raw)} stored bytes")
    if not d.eof or d.unused_data:
        raise FormatError(f"{where}: deflated header at offset {PRELUDE.size} is truncated or has trailing bytes")
    return out


def parse(buf: bytes, where: str) -> tuple[dict[str, Any], list[memoryview]]:
    """Check a whole file and split it into its JSON header and its section views.

    ``where`` (the path) prefixes every error message.
    """
    n = len(buf)
    if n < PRELUDE.size:
        raise FormatError(f"{where}: truncated: {n} bytes, the prelude alone needs {PRELUDE.size}")
    magic, version, flags, hlen, hcrc = PRELUDE.unpack_from(buf, 0)
    if magic != MAGIC:
        raise FormatError(f"{where}: not an .nsk file (bad magic bytes {magic!r} at offset 0)")
    if version != VERSION:
        raise FormatError(f"{where}: format version {version} at offset 8 is not supported (this reader knows {VERSION})")
    if flags & ~FLAG_DEFLATE:
        raise FormatError(f"{where}: unknown flags {flags:#06x} at offset 10")
    if hlen > MAX_HEADER_BYTES:
        raise FormatError(f"{where}: header length {hlen} at offset 12 exceeds the {MAX_HEADER_BYTES}-byte limit")
    if PRELUDE.size + hlen > n:
        raise FormatError(f"{where}: truncated: header of {hlen} bytes at offset {PRELUDE.size} runs past the end ({n} bytes)")
    raw = buf[PRELUDE.size : PRELUDE.size + hlen]
    if zlib.crc32(raw) != hcrc:
        raise FormatError(f"{where}: header (offset {PRELUDE.size}, {hlen} bytes) fails its CRC32 check")
    if flags & FLAG_DEFLATE:
        raw = _inflate(raw, where)
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_no_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FormatError(f"{where}: header is not valid UTF-8 JSON: {str(exc)[:80]}") from None
    if not isinstance(header, dict):
        raise FormatError(f"{where}: header is not a JSON object")
    base = PRELUDE.size + hlen
    data_bytes = int_field(header, "data_bytes", f"{where}: header")
    table = field(header, "sections", list, f"{where}: header")
    if len(table) > MAX_SECTIONS:
        raise FormatError(f"{where}: {len(table)} sections exceed the limit of {MAX_SECTIONS}")
    views, expect, mv = [], 0, memoryview(buf)
    for i, sec in enumerate(table):
        at = f"{where}: header.sections[{i}]"
        name = field(sec, "name", str, at)
        offset = int_field(sec, "offset", at)
        length = int_field(sec, "length", at)
        crc = int_field(sec, "crc32", at, 0, 0xFFFFFFFF)
        if offset != expect:
            raise FormatError(f"{at}: section {name!r} starts at {offset}, expected {expect}")
        start = base + offset
        if start + length > n:
            raise FormatError(
                f"{where}: truncated: section {name!r} (bytes {start}..{start + length}) runs past the end ({n} bytes)"
            )
        view = mv[start : start + length]
        if zlib.crc32(view) != crc:
            raise FormatError(f"{where}: section {name!r} (offset {start}, {length} bytes) fails its CRC32 check")
        views.append(view)
        expect = offset + length
    if expect != data_bytes:
        raise FormatError(f"{where}: sections hold {expect} bytes but the header says {data_bytes}")
    if base + data_bytes != n:
        kind = "truncated" if base + data_bytes > n else "trailing bytes"
        raise FormatError(f"{where}: {kind}: expected {base + data_bytes} bytes, found {n}")
    return header, views
