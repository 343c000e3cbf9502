import pytest
import torch

from netshrink.errors import ConfigError, DataError, NetshrinkError
from netshrink.quantize import (
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    fake_quantize,
    make_observer,
)
from netshrink.quantize.affine import quantization_mse
from netshrink.quantize.observers import (
    minmax_range,
    mse_range,
    observe_range,
    percentile_range,
)


def _data(n=20000, seed=0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def test_minmax_on_known_data():
    x = torch.tensor([[-3.0, 0.5, 2.0], [0.1, 0.2, 0.3]])
    r = minmax_range(x)
    assert float(r.lo) == -3.0 and float(r.hi) == 2.0
    rc = minmax_range(x, axis=0)
    assert torch.equal(rc.lo, torch.tensor([-3.0, 0.1])) and torch.equal(rc.hi, torch.tensor([2.0, 0.3]))
    rc1 = minmax_range(x, axis=1)
    assert torch.equal(rc1.hi, torch.tensor([0.1, 0.5, 2.0]))


def test_percentile_clips_an_outlier():
    x = torch.cat([_data(), torch.tensor([1000.0, -500.0])])
    mm, pc = minmax_range(x), percentile_range(x, 99.9)
    assert float(mm.hi) == 1000.0 and float(mm.lo) == -500.0
    assert 2.5 < float(pc.hi) < 4.0 and -4.0 < float(pc.lo) < -2.5
    # the clipped range quantizes the bulk of the data far better
    bulk = x[:-2]
    assert quantization_mse(bulk, pc.qparams(8, False)) < quantization_mse(bulk, mm.qparams(8, False)) / 100
    assert float(percentile_range(x, 100.0).hi) == 1000.0


def test_mse_range_is_inside_minmax_with_lower_error():
    x = torch.cat([_data(seed=1), torch.tensor([12.0])])
    for bits, symmetric in ((4, True), (4, False), (8, True)):
        mm, ms = minmax_range(x), mse_range(x, bits, symmetric)
        assert float(ms.hi) <= float(mm.hi) and float(ms.lo) >= float(mm.lo)
        err_mm = quantization_mse(x, mm.qparams(bits, symmetric))
        err_ms = quantization_mse(x, ms.qparams(bits, symmetric))
        assert err_ms <= err_mm
    # at 4 bits a single outlier is worth clipping
    assert float(mse_range(x, 4, True).hi) < 8.0
    assert quantization_mse(x, mse_range(x, 4, True).qparams(4)) < 0.5 * quantization_mse(x, minmax_range(x).qparams(4))


def test_mse_per_channel_picks_its_own_clip():
    w = torch.randn(4, 500, generator=torch.Generator().manual_seed(2))
    w[1, 0] = 10.0  # only channel 1 has an outlier, worth clipping at 3 bits
    r = mse_range(w, 3, True, axis=0)
    mm = minmax_range(w, axis=0)
    assert float(r.hi[1]) < 0.5 * float(mm.hi[1])
    qp, qp_mm = r.qparams(3), mm.qparams(3)
    assert torch.all(quantization_mse(w, qp, reduce_axis=0) <= quantization_mse(w, qp_mm, reduce_axis=0) + 1e-12)


def test_observers_accumulate_over_batches():
    x = _data(30000, seed=3)
    batches = x.split(1000)
    mm = MinMaxObserver(8, False)
    for b in batches:
        assert mm(b) is b  # passes its input through
    assert float(mm.range().lo) == float(x.min()) and float(mm.range().hi) == float(x.max())
    assert mm.seen == x.numel()

    pc = PercentileObserver(8, False, percentile=99.0, max_samples=5000)
    for b in batches:
        pc.update(b)
    whole = percentile_range(x, 99.0)
    assert abs(float(pc.range().hi) - float(whole.hi)) < 0.15
    assert abs(float(pc.range().lo) - float(whole.lo)) < 0.15

    ms = MSEObserver(4, True)
    for b in batches:
        ms.update(b)
    assert torch.allclose(ms.range().hi, mse_range(x, 4, True).hi, atol=0.05)
    qp = ms.qparams()
    assert qp.bits == 4 and qp.symmetric and sqnr_db_ok(x, qp)


def sqnr_db_ok(x, qp):
    from netshrink.metrics import sqnr_db

    return sqnr_db(x, fake_quantize(x, qp)) > 15.0


def test_per_channel_observer_over_batches():
    obs = make_observer("minmax", 8, True, axis=1)
    obs.update(torch.tensor([[1.0, -2.0], [3.0, 0.0]]))
    obs.update(torch.tensor([[-1.0, 5.0]]))
    r = obs.range()
    assert torch.equal(r.lo, torch.tensor([-1.0, -2.0])) and torch.equal(r.hi, torch.tensor([3.0, 5.0]))
    assert obs.qparams().axis == 1


@pytest.mark.parametrize("kind", ["minmax", "percentile", "mse"])
def test_empty_and_non_finite_data_are_named(kind):
    obs = make_observer(kind, 8, what="input of layer 'fc1'")
    with pytest.raises(DataError, match="input of layer 'fc1' is empty"):
        obs.range()
    with pytest.raises(DataError, match="empty"):
        obs.update(torch.empty(0, 3))
    with pytest.raises(NetshrinkError, match="NaN or inf"):
        obs.update(torch.tensor([1.0, float("nan")]))
    with pytest.raises(DataError, match="NaN or inf"):
        observe_range(torch.tensor([1.0, float("inf")]), kind)
    with pytest.raises(DataError, match="empty"):
        observe_range(torch.empty(0), kind)


def test_bad_observer_arguments():
    with pytest.raises(ConfigError) as ei:
        make_observer("entropy")
    assert ei.value.field == "observer"
    with pytest.raises(ConfigError) as ei:
        percentile_range(torch.ones(3), 40.0)
    assert ei.value.field == "percentile"
    with pytest.raises(ConfigError) as ei:
        make_observer("mse", bits=9)
    assert ei.value.field == "bits"
