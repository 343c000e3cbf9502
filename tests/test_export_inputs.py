"""Export of the user's own models: BatchNorm folded on the int8 path (zoo CNNs and a torchvision-style
ResNet-18), layers forward never calls, token-id / several / keyword inputs, tuple and dict outputs,
dynamic sequence length, nn.MultiheadAttention."""

import copy

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from benchmarks._archs import BasicBlock, TorchvisionResNet18
from netshrink.data import load_dataset
from netshrink.errors import ModelError
from netshrink.export import export_onnx, ort_error_rate, ort_latency, ort_predict, ort_session
from netshrink.metrics import error_rate
from netshrink.models import build_model
from netshrink.quantize import Int8Config, quantize_
from netshrink.task import Inputs


def ResNet18(w=8, in_channels=1, num_classes=10):
    """torchvision's resnet18 layout at a first-stage width of ``w`` (benchmarks/_archs.py)."""
    return TorchvisionResNet18(in_channels, num_classes, w)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _fit(m, digits, epochs=6, seed=0):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(m.parameters(), lr=0.01)
    xs, ys = digits.train.tensors
    m.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xs)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(m(xs[idx]), ys[idx]).backward()
            opt.step()
    return m.eval()


@pytest.mark.parametrize("make", [
    lambda: build_model("resnet_small", widths=[8, 16, 16]),
    lambda: build_model("mobilenet_small", widths=[8, 16, 16, 16]),
    lambda: ResNet18(w=8),
], ids=["resnet_small", "mobilenet_small", "resnet18"])
def test_bn_cnns_export_to_int8_and_match_the_simulated_model(tmp_path, digits, make):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = _fit(make(), digits, epochs=3)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    q = copy.deepcopy(model)
    res = quantize_(q, Int8Config(calibration_samples=256), data=digits)
    assert len(res.bn_folded) == n_bn and not res.bn_kept
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())
    exp = export_onnx(q, tmp_path / "q.onnx", (1, 8, 8), int8=True)
    assert "BatchNormalization" not in exp.ops and set(exp.quantized) == set(res.bits)
    s = ort_session(exp.path, threads=1)
    sim, ort_err = error_rate(q, digits.test), ort_error_rate(s, digits.test)
    n = len(digits.test)
    assert abs(sim - ort_err) * n <= 1 + 1e-6, (sim, ort_err)  # at most one of the test digits flips
    assert sim <= error_rate(model, digits.test) + 0.03
    x = digits.test.tensors[0]
    logits = q(x).detach().numpy()
    got = ort_predict(s, x)
    assert (got.argmax(1) != logits.argmax(1)).sum() <= 1
    assert np.abs(got - logits).max() <= 0.05 * np.abs(logits).max()
    # convs that feed a residual Add cannot become QLinearConv: with float_unfused they keep float weights
    fl = export_onnx(q, tmp_path / "f.onnx", (1, 8, 8), int8=True, float_unfused=True)
    residual = any(isinstance(m, BasicBlock) for m in model.modules()) or hasattr(model, "stages")
    assert (not residual or fl.float_weights) and not set(fl.float_weights) & set(fl.quantized)
    assert set(fl.float_weights) | set(fl.quantized) == set(exp.quantized)
    got_f = ort_predict(ort_session(fl.path, threads=1), x)
    assert (got_f.argmax(1) != logits.argmax(1)).sum() <= 1


def test_fold_keeps_a_bn_that_follows_no_layer_and_a_shared_output(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.bn_in = nn.BatchNorm2d(1)  # reads the input: nothing to fold into
            self.bn = nn.BatchNorm2d(4)  # follows conv, but conv's output is also added below
            self.fc = nn.Linear(4 * 8 * 8, 3)

        def forward(self, x):
            y = self.conv(self.bn_in(x))
            return self.fc(torch.flatten(self.bn(y) + y, 1))

    torch.manual_seed(0)
    net = Net().eval()
    for bn in (net.bn_in, net.bn):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(32, 1, 8, 8)
    ref = net(x)
    res = quantize_(net, Int8Config(), data=x)
    assert res.bn_folded == {} and set(res.bn_kept) == {"bn_in", "bn"}
    assert "input of a Conv/Linear" in res.bn_kept["bn_in"] or "not the output" in res.bn_kept["bn_in"]
    assert "used elsewhere" in res.bn_kept["bn"]
    assert (net(x) - ref).abs().max() <= 0.05 * ref.abs().max()
    exp = export_onnx(net, tmp_path / "q.onnx", (1, 8, 8), int8=True)
    assert exp.ops.get("BatchNormalization", 0) == 2 and set(exp.quantized) == {"conv", "fc"}


def test_an_already_quantized_model_with_unfolded_bn_is_one_clear_error(tmp_path):
    torch.manual_seed(0)
    net = build_model("resnet_small", widths=[4, 4, 4]).eval()
    quantize_(net, Int8Config(fold_bn=False), data=torch.rand(16, 1, 8, 8))
    with pytest.raises(ModelError, match="stem.conv.*fold_bn") as exc:
        export_onnx(net, tmp_path / "q.onnx", (1, 8, 8), int8=True)
    assert "\n" not in str(exc.value) and not (tmp_path / "q.onnx").exists()


class _Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.spare = nn.Linear(16, 32), nn.Linear(32, 4), nn.Linear(32, 32)
        self.norm = nn.LayerNorm(32)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.norm(self.fc1(x))))


