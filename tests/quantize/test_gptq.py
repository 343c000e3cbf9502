"""GPTQ and RTN: codes in range, dequantization exact, GPTQ below RTN's output error, bad input."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lm_helpers import calib, perplexity, tiny_lm  # noqa: E402

from netshrink.errors import ConfigError  # noqa: E402
from netshrink.quantize import GptqConfig, RtnConfig, quantize_  # noqa: E402
from netshrink.quantize.gptq import gptq_quantize, rtn_quantize  # noqa: E402


def _layer(seed=0, rows=32, cols=64, n=512):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.3 + torch.randn(cols, generator=g)
    return torch.randn(rows, cols, generator=g), x, (x.double().t() @ x.double()) / n


def _err(w, w2, x):
    return float(((x @ (w - w2).t()) ** 2).mean())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [None, 16])
def test_gptq_beats_rtn_on_the_layer_output(bits, group):
    w, x, h = _layer(bits)
    g = gptq_quantize(w, h, bits, group, block_size=16)
    r = rtn_quantize(w, bits, group)
    assert int(g.q.max()) < 2**bits and g.scale.shape == (32, 64 // (group or 64))
    assert _err(w, g.dequantize(), x) < _err(w, r.dequantize(), x)


def test_act_order_with_static_groups():
    w, x, h = _layer(7)
    g = gptq_quantize(w, h, 3, 16, act_order=True)
    assert all(len(torch.unique(g.dequantize()[0, k * 16 : (k + 1) * 16])) <= 8 for k in range(4))
    assert _err(w, g.dequantize(), x) < _err(w, rtn_quantize(w, 3, 16).dequantize(), x)


def test_rtn_known_answer():
    w = torch.tensor([[0.0, 1.5, 3.0, -1.5]])
    r = rtn_quantize(w, 2)  # range [-1.5, 3], step 1.5, zero point 1
    assert r.scale.tolist() == [[1.5]] and r.zero.tolist() == [[1]]
    torch.testing.assert_close(r.dequantize(), w)


def test_dead_column_and_zero_hessian():
    w, x, _ = _layer(3)
    x[:, 0] = 0
    g = gptq_quantize(w, (x.double().t() @ x.double()) / 512, 4)
    assert torch.isfinite(g.dequantize()).all() and (g.dequantize()[:, 0] == 0).all()
    assert torch.isfinite(gptq_quantize(w, torch.zeros(64, 64, dtype=torch.float64), 4).dequantize()).all()


def test_bad_input():
    for bits in (1, 9):
        with pytest.raises(ConfigError, match="from 2 to 8"):
            GptqConfig(bits=bits)
    w, _, h = _layer()
    with pytest.raises(ConfigError, match="does not divide the input width 64"):
        gptq_quantize(w, h, 4, 24)
    with pytest.raises(ConfigError, match="does not divide"):
        quantize_(tiny_lm(), GptqConfig(bits=4, group_size=48, samples=4, progress=False), data=calib(4))


def test_whole_model_gptq_at_or_below_rtn():
    dense = perplexity(tiny_lm())
    g, r = tiny_lm(), tiny_lm()
    res = quantize_(g, GptqConfig(bits=3, group_size=None, samples=32, progress=False), data=calib(32))
    quantize_(r, RtnConfig(bits=3, group_size=None))
    assert len(res.layers) == 14 and hasattr(g.layers[0].attn.q_proj, "netshrink_groupq")
    assert res.report.seconds > 0 and res.report.peak_rss_bytes > 0
    pg, pr = perplexity(g), perplexity(r)
    # on a model this small the per-layer win (tested above) need not show in perplexity; GPTQ must stay close
    assert pg - dense < max(pr - dense, 0.02 * dense) and pg < 1.1 * dense
