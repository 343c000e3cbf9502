"""deploy: every runtime form checked against the model, timed in turns, the fastest written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from netshrink.deploy import deploy, profile_onnx
from netshrink.errors import ConfigError, ModelError
from netshrink.export import ort_predict, ort_session
from netshrink.models import build_model
from netshrink.prune import MagnitudeConfig, prune_

pytest.importorskip("onnxruntime")


class BatchDependent(nn.Module):
    """Adds 1 when the batch has more than one example: tracing at batch 1 bakes in the other branch."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.fc(x)
        return y + 1 if x.shape[0] > 1 else y


def test_fastest_form_is_written_and_matches_the_model(tmp_path):
    torch.manual_seed(0)
    model = build_model("lenet5").eval()
    x = torch.randn(16, 1, 28, 28)
    res = deploy(model, tmp_path, x[:1], batch_sizes=(1, 4), runs=20, rounds=1)
    names = [f.name for f in res.forms]
    assert names[:2] == ["torch", "onnx-fp32"]
    assert res.chosen in names and all(f.speedup for f in res.forms if not f.refused)
    assert res.form("torch").speedup == {1: 1.0, 4: 1.0}
    info = json.loads((tmp_path / "deploy.json").read_text())
    assert info["chosen"] == res.chosen and {f["name"] for f in info["forms"]} == set(names)
    if res.path is not None:  # an ONNX form won: the file is the model
        got = ort_predict(ort_session(res.path), x)
        with torch.no_grad():
            assert np.allclose(got, model(x).numpy(), atol=1e-4)
    assert "| onnx-fp32 |" in res.table()


def test_sparse_and_int8_forms(tmp_path):
    torch.manual_seed(0)
    model = build_model("lenet_300_100").eval()
    prune_(model, MagnitudeConfig(sparsity=0.95))
    x = torch.rand(64, 1, 28, 28)
    data = TensorDataset(x, torch.randint(0, 10, (64,)))
    res = deploy(model, tmp_path, x[:1], calibration=data, val=data, batch_sizes=(1, 8), runs=20, rounds=1)
    sparse, int8 = res.form("torch-sparse"), res.form("onnx-int8")
    assert sparse.refused is None and sparse.max_abs_gap < 1e-4 and "3 Linear" in sparse.note
    assert int8.metric is not None  # judged by the task's metric on val, refused or not
    assert int8.refused is None or "differs from the model's" in int8.refused


def test_a_form_whose_outputs_differ_is_refused_with_the_gap(tmp_path):
    torch.manual_seed(0)
    model = BatchDependent().eval()
    res = deploy(model, tmp_path, torch.randn(1, 4), forms=("onnx-fp32",), batch_sizes=(1, 2), runs=20, rounds=1)
    onnx_form = res.form("onnx-fp32")
    assert onnx_form.refused is not None and "differ from the compressed model by 1" in onnx_form.refused
    assert res.chosen == "torch" and res.path is None
    with pytest.raises(ModelError, match="onnx-fp32 form is refused: outputs differ"):
        deploy(model, tmp_path, torch.randn(1, 4), forms=("onnx-fp32",), batch_sizes=(1, 2), runs=20, rounds=1, strict=True)


def test_bad_arguments(tmp_path):
    m = nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="forms"):
        deploy(m, tmp_path, torch.randn(1, 2), forms=("tensorrt",))
    with pytest.raises(ConfigError, match="runs"):
        deploy(m, tmp_path, torch.randn(1, 2), runs=3)
    with pytest.raises(ConfigError, match=r"batch_sizes\[0\]"):
        deploy(m, tmp_path, torch.randn(1, 2), batch_sizes=(0,))


def test_profile_shares_sum_to_one(tmp_path):
    torch.manual_seed(0)
    model = build_model("lenet5").eval()
    x = torch.randn(1, 1, 28, 28)
    res = deploy(model, tmp_path, x, forms=("onnx-fp32",), batch_sizes=(1,), runs=20, rounds=1)
    prof = profile_onnx(res.form("onnx-fp32").path, x, runs=20)
    assert sum(prof.values()) == pytest.approx(1.0) and "Conv" in prof and "(outside nodes)" in prof


class _Svd(nn.Module):
    def forward(self, x):
        return torch.linalg.svdvals(x.reshape(-1, 2, 2)).reshape(x.shape[0], -1)


class WithUnexportableOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.odd = _Svd()

    def forward(self, x):
        return self.odd(self.fc(x))


def test_an_op_the_runtime_cannot_run_names_the_op_and_the_layer(tmp_path):
    torch.manual_seed(0)
    model = WithUnexportableOp().eval()
    res = deploy(model, tmp_path, torch.randn(1, 4), forms=("onnx-fp32",), batch_sizes=(1,), runs=20, rounds=1)
    refused = res.form("onnx-fp32").refused
    assert "op 'linalg_svdvals'" in refused and "layer 'odd'" in refused and res.chosen == "torch"
    with pytest.raises(ModelError, match=r"op 'linalg_svdvals', called by layer 'odd'"):
        deploy(model, tmp_path, torch.randn(1, 4), forms=("onnx-fp32",), batch_sizes=(1,), runs=20, rounds=1, strict=True)
    out = model(torch.randn(3, 4))  # the hooks used to find the layer are gone: the model still runs as before
    assert out.shape == (3, 2)
