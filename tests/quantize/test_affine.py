import math

import pytest
import torch

from netshrink.errors import ConfigError, DataError
from netshrink.metrics import sqnr_db
from netshrink.quantize import (
    QuantParams,
    choose_qparams,
    dequantize,
    fake_quantize,
    quantize_tensor as quantize,
    stochastic_round,
)
from netshrink.quantize.affine import qrange


def _gauss(n, seed=0, shape=None):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape or (n,), generator=g)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("per_channel", [False, True])
def test_round_trip_error_is_at_most_half_a_step(bits, symmetric, per_channel):
    x = _gauss(0, seed=bits, shape=(6, 200)) * torch.linspace(0.1, 3.0, 6)[:, None] + 0.3
    if per_channel:
        qp = choose_qparams(x.amin(1), x.amax(1), bits, symmetric, axis=0)
        half = qp.scale[:, None] / 2
    else:
        qp = choose_qparams(x.min(), x.max(), bits, symmetric)
        half = qp.scale / 2
    q = quantize(x, qp)
    assert q.dtype == (torch.int8 if symmetric else torch.uint8)
    assert int(q.min()) >= qp.qmin and int(q.max()) <= qp.qmax
    err = (dequantize(q, qp) - x).abs()
    assert torch.all(err <= half * (1 + 1e-5))
    assert torch.equal(dequantize(q, qp), fake_quantize(x, qp))


def test_zero_is_exact_and_the_formulas_hold():
    qp = choose_qparams(-1.0, 3.0, bits=4, symmetric=False)
    assert qp.qmin == 0 and qp.qmax == 15
    assert float(qp.scale) == pytest.approx(4.0 / 15)
    assert int(qp.zero_point) == round(1.0 / (4.0 / 15))
    assert float(fake_quantize(torch.zeros(3), qp).abs().max()) == 0.0
    sym = choose_qparams(-2.0, 1.0, bits=8, symmetric=True)
    assert int(sym.zero_point) == 0 and float(sym.scale) == pytest.approx(2.0 / 127)
    assert qrange(8, True) == (-128, 127) and qrange(3, False) == (0, 7)
    # a positive-only range still holds 0: lo widens to 0
    pos = choose_qparams(2.0, 6.0, bits=8, symmetric=False)
    assert int(pos.zero_point) == 0 and float(pos.scale) == pytest.approx(6.0 / 255)


def test_sqnr_of_8_bits_on_gaussian_data_and_six_db_per_bit():
    x = _gauss(20000, seed=1)
    sq = {}
    for bits in range(2, 9):
        qp = choose_qparams(x.min(), x.max(), bits, symmetric=False)
        sq[bits] = sqnr_db(x, fake_quantize(x, qp))
    assert sq[8] >= 40.0
    for bits in range(4, 9):  # at low widths the distribution's tails distort the 6.02 dB rule
        assert 5.5 <= sq[bits] - sq[bits - 1] <= 7.0, (bits, sq)
    sym = choose_qparams(x.min(), x.max(), 8, symmetric=True)
    assert sqnr_db(x, fake_quantize(x, sym)) >= 39.0


def test_per_channel_beats_per_tensor_when_channel_ranges_differ():
    w = _gauss(0, seed=2, shape=(8, 64)) * torch.logspace(-2, 0, 8)[:, None]
    tensor_qp = choose_qparams(w.min(), w.max(), 4, True)
    chan_qp = choose_qparams(w.amin(1), w.amax(1), 4, True, axis=0)
    per_tensor, per_chan = sqnr_db(w, fake_quantize(w, tensor_qp)), sqnr_db(w, fake_quantize(w, chan_qp))
    assert per_chan > per_tensor + 3.0
    # the small channels are crushed to zero per tensor, but not per channel
    assert float(fake_quantize(w, tensor_qp)[0].abs().max()) == 0.0
    assert float(fake_quantize(w, chan_qp)[0].abs().max()) > 0.0


