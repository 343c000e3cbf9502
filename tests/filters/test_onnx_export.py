"""Every new module type exports to ONNX and runs in onnxruntime with the same outputs."""

import io
import warnings

import pytest
import torch

from netshrink.filters import CReLUConv2d, DepthwiseSeparableConv2d, EquivariantConv2d
from netshrink.matrices import CirculantLinear, HashedLinear, ToeplitzLinear

ort = pytest.importorskip("onnxruntime")


@pytest.mark.parametrize(
    "module,shape",
    [
        (lambda: CirculantLinear(12, 8, 4, signs=True), (2, 12)),
        (lambda: ToeplitzLinear(12, 8), (2, 12)),
        (lambda: HashedLinear(12, 8, 20), (2, 12)),
        (lambda: CReLUConv2d(3, 8, 3, padding=1), (2, 3, 6, 6)),
        (lambda: EquivariantConv2d(3, 8, 3, padding=1, group="p4m"), (2, 3, 6, 6)),
        (lambda: DepthwiseSeparableConv2d(3, 8, 3, padding=1, multiplier=2), (2, 3, 6, 6)),
    ],
)
def test_module_exports_to_onnx(module, shape):
    torch.manual_seed(0)
    m = module().eval()
    x = torch.randn(*shape)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (x,), buf, opset_version=17, dynamo=False)
    sess = ort.InferenceSession(buf.getvalue())
    y = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(y), m(x), rtol=1e-5, atol=1e-5)
