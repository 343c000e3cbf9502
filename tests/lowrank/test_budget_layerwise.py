"""Global rank allocation under a parameter / MACs budget, and layer-by-layer replacement with fitting."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from netshrink.errors import ConfigError
from netshrink.lowrank import (
    LayerwiseConfig,
    LowRankLinear,
    RankBudgetConfig,
    Tucker2Conv,
    factorize_,
)
from netshrink.lowrank.budget import Candidate, allocate
from netshrink.metrics import macs


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 10))


def _data(n: int = 256) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 8, 8, generator=g)
    with torch.no_grad():
        y = _net()(x).argmax(1)  # labels the dense net gets right
    return TensorDataset(x, y)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())


def test_allocate_prefers_the_layer_that_loses_least_per_unit_saved():
    cands = {
        "a": [Candidate(None, 100, 0.0), Candidate((5,), 50, 1.0), Candidate((2,), 20, 5.0)],
        "b": [Candidate(None, 100, 0.0), Candidate((5,), 50, 0.1), Candidate((2,), 20, 0.2)],
    }
    got = allocate(cands, fixed_cost=10, budget=140)
    assert got["a"].ranks is None and got["b"].ranks == (2,)  # b is cheap to shrink: all the way first
    got = allocate(cands, fixed_cost=10, budget=90)
    assert got["b"].ranks == (2,) and got["a"].ranks == (5,)
    assert allocate(cands, fixed_cost=10, budget=49) is None  # 10 + 20 + 20 > 49


@pytest.mark.parametrize("ratio", [0.5, 0.2])
def test_params_budget_is_met_data_free(ratio):
    model = _net()
    dense = _params(model)
    result = factorize_(model, RankBudgetConfig(params_ratio=ratio, criterion="error"))
    assert _params(model) <= ratio * dense
    assert result.layers and all(isinstance(model.get_submodule(n), (LowRankLinear, Tucker2Conv)) for n in result.layers)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_macs_budget_with_loss_criterion_meets_the_budget():
    model, data = _net(), _data()
    x = torch.randn(1, 1, 8, 8)
    dense = macs(model, x).dense
    factorize_(model, RankBudgetConfig(macs_ratio=0.4, batches=2, batch_size=64, levels=[0.1, 0.25, 0.5]), data=data)
    assert macs(model, x).dense <= 0.4 * dense
    assert any(isinstance(m, (LowRankLinear, Tucker2Conv)) for m in model.modules())


def test_budget_bad_inputs():
    model = _net()
    with pytest.raises(ConfigError, match="params_ratio.*cannot be met"):
        factorize_(model, RankBudgetConfig(params_ratio=0.001, criterion="error"))
    with pytest.raises(ConfigError, match="params_ratio.*cannot be met.*left out"):
        factorize_(model, RankBudgetConfig(params_ratio=0.05, criterion="error", layers=["0"]))
    with pytest.raises(ConfigError, match="exactly one"):
        RankBudgetConfig()
    with pytest.raises(ConfigError, match=r"levels\[0\]"):
        RankBudgetConfig(params_ratio=0.5, levels=[0.0])
    with pytest.raises(ConfigError, match=r"levels\[1\]"):
        RankBudgetConfig(params_ratio=0.5, levels=[0.5, 1.5])
    with pytest.raises(ConfigError, match="data"):
        factorize_(model, RankBudgetConfig(params_ratio=0.5))
    with pytest.raises(ConfigError, match="input_shape"):
        factorize_(model, RankBudgetConfig(macs_ratio=0.5, criterion="error"))
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ConfigError, match=r"'0'.*grouped"):
        factorize_(grouped, RankBudgetConfig(params_ratio=0.5, criterion="error", layers=["0"]))
    assert not hasattr(model, "netshrink_edits")  # nothing changed by a refused budget


def test_layerwise_fits_each_layer_and_fine_tunes():
    model, data = _net(), _data()
    cfg = LayerwiseConfig(method="tucker", args={"layer_rank": {"0": [4, 1], "2": 4}}, layers=["0", "2"], fit_steps=60, fit_lr=3e-3,
                          finetune_steps=5, samples=128, batch_size=64)
    result = factorize_(model, cfg, data=data)
    assert list(result.layers) == ["0", "2"]
    for f in result.layers.values():
        assert f.output_error is not None and f.output_error < f.fit_from
    assert isinstance(model[0], Tucker2Conv) and isinstance(model[2], Tucker2Conv)
    assert [e["path"] for e in model.netshrink_edits] == ["0", "2"]


def test_layerwise_svd_without_finetuning():
    model, data = _net(), _data(64)
    result = factorize_(model, LayerwiseConfig(method="svd", args={"rank": 4}, layers=["5"], fit_steps=30,
                                               finetune_steps=0, samples=64), data=data)
    assert result.layers["5"].ranks == (4,) and result.layers["5"].output_error <= result.layers["5"].fit_from


def test_layerwise_bad_inputs():
    with pytest.raises(ConfigError, match="method"):
        LayerwiseConfig(method="magnitude")
    with pytest.raises(ConfigError, match=r"args.rank"):
        LayerwiseConfig(method="svd", args={"rank": 0})
    with pytest.raises(ConfigError, match="args.nope"):
        LayerwiseConfig(method="svd", args={"nope": 1})
    with pytest.raises(ConfigError, match="args.layers"):
        LayerwiseConfig(method="svd", args={"rank": 2, "layers": ["5"]})
    model = _net()
    with pytest.raises(ConfigError, match="data"):
        factorize_(model, LayerwiseConfig(method="svd", args={"rank": 2}))
    with pytest.raises(ConfigError, match=r"'5'.*not a Conv2d"):
        factorize_(model, LayerwiseConfig(method="tucker", args={"rank": 2}, layers=["5"]), data=_data(16))
    with pytest.raises(ConfigError, match="above the full rank"):
        factorize_(model, LayerwiseConfig(method="svd", args={"rank": 65}, layers=["5", "7"]), data=_data(16))


# ------------------------------------------------------------------------------ other tasks


def test_layerwise_fits_a_regression_model_and_fine_tunes_on_its_mse():
    import copy

    from netshrink.task import regression
    from tests._task_models import trained_regressor

    torch.set_num_threads(1)
    model, train, val = trained_regressor()
    task = regression()
    m = copy.deepcopy(model)
    res = factorize_(m, LayerwiseConfig(method="svd", args={"rank": 4}, layers=["2"], fit_steps=60, fit_lr=0.01,
                                        finetune_steps=10, finetune_lr=0.01, samples=256, batch_size=64), data=train, task=task)
    step = res.layers["2"]
    assert isinstance(m[2], LowRankLinear) and step.output_error < step.fit_from  # the fit lowered the output error
    assert task.evaluate(m, val) < float(val.tensors[1].var())  # still a regressor
    from netshrink.errors import DataError

    with pytest.raises(DataError) as ei:  # float targets through the classification loss: one clear line
        factorize_(copy.deepcopy(model), LayerwiseConfig(method="svd", args={"rank": 4}, layers=["2"], fit_steps=1,
                                                         finetune_steps=1), data=[(val.tensors[0][:8], val.tensors[1][:8].sum(1))])
    assert "\n" not in str(ei.value)


def test_rank_budget_scores_ranks_by_a_language_models_loss_on_dict_batches():
    import copy

    from netshrink.task import language_modeling
    from tests._task_models import trained_lm

    torch.set_num_threads(1)
    model, train, val = trained_lm()
    task = language_modeling()
    m = copy.deepcopy(model)
    before = sum(p.numel() for p in m.parameters())
    res = factorize_(m, RankBudgetConfig(params_ratio=0.85, layers=["fc1", "head"], batches=2, batch_size=32), data=train, task=task)
    after = sum(p.numel() for p in m.parameters())
    assert after <= 0.85 * before and res.layers
    assert task.evaluate(m, val) < 3 * task.evaluate(model, val)
    with pytest.raises(ConfigError) as ei:  # a MACs budget: the example comes from the dict batches
        factorize_(copy.deepcopy(model), RankBudgetConfig(macs_ratio=0.01, layers=["fc1", "head"], levels=[0.5], batches=1),
                   data=train, task=task)
    assert ei.value.field == "macs_ratio"
