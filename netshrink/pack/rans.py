"""Static rANS: range asymmetric numeral systems over integer symbol streams, with a stored table.

Algorithm (Duda, "Asymmetric numeral systems", arXiv 0902.0271, 2009-2013; static, interleaved rANS as
in Giesen, "Interleaved entropy coders", arXiv 1402.3392, 2014)
-----------------------------------------------------------------------------------------------------
* **Table.** The ``K`` distinct symbols get integer frequencies ``f_s >= 1`` with ``sum_s f_s = M = 2**p``
  and cumulative starts ``c_s = sum_{t<s} f_t``; coding a stream with histogram ``n_s`` costs
  ``sum_s n_s * log2(M / f_s)`` bits, the entropy ``n * H`` plus the divergence of ``f / M`` from the
  empirical distribution. :func:`quantize` shares ``M`` out in proportion to ``n_s`` (at least 1
  each) and gives the units left where they save most; :func:`plan` tries the precisions ``p`` and
  keeps the one whose section (table + payload, in bits) is smallest.
* **Coding.** The state ``x`` lives in ``[L, 2L)`` with ``L = M * 2**STATE_EXTRA``. To encode ``s`` the
  encoder first shifts out the ``m`` low bits of ``x`` (written to the stream) that bring it into
  ``[f_s * 2**STATE_EXTRA, 2 * f_s * 2**STATE_EXTRA)``, then sets
  ``x <- floor(x / f_s) * M + c_s + (x mod f_s)``, which lands in ``[L, 2L)`` again. Symbols are encoded
  last to first; the decoder runs forward: ``r = x mod M`` names the symbol ``s`` with
  ``c_s <= r < c_s + f_s``, ``x <- f_s * floor(x / M) + r - c_s``, then it reads the ``m`` bits that
  bring ``x`` back to ``[L, 2L)`` (``m = bitlen(L) + 1 - bitlen(x)``). Bitwise renormalisation keeps the
  state and the stored final states short; ``STATE_EXTRA`` bits of headroom keep the rounding loss
  near ``2**-STATE_EXTRA`` bits per symbol.
* **Lanes.** Symbol ``i`` goes to lane ``i mod W`` (``W`` independent states, interleaved in one bit
  stream in decoding order), so that numpy can step all lanes at once for long streams; short
  streams use one lane and a plain Python loop. Every lane starts at ``x = L`` and the decoder must end
  every lane there: a stream that does not is corrupt.
* **Buckets.** A stream with a long sparse tail (the gaps of a pruned layer) would need a table entry
  per distinct value; :class:`Buckets` code a value ``v >= 2**t`` as a token for its bit length and
  top ``h`` bits plus ``bitlen(v) - 1 - h`` raw bits (as DEFLATE's distance codes), so the table holds
  at most ``2**t + 32 * 2**h`` tokens. :func:`choose` keeps buckets only where the section is smaller.

Section (``bytes``): one byte ``precision p`` (bits 0-4) | symbol-set mode (bits 5-6: 0 = the symbols
are ``0..K-1``, 1 = bitmap, 2 = gaps) | bit 7: buckets; then one MSB-first bit stream: exp-Golomb(0)
codes of ``K`` and (``K > 0``) of ``W - 1`` | buckets: ``t`` in 5 bits, ``h`` in 2 bits | symbol set
(of the tokens when bucketed) (bitmap: exp-Golomb(0) of ``max - (K-1)`` and
``max + 1`` bits; gaps: a 5-bit order ``g`` and ``K`` exp-Golomb(g) codes) | frequencies (``K > 1``: an
order ``e`` in ``bitlen(p)`` bits, the index of the largest frequency in ``bitlen(K-1)`` bits, the other
``K - 1`` values ``f - 1`` as exp-Golomb(e) codes; the largest is ``M`` minus their sum) | ``W`` final
states minus ``L``, ``p + STATE_EXTRA`` bits each | payload (per symbol, in decoding order: its
renormalisation bits, then its raw bucket bits) | a stop bit 1 | zero padding to a byte.

The symbol count is not stored: the caller passes it (the .nsk header holds it). :func:`decode` checks
every field against the section's length and the caller's bounds before it allocates anything, and a
stream that reads past its end, does not end exactly at its stop bit or not in its initial states raises
:class:`~netshrink.errors.FormatError` naming the field. rANS resynchronises after corrupt bits, so
these checks catch corruption near the end and any wrong length, not every flipped bit: the .nsk
container's CRC32 of every section does that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import FormatError
from ._bits import pack_varwidth
from ._rans_table import (MAX_PRECISION, STATE_EXTRA, Buckets, RansTable, _best_eg, _eg0_len, _eg_pairs, _freq_layout,
                          _histogram, _Reader, _symset_layout, _windows, _bitlen, choose, estimate_bits,
                          payload_bits, plan, quantize)

#: largest symbol value accepted (the extended alphabet of a block of symbols fits in 32 bits)
MAX_SYMBOL = (1 << 32) - 1
#: most decoding steps (symbols per lane) a stream may ask for: ``W >= ceil(count / MAX_STEPS)``
MAX_STEPS = 1 << 16
#: lanes from which numpy steps all lanes at once (below, one Python loop over the symbols is faster)
NUMPY_LANES = 16
#: the encoder aims at this many steps per lane on long streams ...
TARGET_STEPS = 4096
#: ... unless the stored states would then cost more than this share of the payload
LANE_SHARE = 0.001


@dataclass(frozen=True)
class RansStream:
    """An encoded stream: its ``table``, ``count`` symbols in ``lanes`` lanes, the section bytes
    ``data``; ``coded_bits`` = payload bits + stored states (everything but the head and the table)."""

    table: RansTable
    count: int
    lanes: int
    coded_bits: int
    table_bits: int
    data: bytes


# ------------------------------------------------------------------------------------------- encode


def _lanes_for(n: int, est_bits: float, l_bits: int) -> int:
    need = -(-n // MAX_STEPS)
    w = max(need, min(-(-n // TARGET_STEPS), int(LANE_SHARE * est_bits / max(1, l_bits))))
    return w if w >= NUMPY_LANES else max(1, need)


def _encode_scalar(idx: np.ndarray, rawv: np.ndarray, raww: np.ndarray, f: np.ndarray, c: np.ndarray, p: int,
                   lanes: int) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Python loop: ``(final states, emitted values, their widths)`` in decoding order; each symbol's
    renormalisation bits are followed by its raw bits."""
    extra = STATE_EXTRA
    L = 1 << (p + extra)
    xs = [L] * lanes
    fl, cl = f.tolist(), c.tolist()
    vals, wids = [], []
    keys, rv, rw = idx.tolist(), rawv.tolist(), raww.tolist()
    for i in range(len(keys) - 1, -1, -1):
        j = i % lanes
        s = keys[i]
        fs = fl[s]
        x = xs[j]
        a = fs << extra
        m = x.bit_length() - a.bit_length()
        if (x >> m) < a:
            m -= 1
        vals.append(((x & ((1 << m) - 1)) << rw[i]) | rv[i])
        wids.append(m + rw[i])
        x >>= m
        q, r = divmod(x, fs)
        xs[j] = (q << p) + cl[s] + r
    vals.reverse()
    wids.reverse()
    return xs, np.array(vals, dtype=np.int64), np.array(wids, dtype=np.int64)


