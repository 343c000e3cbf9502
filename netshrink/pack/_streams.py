"""One symbol stream (gaps or codebook indices) coded fixed-width or Huffman, with its statistics.

``coding="auto"`` codes the stream both ways and keeps the smaller section (ties go to fixed), the
per-stream choice of Deep Compression's last stage (Han et al., ICLR 2016, §4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import FormatError
from . import huffman
from ._bits import pack_fixed, packed_nbytes, unpack_fixed
from ._format import int_field

CODINGS = ("auto", "fixed", "huffman")


@dataclass(frozen=True)
class CodedStream:
    """A coded stream: ``count`` symbols below ``2**bits`` in ``data``; ``coded_bits`` are the bits of
    the codewords alone, ``entropy_bits`` the Shannon bound ``n * H`` of the stream."""

    coding: str
    bits: int
    count: int
    coded_bits: int
    entropy_bits: float
    data: bytes

    def describe(self) -> dict[str, Any]:
        return {
            "coding": self.coding,
            "bits": self.bits,
            "count": self.count,
            "coded_bits": self.coded_bits,
            "entropy_bits": round(self.entropy_bits, 3),
        }


def code_stream(symbols: np.ndarray, bits: int, coding: str) -> CodedStream:
    """Code ``symbols`` (each below ``2**bits``) with ``coding`` in ``auto``/``fixed``/``huffman``."""
    if coding not in CODINGS:
        raise ValueError(f"coding must be one of {CODINGS}, got {coding!r}")
    sym = np.asarray(symbols, dtype=np.int64).reshape(-1)
    n = sym.size
    ent = huffman.entropy_bits(sym)
    fixed_len = packed_nbytes(n, bits)
    if coding in ("auto", "huffman"):
        stream = huffman.encode(sym)
        blob = stream.to_bytes()
        if coding == "huffman" or len(blob) < fixed_len:
            return CodedStream("huffman", bits, n, stream.nbits, ent, blob)
    return CodedStream("fixed", bits, n, n * bits, ent, pack_fixed(sym, bits))


def decode_stream(part: dict[str, Any], data: memoryview, where: str, max_bits: int, max_count: int) -> np.ndarray:
    """Symbols of a stream described by ``part`` (its header entry) from its section ``data``.

    ``count`` must not exceed ``max_count`` and ``bits`` must not exceed ``max_bits``; every symbol is
    checked to be below ``2**bits``. Any mismatch raises :class:`FormatError` naming ``where``.
    """
    coding = part.get("coding") if isinstance(part, dict) else None
    bits = int_field(part, "bits", where, 1, max_bits)
    count = int_field(part, "count", where, 0, max_count)
    if coding == "fixed":
        if len(data) != packed_nbytes(count, bits):
            raise FormatError(f"{where}: {len(data)} bytes do not hold {count} symbols of {bits} bits")
        return unpack_fixed(data, bits, count)
    if coding != "huffman":
        raise FormatError(f"{where}: unknown coding {coding!r}")
    try:
        stream = huffman.HuffmanStream.from_bytes(data)
        if stream.count != count:
            raise FormatError(f"huffman stream holds {stream.count} symbols, header says {count}")
        out = huffman.decode(stream)
    except FormatError as exc:
        raise FormatError(f"{where}: {exc}") from None
    if out.size and int(out.max()) >> bits:
        raise FormatError(f"{where}: a symbol does not fit in {bits} bits")
    return out
