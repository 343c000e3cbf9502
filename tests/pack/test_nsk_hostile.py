"""Crafted files whose checksums are right: every one is the project's own error, fast and small.

One test per failure that structure-aware fuzzing found (issue 14), then the fuzzer itself, seeded.
"""

import random
import struct

import pytest

from netshrink.errors import FormatError, ModelError, NetshrinkError
from netshrink.pack import _fuzz, load, read_info, unpack_to_safetensors
from netshrink.pack._fuzz import assemble, split
from netshrink.pack.huffman import MAX_SYNC_EVERY

HEAD = struct.Struct("<BBBB4xIIQQ")


@pytest.fixture(scope="module")
def seeds():
    return {s.name: s.blob for s in _fuzz.seed_files()}


def _write(tmp_path, header, sections, name="x.nsk"):
    p = tmp_path / name
    p.write_bytes(assemble(header, sections))
    return p


def _all_readers_refuse(path, tmp_path, error=NetshrinkError, match=None, unpack=True):
    """load and load(restore=True) refuse the file; so does unpack (which builds no model) when ``unpack``."""
    fns = [lambda: load(path), lambda: load(path, restore=True)]
    if unpack:
        fns.append(lambda: unpack_to_safetensors(path, tmp_path / "o.st"))
    for fn in fns:
        with pytest.raises(error, match=match):
            fn()
    assert not (tmp_path / "o.st").exists()


def _huffman_section(header, tensor):
    e = next(t for t in header["tensors"] if t["name"] == tensor)
    return next(p["section"] for p in e["parts"].values() if p.get("coding") == "huffman")


@pytest.mark.parametrize("depth", [1 << 40, 1 << 30])
def test_a_huge_zoo_depth_stops_before_building(seeds, tmp_path, depth):
    header, sections = split(seeds["raw"])
    header["model"] = {"zoo": "vit_tiny", "args": {"depth": depth}}
    p = _write(tmp_path, header, sections)
    _all_readers_refuse(p, tmp_path, FormatError, "2\\*\\*32|exceed the limit", unpack=depth > 1 << 32)


@pytest.mark.parametrize("width", [10**5, 10**6, 1 << 24])
def test_huge_zoo_widths_are_refused_on_the_meta_device(seeds, tmp_path, width, monkeypatch):
    header, sections = split(seeds["raw"])
    header["model"]["args"]["hidden"] = [width]
    p = _write(tmp_path, header, sections)
    import torch

    made = []
    real_empty = torch.empty

    def spy(*a, **k):  # no real (non-meta) tensor of the huge shape is ever made
        t = real_empty(*a, **k)
        if t.device.type != "meta" and t.numel() >= width:
            made.append(tuple(t.shape))
        return t

    monkeypatch.setattr(torch, "empty", spy)
    _all_readers_refuse(p, tmp_path, NetshrinkError, unpack=False)
    with pytest.raises(NetshrinkError, match="shape|exceed the limit") as info:  # the meta build's shapes, or its budget
        load(p)
    assert width > 10**5 or isinstance(info.value, ModelError)
    assert made == []


def test_a_replaced_layer_with_huge_sizes_stops_within_the_budget(seeds, tmp_path):
    header, sections = split(seeds["hashed"])
    edit = next(e for e in header["edits"] if e["type"] == "hashed_linear")
    edit["args"]["in_features"] = 1 << 22  # index and signs: 2 x 24 x 2**22 elements, hundreds of MB
    p = _write(tmp_path, header, sections)
    before = _fuzz.peak_rss_mb()
    with pytest.raises(NetshrinkError, match="exceed the limit"):
        load(p)
    assert _fuzz.peak_rss_mb() - before < 300


@pytest.mark.parametrize("field, value, match", [
    ("sw", 63, "field width"),
    ("sync_every", 1 << 24, "sync interval"),
    ("sync_every", MAX_SYNC_EVERY + 1, "sync interval"),
    ("sw", 40, "field width"),
])
def test_a_huffman_stream_head_out_of_range_is_a_format_error(seeds, tmp_path, field, value, match):
    header, sections = split(seeds["sparse+codebook/huffman"])
    i = _huffman_section(header, "fc1.weight")
    fields = dict(zip(("layout", "mode", "gw", "sw", "entries", "sync_every", "count", "nbits"), HEAD.unpack_from(sections[i], 0)))
    fields[field] = value
    sections[i] = HEAD.pack(*fields.values()) + sections[i][HEAD.size:]
    p = _write(tmp_path, header, sections)
    _all_readers_refuse(p, tmp_path, FormatError, match)


