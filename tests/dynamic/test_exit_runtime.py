"""Early exits in onnxruntime: the segmented runtime routes like EarlyExitNet.route and skips later stages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from netshrink.dynamic.early_exit import EarlyExitNet
from netshrink.dynamic.exit_runtime import export_exit_runtime
from netshrink.errors import ConfigError
from netshrink.models import build_model

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    backbone = build_model("mlp", in_features=64, hidden=[64, 64, 32], num_classes=10)
    names = [n for n, _ in backbone.named_children()]
    relus = [n for n in names if "relu" in n or "act" in n][:2]
    x = torch.randn(8, 64)
    return EarlyExitNet.from_sequential(backbone, relus, x).eval(), x


@pytest.mark.parametrize("thr", [0.0, 2.25, 1e9])
def test_runtime_routes_like_torch(net, tmp_path, thr):
    model, _ = net
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    rt = export_exit_runtime(model, tmp_path, x, thr)
    got = rt.run(x)
    want = model.route(x, thr)
    assert np.array_equal(got.exit_index, want.exit_index.numpy())
    assert np.allclose(got.logits, want.logits.numpy(), atol=1e-5)
    if thr == 0.0:
        assert (got.exit_index == model.num_exits - 1).all()
    if thr == 1e9:
        assert (got.exit_index == 0).all()


def test_mixed_exits_on_a_batch(net, tmp_path):
    model, _ = net
    x = torch.randn(200, 64, generator=torch.Generator().manual_seed(2))
    ent = [float(v) for v in torch.sort(model.route(x, 0.0).entropy).values]
    thr = ent[len(ent) // 2]  # about half leave at the first exit
    rt = export_exit_runtime(model, tmp_path, x, thr)
    got, want = rt.run(x), model.route(x, thr)
    assert 0 < (got.exit_index == 0).sum() < 200
    assert np.array_equal(got.exit_index, want.exit_index.numpy())
    assert np.allclose(got.logits, want.logits.numpy(), atol=1e-5)


def test_bad_thresholds(net, tmp_path):
    model, x = net
    with pytest.raises(ConfigError, match="thresholds"):
        export_exit_runtime(model, tmp_path, x, [-1.0] * len(model.heads))
