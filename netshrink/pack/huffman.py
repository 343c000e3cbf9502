"""Canonical, length-limited Huffman coding of integer symbol streams, vectorised with numpy.

Algorithm
---------
* **Code lengths.** An optimal prefix code minimises ``sum_i n_i * l_i`` subject to Kraft's
  inequality ``sum_i 2**-l_i <= 1`` (Huffman, "A Method for the Construction of Minimum-Redundancy
  Codes", Proc. IRE 1952). With the extra constraint ``l_i <= L`` the optimum is found by the
  package-merge algorithm (Larmore & Hirschberg, "A fast algorithm for optimal length-limited
  Huffman codes", JACM 1990): starting from the sorted leaf weights, ``L - 1`` times pair up
  ("package") the current list and merge the packages with the leaves; the first ``2n - 2`` items of
  the final list are selected, and a symbol's code length is the number of levels in which its leaf
  lies in the selected prefix. When ``L`` does not bind, the result is an ordinary Huffman code, so
  its mean length is below ``H + 1`` bits/symbol (``H`` = Shannon entropy).
* **Canonical codewords** (Schwartz & Kallick, "Generating a canonical prefix encoding", CACM 1964):
  symbols are sorted by (length, symbol); the first code of length ``l`` is
  ``first[l] = (first[l-1] + count[l-1]) << 1`` and codes of one length are consecutive. Only the
  code lengths need storing; the decoder rebuilds the codewords.
* **Decoding** is table-driven: a left-justified window of ``L`` bits ``w`` has code length
  ``l = min{l : w < limit[l]}`` with ``limit[l] = (first[l] + count[l]) << (L - l)``, and symbol
  number ``offset[l] + (w >> (L - l)) - first[l]`` in canonical order. To step with numpy instead of a
  per-symbol Python loop, the encoder records the bit offset of every ``sync_every``-th symbol
  (a few bits per thousand symbols); the decoder then advances all chunks in lockstep, one symbol of
  every chunk per numpy step.

Serialized stream (little-endian), see :meth:`HuffmanStream.to_bytes`::

    u8 layout=1 | u8 table mode (0 dense, 1 sparse) | u8 table gap width | u8 sync width | 4 x u8 zero
    u32 table entries | u32 sync_every | u64 symbol count | u64 payload bits
    table (code lengths, 5 bits each; sparse mode: symbol gaps first) | chunk bit lengths | payload
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

import numpy as np

from ..errors import FormatError
from ._bits import bit_width, pack_fixed, pack_varwidth, packed_nbytes, unpack_fixed

#: longest codeword (the decoder peeks this many bits through a 32-bit window)
MAX_CODE_LEN = 24
#: largest symbol value accepted
MAX_SYMBOL = (1 << 32) - 1
_LEN_BITS = 5  # bits per stored code length
_HEAD = struct.Struct("<BBBB4xIIQQ")
#: bytes of the fixed head of a serialized stream
STREAM_HEAD_BYTES = _HEAD.size
_LAYOUT = 1
#: largest decoding chunk accepted: the writer uses at most 4096 (:func:`default_sync_every`), and the
#: decoder takes one numpy step per symbol of a chunk, so this bounds the steps whatever the head says
MAX_SYNC_EVERY = 4096


@dataclass(frozen=True)
class HuffmanCode:
    """A canonical prefix code: the used ``symbols`` (ascending, int64) and their code ``lengths``."""

    symbols: np.ndarray
    lengths: np.ndarray

    @property
    def max_length(self) -> int:
        return int(self.lengths.max()) if self.lengths.size else 0

    @classmethod
    def from_counts(cls, symbols: np.ndarray, counts: np.ndarray, max_len: int = MAX_CODE_LEN) -> "HuffmanCode":
        """Optimal code (at most ``max_len`` bits per codeword) for ``symbols`` seen ``counts`` times."""
        symbols = np.asarray(symbols, dtype=np.int64).reshape(-1)
        counts = np.asarray(counts, dtype=np.int64).reshape(-1)
        order = np.argsort(symbols, kind="stable")
        return cls(symbols[order], code_lengths(counts[order], max_len))

    def canonical(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(order, codes, first)``: canonical order (indices into ``symbols``), the codeword of each
        symbol (aligned with ``symbols``) and ``first[l]``, the first codeword of length ``l``."""
        lengths = self.lengths.astype(np.int64)
        top = self.max_length
        per_len = np.bincount(lengths, minlength=top + 1)
        per_len[0] = 0
        first = np.zeros(top + 2, dtype=np.int64)
        code = 0
        for ln in range(1, top + 1):
            code = (code + int(per_len[ln - 1])) << 1
            first[ln] = code
        order = np.lexsort((self.symbols, lengths))
        sorted_len = lengths[order]
        start_of_len = np.concatenate([[0], np.cumsum(per_len)])
        rank = np.arange(order.size) - start_of_len[sorted_len]
        codes = np.empty(order.size, dtype=np.int64)
        codes[order] = first[sorted_len] + rank
        return order, codes, first

    def payload_bits(self, counts: np.ndarray) -> int:
        """Coded bits of a stream whose symbol counts (aligned with ``symbols``) are ``counts``."""
        return int(np.dot(np.asarray(counts, dtype=np.int64), self.lengths.astype(np.int64)))

    def _table_layout(self) -> tuple[int, int, int]:
        """``(mode, gap_width, entries)`` of the smaller of the dense and the sparse table."""
        n = self.symbols.size
        if n == 0:
            return 0, 0, 0
        dense = int(self.symbols[-1]) + 1
        gaps = np.diff(self.symbols, prepend=-1) - 1
        gw = bit_width(int(gaps.max()))
        if packed_nbytes(dense, _LEN_BITS) <= packed_nbytes(n, gw) + packed_nbytes(n, _LEN_BITS):
            return 0, 0, dense
        return 1, gw, n

    def table_bytes(self) -> bytes:
        mode, gw, entries = self._table_layout()
        if entries == 0:
            return b""
        if mode == 0:
            dense = np.zeros(entries, dtype=np.int64)
            dense[self.symbols] = self.lengths
            return pack_fixed(dense, _LEN_BITS)
        gaps = np.diff(self.symbols, prepend=-1) - 1
        return pack_fixed(gaps, gw) + pack_fixed(self.lengths, _LEN_BITS)


