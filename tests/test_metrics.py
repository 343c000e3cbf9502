"""Tests of netshrink.metrics: parameters, non-zeros, MACs (hand-computed), SQNR, latency, error."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from netshrink.errors import ConfigError
from netshrink.metrics import (
    compression_ratio,
    count_nonzeros,
    count_params,
    error_rate,
    fp32_bytes,
    latency,
    macs,
    sqnr_db,
)
from netshrink.models import lenet5, lenet_300_100, mlp
from netshrink.prune._mask import apply_mask

# Hand-computed MACs for one 28x28 image (weights x output positions):
#   conv1: 24*24 positions * (20*1*5*5)  =   288,000
#   conv2:  8* 8 positions * (50*20*5*5) = 1,600,000
#   fc1:   800*500 = 400,000;  fc2: 500*10 = 5,000            total 2,293,000
#   lenet_300_100: 784*300 + 300*100 + 100*10 = 266,200
LENET5_MACS = {"conv1": 288_000, "conv2": 1_600_000, "fc1": 400_000, "fc2": 5_000}
LENET300_MACS = {"fc1": 235_200, "fc2": 30_000, "fc3": 1_000}


def _half_mask(weight: torch.Tensor) -> torch.Tensor:
    """Keep the first half of the output rows/channels."""
    mask = torch.zeros_like(weight, dtype=torch.bool)
    mask[: weight.shape[0] // 2] = True
    return mask


def test_param_counts_and_fp32_bytes():
    m = lenet_300_100()
    assert count_params(m) == 266_610
    assert fp32_bytes(m) == 4 * 266_610
    assert count_params(lenet5()) == 431_080
    assert count_nonzeros(m) == 266_610  # a random init has no exact zeros


def test_nonzeros_with_a_mask_and_params_unchanged():
    torch.manual_seed(0)
    m = lenet_300_100()
    apply_mask(m.fc1, _half_mask(m.fc1.weight))
    assert count_params(m) == 266_610  # the masked weight counts once; mask/original do not count
    assert count_nonzeros(m) == 266_610 - 150 * 784
    with torch.no_grad():
        m.fc3.bias.zero_()
    assert count_nonzeros(m) == 266_610 - 150 * 784 - 10


def test_shared_weight_internals_do_not_count():
    from netshrink.quantize._sharing import apply_sharing

    m = mlp()
    w = m.fc1.weight.detach()
    codebook = torch.tensor([-0.1, 0.0, 0.1])
    indices = torch.bucketize(w, torch.tensor([-0.05, 0.05]))
    apply_sharing(m.fc1, codebook, indices)
    assert count_params(m) == 64 * 32 + 32 + 32 * 10 + 10  # codebook and indices are not parameters of the model
    assert count_nonzeros(m) == count_params(m) - int((indices == 1).sum())


def test_macs_lenet5_hand_computed():
    m = lenet5()
    report = macs(m, torch.zeros(1, 1, 28, 28))
    assert {l.name: l.dense for l in report.layers} == LENET5_MACS
    assert report.dense == 2_293_000 == report.effective
    assert report["conv2"].type == "Conv2d" and report["conv2"].output_shape == (1, 50, 8, 8)
    assert report.input_shape == (1, 1, 28, 28)
    assert macs(m, torch.zeros(4, 1, 28, 28)).dense == 4 * 2_293_000  # counts cover the whole batch
    with pytest.raises(KeyError, match="pool1"):
        report["pool1"]


def test_macs_lenet_300_100_and_effective_after_masking():
    m = lenet_300_100()
    report = macs(m, torch.zeros(1, 784))
    assert {l.name: l.dense for l in report.layers} == LENET300_MACS and report.dense == 266_200
    apply_mask(m.fc1, _half_mask(m.fc1.weight))
    masked = macs(m, torch.zeros(1, 1, 28, 28))
    assert masked["fc1"].dense == 235_200 and masked["fc1"].effective == 117_600
    assert masked["fc2"].effective == 30_000
    assert masked.effective == 266_200 - 117_600
    assert masked["fc1"].density == pytest.approx(0.5)


def test_macs_conv_effective_after_masking_half_of_conv2():
    m = lenet5()
    apply_mask(m.conv2, _half_mask(m.conv2.weight))
    r = macs(m, torch.zeros(1, 1, 28, 28))
    assert r["conv2"].dense == 1_600_000 and r["conv2"].effective == 800_000
    assert r.effective == 2_293_000 - 800_000
    assert r.speedup_bound == pytest.approx(2_293_000 / 1_493_000)


def test_macs_grouped_and_1d_convolutions_and_reuse():
    grouped = nn.Conv2d(4, 8, 3, padding=1, groups=2)
    # 5*5 output positions * weight (8, 4/2, 3, 3) = 25 * 144
    assert macs(grouped, torch.zeros(1, 4, 5, 5)).dense == 3_600
    conv1d = nn.Conv1d(3, 6, 3)
    # batch 2 * length 8 * (6*3*3)
    assert macs(conv1d, torch.zeros(2, 3, 10)).dense == 864
    depthwise = nn.Conv2d(6, 6, 3, groups=6)
    assert macs(depthwise, torch.zeros(1, 6, 7, 7)).dense == 25 * 6 * 9

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.fc(x))

    r = macs(Twice(), torch.zeros(3, 4))
    assert r["fc"].dense == 2 * 3 * 16 and r["fc"].calls == 2


def test_macs_restores_training_mode():
    m = mlp().train()
    macs(m, torch.zeros(1, 64))
    assert m.training
    assert not any(mod._forward_hooks for mod in m.modules())


def test_sqnr_known_cases():
    x = torch.ones(100)
    assert sqnr_db(x, x + 0.1) == pytest.approx(20.0)  # 100 / (100 * 0.01) = 100 -> 20 dB
    assert sqnr_db(x, x) == math.inf
    assert sqnr_db(torch.zeros(3), torch.ones(3)) == -math.inf
    ref = np.array([3.0, 4.0])
    assert sqnr_db(ref, np.array([3.0, 3.0])) == pytest.approx(10 * math.log10(25.0))
    with pytest.raises(ValueError, match="shapes differ"):
        sqnr_db(torch.zeros(3), torch.zeros(4))


def test_sqnr_of_uniform_quantizer_grows_about_6db_per_bit():
    x = torch.rand(100_000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    def q(bits):
        step = 2 / 2**bits
        return torch.clamp(torch.round(x / step) * step, -1, 1)
    s6, s8 = sqnr_db(x, q(6)), sqnr_db(x, q(8))
    assert s8 - s6 == pytest.approx(2 * 6.02, abs=0.3)


def test_compare_latency_times_every_model_in_turns():
    from netshrink.metrics import compare_latency

    small, wide = mlp(), mlp(hidden=(256, 256))
    res = compare_latency({"small": small, "wide": wide}, (1, 8, 8), batch_sizes=(1, 8), runs=20, rounds=3, threads=1)
    assert set(res) == {"small", "wide"} and all(set(r) == {1, 8} for r in res.values())
    assert all(st.runs == 20 and st.threads == 1 for r in res.values() for st in r.values())
    with pytest.raises(ConfigError, match="rounds"):
        compare_latency({"small": small}, (1, 8, 8), rounds=0)
    with pytest.raises(ConfigError, match="models"):
        compare_latency({}, (1, 8, 8))


def test_latency_reports_runs_and_threads():
    m = mlp().train()
    before = torch.get_num_threads()
    res = latency(m, (1, 8, 8), batch_sizes=(1, 4), runs=20, warmup=1, threads=1)
    assert set(res) == {1, 4}
    for b, s in res.items():
        assert s.batch_size == b and s.runs == 20 and len(s.times_ms) == 20
        assert s.threads == 1 and s.device == "cpu"
        assert 0 < s.min_ms <= s.p10_ms <= s.median_ms <= s.p90_ms
    assert torch.get_num_threads() == before and m.training
    tensor_res = latency(m, torch.rand(2, 1, 8, 8), batch_sizes=(3,), runs=20, warmup=0)
    assert tensor_res[3].threads == before
    with pytest.raises(ConfigError, match="at least 20"):
        latency(m, (64,), runs=19)
    with pytest.raises(ConfigError, match=r"batch_sizes\[1\]"):
        latency(m, (64,), batch_sizes=(1, 0))


def test_compression_ratio(tmp_path):
    m = lenet_300_100()
    f = tmp_path / "model.nsk"
    f.write_bytes(b"x" * 1000)
    assert compression_ratio(m, f) == pytest.approx(4 * 266_610 / 1000)
    assert compression_ratio(4000, 1000) == 4.0


def test_error_rate():
    x = torch.eye(10)
    y = torch.arange(10)
    y_bad = y.clone()
    y_bad[:3] = (y_bad[:3] + 1) % 10
    ident = nn.Identity()
    assert error_rate(ident, TensorDataset(x, y)) == 0.0
    assert error_rate(ident, TensorDataset(x, y_bad), batch_size=4) == pytest.approx(0.3)