def test_per_channel_on_another_axis():
    x = _gauss(0, seed=3, shape=(5, 3, 7)) * torch.tensor([1.0, 10.0, 100.0])[None, :, None]
    qp = choose_qparams(x.amin((0, 2)), x.amax((0, 2)), 8, True, axis=1)
    err = (fake_quantize(x, qp) - x).abs()
    assert torch.all(err <= qp.scale[None, :, None] / 2 * (1 + 1e-5))


def test_stochastic_rounding_is_unbiased_and_seeded():
    v = torch.tensor([0.1, 0.5, 2.75, -1.3, -0.01])
    reps = v.repeat(20000, 1)
    r = stochastic_round(reps, torch.Generator().manual_seed(0))
    assert torch.all((r == torch.floor(reps)) | (r == torch.floor(reps) + 1))
    assert torch.allclose(r.mean(0), v, atol=0.01)
    again = stochastic_round(reps, torch.Generator().manual_seed(0))
    other = stochastic_round(reps, torch.Generator().manual_seed(1))
    assert torch.equal(r, again) and not torch.equal(r, other)
    # through the quantizer: the mean of many stochastic quantizations approaches x, nearest does not
    qp = choose_qparams(-1.0, 1.0, 2, symmetric=False)
    x = torch.full((50000,), 0.3)
    mean_sr = dequantize(quantize(x, qp, "stochastic", torch.Generator().manual_seed(5)), qp).mean()
    assert abs(float(mean_sr) - 0.3) < 0.01
    assert abs(float(fake_quantize(x, qp).mean()) - 0.3) > 0.02


def test_straight_through_gradient_is_one_inside_zero_outside():
    qp = choose_qparams(-1.0, 1.0, 4, symmetric=True)
    lo, hi = (float(t) for t in qp.clamp_range())
    s = float(qp.scale)
    # inside: the clamp range, and the part of a half step beyond it that still rounds into it
    x = torch.tensor([-5.0, lo - 0.6 * s, lo - 0.4 * s, lo, -0.3, 0.0, 0.42, hi, hi + 0.4 * s, hi + 0.6 * s, 7.0], requires_grad=True)
    y = fake_quantize(x, qp)
    y.backward(torch.full_like(x, 2.0))
    assert torch.equal(x.grad, torch.tensor([0.0, 0.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 0.0, 0.0]))
    # the largest value of a min-max range keeps its gradient whatever the rounding of x / s
    w = (torch.randn(1000, generator=torch.Generator().manual_seed(4)) * 0.37).requires_grad_(True)
    fake_quantize(w, choose_qparams(w.min(), w.max(), 3, symmetric=False)).sum().backward()
    assert torch.all(w.grad == 1.0)
    # the value is exactly the quantized value (the STE adds an exact zero)
    assert torch.equal(y.detach(), fake_quantize(x.detach(), qp))


def test_degenerate_range_gets_unit_scale():
    qp = choose_qparams(torch.zeros(3), torch.zeros(3), 8, False, axis=0)
    assert torch.equal(qp.scale, torch.ones(3))
    assert torch.equal(fake_quantize(torch.zeros(3, 4), qp), torch.zeros(3, 4))


@pytest.mark.parametrize("bits", [0, 1, 9, 16])
def test_bits_outside_two_to_eight_name_bits(bits):
    with pytest.raises(ConfigError) as ei:
        choose_qparams(-1.0, 1.0, bits)
    assert ei.value.field == "bits"
    with pytest.raises(ConfigError) as ei:
        QuantParams(torch.tensor(1.0), torch.tensor(0, dtype=torch.int32), bits, True, True)
    assert ei.value.field == "bits"


def test_bad_params_are_refused():
    with pytest.raises(ConfigError) as ei:
        QuantParams(torch.tensor(0.0), torch.tensor(0, dtype=torch.int32), 8, True, True)
    assert ei.value.field == "scale"
    with pytest.raises(ConfigError) as ei:
        choose_qparams(-1.0, 1.0, 8, symmetric=True, signed=False)
    assert ei.value.field == "signed"
    with pytest.raises(DataError, match="NaN or inf"):
        choose_qparams(-1.0, math.inf, 8)
    with pytest.raises(ConfigError) as ei:
        quantize(torch.ones(2), choose_qparams(-1.0, 1.0), rounding="up")
    assert ei.value.field == "rounding"
