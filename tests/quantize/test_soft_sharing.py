import math

import pytest
import torch
from torch import nn

from netshrink.data import digits
from netshrink.errors import ConfigError, ModelError
from netshrink.metrics import error_rate
from netshrink.models import build_model
from netshrink.prune import MagnitudeConfig, get_mask, prune_
from netshrink.quantize import KMeansConfig, get_sharing, quantize_
from netshrink.quantize.soft_sharing import (
    Mixture,
    SoftSharingConfig,
    gaussian_kl,
    merge_components,
    mixture_log_prob,
    quantize_to_mixture_,
)
from netshrink.train import TrainConfig, Trainer
from tests._digits_mlp import digits_mlp, trained_digits_mlp

SWS_TRAIN = {"epochs": 10, "optimizer": "adam", "lr": 2e-3, "batch_size": 64, "progress": False, "device": "cpu"}


@pytest.fixture(scope="module")
def trained():
    return trained_digits_mlp()


_model = digits_mlp


def test_mixture_log_prob_matches_the_densities():
    w = torch.tensor([0.0, 0.3, -1.0])
    means, var, pi = torch.tensor([0.0, 0.5]), torch.tensor([0.01, 0.04]), torch.tensor([0.9, 0.1])
    got = mixture_log_prob(w, means, torch.log(var), torch.log(pi))
    dens = sum(p * torch.exp(-((w - m) ** 2) / (2 * v)) / torch.sqrt(2 * math.pi * v) for m, v, p in zip(means, var, pi))
    torch.testing.assert_close(got, torch.log(dens), rtol=1e-5, atol=1e-6)


def test_gaussian_kl_known_values():
    assert gaussian_kl(0.0, 1.0, 0.0, 1.0) == 0.0
    assert gaussian_kl(1.0, 1.0, 0.0, 1.0) == pytest.approx(0.5)
    assert gaussian_kl(0.0, 1.0, 0.0, 4.0) == pytest.approx(math.log(2) + 1 / 8 - 0.5)


def test_merging_joins_close_components_and_keeps_the_zero_mean():
    mix = Mixture(means=[0.0, 0.001, 0.5, 0.51, -0.5], variances=[1e-4] * 5, mixing=[0.9, 0.02, 0.03, 0.01, 0.04])
    merged = merge_components(mix, threshold=2.0)
    assert len(merged.means) == 3
    assert merged.means[0] == 0.0 and merged.mixing[0] == pytest.approx(0.92)
    # the two components near 0.5 merge into their proportion-weighted mean
    i = min(range(3), key=lambda k: abs(merged.means[k] - 0.5))
    assert merged.means[i] == pytest.approx((0.03 * 0.5 + 0.01 * 0.51) / 0.04)
    assert sum(merged.mixing) == pytest.approx(1.0)
    assert merge_components(mix, threshold=0.0).means == mix.means


def test_quantize_assigns_each_weight_to_its_most_responsible_mean():
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.001, 0.48, -0.52, 0.2], [0.0, 0.55, -0.01, -0.45]]))
    mix = Mixture(means=[0.0, 0.5, -0.5], variances=[1e-3, 1e-3, 1e-3], mixing=[0.8, 0.1, 0.1])
    clusters, sparsity = quantize_to_mixture_({"lin": lin}, mix)
    want = torch.tensor([[0.0, 0.5, -0.5, 0.5], [0.0, 0.5, 0.0, -0.5]])
    # equal variances: the responsibility follows log pi - d^2 / (2 var), so 0.2 goes to 0
    # (log 0.8 - 20 against log 0.1 - 45)
    want[0, 3] = 0.0
    torch.testing.assert_close(lin.weight, want)
    assert clusters == {"lin": 2} and sparsity["lin"] == pytest.approx(4 / 8)
    assert get_sharing(lin) is not None and torch.equal(get_mask(lin), want != 0)


