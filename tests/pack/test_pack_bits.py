"""Fixed-width bit packing: exact round trip, exact length, and refusal of symbols that do not fit."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netshrink.pack._bits import bit_width, pack_fixed, packed_nbytes, unpack_fixed


@settings(max_examples=150, deadline=None)
@given(bits=st.integers(1, 64), data=st.data())
def test_round_trip(bits, data):
    values = data.draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=200))
    arr = np.array(values, dtype=np.uint64)
    blob = pack_fixed(arr, bits)
    assert len(blob) == packed_nbytes(len(values), bits)
    out = unpack_fixed(blob, bits, len(values))
    assert [int(v) for v in out] == values


def test_layout_is_msb_first():
    assert pack_fixed(np.array([1, 2, 3]), 2) == bytes([0b01101100])
    assert pack_fixed(np.array([5]), 3) == bytes([0b10100000])


def test_chunked_path_round_trips():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 1 << 13, size=(1 << 20) + 123)
    assert np.array_equal(unpack_fixed(pack_fixed(arr, 13), 13, arr.size), arr)


def test_rejects_what_does_not_fit():
    with pytest.raises(ValueError):
        pack_fixed(np.array([4]), 2)
    with pytest.raises(ValueError):
        pack_fixed(np.array([-1]), 8)
    with pytest.raises(ValueError):
        unpack_fixed(b"\x00", 3, 3)
    assert bit_width(0) == 1 and bit_width(1) == 1 and bit_width(31) == 5 and bit_width(32) == 6
