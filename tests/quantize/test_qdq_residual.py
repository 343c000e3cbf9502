"""Quantized residual adds: onnxruntime runs the whole residual network in int8 (QLinearConv + QLinearAdd)."""

from __future__ import annotations

import collections
import copy

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from netshrink.data import load_dataset
from netshrink.export import export_onnx, ort_predict, ort_session
from netshrink.models import build_model
from netshrink.quantize import Int8Config, quantize_
from netshrink.quantize.qdq_residual import merge_duplicate_pairs, quantize_residual_adds, residual_points

ort = pytest.importorskip("onnxruntime")


def _fused_ops(proto, tmp_path) -> collections.Counter:
    src, dst = tmp_path / "in.onnx", tmp_path / "opt.onnx"
    onnx.save(proto, src)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(dst)
    opts.log_severity_level = 3
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(dst).graph.node)


@pytest.fixture(scope="module")
def int8_resnet(tmp_path_factory):
    torch.manual_seed(0)
    data = load_dataset("digits")
    model = build_model("resnet_small", widths=[8, 16, 16])
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    xs, ys = data.train.tensors
    for _ in range(3):
        for idx in torch.randperm(len(xs)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xs[idx]), ys[idx]).backward()
            opt.step()
    q = copy.deepcopy(model.eval())
    quantize_(q, Int8Config(calibration_samples=256), data=data)
    path = tmp_path_factory.mktemp("res") / "q.onnx"
    export_onnx(q, path, (1, 8, 8), int8=True, unsigned_weights=False)
    return onnx.load(path), data


def test_every_residual_add_runs_quantized_and_outputs_stay_close(int8_resnet, tmp_path):
    proto, data = int8_resnet
    before = _fused_ops(proto, tmp_path)
    assert before["Add"] + before["QLinearAdd"] == 0 or before["QLinearAdd"] < 3  # the export alone leaves float adds
    p = copy.deepcopy(proto)
    name = p.graph.input[0].name
    xs = data.train.tensors[0][:128].numpy()
    added = quantize_residual_adds(p, [{name: xs[i : i + 32]} for i in range(0, 128, 32)])
    assert added
    after = _fused_ops(p, tmp_path)
    assert after["QLinearAdd"] == 3 and after["Add"] == 0 and after["QLinearConv"] == 9
    assert after["Conv"] + after["FusedConv"] == 0  # no conv left in float
    x = data.test.tensors[0]
    onnx.save(proto, tmp_path / "a.onnx")
    onnx.save(p, tmp_path / "b.onnx")
    a = ort_predict(ort_session(tmp_path / "a.onnx", threads=1), x)
    b = ort_predict(ort_session(tmp_path / "b.onnx", threads=1), x)
    assert (a.argmax(1) != b.argmax(1)).mean() <= 0.01  # 8-bit residual sums flip at most 1% of the digits
    assert np.abs(a - b).max() <= 0.1 * np.abs(a).max()


def test_duplicate_pairs_merge_only_when_identical(int8_resnet):
    proto, _ = int8_resnet
    p = copy.deepcopy(proto)
    qs = collections.Counter(n.input[0] for n in p.graph.node if n.op_type == "QuantizeLinear")
    removed = merge_duplicate_pairs(p)
    qs_after = collections.Counter(n.input[0] for n in p.graph.node if n.op_type == "QuantizeLinear")
    assert removed == sum(qs.values()) - sum(qs_after.values())
    onnx.checker.check_model(p)


def test_a_graph_without_adds_is_left_alone():
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    proto = helper.make_model(g)
    assert residual_points(proto) == [] and quantize_residual_adds(proto, []) == []
