import math

import pytest
import torch
from torch import nn

from netshrink.data import digits
from netshrink.errors import ConfigError
from netshrink.metrics import error_rate
from netshrink.models import build_model
from netshrink.prune import get_mask, prune_
from netshrink.prune.variational_dropout import (
    K1,
    VariationalDropoutConfig,
    VariationalLayer,
    kl_approx,
    log_alpha,
    unwrap_,
    wrap_,
)
from netshrink.train import TrainConfig, Trainer
from tests._digits_mlp import digits_mlp, trained_digits_mlp

VD_TRAIN = {"epochs": 6, "optimizer": "adam", "lr": 3e-3, "batch_size": 64, "progress": False, "device": "cpu"}


@pytest.fixture(scope="module")
def trained():
    return trained_digits_mlp()


_model = digits_mlp


def test_kl_approximation_matches_the_paper_fit():
    la = torch.tensor([-8.0, -2.0, 0.0, 3.0, 8.0])
    kl = kl_approx(la)
    # the paper's eq. 14 written out
    want = -(K1 * torch.sigmoid(1.87320 + 1.48695 * la) - 0.5 * torch.log1p(torch.exp(-la)) - K1)
    torch.testing.assert_close(kl, want, rtol=1e-6, atol=1e-6)
    # decreasing in log alpha, near zero for pure-noise weights, about -0.5 log alpha for tiny alpha
    assert torch.all(kl[1:] < kl[:-1])
    assert kl[-1] < 0.01 and kl[-1] > -0.01
    assert kl[0] == pytest.approx(0.5 * 8.0 + K1 - K1 * float(torch.sigmoid(torch.tensor(1.8732 - 1.48695 * 8))), rel=1e-3)


def test_log_alpha_is_log_sigma2_minus_log_theta2():
    theta = torch.tensor([0.5, -0.1, 2.0])
    ls2 = torch.tensor([-4.0, -1.0, 0.0])
    torch.testing.assert_close(log_alpha(theta, ls2), ls2 - torch.log(theta**2 + 1e-8))


def test_local_reparameterization_has_the_right_mean_and_variance():
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    v = VariationalLayer(lin, init_log_sigma2=-2.0, threshold=3.0).train()
    x = torch.randn(1, 5).repeat(20000, 1)
    with torch.no_grad():
        out = v(x)
    mean = lin(x[:1])[0]
    var = (x[0] ** 2) @ torch.exp(v.log_sigma2).T
    torch.testing.assert_close(out.mean(0), mean, atol=0.02, rtol=0)
    torch.testing.assert_close(out.var(0), var, rtol=0.05, atol=0)


def test_eval_mode_drops_the_noisy_weights():
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.01, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]))
    v = VariationalLayer(lin, init_log_sigma2=-6.0, threshold=3.0).eval()
    # log alpha of 0.01 is -6 - log(1e-4) = 3.2 > 3: dropped; the others are at -6
    x = torch.ones(1, 4)
    torch.testing.assert_close(v(x), torch.tensor([[3.0, 4.0]]))


def test_conv_layers_are_wrapped_and_unwrapped():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    wrapped = wrap_(model, VariationalDropoutConfig())
    assert set(wrapped) == {"0", "3"} and isinstance(model[0], VariationalLayer)
    out = model.train()(torch.randn(2, 1, 6, 6))
    assert out.shape == (2, 3)
    with torch.no_grad():
        wrapped["0"].log_sigma2.fill_(5.0)  # all of conv weights are noise now
        want = wrapped["3"].log_alpha() <= 3.0  # the linear layer keeps all but its tiniest weights
    unwrap_(model, wrapped)
    assert isinstance(model[0], nn.Conv2d) and isinstance(model[3], nn.Linear)
    assert float((model[0].weight != 0).sum()) == 0.0
    assert torch.equal(get_mask(model[3]), want) and want.float().mean() > 0.95


def test_training_sparsifies_and_keeps_accuracy(trained):
    splits, state = trained
    model = _model(state)
    base = error_rate(model, splits.val)
    cfg = VariationalDropoutConfig(kl_weight=1.0, anneal_epochs=2, train=VD_TRAIN)
    res = prune_(model, cfg, data=splits)
    assert set(res.sparsity) == {"fc1", "fc2", "fc3"}
    # the first layer (64 pixel inputs, many useless) sparsifies strongly
    assert res.sparsity["fc1"] > 0.5
    assert res.overall > 0.4
    assert res.kl_per_weight >= -0.01 and math.isfinite(res.kl_per_weight)
    assert len(res.val_errors) == VD_TRAIN["epochs"]
    # plain modules back, masked; the model still classifies
    assert isinstance(model.fc1, nn.Linear) and not isinstance(model.fc1, VariationalLayer) and get_mask(model.fc1) is not None
    assert float((model.fc1.weight == 0).float().mean()) == pytest.approx(res.sparsity["fc1"])
    assert error_rate(model, splits.val) < base + 0.05


def test_no_kl_prunes_far_less(trained):
    splits, state = trained
    model = _model(state)
    res = prune_(model, VariationalDropoutConfig(kl_weight=0.0, train={**VD_TRAIN, "epochs": 2}), data=splits)
    assert res.overall < 0.2


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="threshold"):
        VariationalDropoutConfig(threshold=20.0)
    with pytest.raises(ConfigError, match="weight_decay"):
        VariationalDropoutConfig(train={"epochs": 1, "weight_decay": 1e-4})
    with pytest.raises(ConfigError, match="kl_weight"):
        VariationalDropoutConfig(kl_weight=-1.0)
    with pytest.raises(ConfigError, match="data"):
        prune_(nn.Sequential(nn.Linear(2, 2)), VariationalDropoutConfig(), data=None)


def test_recipe_names_the_method():
    from netshrink.recipe import parse_recipe

    r = parse_recipe({"model": "mlp", "model_args": {"in_features": 64, "hidden": [8]}, "data": "digits",
                      "stages": [{"method": "variational_dropout", "threshold": 2.5, "train": {"epochs": 1, "optimizer": "adam"}}]})
    assert isinstance(r.stages[0].config, VariationalDropoutConfig) and r.stages[0].config.threshold == 2.5


def test_a_recipe_runs_variational_dropout_then_soft_sharing_and_packs(digits_recipe, tmp_path):
    """VD prunes, soft sharing quantizes the survivors, Huffman codes them: the packed file is exact."""
    from netshrink.pack import load
    from netshrink.pipeline import run_recipe
    from netshrink.recipe import parse_recipe

    ft = {"epochs": 1, "lr": 0.01, "batch_size": 32, "progress": False}
    digits_recipe["stages"] = [
        {"method": "variational_dropout", "kl_weight": 1.0, "anneal_epochs": 1, "train": {**VD_TRAIN, "epochs": 3}, "finetune": ft},
        {"method": "soft_sharing", "components": 9, "zero_mixing": 0.9, "tau": 0.5, "means_lr": 1e-3, "variance_lr": 3e-2,
         "mixing_lr": 3e-2, "train": {"epochs": 3, "optimizer": "adam", "lr": 2e-3, "batch_size": 64, "progress": False}},
        {"method": "huffman"},
    ]
    res = run_recipe(parse_recipe(digits_recipe), tmp_path / "out", progress=False)
    base, vd, sws, final = res.rows
    assert vd.nonzeros < 0.7 * base.nonzeros and sws.nonzeros <= vd.nonzeros
    assert sws.bytes < vd.bytes < base.bytes and final.bytes < base.bytes / 4  # (Huffman tables cost more than they save on 4k weights)
    loaded = load(res.model_path).eval()
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), res.model.eval()(x))
