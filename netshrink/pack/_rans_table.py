"""Tables of the static rANS coder (:mod:`netshrink.pack.rans`): frequencies quantized to a power of
two, the precision that makes a section smallest, buckets for long sparse tails, the table's compact
bit layout (exp-Golomb codes, Teuhola 1978), and MSB-first bit I/O."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import FormatError

#: largest precision ``p`` (frequency total ``M = 2**p``); so at most ``2**20`` table entries
MAX_PRECISION = 20
#: headroom bits of the state above the precision: ``L = 2**(p + STATE_EXTRA)``
STATE_EXTRA = 8
#: buckets tried by the encoder: at most this many direct bits (the decoder accepts any up to 31)
MAX_DIRECT = 12
_MAX_EG_ZEROS = 40


@dataclass(frozen=True)
class RansTable:
    """Used ``symbols`` (ascending int64) and their ``freqs`` (int64, ``>= 1``, summing to ``2**precision``)."""

    symbols: np.ndarray
    freqs: np.ndarray
    precision: int


# ------------------------------------------------------------------------------------------- tables


def quantize(counts: np.ndarray, precision: int) -> np.ndarray:
    """Frequencies ``f >= 1`` summing to ``2**precision`` that keep ``sum n_s log2(M / f_s)`` small.

    The ``k`` rarest symbols get ``f = 1`` (the fewest for which every other share
    ``n_s (M - k) / rest`` is at least 1) and the rest of ``M`` is shared out proportionally, rounded
    down; the units left go, one per symbol, where they save most (``n_s log2((f+1)/f)``).
    """
    c = np.asarray(counts, dtype=np.int64).reshape(-1)
    m = 1 << precision
    if c.size == 0:
        return c.copy()
    if c.size > m or int(c.min()) <= 0:
        raise ValueError(f"{c.size} positive counts do not fit in a total of {m}")
    order = np.argsort(c, kind="stable")
    cs = c[order]
    suffix = np.cumsum(cs[::-1])[::-1]
    # the fewest smallest symbols at f = 1 that leave every other share n_s (M - k) / rest >= 1
    k = int(np.argmax(cs * (m - np.arange(c.size)) >= suffix))
    budget, rest = m - k, int(suffix[k])
    f = np.ones(c.size, dtype=np.int64)
    free = order[k:]
    f[free] = c[free] * budget // rest
    cf = c.astype(np.float64)
    diff = m - int(f.sum())
    while diff > 0:
        gain = cf * np.log2((f + 1) / f)
        take = np.argsort(-gain, kind="stable")[: min(diff, f.size)]
        f[take] += 1
        diff -= take.size
    return f


def _entropy(counts: np.ndarray) -> float:
    c = np.asarray(counts, dtype=np.float64)
    return float(np.sum(c * (np.log2(c.sum()) - np.log2(c))))


def payload_bits(counts: np.ndarray, freqs: np.ndarray, precision: int) -> float:
    """Ideal payload ``sum_s n_s log2(2**p / f_s)`` in bits."""
    c = np.asarray(counts, dtype=np.float64)
    return float(np.sum(c * (precision - np.log2(np.asarray(freqs, dtype=np.float64)))))


def _bitlen(v: np.ndarray) -> np.ndarray:
    """Bit lengths of non-negative int64 values below ``2**53``."""
    return np.frexp(np.asarray(v, dtype=np.float64))[1].astype(np.int64)


def _eg_lengths(v: np.ndarray, order: int) -> np.ndarray:
    """Lengths of the exp-Golomb codes of order ``order`` of the values ``v >= 0``."""
    return 2 * _bitlen(v + (1 << order)) - order - 1


def _best_eg(v: np.ndarray, top: int) -> tuple[int, int]:
    """``(order, total bits)`` of the cheapest exp-Golomb order in ``0..top`` for the values ``v``."""
    best = (0, int(_eg_lengths(v, 0).sum()))
    for k in range(1, top + 1):
        bits = int(_eg_lengths(v, k).sum())
        if bits < best[1]:
            best = (k, bits)
    return best


def _eg0_len(v: int) -> int:
    return 2 * (v + 1).bit_length() - 1


def _symset_layout(symbols: np.ndarray) -> tuple[int, int]:
    """``(mode, bits)`` of the cheapest coding of the symbol set (0: ``0..K-1``, 1: bitmap, 2: gaps)."""
    k = symbols.size
    top = int(symbols[-1])
    if top == k - 1:
        return 0, 0
    gaps = np.diff(symbols, prepend=-1) - 1
    return min((1, _eg0_len(top - (k - 1)) + top + 1), (2, 5 + _best_eg(gaps, 31)[1]), key=lambda t: t[1])


def _freq_layout(freqs: np.ndarray, precision: int) -> tuple[int, int, int]:
    """``(exp-Golomb order, index of the largest frequency, bits)`` of the frequency table."""
    k = freqs.size
    if k <= 1:
        return 0, 0, 0
    imax = int(np.argmax(freqs))
    order, bits = _best_eg(np.delete(freqs, imax) - 1, min(31, (1 << precision.bit_length()) - 1))
    return order, imax, precision.bit_length() + (k - 1).bit_length() + bits


def table_bits(symbols: np.ndarray, freqs: np.ndarray, precision: int) -> int:
    """Bits of the head and table of a one-lane section."""
    k = symbols.size
    return 8 + _eg0_len(k) + 1 + _symset_layout(symbols)[1] + _freq_layout(freqs, precision)[2]


def _histogram(sym: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(unique symbols, counts, index of each symbol in the unique ones)``."""
    top = int(sym.max())
    if top <= 4 * sym.size + (1 << 16):
        counts = np.bincount(sym, minlength=top + 1)
        used = np.flatnonzero(counts)
        index = np.zeros(top + 1, dtype=np.int64)
        index[used] = np.arange(used.size)
        return used.astype(np.int64), counts[used].astype(np.int64), index[sym]
    used, inverse, counts = np.unique(sym, return_inverse=True, return_counts=True)
    return used.astype(np.int64), counts.astype(np.int64), inverse.reshape(-1).astype(np.int64)


