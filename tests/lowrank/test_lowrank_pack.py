"""Factorized models pack and load exactly: the edits in the .nsk header rebuild the replaced modules."""

import json
import struct
import zlib

import pytest
import torch
from torch import nn

from netshrink.errors import FormatError, ModelError
from netshrink.lowrank import (
    CPConfig,
    LowRankLinear,
    SeparableConfig,
    SvdConfig,
    Tucker2Conv,
    TuckerConfig,
    factorize_,
)
from netshrink.models import build_model
from netshrink.pack import load, pack, packed_bytes
from netshrink.prune import MagnitudeConfig, get_mask, prune_

PRELUDE = struct.Struct("<8sHHII")


def _factorized_lenet() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("lenet5").eval()
    factorize_(model, SeparableConfig(rank=3, layers=["conv1"]))
    factorize_(model, TuckerConfig(rank=[8, 6], layers=["conv2"]))
    factorize_(model, SvdConfig(rank=16, layers=["fc1"], train="fixed_random"))
    factorize_(model, SvdConfig(energy=0.8, layers=["fc2"]))
    return model


def test_zoo_model_round_trip_is_exact(tmp_path):
    model = _factorized_lenet()
    x = torch.randn(3, 1, 28, 28)
    path = tmp_path / "lenet.nsk"
    stats = pack(model, path)
    assert stats.total_bytes == packed_bytes(model)
    loaded = load(path).eval()
    assert isinstance(loaded.fc1, LowRankLinear) and isinstance(loaded.conv2, Tucker2Conv)
    assert "fc1.first.weight" not in dict(loaded.named_parameters())  # the fixed factor stays a buffer
    assert loaded.netshrink_edits == model.netshrink_edits
    assert torch.equal(loaded(x), model(x))
    # re-packing the loaded model writes the same bytes
    again = tmp_path / "again.nsk"
    pack(loaded, again)
    assert again.read_bytes() == path.read_bytes()


def test_user_model_round_trip_and_nested_edits(tmp_path):
    def user_model() -> nn.Module:
        return nn.Sequential(nn.Conv2d(2, 6, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 12))

    torch.manual_seed(1)
    model = user_model().eval()
    factorize_(model, CPConfig(rank=4))
    factorize_(model, SvdConfig(rank=5))
    factorize_(model, SvdConfig(rank=2, layers=["3.second"]))  # an edit inside an edit
    assert [e["path"] for e in model.netshrink_edits] == ["0", "3", "3.second"]
    path = tmp_path / "user.nsk"
    pack(model, path)
    with pytest.raises(ModelError, match="user-supplied"):
        load(path)
    fresh = user_model()
    loaded = load(path, model=fresh).eval()
    assert loaded is fresh and isinstance(fresh[3].second, LowRankLinear)
    x = torch.randn(2, 2, 8, 8)
    assert torch.equal(loaded(x), model(x))
    # loading into the factorized model itself rebuilds the same structure
    same = load(path, model=model).eval()
    assert [e["path"] for e in same.netshrink_edits] == ["0", "3", "3.second"]
    assert torch.equal(same(x), loaded(x))


def test_replacing_a_path_again_drops_its_edits_and_inner_edits(tmp_path):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    factorize_(model, SvdConfig(rank=4))
    factorize_(model, SvdConfig(rank=2, layers=["0.first"]))
    assert [e["path"] for e in model.netshrink_edits] == ["0", "1", "0.first"]
    from netshrink._modules import replace_module

    replace_module(model, "0", LowRankLinear(8, 8, 3))
    assert [(e["path"], e["args"]["rank"]) for e in model.netshrink_edits] == [("1", 4), ("0", 3)]
    path = tmp_path / "m.nsk"
    pack(model, path)
    loaded = load(path, model=nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)))
    x = torch.randn(3, 8)
    assert torch.equal(loaded(x), model(x))


