"""AWQ scale search (never worse than RTN on its rows) and SmoothQuant W8A8."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lm_helpers import calib, perplexity, tiny_lm  # noqa: E402

from netshrink.errors import ConfigError  # noqa: E402
from netshrink.quantize import AwqConfig, SmoothQuantConfig, SmoothQuantLinear, quantize_  # noqa: E402
from netshrink.quantize.awq import awq_search  # noqa: E402
from netshrink.quantize.smoothquant import fake_quant_per_token, smooth_scales  # noqa: E402


def _outlier_layer(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, 64, generator=g)
    x[:, :4] *= 30  # a few outlier channels, as in LLM activations
    return torch.randn(48, 64, generator=g), x


def test_awq_search_beats_rtn_with_outlier_channels():
    w, x = _outlier_layer()
    gq, alpha, err, rtn_err = awq_search(w, x, x.abs().mean(0), 3, 16)
    assert err < 0.9 * rtn_err and alpha > 0
    assert gq.in_scale is not None and int(gq.q.max()) <= 7
    torch.testing.assert_close(((x @ gq.dequantize().t() - x @ w.t()) ** 2).mean(), torch.tensor(err), rtol=1e-4, atol=1e-6)


def test_smoothquant_scales_and_layer():
    w, x = _outlier_layer(1)
    s = smooth_scales(x.abs().amax(0), w, 0.5)
    torch.testing.assert_close(s, (x.abs().amax(0).sqrt() / w.abs().amax(0).sqrt()))
    xs = x / s
    assert xs.abs().amax(0).max() / xs.abs().amax(0).min() < x.abs().amax(0).max() / x.abs().amax(0).min()
    q = fake_quant_per_token(x)
    assert (q - x).abs().max() <= x.abs().amax(-1).max() / 127 / 2 + 1e-5


def test_bad_configs():
    with pytest.raises(ConfigError, match="from 2 to 8"):
        AwqConfig(bits=1)
    with pytest.raises(ConfigError, match="alpha"):
        SmoothQuantConfig(alpha=1.5)


def test_whole_model_awq_and_smoothquant():
    dense = perplexity(tiny_lm())
    m = tiny_lm()
    res = quantize_(m, AwqConfig(bits=4, group_size=32, samples=16, progress=False), data=calib(16))
    assert len(res.layers) == 14 and all(r["out_mse"] <= r["rtn_out_mse"] for r in res.layers.values())
    assert perplexity(m) < 1.1 * dense
    m = tiny_lm()
    res = quantize_(m, SmoothQuantConfig(samples=16, progress=False), data=calib(16))
    assert isinstance(m.layers[0].attn.q_proj, SmoothQuantLinear)
    assert m.netshrink_edits[0]["type"] == "smoothquant_linear"
    assert perplexity(m) < 1.05 * dense


def test_smoothquant_weights_pack_as_int8(tmp_path):
    from netshrink.pack import load, pack

    m = tiny_lm()
    quantize_(m, SmoothQuantConfig(samples=8, progress=False), data=calib(8))
    st = pack(m, tmp_path / "m.nsk")
    enc = {t.name: t.encoding for t in st.tensors}
    assert enc["layers.0.attn.q_proj.weight"].startswith("affine")
    ids = calib(2)[0][None]
    assert torch.equal(m(ids), load(tmp_path / "m.nsk")(ids))