def plan(symbols: np.ndarray, counts: np.ndarray) -> tuple[RansTable, float]:
    """The table (precision and frequencies) whose one-lane section is smallest, and its estimated bits.

    Every precision from ``bitlen(K - 1)`` up to ``MAX_PRECISION`` (and no more than ``bitlen(n) + 4``,
    past which the table only grows) is tried: table bits + ideal payload + the stored state.
    """
    symbols = np.asarray(symbols, dtype=np.int64).reshape(-1)
    counts = np.asarray(counts, dtype=np.int64).reshape(-1)
    k, n = symbols.size, int(counts.sum())
    lo = (k - 1).bit_length()
    if lo > MAX_PRECISION:
        raise ValueError(f"{k} distinct symbols exceed the rANS limit of {1 << MAX_PRECISION}")
    hi = max(lo, min(MAX_PRECISION, n.bit_length() + 4))
    best: tuple[RansTable, float] | None = None
    worse = 0
    for p in range(lo, hi + 1):
        f = quantize(counts, p)
        bits = table_bits(symbols, f, p) + payload_bits(counts, f, p) + p + STATE_EXTRA
        if best is None or bits < best[1]:
            best, worse = (RansTable(symbols, f, p), bits), 0
        else:
            worse += 1
            if worse == 3:  # the table grows faster than the payload shrinks from here on
                break
    assert best is not None
    return best


