"""ONNX export of the LM with its KV cache; int4/int8 MatMulNBits equal to the simulated model."""

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from lm_helpers import calib, heldout, perplexity, tiny_lm  # noqa: E402

from netshrink.errors import ConfigError, ModelError  # noqa: E402
from netshrink.export_lm import export_lm, lm_session, ort_generate, ort_logits, ort_perplexity, pack_nbits, pack_zero_points  # noqa: E402
from netshrink.models import build_model  # noqa: E402
from netshrink.quantize import RtnConfig, SmoothQuantConfig, quantize_  # noqa: E402


def test_nibble_packing_known_answer():
    q = np.array([[1, 2, 3, 4, 15, 0, 7, 8] * 2])
    assert pack_nbits(q, 4, 16).tolist() == [[[0x21, 0x43, 0x0F, 0x87] * 2]]
    assert pack_zero_points(np.array([[1, 2, 3]]), 4).tolist() == [[0x21, 0x03]]
    with pytest.raises(ConfigError, match="4 or 8"):
        pack_nbits(q, 3, 16)


def test_fp32_export_and_greedy_decode_match_torch(tmp_path):
    m = tiny_lm()
    export_lm(m, tmp_path / "m.onnx")
    s = lm_session(tmp_path / "m.onnx")
    ids = heldout(2)[0][None]
    np.testing.assert_allclose(ort_logits(s, ids.numpy()), m(ids).detach().numpy(), atol=2e-4)
    assert ort_generate(s, ids[:, :10].numpy(), 8).tolist() == m.generate(ids[:, :10], 8).tolist()


@pytest.mark.parametrize("bits,group", [(4, 32), (4, None), (8, 64)])
def test_matmulnbits_equals_the_simulated_model(tmp_path, bits, group):
    import onnx

    m = tiny_lm()
    quantize_(m, RtnConfig(bits=bits, group_size=group))
    fp = export_lm(tiny_lm(), tmp_path / "fp.onnx")
    r = export_lm(m, tmp_path / "q.onnx", weight_bits=bits)
    assert r.nbits_layers == 14 and r.dense_layers == 1 and r.bytes < fp.bytes  # the head stays fp32
    ops = {n.op_type for n in onnx.load(tmp_path / "q.onnx").graph.node}
    assert "MatMulNBits" in ops
    s = lm_session(tmp_path / "q.onnx")
    ids = heldout(2)[0][None]
    np.testing.assert_allclose(ort_logits(s, ids.numpy()), m(ids).detach().numpy(), atol=2e-4)
    assert ort_perplexity(s, heldout(4)) == pytest.approx(perplexity(m, 4), rel=1e-4)


@pytest.mark.parametrize("group", [32, None])
def test_int4_token_table_and_head(tmp_path, group):
    """RTN's extra_layers put the Embedding and the LM head on 4 bits too: GatherBlockQuantized and
    MatMulNBits, the whole file about 1/4 of fp32 even for this tiny model, the logits the simulated ones."""
    import onnx

    m = tiny_lm()
    res = quantize_(m, RtnConfig(bits=4, group_size=group, extra_layers=["embed", "lm_head"]))
    assert res["embed"]["outside_blocks"] and res["lm_head"]["outside_blocks"]
    assert m.embed.netshrink_groupq.q.shape == m.embed.weight.shape
    fp = export_lm(tiny_lm(), tmp_path / "fp.onnx")
    r = export_lm(m, tmp_path / "q.onnx", weight_bits=4)
    assert (r.nbits_layers, r.nbits_gathers, r.dense_layers) == (15, 1, 0)
    assert r.bytes < 0.3 * fp.bytes
    proto = onnx.load(tmp_path / "q.onnx")
    assert [n.op_type for n in proto.graph.node].count("GatherBlockQuantized") == 1
    assert "lm.embed.weight" not in {i.name for i in proto.graph.initializer}  # the fp32 table is gone
    ids = heldout(2)[0][None]
    np.testing.assert_allclose(ort_logits(lm_session(tmp_path / "q.onnx"), ids.numpy()), m(ids).detach().numpy(), atol=2e-4)
    # the fast integer path: within int8 activation rounding of the simulated model
    export_lm(m, tmp_path / "fast.onnx", weight_bits=4, accuracy_level=4)
    assert ort_perplexity(lm_session(tmp_path / "fast.onnx"), heldout(4)) == pytest.approx(perplexity(m, 4), rel=1e-3)


def test_smoothquant_exports_as_int8_matmulnbits(tmp_path):
    import onnx

    m = tiny_lm()
    quantize_(m, SmoothQuantConfig(samples=16, progress=False), data=calib(16))
    r = export_lm(m, tmp_path / "sq.onnx", weight_bits=8, accuracy_level=4)
    assert r.nbits_layers == 14 and r.dense_layers == 1  # the head stays fp32
    ops = [n.op_type for n in onnx.load(tmp_path / "sq.onnx").graph.node]
    assert ops.count("MatMulNBits") == 14 and "Round" not in ops  # per-token fake quantization is the kernel's now
    # ORT quantizes activations per block of inputs, the simulation per token: close, not equal
    assert ort_perplexity(lm_session(tmp_path / "sq.onnx"), heldout(4)) == pytest.approx(perplexity(m, 4), rel=5e-3)


def test_extra_layers_must_match_outside_the_blocks():
    with pytest.raises(ConfigError, match="extra_layers.*'head'"):
        quantize_(tiny_lm(), RtnConfig(layers=[], extra_layers=["head"]))
    with pytest.raises(ConfigError, match="extra_layers.*norm is a RMSNorm"):
        quantize_(tiny_lm(), RtnConfig(layers=[], extra_layers=["norm"]))
    with pytest.raises(ConfigError, match="extra_layers"):
        RtnConfig(extra_layers="lm_head")


def test_bad_export_requests(tmp_path):
    with pytest.raises(ConfigError, match="weight_bits"):
        export_lm(tiny_lm(), tmp_path / "x.onnx", weight_bits=3)
    with pytest.raises(ConfigError, match="accuracy_level"):
        export_lm(tiny_lm(), tmp_path / "x.onnx", weight_bits=4, accuracy_level=2)
    with pytest.raises(ModelError, match="forward_cached"):
        export_lm(build_model("mlp"), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