def code_lengths(weights: np.ndarray, max_len: int = MAX_CODE_LEN) -> np.ndarray:
    """Optimal length-limited code lengths (uint8) for positive ``weights``, by package-merge.

    One symbol gets a 1-bit code. Raises ``ValueError`` when ``len(weights) > 2**max_len``.
    """
    w = np.asarray(weights, dtype=np.int64).reshape(-1)
    n = w.size
    if not 1 <= max_len <= MAX_CODE_LEN:
        raise ValueError(f"max_len must be in 1..{MAX_CODE_LEN}, got {max_len}")
    if n == 0:
        return np.zeros(0, dtype=np.uint8)
    if int(w.min()) <= 0:
        raise ValueError("weights must be positive")
    if n == 1:
        return np.ones(1, dtype=np.uint8)
    if n > 1 << max_len:
        raise ValueError(f"{n} symbols do not fit in codes of at most {max_len} bits")
    levels = min(max_len, n - 1)
    order = np.argsort(w, kind="stable")
    leaves = w[order]
    cur = leaves
    leaf_flags = [np.ones(n, dtype=bool)]  # deepest list first
    for _ in range(levels - 1):
        half = cur.size // 2
        packages = cur[0 : 2 * half : 2] + cur[1 : 2 * half : 2]
        at = np.arange(half) + np.searchsorted(leaves, packages, side="right")
        is_leaf = np.ones(n + half, dtype=bool)
        is_leaf[at] = False
        merged = np.empty(n + half, dtype=np.int64)
        merged[at] = packages
        merged[is_leaf] = leaves
        leaf_flags.append(is_leaf)
        cur = merged
    depth = np.zeros(n, dtype=np.int64)
    take = 2 * n - 2
    for is_leaf in reversed(leaf_flags):
        assert take <= is_leaf.size, "package-merge: selection exceeds list"
        k = int(np.count_nonzero(is_leaf[:take]))
        depth[:k] += 1
        take = 2 * (take - k)
    out = np.empty(n, dtype=np.uint8)
    out[order] = depth
    return out