def test_pruned_factors_restore_their_masks(tmp_path):
    torch.manual_seed(3)
    model = build_model("mlp").eval()
    factorize_(model, SvdConfig(rank=8, layers=["fc1"]))
    prune_(model, MagnitudeConfig(sparsity=0.5, layers=["fc1.*"]))
    path = tmp_path / "p.nsk"
    pack(model, path)
    loaded = load(path, restore=True).eval()
    assert get_mask(loaded.fc1.second) is not None
    x = torch.randn(4, 64)
    assert torch.equal(loaded(x), model(x))


def _split(blob: bytes) -> tuple[dict, bytes]:
    _, _, flags, hlen, _ = PRELUDE.unpack_from(blob, 0)
    text = blob[PRELUDE.size : PRELUDE.size + hlen]
    return json.loads(zlib.decompress(text) if flags & 1 else text), blob[PRELUDE.size + hlen :]


def _with_header(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return PRELUDE.pack(b"\x89NSK\r\n\x1a\n", 1, 0, len(text), zlib.crc32(text)) + text + data


@pytest.mark.parametrize(
    "edits, words",
    [
        ({"path": "fc1"}, "expected a list"),
        ([["fc1"]], "edits[0]"),
        ([{"path": "fc1", "type": "lowrank_linear"}], "keys"),
        ([{"path": "", "type": "lowrank_linear", "args": {}}], "edits[0].path"),
        ([{"path": "a..b", "type": "lowrank_linear", "args": {}}], "edits[0].path"),
        ([{"path": "fc1", "type": 3, "args": {}}], "edits[0].type"),
        ([{"path": "fc1", "type": "lowrank_linear", "args": [1]}], "edits[0].args"),
        ([{"path": "x" * 2000, "type": "lowrank_linear", "args": {}}], "edits[0].path"),
    ],
)
def test_malformed_edits_are_format_errors(tmp_path, edits, words):
    model = build_model("mlp")
    factorize_(model, SvdConfig(rank=4, layers=["fc1"]))
    path = tmp_path / "m.nsk"
    pack(model, path)
    header, data = _split(path.read_bytes())
    header["edits"] = edits
    path.write_bytes(_with_header(header, data))
    with pytest.raises(FormatError, match="header.edits") as err:
        load(path)
    assert words in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "edit, words",
    [
        ({"path": "fc1", "type": "no_such_module", "args": {}}, "unknown module type 'no_such_module'"),
        ({"path": "fc9", "type": "lowrank_linear", "args": {}}, "no submodule 'fc9'"),
        ({"path": "fc1", "type": "lowrank_linear", "args": {"in_features": 64}}, "cannot build LowRankLinear"),
        ({"path": "fc1", "type": "lowrank_linear", "args": {"in_features": 64, "out_features": 32, "rank": -1}}, "rank"),
        ({"path": "fc1", "type": "lowrank_linear", "args": {"in_features": 1 << 20, "out_features": 1 << 20,
                                                             "rank": 1 << 20}}, "exceed the limit"),
        ({"path": "fc1", "type": "lowrank_linear", "args": {"in_features": 64, "out_features": 32, "rank": 3}}, "shape"),
    ],
)
def test_edits_that_do_not_fit_are_model_errors(tmp_path, edit, words):
    model = build_model("mlp")
    factorize_(model, SvdConfig(rank=4, layers=["fc1"]))
    path = tmp_path / "m.nsk"
    pack(model, path)
    header, data = _split(path.read_bytes())
    header["edits"] = [edit]
    path.write_bytes(_with_header(header, data))
    with pytest.raises(ModelError) as err:
        load(path)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_files_without_edits_still_load(tmp_path):
    model = build_model("mlp").eval()
    path = tmp_path / "plain.nsk"
    pack(model, path)
    header, data = _split(path.read_bytes())
    assert header["edits"] == []
    del header["edits"]
    path.write_bytes(_with_header(header, data))
    x = torch.randn(2, 64)
    assert torch.equal(load(path).eval()(x), model(x))
