"""The .nsk file: exact round trips, restore of the compression structure, sizes, API errors."""

import os
import sys
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn

from _nsk_helpers import compressed_model, plain_model
from netshrink._state import effective_tensors
from netshrink.errors import FormatError, ModelError, NetshrinkError
from netshrink.pack import load, pack, packed_bytes, read_info, unpack_to_safetensors
from netshrink.prune._mask import Mask, apply_mask, get_mask
from netshrink.quantize._sharing import SharedWeights, apply_sharing, get_sharing

X = torch.randn(7, 1, 8, 8, generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("coding", ["auto", "fixed", "huffman"])
def test_round_trip_is_bit_exact(tmp_path, coding):
    m = compressed_model()
    y = m(X)
    path = tmp_path / "m.nsk"
    stats = pack(m, path, coding=coding, metadata={"error": 0.0123})
    assert stats.total_bytes == os.path.getsize(path) == packed_bytes(m, coding, metadata={"error": 0.0123})
    enc = {t.name: t.encoding for t in stats.tensors}
    assert enc["0.weight"] == "sparse" and enc["4.weight"] == "sparse_codebook" and enc["6.weight"] == "codebook"
    assert enc["1.num_batches_tracked"] == "raw"
    if coding != "auto":
        assert all(s.coding == coding for t in stats.tensors for s in t.streams.values())
    loaded = load(path, plain_model())
    assert torch.equal(loaded(X), y)
    assert not any(isinstance(mod, Mask) for mod in loaded.modules())
    want = effective_tensors(m)
    for name, t in effective_tensors(loaded).items():
        assert t.dtype == want[name].dtype and torch.equal(t, want[name]), name


def test_auto_is_never_larger_than_fixed_or_huffman():
    m = compressed_model(seed=1)
    auto = packed_bytes(m, "auto")
    assert auto <= packed_bytes(m, "fixed") and auto <= packed_bytes(m, "huffman")


def test_restore_gives_back_the_parametrizations(tmp_path):
    m = compressed_model(seed=2)
    y = m(X)
    path, again = tmp_path / "a.nsk", tmp_path / "b.nsk"
    pack(m, path, metadata={"run": "x"})
    r = load(path, plain_model(), restore=True)
    assert torch.equal(r(X), y)
    assert isinstance(r[0].parametrizations.weight[0], Mask)
    assert torch.equal(get_mask(r[0]), get_mask(m[0]))
    for i in (4, 6):
        got, want = get_sharing(r[i]), get_sharing(m[i])
        assert isinstance(got, SharedWeights)
        assert torch.equal(got.codebook, want.codebook)
        keep = want.mask if want.mask is not None else torch.ones_like(want.indices, dtype=torch.bool)
        assert (got.mask is None) == (want.mask is None)
        assert torch.equal(got.indices[keep], want.indices[keep])
    assert not parametrized(r[1])
    pack(r, again, metadata={"run": "x"})
    assert path.read_bytes() == again.read_bytes()  # re-packs exactly as before
    # it still trains: the codebook receives gradient, pruned weights stay zero
    r.train()
    r(X).sum().backward()
    assert get_sharing(r[4]).codebook.grad is not None
    assert torch.count_nonzero(r[4].weight[~get_mask(r[4])]) == 0


def parametrized(module):
    return hasattr(module, "parametrizations")


def test_plain_sparse_tensor_and_dtypes(tmp_path):
    m = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8)).eval()
    with torch.no_grad():
        m[0].weight[torch.rand(m[0].weight.shape) < 0.95] = 0.0
        m[0].weight[0, :3] = -0.0  # negative zeros survive bit for bit
    m[1].to(torch.bfloat16)
    path = tmp_path / "p.nsk"
    stats = pack(m, path)
    t0 = stats.tensor("0.weight")
    assert t0.encoding == "sparse" and not t0.masked and t0.kept < 0.1 * t0.numel
    assert stats.tensor("1.weight").dtype == "bfloat16"
    target = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8).to(torch.bfloat16)).eval()
    r = load(path, target, restore=True)
    assert not parametrized(r[0])  # a plain tensor gets no mask back
    assert torch.equal(r[0].weight.view(torch.int32), m[0].weight.view(torch.int32))
    assert torch.equal(r[1].weight, m[1].weight)


@settings(max_examples=15, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 12), st.integers(1, 40)),
    density=st.floats(0.0, 1.0),
    k=st.integers(1, 40),
    kind=st.sampled_from(["mask", "share", "both", "none"]),
    seed=st.integers(0, 1000),
)
def test_random_layers_round_trip(tmp_path_factory, shape, density, k, kind, seed):
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(shape[1], shape[0])
    if kind in ("mask", "both"):
        apply_mask(layer, torch.rand(layer.weight.shape, generator=g) < density)
    if kind in ("share", "both"):
        apply_sharing(layer, torch.randn(k, generator=g), torch.randint(0, k, layer.weight.shape, generator=g))
    x = torch.randn(3, shape[1], generator=g)
    path = tmp_path_factory.mktemp("r") / "l.nsk"
    pack(layer, path)
    for restore in (False, True):
        out = load(path, nn.Linear(shape[1], shape[0]), restore=restore)
        assert torch.equal(out(x), layer(x))


