import copy
import io

import pytest
import torch
from torch import nn

from netshrink.errors import ConfigError, ModelError
from netshrink.models import build_model
from netshrink.prune import MagnitudeConfig, SparseLinear, prune_, sparsify_linear_


def _sparse_linear(n_in=300, n_out=100, sparsity=0.95, seed=0, bias=True):
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=bias)
    prune_(nn.Sequential(lin), MagnitudeConfig(sparsity=sparsity))
    return lin


@pytest.mark.parametrize("shape", [(1, 300), (64, 300), (2, 5, 300)])
@pytest.mark.parametrize("bias", [True, False])
def test_csr_layer_gives_the_masked_layers_outputs(shape, bias):
    lin = _sparse_linear(bias=bias)
    sp = SparseLinear.from_linear(lin)
    assert sp.nnz == int(torch.count_nonzero(lin.weight)) == 1500
    assert torch.equal(sp.to_dense_weight(), lin.weight.detach())
    x = torch.randn(*shape)
    with torch.no_grad():
        assert (sp(x) - lin(x)).abs().max() <= 1e-5
    assert sp(x).shape == (*shape[:-1], 100)


def test_empty_rows_and_an_all_zero_weight():
    w = torch.zeros(4, 6)
    w[1, 2], w[3, 0] = 2.0, -1.0
    sp = SparseLinear(w, torch.arange(4.0))
    x = torch.randn(3, 6)
    torch.testing.assert_close(sp(x), x @ w.T + torch.arange(4.0))
    zero = SparseLinear(torch.zeros(3, 2))
    assert zero.nnz == 0 and torch.equal(zero(torch.randn(5, 2)), torch.zeros(5, 3))


def test_sparsify_swaps_only_the_sparse_linear_layers_of_a_model():
    torch.manual_seed(0)
    model = build_model("lenet_300_100")
    prune_(model, MagnitudeConfig(layer_sparsity={"fc1": 0.96, "fc2": 0.9, "fc3": 0.5}))
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
    replaced = sparsify_linear_(model, min_sparsity=0.9)
    assert set(replaced) == {"fc1", "fc2"} and replaced["fc1"] == pytest.approx(0.04, abs=1e-4)
    assert isinstance(model.fc1, SparseLinear) and isinstance(model.fc3, nn.Linear)
    with torch.no_grad():
        assert (model(x) - ref).abs().max() <= 1e-5


def test_a_sparse_model_copies_and_round_trips_its_state():
    model = nn.Sequential(_sparse_linear(), nn.ReLU(), nn.Linear(100, 10))
    sparsify_linear_(model, 0.9)
    twin = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        fresh[0].values.zero_()
        fresh[0].bias.zero_()
    fresh.load_state_dict(torch.load(buf, weights_only=True))  # plain tensors: no pickled code
    x = torch.randn(4, 300)
    with torch.no_grad():
        assert torch.equal(twin(x), model(x)) and torch.equal(fresh(x), model(x))


def test_bad_input():
    with pytest.raises(ConfigError) as ei:
        sparsify_linear_(nn.Sequential(nn.Linear(2, 2)), min_sparsity=1.5)
    assert ei.value.field == "min_sparsity"
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2))
    with pytest.raises(ModelError, match="'0' is a Conv2d"):
        sparsify_linear_(net, 0.5, layers=["0"])
    assert sparsify_linear_(net, 0.5) == {}  # unnamed convolutions are skipped; a dense Linear stays
    with pytest.raises(ModelError, match="expects 300 input features"):
        SparseLinear.from_linear(_sparse_linear())(torch.randn(2, 299))