@dataclass(frozen=True)
class Buckets:
    """Large symbols coded as a token plus raw bits, so that a long sparse tail needs few table entries.

    A symbol ``v < 2**direct`` is its own token. A larger one, ``e = bitlen(v) - 1``, becomes the token
    ``2**direct + (e - direct) * 2**mantissa + m`` (``m``: the ``mantissa`` bits below its leading one)
    and its low ``e - mantissa`` bits follow raw (the extra bits of DEFLATE's distance codes, RFC 1951).
    ``mantissa <= direct``, so every token is at most its symbol.
    """

    direct: int
    mantissa: int

    def tokens(self, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(tokens, raw values, raw widths)`` of the symbols ``v``."""
        t, h = self.direct, self.mantissa
        v = np.asarray(v, dtype=np.int64)
        big = v >= (1 << t)
        e = _bitlen(v) - 1
        r = np.where(big, e - h, 0)
        tok = np.where(big, (1 << t) + (e - t) * (1 << h) + ((v >> r) & ((1 << h) - 1)), v)
        return tok, np.where(big, v & ((np.int64(1) << r) - 1), 0), r

    def untoken(self, tok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(smallest symbol, raw widths)`` of the tokens ``tok``."""
        t, h = self.direct, self.mantissa
        tok = np.asarray(tok, dtype=np.int64)
        big = tok >= (1 << t)
        q = np.where(big, tok - (1 << t), 0)
        e = t + (q >> h)
        r = np.where(big, e - h, 0)
        return np.where(big, (np.int64(1) << e) | ((q & ((1 << h) - 1)) << r), tok), r


def choose(symbols: np.ndarray, counts: np.ndarray) -> tuple[Buckets | None, RansTable, float]:
    """The coding of a stream with this histogram (ascending ``symbols``) whose section is smallest:
    plain (every symbol in the table) or :class:`Buckets` (tokens + raw bits), with :func:`plan`'s table."""
    symbols = np.asarray(symbols, dtype=np.int64).reshape(-1)
    counts = np.asarray(counts, dtype=np.int64).reshape(-1)
    best: tuple[Buckets | None, RansTable | None, float] = (None, None, math.inf)
    if symbols.size <= 1 << MAX_PRECISION:
        best = (None, *plan(symbols, counts))
    top = int(symbols[-1]).bit_length() if symbols.size else 0
    cands = []
    for t in range(min(top, MAX_DIRECT + 1) if top >= 7 else 0):  # narrow alphabets have cheap tables
        for h in range(min(t, 2) + 1):
            b = Buckets(t, h)
            tok, _, rw = b.tokens(symbols)
            used, inv = np.unique(tok, return_inverse=True)
            tc = np.bincount(inv.reshape(-1), weights=counts).astype(np.int64)
            raw = float(np.dot(counts, rw)) + 7
            cands.append((_entropy(tc) + raw + 8 * used.size, b, used, tc, raw))  # a quick proxy first
    for _, b, used, tc, raw in sorted(cands, key=lambda t: t[0])[:3]:
        table, bits = plan(used, tc)
        if bits + raw < best[2]:
            best = (b, table, bits + raw)
    if best[1] is None:
        raise ValueError(f"{symbols.size} distinct symbols exceed the rANS limit of {1 << MAX_PRECISION}")
    return best  # type: ignore[return-value]


def estimate_bits(symbols: np.ndarray, counts: np.ndarray) -> float:
    """Estimated bits of the plain (unbucketed) rANS section of a stream with this histogram."""
    if int(np.sum(counts)) == 0:
        return 16.0
    return plan(symbols, counts)[1]


# ------------------------------------------------------------------------------------------ bit I/O




class _Reader:
    """MSB-first bit reader over ``buf[start:]`` whose every read is checked against the end."""

    def __init__(self, buf: bytes, start_bit: int):
        self.buf = buf
        self.pos = start_bit
        self.end = 8 * len(buf)

    def read(self, n: int, what: str) -> int:
        if n == 0:
            return 0
        if self.pos + n > self.end:
            raise FormatError(f"rans stream: {what} runs past the end of the section")
        a, b = self.pos >> 3, (self.pos + n + 7) >> 3
        v = int.from_bytes(self.buf[a:b], "big")
        v = (v >> (8 * (b - a) - (self.pos & 7) - n)) & ((1 << n) - 1)
        self.pos += n
        return v

    def read_eg(self, order: int, what: str) -> int:
        """One exp-Golomb code of order ``order``: ``z`` zeros, then ``z + order + 1`` bits ``u``; ``u - 2**order``."""
        zeros = 0
        while True:
            if self.pos >= self.end:
                raise FormatError(f"rans stream: {what} runs past the end of the section")
            look = min(16, self.end - self.pos)
            peek = self.read(look, what)
            if peek:
                lead = look - peek.bit_length()
                zeros += lead
                self.pos -= look - lead  # back to the leading one
                break
            zeros += look
            if zeros > _MAX_EG_ZEROS:
                raise FormatError(f"rans stream: {what} has a code of more than {_MAX_EG_ZEROS} leading zeros")
        if zeros > _MAX_EG_ZEROS:
            raise FormatError(f"rans stream: {what} has a code of more than {_MAX_EG_ZEROS} leading zeros")
        return self.read(zeros + order + 1, what) - (1 << order)


def _eg_pairs(v: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray]:
    u = np.asarray(v, dtype=np.int64) + (1 << order)
    return u, 2 * _bitlen(u) - order - 1


def _windows(buf: np.ndarray) -> np.ndarray:
    """``win[i]``: the 64 bits starting at byte ``i`` (big-endian, zero past the end), as uint64."""
    pad = np.concatenate([buf, np.zeros(8, dtype=np.uint8)]).astype(np.uint64)
    win = np.zeros(buf.size, dtype=np.uint64)
    for i in range(8):
        win |= pad[i : i + buf.size] << np.uint64(56 - 8 * i)
    return win
