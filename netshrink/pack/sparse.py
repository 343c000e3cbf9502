"""Relative index coding of the positions of a sparse tensor (Deep Compression's CSR-style index).

Idea (Han, Mao & Dally, "Deep Compression", ICLR 2016, §2 and Fig. 2; Han et al., "Learning both
Weights and Connections", NeurIPS 2015): flatten the tensor and, instead of absolute positions, store
the distance from one kept entry to the next in ``b`` bits; when a distance does not fit, filler
entries bridge it. Here the filler is an *escape symbol*, so the value stream holds only real entries:

* ``skip_i = p_i - p_{i-1} - 1`` (with ``p_{-1} = -1``) is the number of dropped positions before the
  ``i``-th kept position ``p_i``; with ``E = 2**b - 1``, it is written as ``skip_i // E`` escape symbols
  ``E`` ("advance E positions, no entry here") followed by the symbol ``skip_i % E`` ("advance that
  many positions, then an entry").
* Decoding: ``advance = E`` for an escape and ``symbol + 1`` otherwise; the positions are
  ``cumsum(advance) - 1`` at the non-escape symbols. Both directions are vectorised.
* ``b = 1`` turns the stream into a plain bitmap (``0`` = entry, ``1`` = skip one position), so dense
  masks are covered too. :func:`choose_gap_bits` tries every ``b`` and keeps the one whose coded stream
  (``b`` bits per symbol, or Huffman-coded) is smallest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import FormatError
from . import huffman, rans

#: widest gap symbol; escapes bridge longer gaps (keeps every cumulative sum far from int64 overflow)
MAX_GAP_BITS = 24
_EXACT_HUFFMAN_ALPHABET = 4096  # above this many distinct symbols the Huffman size is estimated from entropy


@dataclass(frozen=True)
class GapCode:
    """A position stream: ``symbols`` (int64) in ``bits``-bit gap code for ``kept`` of ``size`` positions."""

    bits: int
    symbols: np.ndarray
    size: int
    kept: int

    @property
    def escape(self) -> int:
        return (1 << self.bits) - 1


@dataclass(frozen=True)
class GapChoice:
    """The chosen gap width ``bits``, the coding expected to win and its estimated size in bits."""

    bits: int
    coding: str
    est_bits: float


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    """Flat (row-major) int64 positions of the True entries of ``mask``."""
    return np.flatnonzero(np.asarray(mask).reshape(-1)).astype(np.int64)


def _skips(positions: np.ndarray, size: int) -> np.ndarray:
    pos = np.asarray(positions).reshape(-1)
    if pos.size and pos.dtype.kind not in "iu":
        raise ValueError(f"positions must be integers, got dtype {pos.dtype}")
    pos = pos.astype(np.int64, copy=False)
    skips = np.diff(pos, prepend=-1) - 1
    if pos.size and (int(skips.min()) < 0 or int(pos[-1]) >= size):
        raise ValueError(f"positions must be strictly increasing and in [0, {size})")
    return skips


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= MAX_GAP_BITS:
        raise ValueError(f"gap bits must be in 1..{MAX_GAP_BITS}, got {bits}")


def encode_positions(positions: np.ndarray, size: int, bits: int) -> GapCode:
    """Gap stream of strictly increasing flat ``positions`` in ``[0, size)`` with ``bits``-bit gaps."""
    _check_bits(bits)
    skips = _skips(positions, size)
    esc = (1 << bits) - 1
    n_esc = skips // esc
    stream = np.full(int(n_esc.sum()) + skips.size, esc, dtype=np.int64)
    stream[np.cumsum(n_esc + 1) - 1] = skips % esc
    return GapCode(bits, stream, int(size), int(skips.size))


def decode_positions(symbols: np.ndarray, bits: int, size: int, kept: int) -> np.ndarray:
    """Positions (int64) from a gap stream; raises :class:`FormatError` unless it codes exactly
    ``kept`` positions in ``[0, size)`` with no trailing escape."""
    _check_bits(bits)
    sym = np.asarray(symbols, dtype=np.int64).reshape(-1)
    esc = (1 << bits) - 1
    if sym.size > size or kept > sym.size:
        raise FormatError(f"gap stream: {sym.size} symbols cannot code {kept} of {size} positions")
    if sym.size == 0:
        return np.zeros(0, dtype=np.int64)
    if int(sym.min()) < 0 or int(sym.max()) > esc:
        raise FormatError(f"gap stream: a symbol exceeds the escape {esc} of {bits}-bit gaps")
    entry = sym != esc
    if int(np.count_nonzero(entry)) != kept or not entry[-1]:
        raise FormatError(f"gap stream: expected {kept} entries ending in an entry")
    pos = (np.cumsum(np.where(entry, sym + 1, esc)) - 1)[entry]
    if int(pos[-1]) >= size:
        raise FormatError(f"gap stream: position {int(pos[-1])} is outside the {size} entries")
    return pos


def _histogram_for(skips: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``(symbols, counts, stream length)`` of the gap stream with ``bits``-bit gaps."""
    esc = (1 << bits) - 1
    n_esc = int((skips // esc).sum())
    rem = skips % esc
    if esc <= 1 << 16:
        counts = np.bincount(rem, minlength=esc + 1)
        counts[esc] += n_esc
        used = np.flatnonzero(counts)
        return used, counts[used], n_esc + skips.size
    used, counts = np.unique(rem, return_counts=True)
    if n_esc:
        used, counts = np.append(used, esc), np.append(counts, n_esc)
    return used, counts, n_esc + skips.size


def huffman_estimate_bits(symbols: np.ndarray, counts: np.ndarray) -> float:
    """Bits of a Huffman stream with this histogram: exact payload and table for small alphabets,
    entropy plus table estimate above; sync index estimated."""
    n = int(np.sum(counts))
    if n == 0:
        return 8.0 * huffman.STREAM_HEAD_BYTES
    k = huffman.default_sync_every(n)
    sync = (n // k) * (1 + (k * 8).bit_length())
    if symbols.size <= _EXACT_HUFFMAN_ALPHABET:
        code = huffman.HuffmanCode.from_counts(symbols, counts)
        return float(code.payload_bits(counts) + 8 * (huffman.STREAM_HEAD_BYTES + len(code.table_bytes())) + sync)
    table = symbols.size * (5 + 4)
    return huffman.entropy_of_counts(counts) + 0.03 * n + table + 8 * huffman.STREAM_HEAD_BYTES + sync


def gap_stream_bits(positions: np.ndarray, size: int, bits: int, coding: str) -> float:
    """Estimated coded size in bits of the gap stream with ``bits``-bit gaps (``fixed`` is exact)."""
    _check_bits(bits)
    skips = _skips(positions, size)
    used, counts, n_sym = _histogram_for(skips, bits)
    return float(n_sym * bits) if coding == "fixed" else huffman_estimate_bits(used, counts)


def choose_gap_bits(positions: np.ndarray, size: int, coding: str = "auto") -> GapChoice:
    """The gap width ``b`` (and coding, for ``coding="auto"``) that makes the position stream smallest.

    Widths beyond the first that needs no escape only widen a fixed code and leave a Huffman code's
    histogram unchanged, so the search stops there.
    """
    if coding not in ("auto", "fixed", "huffman", "rans"):
        raise ValueError(f"coding must be 'auto', 'fixed', 'huffman' or 'rans', got {coding!r}")
    skips = _skips(positions, size)
    if skips.size == 0:
        return GapChoice(1, "fixed", 0.0)
    top = min(MAX_GAP_BITS, int(skips.max() + 1).bit_length())
    best: GapChoice | None = None
    for b in range(1, top + 1):
        used, counts, n_sym = _histogram_for(skips, b)
        cands = []
        if coding in ("auto", "fixed"):
            cands.append(GapChoice(b, "fixed", float(n_sym * b)))
        if coding in ("auto", "huffman"):
            cands.append(GapChoice(b, "huffman", huffman_estimate_bits(used, counts)))
        if coding in ("auto", "rans") and used.size <= 1 << rans.MAX_PRECISION:
            cands.append(GapChoice(b, "rans", rans.estimate_bits(used, counts)))
        for c in cands:
            if best is None or c.est_bits < best.est_bits:
                best = c
    assert best is not None
    return best
