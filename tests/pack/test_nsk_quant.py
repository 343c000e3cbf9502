"""Quantized models pack compactly and load back exactly: int-k affine, fixed point, binary, ternary, half."""

import copy

import pytest
import torch

from _nsk_helpers import assemble, plain_model, split
from netshrink.errors import FormatError
from netshrink.pack import load, pack, read_info
from netshrink.pack._qtensors import encode_quant
from netshrink.prune._mask import apply_mask
from netshrink.quantize import BinaryConfig, FixedPointConfig, Int8Config, TernaryConfig, UniformConfig, quantize_
from netshrink.quantize._storage import HalfConfig, StorageHint

CONFIGS = [
    Int8Config(),
    Int8Config(per_channel=False, symmetric=False),
    UniformConfig(bits=4),
    UniformConfig(bits=3, symmetric=False, per_channel=False, activations=False),
    UniformConfig(bits=2, activations=False),
    FixedPointConfig(il=4, fl=12, rounding="nearest"),
    BinaryConfig(),
    BinaryConfig(per_channel=False),
    TernaryConfig(),
    TernaryConfig(per_channel=True),
    HalfConfig(dtype="float16"),
    HalfConfig(dtype="bfloat16"),
]
KIND = {"Int8Config": "affine", "UniformConfig": "affine", "FixedPointConfig": "affine", "BinaryConfig": "binary",
        "TernaryConfig": "ternary", "HalfConfig": "cast"}


def _inputs(seed=0, n=32):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _quantized(cfg, seed=0):
    torch.manual_seed(seed)
    m = plain_model()
    quantize_(m, cfg, data=_inputs(seed + 1, 64))
    return m.eval()


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{type(c).__name__}-{getattr(c, 'bits', '')}{getattr(c, 'dtype', '')}")
def test_round_trip_is_exact_and_small(tmp_path, cfg):
    m = _quantized(cfg)
    x = _inputs(5)
    stats = pack(m, tmp_path / "q.nsk")
    back = load(tmp_path / "q.nsk", plain_model()).eval()
    assert torch.equal(back(x), m(x))
    for name in ("0.weight", "4.weight", "6.weight"):
        mod = name.split(".")[0]
        assert torch.equal(back.get_submodule(mod).weight, m.get_submodule(mod).weight)
        assert stats.tensor(name).encoding.startswith(KIND[type(cfg).__name__])
    dense = pack(plain_model(), tmp_path / "d.nsk").total_bytes
    assert stats.total_bytes < dense / 1.8


def test_activation_quantizers_come_back(tmp_path):
    m = _quantized(Int8Config())
    pack(m, tmp_path / "q.nsk")
    back = load(tmp_path / "q.nsk", plain_model())
    assert back[4].input_quant.calibrated and torch.equal(back[4].input_quant.scale, m[4].input_quant.scale)
    # a second load into an already quantized model keeps its quantizers and fills them
    again = load(tmp_path / "q.nsk", back)
    assert torch.equal(again(_inputs(3)), m(_inputs(3)))


def test_int8_codes_take_one_byte_and_low_bit_codes_are_bit_packed(tmp_path):
    for bits in (8, 4, 3):
        m = _quantized(UniformConfig(bits=bits, activations=False))
        t = pack(m, tmp_path / "q.nsk", coding="fixed").tensor("4.weight")
        sec = {s.part: s.nbytes for s in t.sections}
        assert sec["codes"] == (t.numel * bits + 7) // 8
        assert sec["scale"] == 4 * 24  # per output channel
        assert t.streams["codes"].bits == bits


def test_one_bit_weights_take_a_32nd_of_fp32_plus_scales(tmp_path):
    for per_channel, n_scales in ((True, 24), (False, 1)):
        m = _quantized(BinaryConfig(per_channel=per_channel))
        t = pack(m, tmp_path / "b.nsk", coding="fixed").tensor("4.weight")
        assert t.nbytes == (t.numel + 7) // 8 + 4 * n_scales
        assert t.nbytes <= 4 * t.numel / 32 + 4 * n_scales + 1
    m = _quantized(TernaryConfig())
    t = pack(m, tmp_path / "t.nsk", coding="fixed").tensor("4.weight")
    assert t.nbytes == (2 * t.numel + 7) // 8 + 4


