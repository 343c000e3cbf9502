"""Static rANS: exact round trips, sections near the entropy bound, and hostile bytes refused."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netshrink.errors import FormatError
from netshrink.pack import huffman, rans
from netshrink.pack._bits import pack_varwidth
from netshrink.pack._streams import code_stream, decode_stream


def _roundtrip(sym, **kw) -> rans.RansStream:
    s = rans.encode(np.asarray(sym, dtype=np.int64), **kw)
    out = rans.decode(s.data, len(sym))
    assert out.dtype == np.int64 and np.array_equal(out, sym)
    return s


@settings(max_examples=80, deadline=None)
@given(
    st.integers(0, 20).flatmap(lambda b: st.lists(st.integers(0, (1 << b) - 1), max_size=400)),
    st.integers(1, 40),
)
def test_any_stream_round_trips_with_any_lane_count(values, lanes):
    sym = np.array(values, dtype=np.int64)
    _roundtrip(sym)
    if sym.size:  # one Python loop below NUMPY_LANES lanes, numpy steps from there
        _roundtrip(sym, lanes=min(lanes, sym.size))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, rans.MAX_SYMBOL), min_size=1, max_size=60), st.integers(1, 5000))
def test_sparse_huge_symbols_round_trip(values, repeat):
    sym = np.array(values * (1 + repeat // len(values)), dtype=np.int64)
    _roundtrip(sym)


@pytest.mark.parametrize("sym", [
    np.zeros(0, np.int64),
    np.zeros(1, np.int64),
    np.full(5000, 7, np.int64),  # one symbol: no payload at all
    np.array([rans.MAX_SYMBOL] * 3, np.int64),
    np.array([0, 1] * 700, np.int64),
    np.array([3] * 999 + [200000], np.int64),
])
def test_degenerate_streams_round_trip(sym):
    s = _roundtrip(sym)
    if sym.size and np.unique(sym).size == 1:
        assert s.coded_bits == s.lanes * (s.table.precision + rans.STATE_EXTRA) and len(s.data) <= 8


def test_the_largest_alphabet_round_trips():
    rng = np.random.default_rng(0)
    sym = rng.permutation(np.repeat(np.arange(1 << 16), 2))  # 65,536 distinct symbols, twice each
    plain = rans.plan(np.arange(1 << 16), np.full(1 << 16, 2))[0]
    s = _roundtrip(sym, table=plain)
    assert s.table.precision >= 16 and s.table.symbols.size == 1 << 16
    bucketed = _roundtrip(sym)  # uniform over 2**16: 17 tokens and raw bits beat a 65,536-entry table
    assert bucketed.table.symbols.size < 100 and len(bucketed.data) < len(s.data)
    too_many = np.arange((1 << rans.MAX_PRECISION) + 1)
    with pytest.raises(ValueError, match="distinct symbols"):
        rans.plan(too_many, np.ones_like(too_many))
    assert rans.encode(too_many).table.symbols.size <= 64  # buckets: tokens and raw bits


def test_a_long_sparse_tail_is_bucketed_and_round_trips_in_both_paths():
    rng = np.random.default_rng(5)
    sym = np.where(rng.random(6000) < 0.7, rng.integers(0, 8, 6000), rng.geometric(1e-4, 6000))
    plain = rans.plan(*np.unique(sym, return_counts=True))[0]
    for lanes in (1, 3, 16, 40):
        s = _roundtrip(sym, lanes=lanes)
        assert s.data[0] & 0x80  # the bucket flag: tokens + raw bits
        assert len(s.data) < len(_roundtrip(sym, lanes=lanes, table=plain).data)
    with pytest.raises(FormatError, match="exceeds"):  # raw bits can reach past the caller's bound
        rans.decode(s.data, sym.size, max_symbol=int(sym.max()) - 1)


def test_many_lanes_match_one_lane():
    rng = np.random.default_rng(1)
    sym = rng.geometric(0.2, 200_000) - 1
    one = _roundtrip(sym[:20_000], lanes=1)
    wide = _roundtrip(sym[:20_000], lanes=64)
    assert one.table == one.table and np.array_equal(one.table.freqs, wide.table.freqs)
    auto = _roundtrip(sym)  # a long stream gets numpy lanes by default
    assert auto.lanes >= rans.NUMPY_LANES


@pytest.mark.parametrize("probs", [[0.7, 0.2, 0.07, 0.03], [0.95, 0.05], [0.3] + [0.7 / 20] * 20])
def test_skewed_stream_is_within_half_a_percent_of_its_entropy(probs):
    rng = np.random.default_rng(2)
    sym = rng.choice(len(probs), 20_000, p=np.array(probs) / sum(probs))
    s = _roundtrip(sym)
    bound = huffman.entropy_bits(sym)
    assert 8 * len(s.data) <= 1.005 * bound + 64  # table, head and lane state included
    assert s.coded_bits <= 1.001 * bound + 32


def test_rans_beats_huffman_on_a_skewed_stream_and_auto_takes_it():
    rng = np.random.default_rng(3)
    sym = rng.choice(6, 8000, p=[0.55, 0.25, 0.1, 0.05, 0.03, 0.02])
    r, h, a = (code_stream(sym, 3, c) for c in ("rans", "huffman", "auto"))
    assert len(r.data) < len(h.data) and a.coding == "rans" and len(a.data) == len(r.data)
    desc = a.describe()
    assert np.array_equal(decode_stream(desc, memoryview(a.data), "t", 24, sym.size), sym)


def test_quantized_frequencies_sum_to_the_precision():
    counts = np.array([1, 1, 1, 5000, 3, 70])
    for p in range(3, 17):
        f = rans.quantize(counts, p)
        assert int(f.sum()) == 1 << p and int(f.min()) >= 1
    assert rans.quantize(np.array([1] * 8), 3).tolist() == [1] * 8


# ------------------------------------------------------------------------------------------ hostile


@pytest.fixture(scope="module")
def stream():
    rng = np.random.default_rng(4)
    sym = rng.choice(np.array([0, 3, 9, 40, 41]), 1000, p=[0.5, 0.2, 0.15, 0.1, 0.05])
    return sym, rans.encode(sym)


def test_every_truncation_is_a_format_error(stream):
    sym, s = stream
    for n in range(len(s.data)):
        with pytest.raises(FormatError, match="^rans stream: "):
            rans.decode(s.data[:n], sym.size)


def test_every_flipped_byte_is_refused_or_decodes_safely(stream):
    """A flip is a FormatError, or (rANS resynchronises, and the final-state check sees only the last
    symbols' corruption; the .nsk section CRC catches the rest) ``count`` symbols within the bound."""
    sym, s = stream
    caught = passed = 0
    for i in range(len(s.data)):
        for mask in (0x01, 0x5A):
            bad = bytearray(s.data)
            bad[i] ^= mask
            try:
                out = rans.decode(bytes(bad), sym.size, max_symbol=63)
            except FormatError as exc:
                assert str(exc).startswith("rans stream: ") and "\n" not in str(exc)
                caught += 1
                continue
            assert out.shape == sym.shape and out.dtype == np.int64 and 0 <= out.min() <= out.max() <= 63
            passed += 1
    assert caught > 4 * passed
    for i in range(3):  # the head and the first table bytes are checked field by field
        bad = bytearray(s.data)
        bad[i] ^= 0xFF
        with pytest.raises(FormatError, match="^rans stream: "):
            rans.decode(bytes(bad), sym.size)


def test_extra_bytes_are_a_format_error(stream):
    sym, s = stream
    for tail in (b"\0", b"\x01", b"\0" * 100):
        with pytest.raises(FormatError, match="not at the stop bit"):
            rans.decode(s.data + tail, sym.size)


@pytest.mark.parametrize("count", [0, 1, 999, 1001, 1002, 2000, 10**7])
def test_a_lying_symbol_count_is_a_format_error(stream, count):
    sym, s = stream
    with pytest.raises(FormatError, match="^rans stream: "):
        rans.decode(s.data, count)


def test_symbols_beyond_the_callers_bound_are_refused(stream):
    sym, s = stream
    assert np.array_equal(rans.decode(s.data, sym.size, max_symbol=41), sym)
    with pytest.raises(FormatError, match="exceeds 40|symbols of at most 40"):
        rans.decode(s.data, sym.size, max_symbol=40)


def _section(head: int, fields: list[tuple[int, int]]) -> bytes:
    """A hand-made section: the head byte, then (value, width) fields MSB first."""
    vals, widths = zip(*fields) if fields else ((), ())
    return bytes([head]) + pack_varwidth(np.array(vals, dtype=np.int64), np.array(widths, dtype=np.int64))


def _eg0(v: int) -> tuple[int, int]:
    return v + 1, 2 * (v + 1).bit_length() - 1


@pytest.mark.parametrize("freq_minus_one, match", [
    (3, "frequencies sum to 2\\*\\*2 or more"),  # K = 2, M = 4: the stored one leaves nothing for the largest
    (4, "frequencies sum to 2\\*\\*2 or more"),
])
def test_frequencies_that_do_not_sum_to_the_precision_are_refused(freq_minus_one, match):
    p = 2
    fields = [_eg0(2), _eg0(0), (0, p.bit_length()), (0, 1), _eg0(freq_minus_one), (0, p + rans.STATE_EXTRA)]
    with pytest.raises(FormatError, match=match):
        rans.decode(_section(p, fields), 10)


def test_a_well_formed_hand_made_section_decodes():
    p = 2  # K = 2 symbols 0 and 1, f = (3, 1): the stored one is f_1 - 1 = 0, the largest (index 0) inferred
    fields = [_eg0(2), _eg0(0), (0, p.bit_length()), (0, 1), _eg0(0), (0, p + rans.STATE_EXTRA)]
    data = _section(p, fields)
    with pytest.raises(FormatError):  # a zero-bit payload cannot end in the initial state for 10 symbols
        rans.decode(data, 10)
    s = rans.encode(np.zeros(4, np.int64), table=rans.RansTable(np.array([0]), np.array([1]), 0))
    assert np.array_equal(rans.decode(s.data, 4), np.zeros(4, np.int64))


@pytest.mark.parametrize("head, fields, match", [
    (21, [_eg0(1)], "precision 21"),
    (3 << 5, [_eg0(1)], "mode 3"),
    (1 << 7 | 4, [_eg0(2), _eg0(0), (1, 5), (2, 2)], "bucket mantissa of 2 bits exceeds its 1 direct"),
    (4, [_eg0(20)], "20 distinct symbols for 10"),  # K > count
    (2, [_eg0(5)], "5 distinct symbols .* total 2\\*\\*2"),  # K > M
    (4, [_eg0(2), _eg0(10)], "11 lanes for 10 symbols"),  # W > count
    (4, [(0, 16), (0, 16), (0, 16)], "more than 40 leading zeros"),
    (4 | 1 << 5, [_eg0(2), _eg0(0), _eg0(1 << 20)], "largest symbol .* exceeds"),
    (4 | 1 << 5, [_eg0(2), _eg0(0), _eg0(10)], "bitmap runs past the end"),
    (4, [_eg0(2), _eg0(0), (7, 3), (1, 1)], "frequencies of order 7 run past the end"),
    (4, [_eg0(2), _eg0(0), (0, 3), (1, 1), _eg0(3)], "lane states of 12 bits run past the end"),
    (4, [_eg0(2), _eg0(0), (0, 3), (1, 1), _eg0(3), (0, 4 + rans.STATE_EXTRA)] + [(0, 8)] * 10, "payload bits exceed"),
])
def test_bad_head_and_table_fields_are_named(head, fields, match):
    with pytest.raises(FormatError, match=match):
        rans.decode(_section(head, fields), 10, max_symbol=1000)


def test_a_huge_count_over_a_short_section_is_refused_before_decoding():
    sym = np.array([0, 1] * 50, dtype=np.int64)
    s = rans.encode(sym)
    with pytest.raises(FormatError, match="need at least"):
        rans.decode(s.data, 60_000)


def test_a_stream_with_too_few_lanes_for_its_count_is_refused():
    s = rans.encode(np.zeros(rans.MAX_STEPS + 1, np.int64), lanes=2)
    bad = bytearray(s.data)  # rewrite W - 1 = 1 as W - 1 = 0: one lane for MAX_STEPS + 1 symbols
    fields = pack_varwidth(np.array([2, 1, 0]), np.array([3, 1, rans.STATE_EXTRA]))
    with pytest.raises(FormatError, match="1 lanes for"):
        rans.decode(bytes([bad[0]]) + fields, rans.MAX_STEPS + 1)


def test_the_stream_layer_names_the_part(stream):
    sym, s = stream
    desc = {"coding": "rans", "bits": 6, "count": sym.size, "coded_bits": s.coded_bits, "entropy_bits": 1.0}
    assert np.array_equal(decode_stream(desc, memoryview(s.data), "t.indices", 24, sym.size), sym)
    with pytest.raises(FormatError, match="^t.indices: rans stream: "):
        decode_stream(desc, memoryview(s.data[:-1]), "t.indices", 24, sym.size)
    with pytest.raises(FormatError, match="^t.indices: rans stream: .*exceeds 31"):
        decode_stream(dict(desc, bits=5), memoryview(s.data), "t.indices", 24, sym.size)


# ---------------------------------------------------------------------------------------- whole model


def test_a_model_packed_with_auto_round_trips_and_is_no_larger(tmp_path):
    import torch

    from _nsk_helpers import compressed_model, plain_model
    from netshrink.pack import load, pack, packed_bytes, read_info

    m = compressed_model(seed=5).eval()
    path = tmp_path / "m.nsk"
    info = pack(m, path, coding="auto")
    codings = {s.coding for t in read_info(path).tensors for s in t.streams.values()}
    assert "rans" in codings
    assert info.total_bytes <= min(packed_bytes(m, "huffman"), packed_bytes(m, "fixed"))
    back = load(path, plain_model()).eval()
    huff = tmp_path / "h.nsk"
    pack(m, huff, coding="huffman")
    ref = load(huff, plain_model()).state_dict()
    for name, v in back.state_dict().items():
        assert torch.equal(v, ref[name]), name
    x = torch.randn(8, 1, 8, 8)
    assert torch.equal(m(x), back(x))
    forced = tmp_path / "r.nsk"
    pack(m, forced, coding="rans")
    assert {s.coding for t in read_info(forced).tensors for s in t.streams.values()} == {"rans"}
    for name, v in load(forced, plain_model()).state_dict().items():
        assert torch.equal(v, ref[name]), name
