"""Reading is safe: every truncation, flipped byte or crafted defect is one FormatError."""

import copy
import struct

import pytest

from _nsk_helpers import assemble, compressed_model, plain_model, split
from netshrink.errors import FormatError
from netshrink.pack import load, pack, read_info, unpack_to_safetensors


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    path = tmp_path_factory.mktemp("c") / "m.nsk"
    pack(compressed_model(seed=11), path, metadata={"note": "corruption tests"})
    return path.read_bytes()


@pytest.fixture(scope="module")
def packed_huffman(tmp_path_factory):
    path = tmp_path_factory.mktemp("h") / "h.nsk"
    pack(compressed_model(seed=12), path, coding="huffman")
    return path.read_bytes()


def _write(tmp_path, data, name="x.nsk"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_the_fixtures_are_valid(tmp_path, packed, packed_huffman):
    for blob in (packed, packed_huffman):
        assert len(read_info(_write(tmp_path, blob)).tensors) == 11


def test_every_truncation_is_a_format_error(tmp_path, packed):
    p = tmp_path / "t.nsk"
    for n in range(len(packed)):
        p.write_bytes(packed[:n])
        with pytest.raises(FormatError, match="truncated|CRC"):
            read_info(p)
    for n in range(0, len(packed), 97):  # the full loader stops at the same checks
        p.write_bytes(packed[:n])
        with pytest.raises(FormatError):
            load(p, plain_model())


def test_every_flipped_byte_is_a_format_error(tmp_path, packed):
    p = tmp_path / "f.nsk"
    for i in range(len(packed)):
        bad = bytearray(packed)
        bad[i] ^= 0x5A
        p.write_bytes(bytes(bad))
        with pytest.raises(FormatError):
            read_info(p)


def test_flipped_byte_in_each_section_names_it(tmp_path, packed_huffman):
    header, sections = split(packed_huffman)
    base = len(packed_huffman) - header["data_bytes"]
    for sec in header["sections"]:
        if sec["length"] == 0:
            continue
        bad = bytearray(packed_huffman)
        bad[base + sec["offset"] + sec["length"] // 2] ^= 0x01
        p = _write(tmp_path, bytes(bad))
        with pytest.raises(FormatError, match=f"section '{sec['name']}'.*CRC32"):
            load(p, plain_model())


def test_prelude_defects(tmp_path, packed):
    with pytest.raises(FormatError, match="magic"):
        read_info(_write(tmp_path, b"PK\x03\x04" + packed[4:]))
    future = bytearray(packed)
    struct.pack_into("<H", future, 8, 2)
    with pytest.raises(FormatError, match="version 2"):
        read_info(_write(tmp_path, bytes(future)))
    absurd = bytearray(packed)
    struct.pack_into("<I", absurd, 12, 0xFFFFFFFF)
    with pytest.raises(FormatError, match="header length"):
        read_info(_write(tmp_path, bytes(absurd)))
    with pytest.raises(FormatError, match="trailing"):
        read_info(_write(tmp_path, packed + b"\0"))
    with pytest.raises(FormatError, match="cannot read"):
        read_info(tmp_path / "missing.nsk")


def _crafted(tmp_path, packed, edit_header=None, edit_sections=None, **kw):
    header, sections = split(packed)
    header = copy.deepcopy(header)
    if edit_header:
        edit_header(header)
    if edit_sections:
        edit_sections(header, sections)
    return _write(tmp_path, assemble(header, sections, **kw))


def _tensor(header, name):
    return next(t for t in header["tensors"] if t["name"] == name)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda h: h.pop("tensors"), "missing key 'tensors'"),
        (lambda h: h.pop("model"), "missing key 'model'"),
        (lambda h: h.update(format="zip"), "format"),
        (lambda h: _tensor(h, "6.weight").pop("shape"), "missing key 'shape'"),
        (lambda h: _tensor(h, "6.weight").update(shape=[2**40, 2**40]), "6.weight"),
        (lambda h: _tensor(h, "6.weight").update(shape=[10, -24]), "shape"),
        (lambda h: _tensor(h, "6.weight").update(shape=[1] * 40), "dimensions"),
        (lambda h: _tensor(h, "6.weight").update(encoding="lzma"), "unknown encoding"),
        (lambda h: _tensor(h, "6.weight").update(dtype="float8"), "unknown dtype"),
        (lambda h: _tensor(h, "4.weight")["parts"]["indices"].update(count=10**12), "indices"),
        (lambda h: _tensor(h, "4.weight")["parts"]["indices"].update(bits=99), "bits"),
        (lambda h: _tensor(h, "4.weight")["parts"]["positions"].update(section=999), "section"),
        (lambda h: _tensor(h, "0.bias")["parts"]["data"].update(section=1), "exactly once"),
        (lambda h: _tensor(h, "4.weight").update(kept=3), "4.weight"),
        (lambda h: _tensor(h, "6.weight")["parts"]["codebook"].update(count=3), "6.weight/codebook"),
        (lambda h: h["tensors"].append(dict(h["tensors"][0])), "twice"),
        (lambda h: h["sections"][1].update(offset=5), "starts at"),
        (lambda h: h.update(data_bytes=h["data_bytes"] + 10**9), "sections hold"),
    ],
)
def test_crafted_header_defects(tmp_path, packed, edit, match):
    header, sections = split(packed)
    header = copy.deepcopy(header)
    edit(header)
    p = _write(tmp_path, assemble(header, sections, fix_sections=False))
    with pytest.raises(FormatError, match=match):
        load(p, plain_model())


