import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from netshrink.errors import ConfigError
from netshrink.prune import GradualPruner, MagnitudeConfig, TaylorConfig, agp_sparsity, get_mask
from netshrink.train import TrainConfig, Trainer


def test_agp_endpoints_shape_and_monotonicity():
    kw = dict(final=0.9, initial=0.1, begin=10, steps=5, frequency=4)
    assert agp_sparsity(0, **kw) == pytest.approx(0.1)  # before t₀: s_i
    assert agp_sparsity(10, **kw) == pytest.approx(0.1)  # t₀: s_i
    assert agp_sparsity(30, **kw) == pytest.approx(0.9)  # t₀ + nΔt: s_f
    assert agp_sparsity(1000, **kw) == pytest.approx(0.9)
    # s_t = s_f + (s_i − s_f)(1 − k/n)³ at the k-th pruning step, held in between
    assert agp_sparsity(14, **kw) == pytest.approx(0.9 - 0.8 * 0.8**3)
    assert agp_sparsity(17, **kw) == agp_sparsity(14, **kw)
    values = [agp_sparsity(t, **kw) for t in range(40)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    steps = [values[t] - values[t - 4] for t in (14, 18, 22, 26, 30)]
    assert all(b < a for a, b in zip(steps, steps[1:]))  # fast first, slow at the end


def _loop(pruner, net, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    seen = []
    for _ in range(steps):
        opt.zero_grad()
        net(torch.randn(16, 12, generator=g)).pow(2).mean().backward()
        opt.step()
        pruner.step()
        seen.append(float((net[0].weight == 0).float().mean()))
    return seen


def test_gradual_pruner_follows_the_schedule_in_a_user_loop():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 4))
    pruner = GradualPruner(net, MagnitudeConfig(sparsity=0.8, layer_sparsity={"2": 0.5}), begin=2, steps=4, frequency=3)
    seen = _loop(pruner, net, 20)
    assert [t for t, _ in pruner.history] == [5, 8, 11, 14]  # t₀ has target 0: skipped
    for t, res in pruner.history:
        assert res.sparsity["0"] == pytest.approx(agp_sparsity(t, 0.8, 0.0, 2, 4, 3), abs=1 / 240)
        assert res.sparsity["2"] == pytest.approx(agp_sparsity(t, 0.5, 0.0, 2, 4, 3), abs=1 / 80)
    assert seen[-1] == pytest.approx(0.8) and all(b >= a for a, b in zip(seen, seen[1:]))
    assert pruner.done


def test_gradual_pruner_attached_to_the_trainer_with_a_data_driven_criterion():
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 12, generator=g), torch.randint(0, 4, (64,), generator=g))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 4))
    pruner = GradualPruner(net, TaylorConfig(sparsity=0.6, batches=1, batch_size=32), initial=0.2, steps=3, frequency=2, data=data)
    Trainer(net, TrainConfig(epochs=2, batch_size=8, lr=0.01, progress=False, device="cpu"), callbacks=[pruner]).fit(data)
    assert [t for t, _ in pruner.history] == [0, 2, 4, 6]
    assert (net[0].weight == 0).float().mean() == pytest.approx(0.6)
    assert (~get_mask(net[2])).float().mean() == pytest.approx(0.6, abs=1 / 80)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"steps": 0}, "steps"),
        ({"frequency": 0}, "frequency"),
        ({"begin": -1}, "begin"),
        ({"initial": 0.95}, "initial"),
    ],
)
def test_bad_schedules_name_the_field(kwargs, field):
    net = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(ConfigError) as ei:
        GradualPruner(net, MagnitudeConfig(sparsity=0.9), **kwargs)
    assert ei.value.field == field
    with pytest.raises(ConfigError) as ei:
        agp_sparsity(0, **{"final": 0.9, **kwargs})
    assert ei.value.field == field


def test_schedule_needs_sparsity_targets():
    net = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(ConfigError) as ei:
        GradualPruner(net, MagnitudeConfig(quality=1.0))
    assert ei.value.field == "quality"
    with pytest.raises(ConfigError) as ei:
        GradualPruner(net, MagnitudeConfig(sparsity=0.5, steps=3))
    assert ei.value.field == "steps"
    with pytest.raises(ConfigError) as ei:
        agp_sparsity(0, final=1.0)
    assert ei.value.field == "sparsity"


def test_agp_as_a_trainer_callback_equals_a_hand_loop_that_steps_the_pruner():
    import copy

    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(64, 12, generator=g), torch.randint(0, 4, (64,), generator=g))
    loader = DataLoader(data, batch_size=8, shuffle=False)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 4))
    twin = copy.deepcopy(net)
    cfg = MagnitudeConfig(sparsity=0.7)
    pruner = GradualPruner(net, cfg, steps=4, frequency=3)
    Trainer(net, TrainConfig(epochs=2, lr=0.05, momentum=0.0, progress=False, device="cpu"), callbacks=[pruner]).fit(loader)
    hand = GradualPruner(twin, cfg, steps=4, frequency=3)
    opt = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.0)
    for _ in range(2):
        for xb, yb in loader:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(twin(xb), yb).backward()
            opt.step()
            hand.step()
    assert [t for t, _ in pruner.history] == [t for t, _ in hand.history] == [3, 6, 9, 12]
    for (k, a), b in zip(net.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), k
    assert float((net[0].weight == 0).float().mean()) == pytest.approx(0.7, abs=1 / 240)


def test_gradual_pruner_scores_a_language_model_on_its_task():
    import copy

    from netshrink.task import language_modeling
    from tests._task_models import trained_lm

    torch.set_num_threads(1)
    model, train, _ = trained_lm(epochs=2)
    net = copy.deepcopy(model)
    task = language_modeling()
    pruner = GradualPruner(net, TaylorConfig(sparsity=0.5, batches=1, batch_size=16, layers=["fc1", "head"]), steps=2,
                           frequency=3, data=train, task=task)
    Trainer(net, TrainConfig(epochs=1, batch_size=32, lr=0.01, progress=False, device="cpu"), task=task, callbacks=[pruner]).fit(train)
    assert [t for t, _ in pruner.history] == [3, 6] and pruner.done  # 8 steps; t = 0 has target 0
    assert float((net.fc1.weight == 0).float().mean()) == pytest.approx(0.5, abs=1 / 240)
