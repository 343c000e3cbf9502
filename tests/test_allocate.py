"""The neutral allocator module: no family imports; knapsack; the sweep evaluation through a Task."""

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import netshrink._allocate as alloc
from netshrink.errors import ConfigError, DataError
from netshrink.task import Task, regression


def test_imports_no_family_and_the_families_import_it():
    tree = ast.parse(Path(alloc.__file__).read_text())
    local = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0}
    assert local <= {"errors", "task"}, local
    root = Path(alloc.__file__).parent
    for user in ("prune/sensitivity.py", "prune/structured/auto.py", "quantize/mixed.py", "lowrank/budget.py", "lowrank/layerwise.py"):
        src = (root / user).read_text()
        assert "_allocate import" in src
        if not user.startswith("prune"):
            assert "from ..prune" not in src  # the shared allocators no longer come from the pruning family


def test_knapsack_is_exact_on_a_small_case():
    costs = [np.array([10, 6, 3]), np.array([8, 4, 1]), np.array([5, 2])]
    values = [np.array([0.0, 1.0, 5.0]), np.array([0.0, 0.5, 4.0]), np.array([0.0, 2.0])]
    best = None
    for a in range(3):
        for b in range(3):
            for c in range(2):
                if costs[0][a] + costs[1][b] + costs[2][c] <= 15:
                    v = values[0][a] + values[1][b] + values[2][c]
                    best = v if best is None or v < best else best
    picked = alloc.knapsack_min(costs, values, 15.0)
    assert sum(c[j] for c, j in zip(costs, picked)) <= 15
    assert sum(v[j] for v, j in zip(values, picked)) == pytest.approx(best)


def test_evaluate_on_the_same_seeded_subset_equals_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 4, generator=g), torch.randn(50, 3, generator=g)
    data = TensorDataset(x, y)
    model = nn.Linear(4, 3)
    sub = alloc.eval_subset(data, 20, seed=3, batch_size=8, task=regression())
    assert sub.samples == 20 and [b[0].shape[0] for b in sub.batches] == [8, 8, 4]
    again = alloc.eval_subset(data, 20, seed=3, batch_size=8, task=regression())
    assert all(torch.equal(a[0], b[0]) for a, b in zip(sub.batches, again.batches))
    mse, loss = alloc.evaluate(model, sub, task=regression())
    xs = torch.cat([b[0] for b in sub.batches])
    ys = torch.cat([b[1] for b in sub.batches])
    with torch.no_grad():
        want = float((model(xs) - ys).pow(2).mean())
    assert mse == pytest.approx(want, rel=1e-5) and loss == pytest.approx(want, rel=1e-5)
    macs = alloc.layer_macs(model, {"": model}, sub.example(regression()))
    assert macs == {"": 12}


def test_a_bad_task_is_one_data_error():
    data = TensorDataset(torch.randn(10, 4), torch.randn(10, 3))
    model = nn.Linear(4, 3)
    sub = alloc.eval_subset(data, 10)
    with pytest.raises(DataError, match="scalar"):
        alloc.evaluate(model, sub, task=Task(name="vec", loss=lambda o, t: (o - t).pow(2).mean(1)))
    with pytest.raises(DataError, match="metric 'error' failed|error: predictions"):  # float targets through top-1 error
        alloc.evaluate(model, sub, task=Task(name="mixed", loss=regression().loss))
    with pytest.raises(ConfigError):
        alloc.eval_subset(data, 0)
    with pytest.raises(DataError):
        alloc.eval_subset(TensorDataset(torch.zeros(0, 4), torch.zeros(0, 3)), 5)
