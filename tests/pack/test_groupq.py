"""Group-quantized weights (GPTQ/RTN/AWQ/SparseGPT+bits) in .nsk at their true bit widths: exact round
trips, sizes, and every header field checked before decoding."""

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lm_helpers import calib, tiny_lm  # noqa: E402

from netshrink.errors import FormatError  # noqa: E402
from netshrink.pack import load, pack  # noqa: E402
from netshrink.pack._groupq import check_groupq_entry, encode_groupq, GroupHint  # noqa: E402
from netshrink.prune import SparseGptConfig, prune_  # noqa: E402
from netshrink.quantize import AwqConfig, RtnConfig, quantize_  # noqa: E402
from netshrink.quantize.gptq import rtn_quantize  # noqa: E402


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_rtn_round_trip_is_exact_at_the_true_width(tmp_path, bits):
    m = tiny_lm()
    quantize_(m, RtnConfig(bits=bits, group_size=32))
    st = pack(m, tmp_path / "m.nsk", coding="fixed")
    q = {t.name: t for t in st.tensors}["layers.0.mlp.up_proj.weight"]
    assert q.encoding == "groupq"
    assert q.nbytes <= 128 * 64 * bits / 8 + 128 * 2 * (4 + 1) + 8  # codes + fp32 scales + zero points
    ids = calib(2)[0][None]
    m2 = load(tmp_path / "m.nsk")
    assert torch.equal(m(ids), m2(ids))
    for (n, p), (_, p2) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(p, p2), n


def test_token_table_and_head_stored_at_four_bits(tmp_path):
    m = tiny_lm()
    quantize_(m, RtnConfig(bits=4, group_size=32, extra_layers=["embed", "lm_head"]))
    st = {t.name: t for t in pack(m, tmp_path / "m.nsk", coding="fixed").tensors}
    assert st["embed.weight"].encoding == "groupq" and st["lm_head.weight"].encoding == "groupq"
    assert st["embed.weight"].nbytes <= 256 * 64 / 2 + 256 * 2 * 5 + 8
    m2 = load(tmp_path / "m.nsk")
    ids = calib(2)[0][None]
    assert torch.equal(m(ids), m2(ids))


def test_awq_and_sparse_four_bit_round_trip(tmp_path):
    for fn, cfg in ((quantize_, AwqConfig(bits=4, group_size=32, samples=8, progress=False)),
                    (prune_, SparseGptConfig(sparsity=0.5, bits=4, group_size=32, samples=8, progress=False))):
        m = tiny_lm()
        fn(m, cfg, data=calib(8))
        st = pack(m, tmp_path / "m.nsk")
        assert {t.encoding for t in st.tensors} >= {"groupq"} or {"groupq_awq"} <= {t.encoding for t in st.tensors}
        ids = calib(2)[1][None]
        assert torch.equal(m(ids), load(tmp_path / "m.nsk")(ids))


def test_encoder_refuses_codes_that_do_not_reproduce_the_weight():
    w = torch.randn(4, 32)
    gq = rtn_quantize(w, 4, 16)
    base = {"name": "w", "shape": [4, 32], "dtype": "float32", "nonzeros": 128}
    assert encode_groupq("w", gq.dequantize(), GroupHint(gq), "fixed", base) is not None
    assert encode_groupq("w", w, GroupHint(gq), "fixed", base) is None


def _entry():
    gq = rtn_quantize(torch.randn(4, 32), 3, 16)
    enc = encode_groupq("w", gq.dequantize(), GroupHint(gq), "fixed", {"name": "w", "shape": [4, 32], "dtype": "float32", "nonzeros": 128})
    entry = copy.deepcopy(enc.entry)
    for i, p in enumerate(entry["parts"].values()):
        p["section"] = i
    return entry, [len(b) for _, b in enc.parts]


@pytest.mark.parametrize("edit,match", [
    (lambda e: e["groupq"].update(bits=9), "bits"),
    (lambda e: e["groupq"].update(group_size=12), "does not divide"),
    (lambda e: e.update(shape=[4, 32, 1]), "2-D"),
    (lambda e: e["parts"]["scale"].update(count=7), "count"),
    (lambda e: e["parts"]["codes"].update(bits=4), "bits"),
    (lambda e: e["parts"].pop("zero"), "needs parts"),
    (lambda e: e.update(masked=True), "masked"),
    (lambda e: e["groupq"].update(extra=1), "unknown key"),
    (lambda e: e["groupq"].update(transposed=1), "transposed"),
    (lambda e: e["groupq"].update(transposed=True), "group_size"),  # the 32x4 matrix the flag implies has rows of 4
])
def test_header_checks(edit, match):
    entry, sections = _entry()
    check_groupq_entry(entry, "header", sections)
    edit(entry)
    with pytest.raises(FormatError, match=match):
        check_groupq_entry(entry, "header", sections)


def test_truncated_file_is_one_error(tmp_path):
    m = tiny_lm()
    quantize_(m, RtnConfig(bits=4, group_size=32))
    pack(m, tmp_path / "m.nsk")
    data = (tmp_path / "m.nsk").read_bytes()
    (tmp_path / "t.nsk").write_bytes(data[: len(data) - 100])
    with pytest.raises(FormatError):
        load(tmp_path / "t.nsk")


def test_two_four_masks_round_trip_with_one_bit_per_weight(tmp_path):
    from netshrink.prune import WandaConfig
    from netshrink.prune._mask import get_mask

    m = tiny_lm()
    prune_(m, WandaConfig(n=2, m=4, samples=8, progress=False), data=calib(8))
    st = pack(m, tmp_path / "m.nsk", coding="fixed")
    t = {t.name: t for t in st.tensors}["layers.0.mlp.down_proj.weight"]
    assert t.encoding == "nm_sparse" and t.nbytes == 64 * 128 // 8 + 64 * 64 * 4  # slots + fp32 values
    ids = calib(2)[0][None]
    m2 = load(tmp_path / "m.nsk", restore=True)
    assert torch.equal(m(ids), m2(ids))
    assert torch.equal(get_mask(m2.layers[1].attn.q_proj), get_mask(m.layers[1].attn.q_proj))


def test_nm_header_checks():
    from netshrink.pack._groupq import encode_nm

    w = torch.randn(4, 8)
    keep = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 1]] * 4, dtype=torch.bool).reshape(4, 8)
    w = torch.where(keep, w, torch.zeros(()))
    enc = encode_nm("w", w, keep, "fixed", {"name": "w", "shape": [4, 8], "dtype": "float32", "nonzeros": 16})
    assert enc.entry["nm"] == {"n": 2, "m": 4}
    entry = copy.deepcopy(enc.entry)
    for i, p in enumerate(entry["parts"].values()):
        p["section"] = i
    sections = [len(b) for _, b in enc.parts]
    check_groupq_entry(entry, "h", sections)
    for edit, match in ((lambda e: e["nm"].update(n=4), "n"), (lambda e: e.update(kept=15), "keeps"), (lambda e: e["nm"].update(m=3), "divide")):
        bad = copy.deepcopy(entry)
        edit(bad)
        with pytest.raises(FormatError, match=match):
            check_groupq_entry(bad, "h", sections)
    assert encode_nm("w", w, torch.ones(4, 8, dtype=torch.bool), "fixed", {"name": "w", "shape": [4, 8], "dtype": "float32", "nonzeros": 32}) is None
