"""Canonical length-limited Huffman coding: exact round trips, optimality, entropy bounds, robustness."""

import heapq
import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netshrink.errors import FormatError
from netshrink.pack import huffman
from netshrink.pack._bits import bit_width


def _round_trip(symbols, **kw):
    stream = huffman.encode(np.asarray(symbols, dtype=np.int64), **kw)
    parsed = huffman.HuffmanStream.from_bytes(stream.to_bytes())
    return stream, huffman.decode(parsed)


def _huffman_cost(weights):
    """Total cost sum(w_i * l_i) of an unconstrained Huffman code (the classic heap merge)."""
    heap = [int(w) for w in weights]
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        cost += a + b
        heapq.heappush(heap, a + b)
    return cost


symbol_lists = st.one_of(
    st.lists(st.integers(0, 7), max_size=300),
    st.lists(st.integers(0, huffman.MAX_SYMBOL), max_size=100),
    st.lists(st.sampled_from([0, 1, 2, 1000, 70000, 2**31]), max_size=300),
)


@settings(max_examples=200, deadline=None)
@given(symbols=symbol_lists)
def test_round_trip_exact(symbols):
    stream, out = _round_trip(symbols)
    assert out.dtype == np.int64
    assert out.tolist() == symbols
    assert stream.nbits == stream.code.payload_bits(
        np.array([symbols.count(int(s)) for s in stream.code.symbols], dtype=np.int64)
    )


@settings(max_examples=60, deadline=None)
@given(symbols=st.lists(st.integers(0, 20), min_size=1, max_size=400), every=st.integers(1, 40))
def test_round_trip_any_chunking(symbols, every):
    _, out = _round_trip(symbols, sync_every=every)
    assert out.tolist() == symbols


def test_edge_cases():
    stream, out = _round_trip([])
    assert out.size == 0 and stream.nbits == 0
    stream, out = _round_trip([42] * 17)
    assert out.tolist() == [42] * 17
    assert stream.nbits == 17  # a single symbol gets a 1-bit code
    rng = np.random.default_rng(1)
    big = rng.integers(0, 1 << 17, size=50_000)  # alphabet beyond 2**16
    _, out = _round_trip(big)
    assert np.array_equal(out, big)
    sparse_alpha = rng.choice(np.array([3, 1 << 20, huffman.MAX_SYMBOL]), size=2000)
    stream, out = _round_trip(sparse_alpha)
    assert np.array_equal(out, sparse_alpha)
    assert len(stream.to_bytes()) < 2000  # the code table of a sparse alphabet stays small


def test_million_symbols_round_trip():
    rng = np.random.default_rng(2)
    x = rng.geometric(0.2, size=1_000_000) - 1
    stream, out = _round_trip(x)
    assert np.array_equal(out, x)
    assert stream.nbits <= huffman.entropy_bits(x) + x.size


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(weights=st.lists(st.integers(1, 10**6), min_size=2, max_size=200))
def test_package_merge_equals_huffman_when_unconstrained(weights):
    lengths = huffman.code_lengths(np.array(weights))
    assert sum(2.0 ** -int(l) for l in lengths) <= 1.0
    assert int(np.dot(weights, lengths.astype(np.int64))) == _huffman_cost(weights)


@settings(max_examples=80, deadline=None)
@given(weights=st.lists(st.integers(1, 60), min_size=2, max_size=6), extra=st.integers(0, 2))
def test_length_limited_is_optimal(weights, extra):
    limit = max(1, math.ceil(math.log2(len(weights)))) + extra
    lengths = huffman.code_lengths(np.array(weights), limit)
    assert int(lengths.max()) <= limit
    best = min(
        sum(w * l for w, l in zip(weights, ls))
        for ls in itertools.product(range(1, limit + 1), repeat=len(weights))
        if sum(2.0 ** -l for l in ls) <= 1
    )
    assert int(np.dot(weights, lengths.astype(np.int64))) == best


