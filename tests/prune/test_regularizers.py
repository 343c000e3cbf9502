import math

import pytest
import torch

from netshrink.data import digits
from netshrink.errors import ConfigError
from netshrink.models import build_model
from netshrink.prune import biased_penalty, biased_weight_decay
from netshrink.train import TrainConfig, Trainer


def test_penalty_values_and_small_weight_gradient_match_l2():
    one = torch.tensor([1.0])
    assert float(biased_penalty(one)) == pytest.approx(0.5)  # Hanson & Pratt's w²/(1+w²) at w = 1
    assert float(biased_penalty(one, "exponential")) == pytest.approx(1 - math.exp(-1))
    assert float(biased_penalty(torch.tensor([100.0]), scale=0.5)) == pytest.approx(0.25, rel=1e-3)  # saturates at w₀²
    for kind in ("hyperbolic", "exponential"):
        w = torch.tensor([1e-3, -2e-3], requires_grad=True)
        (g,) = torch.autograd.grad(biased_penalty(w, kind, scale=0.3), w)
        torch.testing.assert_close(g, 2 * w.detach(), rtol=1e-3, atol=0)  # like L2 near zero
        w = torch.tensor([3.0], requires_grad=True)
        (g,) = torch.autograd.grad(biased_penalty(w, kind, scale=0.3), w)
        assert float(g) < 0.01 * 2 * 3.0  # large weights are left nearly free


def _train(extra, seed):
    splits = digits()
    torch.manual_seed(seed)
    model = build_model("mlp", in_features=64, hidden=[32])
    cfg = TrainConfig(epochs=5, lr=0.05, batch_size=32, seed=seed, progress=False, device="cpu")
    Trainer(model, cfg, extra_loss=extra).fit(splits.train)
    weights = [model.fc1.weight.detach(), model.fc2.weight.detach()]
    x, y = splits.val.tensors
    with torch.no_grad():
        err = float((model(x).argmax(1) != y).float().mean())
    return weights, err


def test_biased_decay_gives_more_near_zero_weights_than_l2_of_equal_strength():
    torch.set_num_threads(1)
    strength = 0.03

    def l2(model, x, y, logits):
        return strength * (model.fc1.weight.pow(2).sum() + model.fc2.weight.pow(2).sum())

    def near_zero(ws, tol):
        return sum(int((w.abs() < tol).sum()) for w in ws) / sum(w.numel() for w in ws)

    def near_zero_rel(ws):  # below 5% of the layer's largest weight
        return sum(int((w.abs() < 0.05 * w.abs().max()).sum()) for w in ws) / sum(w.numel() for w in ws)

    plain, err_plain = _train(l2, seed=0)
    biased, err_biased = _train(biased_weight_decay(strength, ["fc*"], scale=0.3), seed=0)
    assert near_zero(biased, 1e-2) > near_zero(plain, 1e-2) + 0.05
    assert near_zero_rel(biased) > near_zero_rel(plain) + 0.1
    assert err_biased <= err_plain  # the large weights the task needs are not shrunk


@pytest.mark.parametrize(
    "kwargs, field",
    [({"strength": -1.0}, "strength"), ({"strength": 1.0, "scale": 0.0}, "scale"), ({"strength": 1.0, "kind": "cubic"}, "kind")],
)
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as ei:
        biased_weight_decay(**kwargs)
    assert ei.value.field == field


def test_unknown_layer_is_a_config_error():
    model = build_model("mlp", in_features=64, hidden=[8])
    extra = biased_weight_decay(1e-3, ["fc9"])
    with pytest.raises(ConfigError, match="fc9"):
        extra(model, None, None, torch.zeros(()))
