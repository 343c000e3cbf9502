"""Circulant, Toeplitz and hashed Linear layers: the fast path equals the explicit matrix, O(n) storage,
least-squares init, exact pack round trip, clear errors."""

import pytest
import torch
from torch import nn

from netshrink._registry import config_type
from netshrink.errors import ConfigError, ModelError
from netshrink.lowrank._common import module_params
from netshrink.matrices import (
    CirculantConfig,
    CirculantLinear,
    HashedConfig,
    HashedLinear,
    ToeplitzConfig,
    ToeplitzLinear,
    circulant_matrix,
    circulant_project,
    structure_,
    toeplitz_matrix,
)
from netshrink.matrices.structured import hash32
from netshrink.models import build_model
from netshrink.pack import load, pack


def test_circulant_fft_equals_explicit_dense_matmul():
    torch.manual_seed(0)
    c = torch.randn(7, dtype=torch.float64)
    explicit = circulant_matrix(c)
    assert explicit[2, 0] == c[2] and explicit[0, 1] == c[6]  # C[i, j] = c[(i - j) mod n]
    layer = CirculantLinear(7, 7, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(c.reshape(1, 1, 7))
    x = torch.randn(5, 7, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ explicit.T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape,block", [((5, 12), 5), ((12, 5), 5), ((9, 9), 4), ((3, 10), 10)])
@pytest.mark.parametrize("signs", [False, True])
def test_block_circulant_matches_its_dense_weight(shape, block, signs):
    torch.manual_seed(1)
    n_out, n_in = shape
    layer = CirculantLinear(n_in, n_out, block, signs=signs, seed=3).double()
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(4, n_in, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ layer.dense_weight().T + layer.bias, rtol=1e-10, atol=1e-10)


def test_circulant_storage_is_linear_in_width():
    for n in (64, 256, 1024):
        layer = CirculantLinear(n, n)
        assert module_params(layer) == 2 * n  # n circulant entries + n biases
    assert module_params(CirculantLinear(784, 300)) == 3 * 300 + 300  # ceil(784/300) blocks of 300


def test_circulant_projection_is_least_squares():
    torch.manual_seed(2)
    w = torch.randn(6, 6, dtype=torch.float64)
    c = circulant_project(w, 6)
    # the fit of a circulant matrix is itself; the residual is orthogonal to every circulant matrix
    torch.testing.assert_close(circulant_project(circulant_matrix(c[0, 0]), 6), c)
    resid = w - circulant_matrix(c[0, 0])
    for k in range(6):
        basis = circulant_matrix(torch.eye(6, dtype=torch.float64)[k])
        assert abs(float((resid * basis).sum())) < 1e-10


def test_toeplitz_fft_equals_explicit_and_projects_a_toeplitz_exactly():
    torch.manual_seed(3)
    for n_out, n_in in ((4, 9), (9, 4), (1, 1), (6, 6)):
        layer = ToeplitzLinear(n_in, n_out).double()
        x = torch.randn(3, n_in, dtype=torch.float64)
        dense = toeplitz_matrix(layer.weight, n_out, n_in)
        torch.testing.assert_close(layer(x), x @ dense.T + layer.bias, rtol=1e-10, atol=1e-10)
        assert module_params(layer) == n_out + n_in - 1 + n_out
        other = ToeplitzLinear(n_in, n_out).double().set_from_dense(dense.detach())
        torch.testing.assert_close(other.weight, layer.weight)


def test_hash_is_deterministic_and_spreads():
    keys = torch.arange(10000, dtype=torch.int64)
    assert torch.equal(hash32(keys, 7), hash32(keys, 7))
    assert not torch.equal(hash32(keys, 7), hash32(keys, 8))
    counts = torch.bincount(hash32(keys, 7) % 10, minlength=10)
    assert counts.min() > 850 and counts.max() < 1150
    assert int(hash32(torch.tensor([12345]), 0)) == int(hash32(torch.tensor([12345]), 0))


def test_hashed_layer_shares_weights_and_trains():
    torch.manual_seed(4)
    layer = HashedLinear(20, 10, buckets=16, seed=5)
    assert module_params(layer) == 16 + 10
    v = layer.dense_weight()
    idx, signs = layer.index, layer.signs
    assert torch.equal(v, layer.weight[idx] * signs)
    assert set(idx.unique().tolist()) <= set(range(16))
    x = torch.randn(8, 20)
    torch.testing.assert_close(layer(x), x @ v.T + layer.bias)
    layer(x).sum().backward()
    # the gradient of a bucket is the signed sum of its virtual weights' gradients
    grad_v = x.sum(0)[None, :].expand(10, 20) * signs
    want = torch.zeros(16).index_add_(0, idx.flatten(), grad_v.flatten())
    torch.testing.assert_close(layer.weight.grad, want)
    # the same seed rebuilds the same hash; another seed does not
    assert torch.equal(HashedLinear(20, 10, 16, seed=5).index, idx)
    assert not torch.equal(HashedLinear(20, 10, 16, seed=6).index, idx)


@pytest.mark.parametrize(
    "config,kind",
    [(CirculantConfig(), CirculantLinear), (CirculantConfig(block=50, signs=True), CirculantLinear),
     (ToeplitzConfig(), ToeplitzLinear), (HashedConfig(ratio=0.125), HashedLinear)],
)
def test_structure_lenet_packs_and_loads_exactly(tmp_path, config, kind):
    torch.manual_seed(0)
    model = build_model("lenet_300_100").eval()
    dense = sum(p.numel() for p in model.parameters())
    result = structure_(model, config)
    assert set(result.layers) == {"fc1", "fc2", "fc3"}
    assert all(isinstance(getattr(model, n), kind) for n in result.layers)
    assert result.params_after < dense / 4
    assert all(0 < s.rel_error < 1.0 for s in result.layers.values())
    x = torch.randn(3, 1, 28, 28)
    path = tmp_path / "m.nsk"
    pack(model, path)
    loaded = load(path).eval()
    assert loaded.netshrink_edits == model.netshrink_edits
    assert torch.equal(loaded(x), model(x))


def test_projection_keeps_the_dense_function_when_the_weight_is_structured():
    torch.manual_seed(5)
    lin = nn.Linear(8, 8)
    with torch.no_grad():
        lin.weight.copy_(circulant_matrix(torch.randn(8)))
    model = nn.Sequential(lin)
    x = torch.randn(4, 8)
    want = model(x)
    result = structure_(model, CirculantConfig())
    assert result.layers["0"].rel_error < 1e-6
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


def test_structured_model_fine_tunes():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(16, 16))
    structure_(model, CirculantConfig())
    teacher = CirculantLinear(16, 16)
    x = torch.randn(128, 16)
    with torch.no_grad():
        y = teacher(x)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


def test_bad_inputs_give_clear_errors():
    model = build_model("lenet5")
    with pytest.raises(ConfigError, match=r"layers\[0\].*'nope'"):
        structure_(model, CirculantConfig(layers=["nope"]))
    with pytest.raises(ConfigError, match=r"layers\[0\].*'conv1'.*not a Linear"):
        structure_(model, ToeplitzConfig(layers=["conv1"]))
    with pytest.raises(ConfigError, match="buckets.*exactly one"):
        HashedConfig()
    with pytest.raises(ConfigError, match="ratio"):
        HashedConfig(ratio=1.5)
    with pytest.raises(ConfigError, match="block"):
        CirculantConfig(block=0)
    with pytest.raises(ConfigError, match="buckets.*exceed.*'fc3'"):
        structure_(build_model("lenet_300_100"), HashedConfig(buckets=5000, layers=["fc3"]))
    with pytest.raises(ConfigError, match="block.*'fc3'"):
        structure_(build_model("lenet_300_100"), CirculantConfig(block=500, layers=["fc3"]))
    with pytest.raises(ModelError, match="block"):
        CirculantLinear(4, 4, block=0)
    with pytest.raises(ModelError, match="does not fit"):
        CirculantLinear(4, 4).set_from_dense(torch.randn(3, 4))
    assert config_type("circulant") is CirculantConfig and config_type("hashed") is HashedConfig


def test_recipe_runs_structured_and_compact_stages(digits_recipe, tmp_path):
    from netshrink.data import digits
    from netshrink.pipeline import run_recipe
    from netshrink.recipe import parse_recipe

    digits_recipe["train"]["epochs"] = 2
    ft = {"epochs": 1, "lr": 0.01, "batch_size": 32, "progress": False}
    digits_recipe["stages"] = [
        {"method": "circulant", "label": "circ", "layers": ["fc1"], "finetune": ft},
        {"method": "hashed", "label": "hash", "ratio": 0.25, "layers": ["fc2"]},
        {"method": "huffman"},
    ]
    recipe = parse_recipe(digits_recipe)
    res = run_recipe(recipe, tmp_path / "out", progress=False)
    assert [r.stage for r in res.rows][:3] == ["baseline", "circ", "hash"]
    assert res.rows[1].params < res.rows[0].params
    x = torch.stack([digits().test[i][0] for i in range(16)])
    res.model.eval()
    assert torch.equal(load(res.model_path)(x), res.model(x))