def test_a_large_sync_interval_cannot_slow_decoding(seeds, tmp_path):
    """A stream re-coded with one chunk of 2**20 symbols (which the writer never does) is refused, not
    decoded one symbol per numpy step."""
    import numpy as np

    from netshrink.pack import huffman

    stream = huffman.encode(np.zeros(5000, dtype=np.int64))
    blob = bytearray(stream.to_bytes())
    struct.pack_into("<I", blob, 12, 1 << 20)
    with pytest.raises(FormatError, match="sync interval"):
        huffman.HuffmanStream.from_bytes(bytes(blob))
    with pytest.raises(ValueError, match="sync_every"):
        huffman.encode(np.zeros(10, dtype=np.int64), sync_every=1 << 20)


def test_a_dtype_given_as_a_list_is_a_format_error(seeds, tmp_path):
    header, sections = split(seeds["float16"])
    e = next(t for t in header["tensors"] if t["encoding"] == "cast")
    e["parts"]["data"]["dtype"] = ["float16"]
    p = _write(tmp_path, header, sections)
    with pytest.raises(FormatError, match="parts.data.dtype"):
        read_info(p)
    _all_readers_refuse(p, tmp_path, FormatError, "parts.data.dtype")


@pytest.mark.parametrize("key, value", [("entropy_bits", None), ("entropy_bits", 10**400), ("coded_bits", None),
                                        ("block", None), ("block", 10**30), ("entropy_bits", "1.0")])
def test_statistics_fields_null_or_huge_are_format_errors(seeds, tmp_path, key, value, capsys):
    from netshrink.cli import main

    header, sections = split(seeds["sparse+codebook/huffman"])
    e = next(t for t in header["tensors"] if t["name"] == "fc2.weight")
    e["parts"]["indices"][key] = value
    p = _write(tmp_path, header, sections)
    with pytest.raises(FormatError, match=key):
        read_info(p)
    assert main(["info", str(p)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and key in err


@pytest.mark.parametrize("text", [b'{"x": NaN}', b'{"x": Infinity}', b'{"x": 1e999}'])
def test_non_finite_numbers_in_the_header_are_refused(tmp_path, text):
    import zlib

    from netshrink.pack._format import MAGIC, PRELUDE

    p = tmp_path / "n.nsk"
    p.write_bytes(PRELUDE.pack(MAGIC, 1, 0, len(text), zlib.crc32(text)) + text)
    with pytest.raises(FormatError, match="not valid UTF-8 JSON"):
        read_info(p)


def test_the_seeds_cover_every_encoding_and_load(seeds, tmp_path):
    encodings = set()
    for name, blob in seeds.items():
        p = tmp_path / "s.nsk"
        p.write_bytes(blob)
        encodings |= {t.encoding for t in read_info(p).tensors}
        load(p, restore=True)
    assert encodings == {"raw", "sparse", "codebook", "sparse_codebook", "affine", "affine_zp", "binary", "ternary", "cast"}


def test_structure_aware_fuzzing_finds_only_our_own_errors(seeds, tmp_path):
    """300 seeded cases over every seed: each reader answers ok or a NetshrinkError, never another
    exception, never past the time limit, and memory stays bounded."""
    rng = random.Random(14)
    blobs = list(seeds.values())
    before = _fuzz.peak_rss_mb()
    counts = {}
    for i in range(300):
        blob, desc = _fuzz.mutate(rng.choice(blobs), rng)
        res = _fuzz.run_case(blob, desc, tmp_path, time_limit=20.0, cli_eval=i % 25 == 0)
        assert res.failure is None, f"case {i} ({desc}): {res.failure}"
        for v in res.outcomes.values():
            counts[v] = counts.get(v, 0) + 1
    assert counts.get("crash", 0) == 0 and counts.get("hang", 0) == 0
    assert counts.get("FormatError", 0) > 300 and counts.get("ok", 0) > 50  # the mutations reach deep and also pass
    assert _fuzz.peak_rss_mb() - before < 1024


def test_a_small_deflated_header_cannot_inflate_to_megabytes(tmp_path):
    import zlib

    from netshrink.pack._format import MAGIC, PRELUDE

    text = zlib.compress(b"[" + b"0," * (2 << 20) + b"0]", 9)  # 4 MiB of JSON numbers in a few KB
    p = tmp_path / "bomb.nsk"
    p.write_bytes(PRELUDE.pack(MAGIC, 1, 1, len(text), zlib.crc32(text)) + text)
    with pytest.raises(FormatError, match="inflates past the .*-byte limit for its"):
        read_info(p)