def _histogram(symbols: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(unique symbols, counts, inverse or None)``; bincount for compact alphabets."""
    top = int(symbols.max())
    if top <= 4 * symbols.size + (1 << 16):
        counts = np.bincount(symbols, minlength=top + 1)
        used = np.flatnonzero(counts)
        return used.astype(np.int64), counts[used].astype(np.int64), None
    uniq, inverse, counts = np.unique(symbols, return_inverse=True, return_counts=True)
    return uniq.astype(np.int64), counts.astype(np.int64), inverse.reshape(-1)


def _as_symbols(symbols: np.ndarray) -> np.ndarray:
    sym = np.asarray(symbols).reshape(-1)
    if sym.size == 0:
        return sym.astype(np.int64)
    if sym.dtype.kind not in "iu":
        raise ValueError(f"symbols must be integers, got dtype {sym.dtype}")
    if int(sym.min()) < 0 or int(sym.max()) > MAX_SYMBOL:
        raise ValueError(f"symbols must be in 0..{MAX_SYMBOL}")
    return sym.astype(np.int64, copy=False)


def entropy_bits(symbols: np.ndarray) -> float:
    """``n * H``: the Shannon bound in bits for the stream, ``sum_s c_s * log2(n / c_s)``."""
    sym = _as_symbols(symbols)
    if sym.size == 0:
        return 0.0
    _, counts, _ = _histogram(sym)
    return entropy_of_counts(counts)


def entropy_of_counts(counts: np.ndarray) -> float:
    """``sum_s c_s * log2(n / c_s)`` for a histogram ``counts`` (zeros ignored)."""
    c = np.asarray(counts, dtype=np.float64)
    c = c[c > 0]
    if c.size == 0:
        return 0.0
    return float(np.sum(c * (math.log2(c.sum()) - np.log2(c))))


def default_sync_every(count: int) -> int:
    """Symbols per decoding chunk: about ``sqrt(16 n)``, a power of two in [256, 4096]."""
    target = math.sqrt(16.0 * max(count, 1))
    return int(min(4096, max(256, 1 << max(0, math.ceil(math.log2(target))))))


@dataclass(frozen=True)
class HuffmanStream:
    """A coded stream: its code, ``count`` symbols in ``nbits`` payload bits, and the chunk index."""

    code: HuffmanCode
    count: int
    nbits: int
    payload: bytes
    sync_every: int
    chunk_bits: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # all chunks but the last

    def to_bytes(self) -> bytes:
        mode, gw, entries = self.code._table_layout()
        sw = bit_width(int(self.chunk_bits.max())) if self.chunk_bits.size else 0
        head = _HEAD.pack(_LAYOUT, mode, gw, sw, entries, self.sync_every, self.count, self.nbits)
        sync = pack_fixed(self.chunk_bits, sw) if self.chunk_bits.size else b""
        return head + self.code.table_bytes() + sync + self.payload

    @property
    def nbytes(self) -> int:
        return len(self.to_bytes())

    @classmethod
    def from_bytes(cls, buf: bytes | memoryview) -> "HuffmanStream":
        """Parse and validate a serialized stream; any inconsistency raises :class:`FormatError`.

        Every size is checked against ``len(buf)`` before anything is allocated.
        """
        buf = memoryview(buf).cast("B")
        if len(buf) < _HEAD.size:
            raise FormatError(f"huffman stream: {len(buf)} bytes, shorter than its {_HEAD.size}-byte head")
        layout, mode, gw, sw, entries, sync_every, count, nbits = _HEAD.unpack_from(buf, 0)
        if layout != _LAYOUT or mode not in (0, 1) or bytes(buf[4:8]) != b"\0\0\0\0":
            raise FormatError(f"huffman stream: unknown layout {layout}/table mode {mode}")
        if count > nbits or (count == 0) != (nbits == 0) or (count > 0) != (entries > 0):
            raise FormatError(f"huffman stream: {count} symbols in {nbits} bits is impossible")
        if not 1 <= sync_every <= MAX_SYNC_EVERY:
            raise FormatError(f"huffman stream: sync interval {sync_every} is outside [1, {MAX_SYNC_EVERY}]")
        if gw > 32 or sw > bit_width(nbits):  # a chunk never holds more bits than the payload
            raise FormatError(f"huffman stream: field width (table gaps {gw}, sync {sw}) out of range")
        chunks = -(-count // sync_every)
        n_sync = max(chunks - 1, 0)
        if (n_sync > 0) != (sw > 0) or (mode == 1) != (gw > 0):
            raise FormatError("huffman stream: field widths do not match the counts")
        t_len = packed_nbytes(entries, _LEN_BITS) + (packed_nbytes(entries, gw) if mode == 1 else 0)
        sizes = [_HEAD.size, t_len, packed_nbytes(n_sync, sw) if sw else 0, packed_nbytes(nbits, 1)]
        if sum(sizes) != len(buf):
            raise FormatError(f"huffman stream: expected {sum(sizes)} bytes from its head, found {len(buf)}")
        at = _HEAD.size
        if mode == 0:
            lengths = unpack_fixed(buf[at : at + t_len], _LEN_BITS, entries)
            symbols = np.flatnonzero(lengths)
            lengths = lengths[symbols]
        else:
            g_len = packed_nbytes(entries, gw)
            gaps = unpack_fixed(buf[at : at + g_len], gw, entries)
            symbols = np.cumsum(gaps + 1) - 1
            lengths = unpack_fixed(buf[at + g_len : at + t_len], _LEN_BITS, entries)
            if symbols.size and int(symbols[-1]) > MAX_SYMBOL:
                raise FormatError("huffman stream: symbol out of range in its code table")
        _check_lengths(lengths, count)
        at += t_len
        chunk_bits = unpack_fixed(buf[at : at + sizes[2]], sw, n_sync) if sw else np.zeros(0, dtype=np.int64)
        if n_sync and (int(chunk_bits.min()) < sync_every or int(chunk_bits.max()) > MAX_CODE_LEN * sync_every):
            raise FormatError("huffman stream: a chunk's bit length is impossible for its symbol count")
        if n_sync and float(chunk_bits.astype(np.float64).sum()) > nbits:
            raise FormatError("huffman stream: chunk index runs past the payload")
        at += sizes[2]
        code = HuffmanCode(symbols.astype(np.int64), lengths.astype(np.uint8))
        return cls(code, int(count), int(nbits), bytes(buf[at:]), int(sync_every), chunk_bits.astype(np.int64))


def _check_lengths(lengths: np.ndarray, count: int) -> None:
    if count == 0:
        return
    if lengths.size == 0 or int(lengths.min()) < 1 or int(lengths.max()) > MAX_CODE_LEN:
        raise FormatError("huffman stream: code lengths out of range")
    kraft = int(np.sum(np.left_shift(np.int64(1), MAX_CODE_LEN - lengths.astype(np.int64))))
    if kraft > 1 << MAX_CODE_LEN:
        raise FormatError("huffman stream: code lengths violate Kraft's inequality")


def encode(symbols: np.ndarray, max_len: int = MAX_CODE_LEN, sync_every: int | None = None) -> HuffmanStream:
    """Huffman-code a stream of non-negative integers (values up to :data:`MAX_SYMBOL`)."""
    sym = _as_symbols(symbols)
    n = sym.size
    if sync_every is None:
        sync_every = default_sync_every(n)
    if isinstance(sync_every, bool) or not isinstance(sync_every, int) or not 1 <= sync_every <= MAX_SYNC_EVERY:
        raise ValueError(f"sync_every must be an integer in 1..{MAX_SYNC_EVERY}, got {sync_every!r}")
    if n == 0:
        return HuffmanStream(HuffmanCode(np.zeros(0, np.int64), np.zeros(0, np.uint8)), 0, 0, b"", sync_every)
    used, counts, inverse = _histogram(sym)
    code = HuffmanCode(used, code_lengths(counts, max_len))
    _, codes, _ = code.canonical()
    if inverse is None:  # compact alphabet: direct lookup tables indexed by symbol
        len_of = np.zeros(int(used[-1]) + 1, dtype=np.int64)
        code_of = np.zeros(int(used[-1]) + 1, dtype=np.int64)
        len_of[used] = code.lengths
        code_of[used] = codes
    else:
        len_of, code_of = code.lengths.astype(np.int64), codes
    keys = sym if inverse is None else inverse
    ln = len_of[keys]
    starts = np.cumsum(ln) - ln
    total = int(starts[-1] + ln[-1])
    sync_starts = starts[::sync_every]  # the bit offset of every sync_every-th symbol
    chunk_bits = np.diff(np.append(sync_starts, total))[:-1]
    return HuffmanStream(code, n, total, pack_varwidth(code_of[keys], ln), sync_every, chunk_bits.astype(np.int64))


def decode(stream: HuffmanStream) -> np.ndarray:
    """Decode ``stream`` to an int64 array; a corrupt stream raises :class:`FormatError`."""
    count, K = stream.count, stream.sync_every
    if not 1 <= K <= MAX_SYNC_EVERY:
        raise FormatError(f"huffman stream: sync interval {K} is outside [1, {MAX_SYNC_EVERY}]")
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    code = stream.code
    _check_lengths(code.lengths, count)
    top = code.max_length
    order, _, first = code.canonical()
    per_len = np.bincount(code.lengths.astype(np.int64), minlength=top + 1)
    per_len[0] = 0
    ls = np.arange(1, top + 1)
    limits = (first[1 : top + 1] + per_len[1:]) << (top - ls)
    offset = np.concatenate([[0], np.cumsum(per_len)])
    nsym = code.symbols.size
    # per length class (index cls = length - 1), plus one invalid class at index ``top``
    len_tab = np.append(ls, top).astype(np.int64)
    off_tab = np.append(offset[1 : top + 1], nsym).astype(np.int64)
    first_tab = np.append(first[1 : top + 1], 0).astype(np.int64)
    canon = np.append(code.symbols[order], -1)

    chunks = -(-count // K)
    if stream.chunk_bits.size != chunks - 1:
        raise FormatError("huffman stream: chunk index does not match the symbol count")
    starts = np.concatenate([[0], np.cumsum(stream.chunk_bits)]).astype(np.int64)
    last_n = count - (chunks - 1) * K
    if chunks > 1 and (int(stream.chunk_bits.min()) < K or int(stream.chunk_bits.max()) > MAX_CODE_LEN * K):
        raise FormatError("huffman stream: chunk index inconsistent with the payload")
    if int(starts[-1]) + last_n > stream.nbits:
        raise FormatError("huffman stream: chunk index inconsistent with the payload")
    if len(stream.payload) != packed_nbytes(stream.nbits, 1):
        raise FormatError("huffman stream: payload length does not match its bit count")
    data = np.frombuffer(stream.payload, dtype=np.uint8)
    pad = np.concatenate([data, np.zeros(4, dtype=np.uint8)]).astype(np.uint32)
    win = (pad[:-3] << 24) | (pad[1:-2] << 16) | (pad[2:-1] << 8) | pad[3:]
    last_byte = win.size - 1
    drop = np.uint32(32 - top)
    pos = starts.copy()
    out = np.empty((K, chunks), dtype=np.int64)
    for s in range(K):
        active = chunks if s < last_n else chunks - 1
        if active == 0:
            break
        p = pos[:active]
        w = ((win[np.minimum(p >> 3, last_byte)] << (p & 7).astype(np.uint32)) >> drop).astype(np.int64)
        cls = np.searchsorted(limits, w, side="right")
        ln = len_tab[cls]
        idx = np.minimum(off_tab[cls] + (w >> (top - ln)) - first_tab[cls], nsym)
        out[s, :active] = canon[idx]
        p += ln
    expected = np.append(starts[1:], stream.nbits)
    if not np.array_equal(pos, expected):
        raise FormatError("huffman stream: decoded chunks do not end where the index says")
    result = out.T.reshape(-1)[:count]
    if int(result.min()) < 0:
        raise FormatError("huffman stream: invalid codeword")
    return result
