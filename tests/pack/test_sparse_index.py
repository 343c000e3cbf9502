"""Relative (gap) index coding of sparse positions: exact round trips, escape semantics, choice of b."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netshrink.errors import FormatError
from netshrink.pack import huffman, sparse


@st.composite
def positions_and_size(draw):
    size = draw(st.integers(0, 5000))
    pos = draw(st.lists(st.integers(0, max(size - 1, 0)), unique=True, max_size=min(size, 300))) if size else []
    return np.array(sorted(pos), dtype=np.int64), size


@settings(max_examples=200, deadline=None)
@given(ps=positions_and_size(), bits=st.integers(1, sparse.MAX_GAP_BITS))
def test_round_trip_exact(ps, bits):
    pos, size = ps
    code = sparse.encode_positions(pos, size, bits)
    assert int(np.count_nonzero(code.symbols != code.escape)) == pos.size  # only real entries carry values
    assert code.symbols.size == 0 or int(code.symbols.max()) <= code.escape
    out = sparse.decode_positions(code.symbols, bits, size, pos.size)
    assert np.array_equal(out, pos)


@settings(max_examples=60, deadline=None)
@given(ps=positions_and_size())
def test_round_trip_through_huffman(ps):
    pos, size = ps
    choice = sparse.choose_gap_bits(pos, size, "huffman")
    code = sparse.encode_positions(pos, size, choice.bits)
    stream = huffman.HuffmanStream.from_bytes(huffman.encode(code.symbols).to_bytes())
    assert np.array_equal(sparse.decode_positions(huffman.decode(stream), choice.bits, size, pos.size), pos)


def test_escape_semantics_match_deep_compression_example():
    # 3-bit gaps (escape 7): a gap of 9 skipped positions is one filler (advance 7) then "skip 2, entry".
    code = sparse.encode_positions(np.array([1, 11, 12]), 20, 3)
    assert code.symbols.tolist() == [1, 7, 2, 0]
    bitmap = sparse.encode_positions(np.array([0, 2, 3]), 4, 1)  # b = 1 is a bitmap: 0 entry, 1 skip
    assert bitmap.symbols.tolist() == [0, 1, 0, 0]


@settings(max_examples=60, deadline=None)
@given(ps=positions_and_size())
def test_fixed_choice_is_the_smallest(ps):
    pos, size = ps
    choice = sparse.choose_gap_bits(pos, size, "fixed")
    sizes = [sparse.encode_positions(pos, size, b).symbols.size * b for b in range(1, sparse.MAX_GAP_BITS + 1)]
    assert choice.coding == "fixed"
    assert choice.est_bits == min(sizes)


def test_choice_adapts_to_density():
    rng = np.random.default_rng(0)
    size = 100_000
    dense = np.sort(rng.choice(size, size // 2, replace=False))
    sparse_pos = np.sort(rng.choice(size, size // 100, replace=False))
    assert sparse.choose_gap_bits(dense, size, "fixed").bits <= 2
    assert sparse.choose_gap_bits(sparse_pos, size, "fixed").bits >= 6
    auto = sparse.choose_gap_bits(sparse_pos, size, "auto")
    assert auto.est_bits <= sparse.choose_gap_bits(sparse_pos, size, "fixed").est_bits


def test_bad_input_and_corrupt_streams():
    with pytest.raises(ValueError):
        sparse.encode_positions(np.array([3, 3]), 10, 2)
    with pytest.raises(ValueError):
        sparse.encode_positions(np.array([10]), 10, 2)
    with pytest.raises(FormatError):
        sparse.decode_positions(np.array([0, 3]), 2, 10, 1)  # trailing escape
    with pytest.raises(FormatError):
        sparse.decode_positions(np.array([0, 1]), 2, 10, 3)  # wrong count
    with pytest.raises(FormatError):
        sparse.decode_positions(np.array([5]), 2, 10, 1)  # symbol above the escape
    with pytest.raises(FormatError):
        sparse.decode_positions(np.array([2, 2, 2]), 2, 8, 3)  # position 8 outside 8 entries
    with pytest.raises(FormatError):
        sparse.decode_positions(np.zeros(11, dtype=np.int64), 2, 10, 11)  # more symbols than positions
