import pytest
import torch

from netshrink._modules import apply_edits
from netshrink.data import digits
from netshrink.errors import ConfigError
from netshrink.models import build_model
from netshrink.prune import MergeConfig, MergePlan, apply_mask, get_mask, merge_linear_pair, plan_merges, prune_
from netshrink.prune.importance import merge_saliency
from netshrink.prune.merge import MergedLinear, incoming_vectors
from netshrink.train import TrainConfig, Trainer


def _mlp(hidden=(10,), seed=0):
    torch.manual_seed(seed)
    return build_model("mlp", in_features=6, hidden=list(hidden), num_classes=4)


def test_merge_saliency_formula():
    w = torch.tensor([[0.0, 1.0], [1.0, 1.0], [3.0, 1.0]])
    a = torch.tensor([[2.0, 1.0, 0.5], [0.0, 3.0, 0.5]])  # (fan_out, h)
    s = merge_saliency(w, a.T)
    assert s[0, 1] == pytest.approx(1.0 * (1 + 9) / 2)  # ‖W_0 − W_1‖² ⟨a_1²⟩
    assert s[1, 0] == pytest.approx(1.0 * 4 / 2)
    assert s[2, 0] == pytest.approx(9.0 * 4 / 2)
    assert torch.isinf(s.diagonal()).all()


def test_merging_identical_neurons_leaves_the_output_unchanged():
    net = _mlp()
    with torch.no_grad():  # neuron 7 duplicates neuron 2, weights and bias
        net.fc1.weight[7] = net.fc1.weight[2]
        net.fc1.bias[7] = net.fc1.bias[2]
    x = torch.randn(50, 6)
    with torch.no_grad():
        ref = net(x)
    res = prune_(net, MergeConfig(pairs={"fc1": "fc2"}, neurons=1))
    d = res.plans["fc1"].decisions[0]
    assert {d.kept, d.removed} == {2, 7} and d.saliency == 0.0
    assert res.widths == {"fc1": (10, 9)}
    assert isinstance(net.fc1, MergedLinear) and net.fc1.out_features == 9 and net.fc2.in_features == 9
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref, rtol=0, atol=1e-6)


def test_merging_beats_naive_removal_on_a_trained_digits_mlp():
    torch.set_num_threads(1)
    splits = digits()
    torch.manual_seed(0)
    net = build_model("mlp", in_features=64, hidden=[64])
    Trainer(net, TrainConfig(epochs=8, lr=0.05, batch_size=32, progress=False, device="cpu")).fit(splits.train)
    x = splits.val.tensors[0].flatten(1)
    with torch.no_grad():
        ref = net(x)
    plan = plan_merges(incoming_vectors(net.fc1), net.fc2.weight, 32)
    naive = MergePlan([], plan.keep)  # the same neurons dropped, nothing added to the survivors

    def out_error(p):
        l1, l2 = merge_linear_pair(net.fc1, net.fc2, p)
        with torch.no_grad():
            return float((l2(torch.relu(l1(x))) - ref).pow(2).mean())

    assert out_error(plan) < 0.8 * out_error(naive)


def test_merged_model_rebuilds_from_its_edits_and_carries_masks():
    net = _mlp(hidden=(10, 8))
    apply_mask(net.fc1, torch.rand(10, 6, generator=torch.Generator().manual_seed(0)) > 0.3)
    apply_mask(net.fc2, torch.rand(8, 10, generator=torch.Generator().manual_seed(1)) > 0.3)
    before = get_mask(net.fc1).clone()
    x = torch.randn(5, 6)
    res = prune_(net, MergeConfig(pairs={"fc1": "fc2", "fc2": "fc3"}, fraction=0.25))
    assert res.widths == {"fc1": (10, 8), "fc2": (8, 6)}
    keep = torch.tensor(res.plans["fc1"].keep)
    assert torch.equal(get_mask(net.fc1), before[keep])
    assert torch.all(net.fc1.weight[~get_mask(net.fc1)] == 0)
    fresh = _mlp(hidden=(10, 8), seed=5)
    apply_edits(fresh, net.netshrink_edits)
    assert [m.out_features for m in (fresh.fc1, fresh.fc2, fresh.fc3)] == [8, 6, 4]
    state = {k.replace("parametrizations.weight.original", "weight"): v for k, v in net.state_dict().items() if "mask" not in k}
    with torch.no_grad():
        for name in ("fc1", "fc2"):
            state[f"{name}.weight"] = getattr(net, name).weight.detach()
    fresh.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), net(x))


@pytest.mark.parametrize(
    "args, field",
    [
        ({"neurons": 2}, "pairs"),
        ({"pairs": {"fc1": "fc2"}}, "neurons"),
        ({"pairs": {"fc1": "fc2"}, "neurons": 2, "fraction": 0.5}, "neurons"),
        ({"pairs": {"fc1": "fc2"}, "neurons": -1}, "neurons"),
        ({"pairs": {"fc1": "fc2"}, "fraction": 1.0}, "fraction"),
        ({"pairs": "fc1"}, "pairs"),
    ],
)
def test_bad_configs_name_the_field(args, field):
    with pytest.raises(ConfigError) as ei:
        MergeConfig.from_dict(args)
    assert ei.value.field == field


def test_pairs_must_fit_the_model():
    net = _mlp(hidden=(10, 8))
    for pairs, msg in [({"fc1": "fc3"}, "outputs"), ({"fc1": "relu1"}, "not a Linear"), ({"fc9": "fc2"}, "not a Linear")]:
        with pytest.raises(ConfigError, match=msg) as ei:
            MergeConfig(pairs=pairs, neurons=1).check_model(net)
        assert ei.value.field == f"pairs.{next(iter(pairs))}"
    with pytest.raises(ConfigError) as ei:
        prune_(net, MergeConfig(pairs={"fc2": "fc3"}, neurons=8))
    assert ei.value.field == "neurons"
    with pytest.raises(ValueError):
        plan_merges(torch.randn(4, 3), torch.randn(2, 5), 1)