def test_length_limit_binds_on_fibonacci_weights():
    fib = [1, 1]
    while len(fib) < 30:
        fib.append(fib[-1] + fib[-2])
    assert int(huffman.code_lengths(np.array(fib), 24).max()) == 24  # unconstrained would need 29
    x = np.repeat(np.arange(30), fib)
    stream, out = _round_trip(x)
    assert np.array_equal(out, x) and stream.code.max_length == 24
    short = np.repeat(np.arange(12), fib[:12])
    stream, out = _round_trip(short, max_len=5)  # a tight limit still decodes exactly
    assert np.array_equal(out, short) and stream.code.max_length == 5
    with pytest.raises(ValueError):
        huffman.code_lengths(np.ones(9), 3)


@settings(max_examples=100, deadline=None)
@given(symbols=st.lists(st.integers(0, 50), min_size=1, max_size=500))
def test_mean_length_within_one_bit_of_entropy(symbols):
    stream = huffman.encode(np.array(symbols))
    h = huffman.entropy_bits(np.array(symbols))
    n = len(symbols)
    assert h - 1e-6 <= stream.nbits <= h + n + 1e-6


def test_entropy_bits_values():
    assert huffman.entropy_bits(np.array([0, 1, 2, 3] * 25)) == pytest.approx(200.0)
    assert huffman.entropy_bits(np.array([5] * 10)) == 0.0
    assert huffman.entropy_bits(np.array([], dtype=np.int64)) == 0.0


def test_skewed_distribution_beats_fixed():
    rng = np.random.default_rng(3)
    x = rng.choice(32, size=20_000, p=np.r_[0.9, np.full(31, 0.1 / 31)])
    stream = huffman.encode(x)
    fixed_bytes = (x.size * bit_width(31) + 7) // 8
    assert len(stream.to_bytes()) < fixed_bytes / 2
    assert np.array_equal(huffman.decode(huffman.HuffmanStream.from_bytes(stream.to_bytes())), x)


def test_canonical_codes_are_prefix_free_and_ordered():
    code = huffman.HuffmanCode.from_counts(np.array([10, 11, 12, 13, 14]), np.array([40, 30, 15, 10, 5]))
    _, codes, _ = code.canonical()
    words = [format(int(c), f"0{int(l)}b") for c, l in zip(codes, code.lengths)]
    assert all(not b.startswith(a) for a, b in itertools.permutations(words, 2))
    top = code.max_length
    ordered = sorted(zip(code.lengths.tolist(), code.symbols.tolist(), codes.tolist()))
    left = [c << (top - l) for l, _, c in ordered]
    assert left[0] == 0 and all(a < b for a, b in zip(left, left[1:]))  # consecutive in (length, symbol) order


def test_corrupt_streams_raise_format_error():
    blob = huffman.encode(np.arange(100) % 7).to_bytes()
    with pytest.raises(FormatError):
        huffman.HuffmanStream.from_bytes(blob[:10])
    with pytest.raises(FormatError):
        huffman.HuffmanStream.from_bytes(blob[:-1])
    with pytest.raises(FormatError):
        huffman.HuffmanStream.from_bytes(blob + b"\0")
    bad = bytearray(blob)
    bad[0] = 9  # unknown layout
    with pytest.raises(FormatError):
        huffman.HuffmanStream.from_bytes(bytes(bad))


@settings(max_examples=150, deadline=None)
@given(pos=st.integers(0, 10**6), value=st.integers(1, 255), seed=st.integers(0, 3))
def test_flipped_byte_gives_format_error_or_a_stream(pos, value, seed):
    """Without a checksum a flip may decode to other symbols, but never crashes, hangs or over-allocates."""
    x = np.random.default_rng(seed).integers(0, 12, size=600)
    bad = bytearray(huffman.encode(x, sync_every=64).to_bytes())
    bad[pos % len(bad)] ^= value
    try:
        out = huffman.decode(huffman.HuffmanStream.from_bytes(bytes(bad)))
    except FormatError:
        return
    assert out.dtype == np.int64 and out.size <= 8 * len(bad)
