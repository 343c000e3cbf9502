import numpy as np
import pytest
import torch
from torch import nn

from netshrink.errors import ConfigError
from netshrink.prune import MagnitudeConfig, prune_
from netshrink.quantize import KMeansConfig, get_sharing, kmeans_1d, quantize_
from netshrink.quantize.kmeans import init_centroids


def test_kmeans_finds_well_separated_clusters():
    rng = np.random.default_rng(0)
    centers = np.array([-1.0, 0.2, 3.0])
    x = np.concatenate([c + 0.01 * rng.standard_normal(500) for c in centers])
    for init in ("linear", "density", "random"):
        book = kmeans_1d(x, 3, init, seed=1)
        assert np.allclose(np.sort(book.centroids), centers, atol=0.01), init
        assert np.all(np.abs(book.centroids[book.indices] - x) < 0.06)


def test_lloyd_never_increases_the_error_over_its_init():
    x = np.random.default_rng(1).standard_normal(5000)
    for init in ("linear", "density", "random"):
        c0 = np.sort(init_centroids(x, 16, init, seed=0))
        mse0 = np.mean((x - c0[np.abs(x[:, None] - c0[None]).argmin(1)]) ** 2)
        book = kmeans_1d(x, 16, init, seed=0)
        assert book.inertia / x.size <= mse0 + 1e-12


def test_init_methods_differ_as_the_paper_describes():
    x = np.random.default_rng(2).standard_normal(10000)
    lin = init_centroids(x, 8, "linear")
    dens = init_centroids(x, 8, "density")
    assert lin[0] == pytest.approx(x.min()) and lin[-1] == pytest.approx(x.max())
    assert np.all(np.diff(lin) > 0)
    assert abs(dens[0]) < abs(lin[0])  # density init crowds the centroids near the mode


def test_fewer_distinct_values_than_clusters_is_exact():
    x = np.array([0.5, -0.5, 0.5, 0.25])
    book = kmeans_1d(x, 32)
    assert np.array_equal(book.centroids[book.indices], x.astype(np.float32))


def test_sharing_a_pruned_layer_keeps_zeros_and_has_at_most_k_values():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 10))
    prune_(net, MagnitudeConfig(sparsity=0.7))
    zeros = net[0].weight.detach() == 0
    res = quantize_(net, KMeansConfig(bits=3, layer_bits={"2": 2}))
    w = net[0].weight.detach()
    assert torch.all(w[zeros] == 0)
    assert torch.unique(w[~zeros]).numel() <= 8
    assert torch.unique(net[2].weight.detach()[net[2].weight.detach() != 0]).numel() <= 4
    assert res.clusters == {"0": 8, "2": 4}


def test_centroid_gradient_is_the_sum_of_its_cluster_gradients():
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    quantize_(lin, KMeansConfig(bits=2))
    shared = get_sharing(lin)
    x = torch.randn(5, 6)
    # reference: gradient w.r.t. a dense copy of the effective weight, summed per cluster
    w = lin.weight.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x, w, lin.bias.detach()).pow(2).sum().backward()
    lin(x).pow(2).sum().backward()
    expected = torch.zeros(shared.codebook.numel()).index_add_(0, shared.indices.reshape(-1), w.grad.reshape(-1))
    assert torch.allclose(shared.codebook.grad, expected, atol=1e-5)


@pytest.mark.parametrize("args, field", [({"bits": 0}, "bits"), ({"bits": 17}, "bits"), ({"init": "kmeans++"}, "init"), ({"layer_bits": {"x": 40}}, "layer_bits.x")])
def test_bad_config_names_the_field(args, field):
    with pytest.raises(ConfigError) as ei:
        KMeansConfig.from_dict(args)
    assert ei.value.field == field
