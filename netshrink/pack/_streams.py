"""One symbol stream (gaps or codebook indices) coded fixed-width, Huffman or rANS, with its statistics.

``coding="auto"`` codes the stream every way and keeps the smallest section, tables included (ties go
to fixed, then Huffman), the per-stream choice of Deep Compression's last stage (Han et al., ICLR 2016,
§4). rANS (:mod:`netshrink.pack.rans`, Duda 2013) spends fractions of a bit per symbol, so it comes
within its table's bytes of the entropy bound where a Huffman code cannot.

Block Huffman: a Huffman code spends at least one bit per symbol and up to ``p_max + 0.086`` bits over
the entropy ``H`` (Gallager 1978), which is far over for a skewed stream of few symbols (a bitmap of a
dense layer, small gaps). Coding ``k`` consecutive symbols as one symbol of the extended alphabet
brings the bound down to ``H + 1/k`` bits per original symbol (Shannon's source-coding theorem, Cover &
Thomas §5.4). The Huffman coder tries ``k = 1, 2, ...`` (while ``k * bits <= 32`` and the extended
alphabet stays small) and keeps the ``k`` whose section, code table included, is smallest. A stream
of ``n`` symbols is padded with zeros to a multiple of ``k``; the header's ``block`` field holds ``k``
(absent means 1) and the decoder drops the padding. rANS tries the same block sizes (its payload is
near the entropy of the blocks, which is below ``k * H`` when neighbouring symbols are correlated)
and keeps the one whose estimated section, table included, is smallest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import FormatError
from . import huffman, rans
from ._bits import pack_fixed, packed_nbytes, unpack_fixed
from ._format import int_field

CODINGS = ("auto", "fixed", "huffman", "rans")


@dataclass(frozen=True)
class CodedStream:
    """A coded stream: ``count`` symbols below ``2**bits`` in ``data``; ``coded_bits`` are the bits of
    the codewords alone (rANS: payload and final states), ``entropy_bits`` the Shannon bound ``n * H``
    of the stream; ``len(data)`` counts everything, head and code table included."""

    coding: str
    bits: int
    count: int
    coded_bits: int
    entropy_bits: float
    data: bytes
    block: int = 1

    def describe(self) -> dict[str, Any]:
        out = {
            "coding": self.coding,
            "bits": self.bits,
            "count": self.count,
            "coded_bits": self.coded_bits,
            "entropy_bits": round(self.entropy_bits, 3),
        }
        if self.block > 1:
            out["block"] = self.block
        return out


#: Largest extended alphabet (distinct k-tuples) a block size may need before larger blocks stop
#: being tried: past it the code table outweighs what the longer blocks save.
MAX_BLOCK_ALPHABET = 4096
MAX_BLOCK = 8
#: A block size is tried only while each distinct block occurs this many times on average: below
#: that the code table, not the codewords, carries the stream, and its bits/symbol mean nothing.
MIN_BLOCK_REUSE = 4


def max_block(bits: int) -> int:
    """The largest block size for symbols of ``bits`` bits (a k-tuple must fit in 32 bits)."""
    return max(1, min(MAX_BLOCK, 32 // bits))


def _blocked(sym: np.ndarray, bits: int, k: int) -> np.ndarray:
    """``sym`` padded with zeros to a multiple of ``k``, each k-tuple packed little-endian in one int."""
    if k == 1:
        return sym
    pad = (-sym.size) % k
    tup = np.concatenate([sym, np.zeros(pad, dtype=np.int64)]).reshape(-1, k)
    shifts = np.arange(k, dtype=np.int64) * bits
    return np.bitwise_or.reduce(np.left_shift(tup, shifts), axis=1) if tup.size else tup.reshape(-1)


def _unblocked(values: np.ndarray, bits: int, k: int, count: int) -> np.ndarray:
    if k == 1:
        return values
    shifts = np.arange(k, dtype=np.int64) * bits
    mask = (1 << bits) - 1
    return (np.right_shift(values.astype(np.int64)[:, None], shifts) & mask).reshape(-1)[:count]


def _best_huffman(sym: np.ndarray, bits: int) -> tuple[huffman.HuffmanStream, bytes, int]:
    """The block size whose Huffman section is smallest, with its stream and bytes."""
    best = None
    for k in range(1, max_block(bits) + 1):
        values = _blocked(sym, bits, k)
        if k > 1:
            distinct = np.unique(values).size
            if distinct > MAX_BLOCK_ALPHABET or distinct * MIN_BLOCK_REUSE > values.size:
                break
        stream = huffman.encode(values)
        blob = stream.to_bytes()
        if best is None or len(blob) < len(best[1]):
            best = (stream, blob, k)
    assert best is not None
    return best


def _best_rans(sym: np.ndarray, bits: int) -> tuple[rans.RansStream, int]:
    """The rANS stream of the block size whose estimated section is smallest."""
    best = None
    for k in range(1, max_block(bits) + 1):
        values = _blocked(sym, bits, k)
        used, counts = np.unique(values, return_counts=True)
        if k > 1 and (used.size > MAX_BLOCK_ALPHABET or used.size * MIN_BLOCK_REUSE > values.size):
            break
        est = rans.choose(used, counts)[2] if values.size else 0.0
        if best is None or est < best[0]:
            best = (est, k, values)
    assert best is not None
    return rans.encode(best[2]), best[1]


def code_stream(symbols: np.ndarray, bits: int, coding: str) -> CodedStream:
    """Code ``symbols`` (each below ``2**bits``) with ``coding`` in ``auto``/``fixed``/``huffman``/``rans``."""
    if coding not in CODINGS:
        raise ValueError(f"coding must be one of {CODINGS}, got {coding!r}")
    sym = np.asarray(symbols, dtype=np.int64).reshape(-1)
    n = sym.size
    ent = huffman.entropy_bits(sym)
    best = CodedStream("fixed", bits, n, n * bits, ent, pack_fixed(sym, bits)) if coding in ("auto", "fixed") else None
    if coding in ("auto", "huffman"):
        stream, blob, k = _best_huffman(sym, bits)
        if best is None or len(blob) < len(best.data):
            best = CodedStream("huffman", bits, n, stream.nbits, ent, blob, k)
    if coding in ("auto", "rans"):
        found = _best_rans(sym, bits)
        if best is None or len(found[0].data) < len(best.data):
            best = CodedStream("rans", bits, n, found[0].coded_bits, ent, found[0].data, found[1])
    assert best is not None
    return best


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
    if coding not in ("huffman", "rans"):
        raise FormatError(f"{where}: unknown coding {coding!r}")
    k = int_field(part, "block", where, 1, max_block(bits)) if "block" in part else 1
    if coding == "rans":
        try:
            values = rans.decode(data, -(-count // k), (1 << (k * bits)) - 1)
        except FormatError as exc:
            raise FormatError(f"{where}: {exc}") from None
        return _unblocked(values, bits, k, count)
    try:
        stream = huffman.HuffmanStream.from_bytes(data)
        if stream.count != -(-count // k):
            raise FormatError(f"huffman stream holds {stream.count} blocks of {k}, header says {count} symbols")
        if k > 1 and stream.code.symbols.size and int(stream.code.symbols.max()) >> (k * bits):
            raise FormatError(f"a block of {k} symbols does not fit in {k * bits} bits")
        out = _unblocked(huffman.decode(stream), bits, k, count)
    except FormatError as exc:
        raise FormatError(f"{where}: {exc}") from None
    if out.size and int(out.max()) >> bits:
        raise FormatError(f"{where}: a symbol does not fit in {bits} bits")
    return out