def test_negative_zeros_of_ternary_weights_survive(tmp_path):
    m = plain_model()
    with torch.no_grad():
        m[6].weight.copy_(torch.tensor([0.5, -0.5, 0.0, -0.0]).repeat(60).reshape(10, 24))
    hint = StorageHint("ternary")
    enc = encode_quant("w", m[6].weight.detach(), hint, "auto", {})
    assert enc is not None and enc.entry["encoding"] == "ternary"
    quantize_(m, TernaryConfig(layers=["0"]))
    pack(m, tmp_path / "t.nsk")
    back = load(tmp_path / "t.nsk", plain_model())
    assert torch.equal(back[6].weight.view(torch.int32), m[6].weight.detach().view(torch.int32))


def test_a_hint_that_does_not_fit_falls_back_to_float(tmp_path, caplog):
    w = torch.randn(6, 5)
    assert encode_quant("w", w, StorageHint("binary"), "auto", {}) is None
    assert encode_quant("w", w, StorageHint("ternary"), "auto", {}) is None
    assert encode_quant("w", w, StorageHint("cast", dtype="float16"), "auto", {}) is None
    scale = torch.full((6,), 0.01)
    hint = StorageHint("affine", scale, torch.zeros(6, dtype=torch.int32), 8, True, 0)
    assert encode_quant("w", w, hint, "auto", {}) is None  # not on the grid
    assert encode_quant("w", torch.round(w / 0.01) * 0.01, hint, "auto", {}) is None  # off the grid by float error, or out of range
    on_grid = torch.clamp(torch.round(w / 0.01), -128, 127) * scale[:, None]
    assert encode_quant("w", on_grid, hint, "auto", {}) is not None


def test_pruned_then_quantized_stays_exact(tmp_path):
    torch.manual_seed(0)
    m = plain_model()
    apply_mask(m[4], torch.rand(m[4].weight.shape) > 0.9)
    quantize_(m, Int8Config(), data=_inputs(1, 64))
    m.eval()
    stats = pack(m, tmp_path / "p.nsk")
    back = load(tmp_path / "p.nsk", plain_model())
    assert torch.equal(back(_inputs(2)), m(_inputs(2)))
    assert stats.tensor("4.weight").nbytes < stats.tensor("4.weight").numel * 0.5  # sparse codes compress


# ---------------------------------------------------------------------------------------------- corrupt files


@pytest.fixture(scope="module")
def qfile(tmp_path_factory):
    p = tmp_path_factory.mktemp("q") / "q.nsk"
    torch.manual_seed(3)
    m = plain_model()
    quantize_(m, Int8Config(symmetric=False, per_channel=True), data=_inputs(1, 64))
    pack(m, p, coding="fixed")
    return p.read_bytes()


def _entry(header, name):
    return next(e for e in header["tensors"] if e["name"] == name)


def _broken(tmp_path, blob, edit):
    header, sections = split(blob)
    header, sections = copy.deepcopy(header), list(sections)
    edit(header, sections)
    p = tmp_path / "bad.nsk"
    p.write_bytes(assemble(header, sections))
    return p


def _section(header, name, part):
    return _entry(header, name)["parts"][part]["section"]