def test_malformed_json_and_deep_nesting(tmp_path, packed):
    header, sections = split(packed)
    for text in (b"{not json", b"[1, 2, 3]", b"[" * 100_000 + b"]" * 100_000, "{\"a\": \"\udcff\"}".encode("utf-8", "surrogatepass")):
        p = _write(tmp_path, assemble(header, sections, header_text=text))
        with pytest.raises(FormatError):
            read_info(p)


def test_crafted_section_contents(tmp_path, packed_huffman):
    """Sections with valid checksums but inconsistent contents are caught when decoded."""
    header, sections = split(packed_huffman)
    for name in ("4.weight/positions", "4.weight/indices", "6.weight/indices", "6.weight/codebook", "0.weight/values"):
        idx = next(i for i, s in enumerate(header["sections"]) if s["name"] == name)
        for change in (lambda b: b[:-1], lambda b: b + b"\0", lambda b: b[:8] + b"\xff" * 8 + b[16:],
                       lambda b: b[:-4] + bytes(x ^ 0xFF for x in b[-4:])):
            secs = list(sections)
            secs[idx] = change(secs[idx])
            p = _write(tmp_path, assemble(copy.deepcopy(header), secs))
            try:
                out = load(p, plain_model())
            except FormatError as exc:
                assert name in str(exc) or "tensor" in str(exc)
            else:  # a change that keeps the stream well-formed only changes values, never shapes
                assert out[6].weight.shape == (10, 24)


def test_large_sparse_claim_is_refused_before_allocation(tmp_path, packed):
    def huge(h):
        t = _tensor(h, "0.weight")
        t["shape"] = [2**20, 2**12]  # 4 G elements from a few-kB file
    p = _crafted(tmp_path, packed, huge)
    with pytest.raises(FormatError, match="limit"):
        unpack_to_safetensors(p, tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_deflated_header_bomb_and_garbage_are_refused(tmp_path):
    import struct
    import zlib

    from netshrink.errors import FormatError
    from netshrink.pack import load
    from netshrink.pack._format import MAGIC, MAX_HEADER_BYTES, PRELUDE

    bomb = zlib.compress(b" " * (MAX_HEADER_BYTES + 10), 9)
    for name, text in [("bomb", bomb), ("garbage", b"\x78\x9c not deflate"), ("cut", bomb[: len(bomb) // 2])]:
        p = tmp_path / f"{name}.nsk"
        p.write_bytes(PRELUDE.pack(MAGIC, 1, 1, len(text), zlib.crc32(text)) + text)
        with pytest.raises(FormatError, match="header"):
            load(p)
    assert struct.calcsize("<8sHHII") == PRELUDE.size