def _encode_numpy(idx: np.ndarray, rawv: np.ndarray, raww: np.ndarray, f: np.ndarray, c: np.ndarray, p: int,
                  lanes: int) -> tuple[list[int], np.ndarray, np.ndarray]:
    """All lanes stepped at once: ``(final states, emitted values, their widths)`` in decoding order."""
    n = idx.size
    steps = -(-n // lanes)
    L = 1 << (p + STATE_EXTRA)
    x = np.full(lanes, L, dtype=np.int64)
    vals = np.zeros((steps, lanes), dtype=np.int64)
    wids = np.zeros((steps, lanes), dtype=np.int64)
    for t in range(steps - 1, -1, -1):
        a = min(lanes, n - t * lanes)
        s = idx[t * lanes : t * lanes + a]
        fs = f[s]
        xs = x[:a]
        low = fs << STATE_EXTRA
        m = _bitlen(xs) - _bitlen(low)
        m -= (xs >> m) < low
        rw = raww[t * lanes : t * lanes + a]
        vals[t, :a] = ((xs & ((np.int64(1) << m) - 1)) << rw) | rawv[t * lanes : t * lanes + a]
        wids[t, :a] = m + rw
        xs = xs >> m
        x[:a] = (xs // fs << p) + c[s] + xs % fs
    return x.tolist(), vals.reshape(-1), wids.reshape(-1)


def encode(symbols: np.ndarray, *, lanes: int | None = None, table: RansTable | None = None) -> RansStream:
    """rANS-code a stream of non-negative integers (values up to :data:`MAX_SYMBOL`).

    ``table`` (over the stream's own symbols, no buckets) defaults to :func:`choose`'s coding; ``lanes``
    to one for short streams and enough for numpy stepping on long ones (at most :data:`MAX_STEPS`
    steps per lane in any case).
    """
    sym = np.asarray(symbols).reshape(-1)
    if sym.size and sym.dtype.kind not in "iu":
        raise ValueError(f"symbols must be integers, got dtype {sym.dtype}")
    sym = sym.astype(np.int64, copy=False)
    n = sym.size
    if n == 0:
        empty = RansTable(np.zeros(0, np.int64), np.zeros(0, np.int64), 0)
        return RansStream(empty, 0, 0, 0, 9, bytes([0, 0xC0]))
    if int(sym.min()) < 0 or int(sym.max()) > MAX_SYMBOL:
        raise ValueError(f"symbols must be in 0..{MAX_SYMBOL}")
    used, counts, idx = _histogram(sym)
    buckets = None
    rawv = raww = np.zeros(n, dtype=np.int64)
    if table is None:
        buckets, table, est = choose(used, counts)
        if buckets is not None:
            tok, rawv, raww = buckets.tokens(sym)
            idx = np.searchsorted(table.symbols, tok)
            used = table.symbols
    else:
        if not np.array_equal(table.symbols, used):
            raise ValueError("the table's symbols are not the stream's")
        est = payload_bits(counts, table.freqs, table.precision)
    p, f = table.precision, table.freqs.astype(np.int64)
    if f.size != used.size or int(f.min()) < 1 or int(f.sum()) != 1 << p:
        raise ValueError("table frequencies must be >= 1 and sum to 2**precision")
    l_bits = p + STATE_EXTRA
    if lanes is None:
        lanes = _lanes_for(n, est, l_bits)
    if not -(-n // MAX_STEPS) <= lanes <= n:
        raise ValueError(f"lanes must be in {-(-n // MAX_STEPS)}..{n}, got {lanes}")
    c = np.concatenate([[0], np.cumsum(f)[:-1]]).astype(np.int64)
    run = _encode_numpy if lanes >= NUMPY_LANES else _encode_scalar
    states, vals, wids = run(idx, rawv, raww, f, c, p, lanes)

    mode, _ = _symset_layout(used)
    k = used.size
    tv: list[np.ndarray] = [np.array([k + 1, lanes])]  # exp-Golomb(0) of K and of W - 1
    tw: list[np.ndarray] = [np.array([_eg0_len(k), _eg0_len(lanes - 1)])]
    if buckets is not None:
        tv.append(np.array([buckets.direct, buckets.mantissa]))
        tw.append(np.array([5, 2]))
    if mode == 1:
        bitmap = np.zeros(int(used[-1]) + 1, dtype=np.int64)
        bitmap[used] = 1
        tv += [np.array([int(used[-1]) - k + 2]), bitmap]
        tw += [np.array([_eg0_len(int(used[-1]) - k + 1)]), np.ones(bitmap.size, dtype=np.int64)]
    elif mode == 2:
        gaps = np.diff(used, prepend=-1) - 1
        order, _ = _best_eg(gaps, 31)
        a, b = _eg_pairs(gaps, order)
        tv += [np.array([order]), a]
        tw += [np.array([5]), b]
    if k > 1:
        order, imax, _ = _freq_layout(f, p)
        a, b = _eg_pairs(np.delete(f, imax) - 1, order)
        tv += [np.array([order, imax]), a]
        tw += [np.array([p.bit_length(), (k - 1).bit_length()]), b]
    tbits = 8 + int(sum(int(w.sum()) for w in tw))
    tv += [np.array(states, dtype=np.int64) - (1 << l_bits), vals, np.array([1])]  # ... and the stop bit
    tw += [np.full(lanes, l_bits, dtype=np.int64), wids, np.array([1])]
    data = bytes([p | (mode << 5) | (0x80 if buckets is not None else 0)]) + pack_varwidth(np.concatenate(tv), np.concatenate(tw))
    return RansStream(table, n, lanes, lanes * l_bits + int(wids.sum()), tbits, data)


# ------------------------------------------------------------------------------------------- decode


def _read_table(buf: bytes, count: int, max_symbol: int) -> tuple[RansTable, Buckets | None, int, _Reader]:
    if len(buf) < 2:
        raise FormatError(f"rans stream: {len(buf)} bytes, shorter than its 2-byte head")
    p, mode, bucketed = buf[0] & 0x1F, (buf[0] >> 5) & 3, buf[0] >> 7
    if mode > 2 or p > MAX_PRECISION:
        raise FormatError(f"rans stream: precision {p} (at most {MAX_PRECISION}) or symbol-set mode {mode} out of range")
    m = 1 << p
    r = _Reader(buf, 8)
    k = r.read_eg(0, "symbol count K")
    if (k == 0) != (count == 0) or k > min(count, m, max_symbol + 1):
        raise FormatError(f"rans stream: {k} distinct symbols for {count} symbols of at most {max_symbol} with total 2**{p}")
    if k == 0:
        if buf[0]:
            raise FormatError("rans stream: an empty stream with a precision or symbol-set mode")
        return RansTable(np.zeros(0, np.int64), np.zeros(0, np.int64), p), None, 0, r
    lanes = r.read_eg(0, "lane count W") + 1
    if not -(-count // MAX_STEPS) <= lanes <= count:
        raise FormatError(f"rans stream: {lanes} lanes for {count} symbols (need {-(-count // MAX_STEPS)}..{count})")
    buckets = None
    if bucketed:
        buckets = Buckets(r.read(5, "bucket direct bits"), r.read(2, "bucket mantissa bits"))
        if buckets.mantissa > buckets.direct:
            raise FormatError(f"rans stream: bucket mantissa of {buckets.mantissa} bits exceeds its {buckets.direct} direct bits")
    if mode == 0:
        symbols = np.arange(k, dtype=np.int64)
    elif mode == 1:
        top = r.read_eg(0, "largest symbol") + k - 1
        if top > max_symbol:
            raise FormatError(f"rans stream: largest symbol {top} exceeds {max_symbol}")
        if r.pos + top + 1 > r.end:
            raise FormatError("rans stream: symbol bitmap runs past the end of the section")
        bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8, count=(r.pos + top + 8) >> 3))[r.pos : r.pos + top + 1]
        r.pos += top + 1
        symbols = np.flatnonzero(bits).astype(np.int64)
        if symbols.size != k or not bits[-1]:
            raise FormatError(f"rans stream: symbol bitmap holds {symbols.size} symbols ending in {int(bits[-1])}, K = {k}")
    else:
        order = r.read(5, "symbol gap order")
        if k * (order + 1) > r.end - r.pos:
            raise FormatError(f"rans stream: {k} symbol gaps of order {order} run past the end of the section")
        vals = []
        s = -1
        for _ in range(k):
            s += r.read_eg(order, "symbol gaps") + 1
            if s > max_symbol:
                raise FormatError(f"rans stream: symbol {s} in the table exceeds {max_symbol}")
            vals.append(s)
        symbols = np.array(vals, dtype=np.int64)
    if k == 1:
        freqs = np.array([m], dtype=np.int64)
    else:
        order = r.read(p.bit_length(), "frequency order")
        imax = r.read((k - 1).bit_length(), "index of the largest frequency")
        if imax >= k:
            raise FormatError(f"rans stream: index of the largest frequency {imax} is not below K = {k}")
        if (k - 1) * (order + 1) > r.end - r.pos:
            raise FormatError(f"rans stream: {k - 1} frequencies of order {order} run past the end of the section")
        rest = []
        total = 0
        for _ in range(k - 1):
            v = r.read_eg(order, "frequencies") + 1
            total += v
            if total >= m:
                raise FormatError(f"rans stream: frequencies sum to 2**{p} or more before the largest one")
            rest.append(v)
        freqs = np.array(rest[:imax] + [m - total] + rest[imax:], dtype=np.int64)
    if buckets is not None:
        big = symbols >= 1 << buckets.direct
        if big.any() and int(symbols[big].max() - (1 << buckets.direct)) >> buckets.mantissa > 31 - buckets.direct:
            raise FormatError(f"rans stream: a token of the table names a symbol of more than 32 bits")
        if big.any() and int(buckets.untoken(symbols[big])[0].max()) > max_symbol:
            raise FormatError(f"rans stream: a token of the table names symbols that exceed {max_symbol}")
    return RansTable(symbols, freqs, p), buckets, lanes, r


def _check_end(buf: bytes, pos: int) -> None:
    """The stream ends at bit ``pos``: a stop bit 1, then zeros to the end of that byte, the last."""
    stop = pos < 8 * len(buf) and (buf[pos >> 3] >> (7 - (pos & 7))) & 1
    if not stop or (pos + 8) >> 3 != len(buf) or buf[-1] & ((1 << (7 - (pos & 7))) - 1):
        raise FormatError(f"rans stream: decoding ended at bit {pos} of {8 * len(buf)}, not at the stop bit of the last byte")


def decode(data: bytes | memoryview, count: int, max_symbol: int = MAX_SYMBOL) -> np.ndarray:
    """The ``count`` symbols (int64) of the section ``data``; any inconsistency raises :class:`FormatError`.

    ``count`` comes from the caller (bounded there); every symbol the table names is at most
    ``max_symbol``. Work is bounded by ``count`` and by :data:`MAX_STEPS` numpy steps.
    """
    buf = bytes(data)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise FormatError(f"rans stream: symbol count {count!r} is not a non-negative integer")
    table, buckets, lanes, r = _read_table(buf, count, max_symbol)
    if count == 0:
        _check_end(buf, r.pos)
        return np.zeros(0, dtype=np.int64)
    p, f = table.precision, table.freqs
    l_bits = p + STATE_EXTRA
    L = 1 << l_bits
    if r.pos + lanes * l_bits > r.end:
        raise FormatError(f"rans stream: {lanes} lane states of {l_bits} bits run past the end of the section")
    states = [L + r.read(l_bits, "lane states") for _ in range(lanes)]
    start, end = r.pos, r.end
    payload = end - start
    base, rbits = buckets.untoken(table.symbols) if buckets is not None else (table.symbols, np.zeros(f.size, np.int64))
    if payload > count * (p + 1 + int(rbits.max())) + 8:
        raise FormatError(f"rans stream: {payload} payload bits exceed what {count} symbols can read")
    if f.size > 1:  # each symbol carries at least log2(M / f_max) bits, less the rounding of the state
        least = p - math.log2(int(f.max())) - 2.0 ** (3 - STATE_EXTRA)
        if least > 0 and count * least > payload + lanes + 1:
            raise FormatError(f"rans stream: {count} symbols need at least {count * least:.0f} bits, the section holds {payload}")
    c = np.concatenate([[0], np.cumsum(f)[:-1]]).astype(np.int64)
    slot = np.repeat(np.arange(f.size, dtype=np.int32), f)
    raw = np.frombuffer(buf, dtype=np.uint8)
    run = _decode_numpy if lanes >= NUMPY_LANES else _decode_scalar
    out, pos, states = run(raw, states, count, f, c, slot, base, rbits, p, start, end)
    if any(x != L for x in states):
        raise FormatError("rans stream: a lane does not end in its initial state (corrupt payload)")
    _check_end(buf, pos)
    if buckets is not None and int(out.max()) > max_symbol:
        raise FormatError(f"rans stream: a decoded symbol exceeds {max_symbol}")
    return out


def _decode_scalar(raw, states, count, f, c, slot, base, rbits, p, start, end):
    """Python loop over the symbols: ``(symbols, end bit, final states)``."""
    lanes = len(states)
    l1 = p + STATE_EXTRA + 1
    mask = (1 << p) - 1
    win = _windows(raw).tolist()
    fl, cl, sl, bl, rl = f.tolist(), c.tolist(), slot.tolist(), base.tolist(), rbits.tolist()
    out = [0] * count
    pos = start
    xs = list(states)
    for i in range(count):
        j = i % lanes
        x = xs[j]
        r = x & mask
        s = sl[r]
        x = fl[s] * (x >> p) + r - cl[s]
        m = l1 - x.bit_length()
        w = m + rl[s]
        v = bl[s]
        if w:
            if pos + w > end:
                raise FormatError("rans stream: the payload runs past the end of the section")
            bits = (win[pos >> 3] >> (64 - (pos & 7) - w)) & ((1 << w) - 1)
            x = (x << m) | (bits >> rl[s])
            v += bits & ((1 << rl[s]) - 1)
            pos += w
        xs[j] = x
        out[i] = v
    return np.array(out, dtype=np.int64), pos, xs


def _decode_numpy(raw, states, count, f, c, slot, base, rbits, p, start, end):
    """All lanes stepped at once: ``(symbols, end bit, final states)``."""
    lanes = len(states)
    steps = -(-count // lanes)
    l1 = p + STATE_EXTRA + 1
    mask = np.int64((1 << p) - 1)
    win = _windows(raw)
    last = win.size - 1
    x = np.array(states, dtype=np.int64)
    out = np.zeros((steps, lanes), dtype=np.int64)
    pos = start
    one = np.uint64(1)
    for t in range(steps):
        a = min(lanes, count - t * lanes)
        xs = x[:a]
        r = xs & mask
        s = slot[r]
        xs = f[s] * (xs >> p) + r - c[s]
        m = l1 - _bitlen(xs)
        rb = rbits[s]
        n = m + rb
        ends = np.cumsum(n)
        total = int(ends[-1])
        if pos + total > end:
            raise FormatError("rans stream: the payload runs past the end of the section")
        at = pos + ends - n
        w = win[np.minimum(at >> 3, last)] << (at & 7).astype(np.uint64)  # a lane reading 0 bits may sit at the end
        bits = ((w >> one) >> (63 - n).astype(np.uint64)).astype(np.int64)
        x[:a] = (xs << m) | (bits >> rb)
        out[t, :a] = base[s] + (bits & ((np.int64(1) << rb) - 1))
        pos += total
    return out.reshape(-1)[:count], pos, x.tolist()


__all__ = ["MAX_PRECISION", "MAX_STEPS", "Buckets", "RansStream", "RansTable", "choose", "decode", "encode", "estimate_bits", "plan",
           "quantize"]