CORRUPTIONS = {
    "bits too wide": (lambda h, s: _entry(h, "4.weight")["quant"].update(bits=40), "bits"),
    "bits disagree with the stream": (lambda h, s: _entry(h, "4.weight")["quant"].update(bits=7), "bits"),
    "bad axis": (lambda h, s: _entry(h, "4.weight")["quant"].update(axis=1), "axis"),
    "signed not a bool": (lambda h, s: _entry(h, "4.weight")["quant"].update(signed=1), "signed"),
    "quant missing": (lambda h, s: _entry(h, "4.weight").pop("quant"), "quant"),
    "scale count": (lambda h, s: _entry(h, "4.weight")["parts"]["scale"].update(count=1), "scale.count"),
    "codes truncated": (lambda h, s: s.__setitem__(_section(h, "4.weight", "codes"), s[_section(h, "4.weight", "codes")][:-3]), "bytes do not hold|coded_bits"),
    "scale truncated": (lambda h, s: s.__setitem__(_section(h, "4.weight", "scale"), s[_section(h, "4.weight", "scale")][:-1]), "bytes do not hold"),
    "nan scale": (lambda h, s: s.__setitem__(_section(h, "4.weight", "scale"), b"\x00\x00\xc0\x7f" * 24), "not finite"),
    "zero scale": (lambda h, s: s.__setitem__(_section(h, "4.weight", "scale"), b"\x00" * 96), "not positive"),
    "zero point out of range": (lambda h, s: s.__setitem__(_section(h, "4.weight", "zero_point"), b"\xff\x01\x00\x00" * 24), "zero point"),
    "wrong dtype": (lambda h, s: _entry(h, "4.weight").update(dtype="float16"), "float32"),
    "kept": (lambda h, s: _entry(h, "4.weight").update(kept=3), "kept"),
    "part missing": (lambda h, s: _entry(h, "4.weight")["parts"].pop("zero_point"), "parts"),
    "act_quant bits": (lambda h, s: h["act_quant"][0].update(bits=9), "act_quant"),
    "act_quant layer": (lambda h, s: h["act_quant"][0].update(layer=5), "act_quant"),
    "act_quant not a list": (lambda h, s: h.update(act_quant={}), "act_quant"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_quantized_files_are_one_format_error(tmp_path, qfile, case):
    edit, match = CORRUPTIONS[case]
    p = _broken(tmp_path, qfile, edit)
    with pytest.raises(FormatError, match=match):
        load(p, plain_model())


def test_corrupt_binary_and_cast_files(tmp_path):
    m = _quantized(BinaryConfig())
    pack(m, tmp_path / "b.nsk", coding="fixed")
    blob = (tmp_path / "b.nsk").read_bytes()
    p = _broken(tmp_path, blob, lambda h, s: _entry(h, "4.weight")["parts"]["signs"].update(bits=2))
    with pytest.raises(FormatError, match="bits"):
        read_info(p)
    p = _broken(tmp_path, blob, lambda h, s: s.__setitem__(_section(h, "4.weight", "signs"), s[_section(h, "4.weight", "signs")][:-1]))
    with pytest.raises(FormatError, match="bytes do not hold|coded_bits"):
        load(p, plain_model())
    m = _quantized(HalfConfig(dtype="float16"))
    pack(m, tmp_path / "h.nsk")
    blob = (tmp_path / "h.nsk").read_bytes()
    p = _broken(tmp_path, blob, lambda h, s: _entry(h, "4.weight")["parts"]["data"].update(dtype="int8"))
    with pytest.raises(FormatError, match="float16, bfloat16"):
        read_info(p)
    p = _broken(tmp_path, blob, lambda h, s: s.__setitem__(_section(h, "4.weight", "data"), s[_section(h, "4.weight", "data")][:-2]))
    with pytest.raises(FormatError, match="bytes do not hold"):
        load(p, plain_model())


def test_every_flipped_byte_of_a_quantized_file_is_caught(tmp_path, qfile):
    p = tmp_path / "f.nsk"
    for i in range(0, len(qfile), 13):
        bad = bytearray(qfile)
        bad[i] ^= 0x5A
        p.write_bytes(bytes(bad))
        with pytest.raises(FormatError):
            read_info(p)


def test_restore_brings_back_the_weight_quantizers(tmp_path):
    from netshrink.quantize._common import weight_quantizer_of
    from netshrink.quantize.fake import WeightFakeQuant

    m = _quantized(Int8Config())
    pack(m, tmp_path / "q.nsk")
    back = load(tmp_path / "q.nsk", plain_model(), restore=True).eval()
    for i in (0, 4, 6):
        q = weight_quantizer_of(back[i])
        assert isinstance(q, WeightFakeQuant) and torch.equal(q.scale, weight_quantizer_of(m[i]).scale)
    assert torch.equal(back(_inputs(4)), m(_inputs(4)))
    pack(back, tmp_path / "again.nsk")
    assert (tmp_path / "again.nsk").read_bytes() == (tmp_path / "q.nsk").read_bytes()
    fp = _quantized(FixedPointConfig(il=4, fl=12, rounding="nearest"))  # 16-bit codes: stored, not restored as int-k
    pack(fp, tmp_path / "f.nsk")
    assert weight_quantizer_of(load(tmp_path / "f.nsk", plain_model(), restore=True)[4]) is None