def test_a_layer_forward_never_calls_is_skipped_not_fatal(tmp_path):
    torch.manual_seed(0)
    m = _Unused().eval()
    x = torch.randn(64, 16)
    q = copy.deepcopy(m)
    res = quantize_(q, Int8Config(), data=x)
    assert set(res.bits) == {"fc1", "fc2"} and "never called" in res.skipped["spare"]
    exp = export_onnx(q, tmp_path / "q.onnx", (16,), int8=True)
    assert exp.quantized == ["fc1", "fc2"]
    s = ort_session(exp.path, threads=1)
    np.testing.assert_allclose(ort_predict(s, x), q(x).detach().numpy(), atol=0.05 * float(q(x).detach().abs().max()))
    # calibrated by export itself: the same
    exp2 = export_onnx(m, tmp_path / "c.onnx", (16,), int8=True, calibration=x)
    assert exp2.quantized == ["fc1", "fc2"] and "never called" in exp2.skipped["spare"]


class _TokenModel(nn.Module):
    """Token ids + attention mask as keyword inputs; returns a dict with logits (a HF-style output)."""

    def __init__(self, vocab=50, dim=16, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids, attention_mask=None):
        h = torch.relu(self.proj(self.emb(input_ids)))
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1).to(h.dtype)
        return {"hidden": h, "logits": self.head(h)}


def test_token_ids_keyword_inputs_dict_output_and_dynamic_sequence(tmp_path):
    torch.manual_seed(0)
    m = _TokenModel().eval()
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    res = export_onnx(m, tmp_path / "t.onnx", {"input_ids": ids, "attention_mask": mask})
    assert res.input_names == ["input_ids", "attention_mask"]
    g = onnx.load(res.path).graph
    assert g.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert [d.dim_param for d in g.input[0].type.tensor_type.shape.dim] == ["batch", "sequence"]
    s = ort_session(res.path, threads=1)
    for b, t in ((1, 3), (5, 11)):  # other batch sizes and lengths than the example
        ids2, mask2 = torch.randint(0, 50, (b, t)), (torch.rand(b, t) > 0.3).long()
        want = m(ids2, attention_mask=mask2)["logits"].detach().numpy()
        got = ort_predict(s, Inputs((), {"input_ids": ids2, "attention_mask": mask2}))
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(ort_predict(s, {"input_ids": ids2.numpy(), "attention_mask": mask2.numpy()}), want, atol=1e-5, rtol=1e-5)
    lat = ort_latency(s, {"input_ids": ids, "attention_mask": mask}, batch_sizes=(1, 4), runs=20)
    assert set(lat) == {1, 4}
    # PTQ calibrates on dict batches through the task; export sees the embedding model's projections
    batches = [{"input_ids": torch.randint(0, 50, (8, 7)), "attention_mask": mask[:1].repeat(8, 1), "labels": torch.zeros(8, 7, dtype=torch.long)}
               for _ in range(4)]
    q = copy.deepcopy(m)
    r = quantize_(q, Int8Config(), data=batches)
    assert set(r.inputs) == {"proj", "head"}


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(6, 8), nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x, y):
        return self.out(torch.relu(self.a(x) + self.b(y))), x.sum()


def test_several_positional_inputs_tuple_output_int8(tmp_path):
    torch.manual_seed(0)
    m = _TwoInputs().eval()
    x, y = torch.randn(64, 6), torch.randn(64, 4)
    target = m(x, y)[0].argmax(1)
    data = [(x[i:i + 16], y[i:i + 16], target[i:i + 16]) for i in range(0, 64, 16)]
    res = export_onnx(m, tmp_path / "two.onnx", (x[:2], y[:2]), int8=True, calibration=data)
    assert res.input_names == ["input_0", "input_1"] and set(res.quantized) == {"a", "b", "out"}
    s = ort_session(res.path, threads=1)
    assert ort_error_rate(s, data) <= 0.1
    fp = export_onnx(m, tmp_path / "two_fp.onnx", (x[:2], y[:2]))
    np.testing.assert_allclose(ort_predict(ort_session(fp.path), (x, y)), m(x, y)[0].detach().numpy(), atol=1e-5)