def test_retraining_clusters_prunes_and_packs(trained, tmp_path):
    from netshrink.pack import load, pack

    splits, state = trained
    model = _model(state)
    base = error_rate(model, splits.val)
    # a small MLP on 1,200 digits: a weaker zero component and faster prior learning rates than the
    # paper's LeNet settings, so that 10 short epochs cluster the weights
    cfg = SoftSharingConfig(components=9, zero_mixing=0.9, tau=0.5, means_lr=1e-3, variance_lr=3e-2, mixing_lr=3e-2, train=SWS_TRAIN)
    res = quantize_(model, cfg, data=splits)
    assert len(res.val_errors) == SWS_TRAIN["epochs"]
    assert len(res.merged.means) <= 9 and res.merged.means[0] == 0.0
    # every layer's weights take at most as many non-zero values as there are merged components
    for name, m in (("fc1", model.fc1), ("fc2", model.fc2), ("fc3", model.fc3)):
        values = torch.unique(m.weight.detach())
        assert len(values[values != 0]) == res.clusters[name] <= len(res.merged.means) - 1
        assert float((m.weight == 0).float().mean()) == pytest.approx(res.sparsity[name])
    # the zero component takes a large share of the weights, and the model still works
    assert sum(res.sparsity.values()) / 3 > 0.5
    assert error_rate(model, splits.val) < base + 0.08
    # stored through the codebook machinery: the .nsk round trip is exact and smaller than fp32
    x = splits.val[0][0].unsqueeze(0)
    info = pack(model, tmp_path / "m.nsk", coding="huffman")
    back = load(tmp_path / "m.nsk").eval()
    with torch.no_grad():
        assert torch.equal(back(x), model.eval()(x))
    assert info.total_bytes < sum(p.numel() for p in model.parameters()) * 4 / 5


def test_keeps_an_earlier_pruning_mask(trained):
    splits, state = trained
    model = _model(state)
    prune_(model, MagnitudeConfig(sparsity=0.5), data=splits)
    before = get_mask(model.fc1).clone()
    quantize_(model, SoftSharingConfig(components=5, train={**SWS_TRAIN, "epochs": 1}), data=splits)
    after = get_mask(model.fc1)
    assert not torch.any(after & ~before)  # nothing pruned comes back


def test_rejects_shared_layers_and_bad_configs(trained):
    splits, state = trained
    model = _model(state)
    quantize_(model, KMeansConfig(bits=3))
    with pytest.raises(ModelError, match="already weight-shared"):
        quantize_(model, SoftSharingConfig(train={**SWS_TRAIN, "epochs": 1}), data=splits)
    with pytest.raises(ConfigError, match="zero_mixing"):
        SoftSharingConfig(zero_mixing=1.0)
    with pytest.raises(ConfigError, match="gamma"):
        SoftSharingConfig(gamma=[1.0])
    with pytest.raises(ConfigError, match="weight_decay"):
        SoftSharingConfig(train={"weight_decay": 0.1})
    with pytest.raises(ConfigError, match="data"):
        quantize_(_model(state), SoftSharingConfig(), data=None)


def test_pruned_weights_count_as_zeros_under_the_prior():
    from netshrink.prune import apply_mask
    from netshrink.quantize.soft_sharing import GaussianMixturePrior, PriorLoss

    torch.manual_seed(0)
    a, b = nn.Linear(6, 5), nn.Linear(6, 5)
    keep = torch.rand(5, 6) > 0.5
    with torch.no_grad():
        b.weight.copy_(torch.where(keep, a.weight, torch.zeros(())))
    apply_mask(a, keep)  # a: masked; b: the same effective weights, unmasked
    prior = GaussianMixturePrior(5, 0.9, -0.4, 0.4, 0.05)
    cfg = SoftSharingConfig()
    masked, plain = PriorLoss(prior, {"a": a}, cfg, 10), PriorLoss(prior, {"b": b}, cfg, 10)
    assert masked.n_pruned == int((~keep).sum()) and plain.n_pruned == 0
    torch.testing.assert_close(masked.complexity(), plain.complexity(), rtol=1e-5, atol=1e-4)