def test_read_info_describes_the_file(tmp_path):
    m = compressed_model(seed=3, bits=5)
    path = tmp_path / "i.nsk"
    stats = pack(m, path, metadata={"test_error": 0.01})
    info = read_info(path)
    assert info.total_bytes == os.path.getsize(path) == stats.total_bytes
    assert info.metadata == {"test_error": 0.01} and info.model["user_supplied"] is True
    assert info.header_bytes + sum(t.nbytes for t in info.tensors) == info.total_bytes
    assert sum(t.share for t in info.tensors) == pytest.approx(1 - info.header_bytes / info.total_bytes)
    t = info.tensor("4.weight")
    assert t.codebook_size == 32 and t.kept == int(get_mask(m[4]).sum()) and t.masked
    assert {s.part for s in t.sections} == {"positions", "codebook", "indices"}
    idx = t.streams["indices"]
    assert idx.count == t.kept and idx.bits == 5
    assert idx.entropy_bits <= idx.coded_bits <= max(idx.entropy_bits + idx.count, idx.count * idx.bits)
    assert idx.bits_per_kept == pytest.approx(8 * next(s.nbytes for s in t.sections if s.part == "indices") / t.kept)
    with open(path, "rb") as f:  # section offsets point at the section bytes
        sec = t.sections[0]
        f.seek(sec.offset)
        assert len(f.read(sec.nbytes)) == sec.nbytes
    assert info.ratio == pytest.approx(info.dense_fp32_bytes / info.total_bytes)


def test_unpack_to_safetensors(tmp_path):
    m = compressed_model(seed=4)
    path, out = tmp_path / "s.nsk", tmp_path / "s.safetensors"
    pack(m, path)
    unpack_to_safetensors(path, out)
    got = load_file(out)
    want = effective_tensors(m)
    assert set(got) == set(want)
    for name, t in want.items():
        assert torch.equal(got[name], t), name
    assert got["0.weight"].dtype == torch.float32 and got["1.num_batches_tracked"].dtype == torch.int64


def test_zoo_model_is_rebuilt(tmp_path, monkeypatch):
    calls = []

    def build_model(name, **kwargs):
        model = plain_model()
        calls.append((name, kwargs, model[0].weight.device.type))
        model.netshrink_spec = {"zoo": name, "args": kwargs}
        return model

    monkeypatch.setitem(sys.modules, "netshrink.models", types.SimpleNamespace(build_model=build_model))
    m = compressed_model(seed=5)
    m.netshrink_spec = {"zoo": "tiny", "args": {"width": 4}}
    path = tmp_path / "z.nsk"
    pack(m, path)
    assert read_info(path).model == {"zoo": "tiny", "args": {"width": 4}}
    r = load(path, restore=True)
    # first on the meta device (shapes checked against the file), then for real
    assert calls == [("tiny", {"width": 4}, "meta"), ("tiny", {"width": 4}, "cpu")]
    assert torch.equal(r(X), m(X)) and get_sharing(r[6]) is not None


def test_model_mismatches_are_named(tmp_path):
    path = tmp_path / "u.nsk"
    pack(compressed_model(), path)
    with pytest.raises(ModelError, match="user-supplied"):
        load(path)
    wrong = plain_model()
    wrong[6] = nn.Linear(24, 11)
    with pytest.raises(ModelError, match="6.weight"):
        load(path, wrong)
    extra = nn.Sequential(*plain_model(), nn.Linear(10, 2))
    with pytest.raises(ModelError, match="7.weight"):
        load(path, extra)
    with pytest.raises(NetshrinkError):
        pack(compressed_model(), tmp_path / "c.nsk", coding="zip")


def test_unwritable_path_and_atomic_write(tmp_path, monkeypatch):
    m = compressed_model()
    with pytest.raises(FormatError, match="no_such_dir"):
        pack(m, tmp_path / "no_such_dir" / "m.nsk")
    (tmp_path / "adir").mkdir()
    with pytest.raises(FormatError, match="adir"):
        pack(m, tmp_path / "adir")
    path = tmp_path / "keep.nsk"
    pack(m, path)
    before = path.read_bytes()

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(FormatError, match="keep.nsk"):
        pack(compressed_model(seed=7), path)
    monkeypatch.undo()
    bad = plain_model()
    bad[6].weight = nn.Parameter(torch.zeros(10, 24, dtype=torch.complex64))
    with pytest.raises(ModelError):
        pack(bad, path)  # fails while encoding, after the temporary file exists
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["adir", "keep.nsk"]  # no temporary file left behind


def test_bad_metadata_and_spec_leave_no_file(tmp_path):
    path = tmp_path / "m.nsk"
    with pytest.raises(NetshrinkError, match="metadata"):
        pack(compressed_model(), path, metadata={"when": object()})
    with pytest.raises(NetshrinkError, match="metadata"):
        pack(compressed_model(), path, metadata={"error": float("nan")})
    m = compressed_model()
    m.netshrink_spec = "lenet"
    with pytest.raises(ModelError, match="netshrink_spec"):
        pack(m, path)
    assert os.listdir(tmp_path) == []


def test_real_zoo_round_trip(tmp_path):
    models = pytest.importorskip("netshrink.models")
    from netshrink._layers import weight_layers

    m = models.build_model("lenet_300_100").eval()
    for layer in weight_layers(m).values():
        w = layer.weight.detach()
        apply_mask(layer, w.abs() > w.abs().median())
    path = tmp_path / "zoo.nsk"
    pack(m, path)
    x = torch.randn(3, 1, 28, 28)
    r = load(path, restore=True)
    assert torch.equal(r(x), m(x))
    assert all(get_mask(layer) is not None for layer in weight_layers(r).values())