class _MHAClassifier(nn.Module):
    def __init__(self, dim=16, heads=4, classes=3):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        h = self.norm(x + self.attn(x, x, x, need_weights=False)[0])
        return self.head(h.mean(1))


def test_multihead_attention_exports_to_fp32_onnx(tmp_path):
    torch.manual_seed(0)
    m = _MHAClassifier().eval()
    x = torch.randn(3, 5, 16)
    res = export_onnx(m, tmp_path / "mha.onnx", x)
    s = ort_session(res.path, threads=1)
    with torch.no_grad():
        want = m(x).numpy()
    np.testing.assert_allclose(ort_predict(s, x), want, atol=1e-5, rtol=1e-4)
    assert torch.backends.mha.get_fastpath_enabled()  # restored after the export


def test_multihead_attention_int8_ptq_sees_every_projection(tmp_path):
    torch.manual_seed(0)
    m = _MHAClassifier().eval()
    x = torch.randn(64, 5, 16)
    ref = m(x)
    Int8Config(layers=["attn.q_proj", "head"]).check_model(m)  # names after conversion are valid up front
    q = copy.deepcopy(m)
    res = quantize_(q, Int8Config(), data=x)
    assert res.converted_attention == ["attn"] and not res.skipped
    assert {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "head"} <= set(res.inputs)
    assert (q(x) - ref).abs().max() <= 0.1 * ref.abs().max()
    # the converted, quantized model still exports to fp32 ONNX and runs
    res2 = export_onnx(q, tmp_path / "mha_q_fp.onnx", x[:2])
    np.testing.assert_allclose(ort_predict(ort_session(res2.path), x), m(x).detach().numpy(), atol=0.1 * float(ref.detach().abs().max()))
    # and to int8 QDQ: the projections on (batch, length, dim) inputs are MatMuls with transposed int8 weights
    res3 = export_onnx(q, tmp_path / "mha_q8.onnx", x[:2], int8=True)
    assert {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "head"} <= set(res3.quantized) == set(res3.act_quantized)
    sim = q(x).detach().numpy()
    got = ort_predict(ort_session(res3.path, threads=1), x)
    assert np.abs(got - sim).max() <= 0.02 * np.abs(sim).max()


def test_dynamic_axes_given_by_the_user(tmp_path):
    torch.manual_seed(0)
    m = _MHAClassifier().eval()
    res = export_onnx(m, tmp_path / "mha.onnx", torch.randn(2, 5, 16), dynamic_axes={"input": {0: "batch", 1: "sequence"}, "output": {0: "batch"}})
    s = ort_session(res.path, threads=1)
    x = torch.randn(4, 9, 16)  # a length the example did not have
    np.testing.assert_allclose(ort_predict(s, x), m(x).detach().numpy(), atol=1e-5, rtol=1e-4)
    from netshrink.errors import ConfigError

    with pytest.raises(ConfigError, match="dynamic_axes.nope"):
        export_onnx(m, tmp_path / "bad.onnx", torch.randn(2, 5, 16), dynamic_axes={"nope": {0: "b"}})
    assert not (tmp_path / "bad.onnx").exists()


def test_example_inputs_the_model_rejects_are_one_line(tmp_path):
    m = _TwoInputs().eval()
    with pytest.raises(ModelError, match="rejects the example inputs") as exc:
        export_onnx(m, tmp_path / "x.onnx", torch.randn(2, 6))  # forward needs two inputs
    assert "\n" not in str(exc.value) and not (tmp_path / "x.onnx").exists()


class Conv1D(nn.Module):
    """The layer GPT-2 uses (transformers' ``Conv1D``): ``y = x W + b`` with ``W`` of shape (in, out)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        shape = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(shape)


def test_gpt2_conv1d_layers_are_quantized_per_output_channel_and_export(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(Conv1D(24, 12), nn.GELU(), Conv1D(5, 24)).eval()
    x = torch.randn(64, 7, 12)
    ref = m(x).detach()
    q = copy.deepcopy(m)
    res = quantize_(q, Int8Config(), data=x)
    assert set(res.bits) == {"0", "2"} and set(res.inputs) == {"0", "2"}
    wq = q[0].parametrizations.weight[0]
    assert wq.axis == 1 and wq.scale.shape == (24,)  # one scale per output channel (axis 1 of an (in, out) weight)
    assert (q(x) - ref).abs().max() <= 0.05 * ref.abs().max()
    exp = export_onnx(q, tmp_path / "c1d.onnx", x[:2], int8=True)
    assert set(exp.quantized) == {"0", "2"}
    sim = q(x).detach().numpy()
    assert np.abs(ort_predict(ort_session(exp.path, threads=1), x) - sim).max() <= 0.02 * np.abs(sim).max()
