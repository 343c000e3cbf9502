"""ONNX export: fp32 equals torch; int8 QDQ runs fused in onnxruntime with the simulated model's error."""

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from netshrink.data import load_dataset
from netshrink.errors import ConfigError, DataError, ModelError
from netshrink.export import export_onnx, onnx_input_shape, ort_error_rate, ort_latency, ort_predict, ort_session
from netshrink.metrics import error_rate
from netshrink.models import build_model
from netshrink.quantize import Int8Config, quantize_


def _conv_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 2), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 2 * 2, 10),
    )


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _trained(make, digits, epochs=12, seed=0):
    torch.manual_seed(seed)
    m = make()
    opt = torch.optim.Adam(m.parameters(), lr=0.01)
    xs = torch.stack([digits.train[i][0] for i in range(len(digits.train))])
    ys = torch.stack([torch.as_tensor(digits.train[i][1]) for i in range(len(digits.train))])
    for _ in range(epochs):
        for idx in torch.randperm(len(xs)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(m(xs[idx]), ys[idx]).backward()
            opt.step()
    return m.eval()


@pytest.fixture(scope="module")
def trained(digits):
    return {"mlp": _trained(lambda: build_model("mlp", in_features=64, hidden=[48, 24]), digits),
            "conv": _trained(_conv_net, digits)}


def test_fp32_export_equals_torch(tmp_path, trained):
    x = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    for name, m in trained.items():
        res = export_onnx(m, tmp_path / f"{name}.onnx", (1, 8, 8))
        assert not res.int8 and "QuantizeLinear" not in res.ops
        s = ort_session(res.path, threads=1)
        assert onnx_input_shape(s) == (1, 8, 8)
        np.testing.assert_allclose(ort_predict(s, x), m(x).detach().numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_int8_error_in_onnxruntime_matches_the_simulated_model(tmp_path, trained, digits, name):
    q = copy.deepcopy(trained[name])
    quantize_(q, Int8Config(calibration_samples=256), data=digits)
    res = export_onnx(q, tmp_path / "q.onnx", (1, 8, 8), int8=True)
    assert res.int8 and res.ops["QuantizeLinear"] >= 3 and res.ops["DequantizeLinear"] >= 6
    assert set(res.quantized) == set(res.act_quantized) and len(res.quantized) == (3 if name == "mlp" else 3)
    # the graph onnxruntime runs is fused into integer kernels, not float ops on dequantized values
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(res.path, opts, providers=["CPUExecutionProvider"])
    fused = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert "QGemm" in fused and (name == "mlp" or "QLinearConv" in fused)
    s = ort_session(res.path, threads=1)
    sim, onnx_err = error_rate(q, digits.test), ort_error_rate(s, digits.test)
    assert abs(sim - onnx_err) * 100 <= 0.1, (sim, onnx_err)
    assert sim <= error_rate(trained[name], digits.test) + 0.02
    x = torch.stack([digits.test[i][0] for i in range(64)])
    logits = q(x).detach().numpy()
    assert np.abs(ort_predict(s, x) - logits).max() <= 0.02 * np.abs(logits).max()
    assert res.bytes < export_onnx(trained[name], tmp_path / "f.onnx", (1, 8, 8)).bytes


def test_int8_export_calibrates_an_unquantized_model(tmp_path, trained, digits):
    m = trained["mlp"]
    res = export_onnx(m, tmp_path / "c.onnx", (1, 8, 8), int8=True, calibration=digits, calibration_samples=128)
    assert res.quantized == ["fc1", "fc2", "fc3"]
    assert not any(n.endswith("input_quant") for n, _ in m.named_modules())  # m itself is left unquantized
    assert ort_error_rate(ort_session(res.path), digits.test) <= error_rate(m, digits.test) + 0.02


def test_the_original_model_survives_export(tmp_path, trained, digits):
    q = copy.deepcopy(trained["conv"])
    quantize_(q, Int8Config(calibration_samples=64), data=digits)
    x = torch.rand(8, 1, 8, 8)
    before = q(x)
    export_onnx(q, tmp_path / "q.onnx", (1, 8, 8), int8=True)
    export_onnx(q, tmp_path / "f.onnx", (1, 8, 8))
    assert torch.equal(q(x), before) and hasattr(q[0], "input_quant")


class _Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.special.zeta(self.fc(x), 2.0)


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.fc(x)))


def test_bad_exports_are_one_line_errors(tmp_path, capfd):
    with pytest.raises(ModelError, match="special_zeta.*not supported") as exc:
        export_onnx(_Unsupported(), tmp_path / "u.onnx", (4,))
    assert "\n" not in str(exc.value)
    assert "Torch IR graph" not in capfd.readouterr().out
    with pytest.raises(DataError, match="calibration"):
        export_onnx(_Shared(), tmp_path / "s.onnx", (4,), int8=True)
    with pytest.raises(DataError, match="empty"):
        export_onnx(_Shared(), tmp_path / "s.onnx", (4,), int8=True, calibration=torch.zeros(0, 4))
    with pytest.raises(DataError, match="NaN"):
        export_onnx(_Shared(), tmp_path / "s.onnx", (4,), int8=True, calibration=torch.full((8, 4), float("nan")))
    with pytest.raises(ModelError, match="'fc'"):
        export_onnx(_Shared(), tmp_path / "s.onnx", (4,), int8=True, calibration=torch.rand(16, 4))
    assert not (tmp_path / "u.onnx").exists() and not (tmp_path / "s.onnx").exists()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="onnxruntime cannot load"):
        ort_session(bad)
    export_onnx(nn.Linear(4, 2), tmp_path / "l.onnx", (4,))
    with pytest.raises(ConfigError, match="runs"):
        ort_latency(ort_session(tmp_path / "l.onnx"), (4,), runs=5)
    lat = ort_latency(ort_session(tmp_path / "l.onnx", threads=1), (4,), batch_sizes=(1, 3), runs=20)
    assert set(lat) == {1, 3} and all(v.median_ms > 0 and v.threads == 1 for v in lat.values())
