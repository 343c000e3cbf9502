"""Symbol streams: fixed or (block) Huffman coding, exact round trips, the choice of block size."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netshrink.errors import FormatError
from netshrink.pack._streams import code_stream, decode_stream, max_block


def _roundtrip(sym: np.ndarray, bits: int, coding: str) -> tuple[dict, np.ndarray]:
    s = code_stream(sym, bits, coding)
    desc = s.describe()
    return desc, decode_stream(desc, memoryview(s.data), "t", 32, sym.size)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 12).flatmap(lambda b: st.tuples(st.just(b), st.lists(st.integers(0, (1 << b) - 1), max_size=300))),
    st.sampled_from(["auto", "fixed", "huffman"]),
)
def test_any_stream_round_trips(case, coding):
    bits, values = case
    sym = np.array(values, dtype=np.int64)
    desc, out = _roundtrip(sym, bits, coding)
    assert np.array_equal(out, sym)
    assert 1 <= desc.get("block", 1) <= max_block(bits)


def test_skewed_binary_stream_is_block_coded_within_one_percent_of_entropy():
    rng = np.random.default_rng(0)
    sym = (rng.random(20_000) < 0.1).astype(np.int64)  # H = 0.469 bits; plain Huffman spends 1 bit
    s = code_stream(sym, 1, "huffman")
    assert s.block > 1
    assert s.coded_bits <= 1.01 * s.entropy_bits
    desc, out = _roundtrip(sym, 1, "huffman")
    assert desc["block"] == s.block and np.array_equal(out, sym)


def test_flat_stream_keeps_block_one():
    rng = np.random.default_rng(1)
    sym = rng.integers(0, 256, 5000)
    assert code_stream(sym, 8, "huffman").block == 1


def test_block_size_is_chosen_by_section_bytes():
    rng = np.random.default_rng(2)
    sym = (rng.random(3000) < 0.2).astype(np.int64)
    chosen = code_stream(sym, 1, "huffman")
    from netshrink.pack import huffman
    from netshrink.pack._streams import _blocked

    sizes = {k: len(huffman.encode(_blocked(sym, 1, k)).to_bytes()) for k in range(1, max_block(1) + 1)}
    assert len(chosen.data) == min(sizes.values())


@pytest.mark.parametrize("block", [0, 9, "2"])
def test_bad_block_field_is_a_format_error(block):
    rng = np.random.default_rng(3)
    sym = (rng.random(2000) < 0.1).astype(np.int64)
    s = code_stream(sym, 1, "huffman")
    desc = dict(s.describe(), block=block)
    with pytest.raises(FormatError, match="block"):
        decode_stream(desc, memoryview(s.data), "t", 32, sym.size)


def test_block_count_mismatch_is_a_format_error():
    rng = np.random.default_rng(4)
    sym = (rng.random(2000) < 0.1).astype(np.int64)
    s = code_stream(sym, 1, "huffman")
    desc = dict(s.describe(), block=s.block - 1 if s.block > 2 else s.block + 1)
    with pytest.raises(FormatError):
        decode_stream(desc, memoryview(s.data), "t", 32, sym.size)
