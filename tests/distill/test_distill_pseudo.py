"""Model compression with MUNGE pseudo-data (Buciluǎ et al. 2006)."""

from __future__ import annotations

import pytest
import torch
from _distill_helpers import fast, splits, teacher
from torch.utils.data import TensorDataset

from netshrink.distill import (
    MungeConfig,
    compress_with_pseudo_data,
    munge,
    nearest_neighbours,
    pseudo_dataset,
)
from netshrink.errors import ConfigError
from netshrink.metrics import error_rate
from netshrink.models import build_model


def test_nearest_neighbours_match_brute_force():
    x = torch.randn(50, 7, generator=torch.Generator().manual_seed(0))
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    assert torch.equal(nearest_neighbours(x, chunk=16), d.argmin(1))


def test_munge_size_range_difference_and_seed():
    x = splits().train.tensors[0]
    n = len(x)
    sample = munge(x, multiplier=3, p=0.5, s=2.0, seed=7)
    assert sample.x.shape == (3 * n, 1, 8, 8)
    assert torch.equal(sample.source, torch.arange(n).repeat(3))
    flat, syn = x.reshape(n, -1), sample.x.reshape(3 * n, -1)
    # within each attribute's training range (here [0, 1] pixels)
    assert bool((syn >= flat.min(0).values).all()) and bool((syn <= flat.max(0).values).all())
    assert float(syn.min()) >= 0.0 and float(syn.max()) <= 1.0
    # differs from the real data: most rows changed, and no synthetic row is a copy of a real one
    changed = (syn != flat[sample.source]).any(1).float().mean()
    assert changed > 0.95
    assert torch.cdist(syn, flat).min(1).values.gt(0).float().mean() > 0.95
    # but it stays close to the data: each synthetic row is nearer its source than a random real row
    near = (syn - flat[sample.source]).norm(dim=1).mean()
    far = (syn - flat[torch.randperm(n, generator=torch.Generator().manual_seed(0)).repeat(3)]).norm(dim=1).mean()
    assert near < 0.6 * far
    # seeded: the same seed gives the same set, another seed another set
    assert torch.equal(munge(x, 3, 0.5, 2.0, seed=7).x, sample.x)
    assert not torch.equal(munge(x, 3, 0.5, 2.0, seed=8).x, sample.x)


def test_munge_extremes_and_nominal():
    x = torch.tensor([[0.0, 0.0], [1.0, 10.0], [3.0, 30.0]])
    assert torch.equal(munge(x, 2, p=0.0, seed=0).x, x.repeat(2, 1))  # p = 0: no swaps
    nn_idx = nearest_neighbours(x)
    swapped = munge(x, 1, p=1.0, seed=0, nominal=[0, 1]).x  # p = 1, nominal: the neighbour itself
    assert torch.equal(swapped, x[nn_idx])


@pytest.mark.parametrize("field,value", [("p", 1.5), ("s", 0.0), ("multiplier", 0), ("temperature", -1.0)])
def test_bad_munge_config(field, value):
    with pytest.raises(ConfigError) as err:
        MungeConfig(**{field: value})
    assert err.value.field == field


def test_pseudo_dataset_labels_come_from_the_teacher():
    data, t = splits(), teacher()
    small = TensorDataset(*(v[:200] for v in data.train.tensors))
    soft = pseudo_dataset(t, small, MungeConfig(multiplier=2, labels="soft"))
    x, p = soft.tensors
    assert len(soft) == 400 and p.shape == (400, 10)
    torch.testing.assert_close(p.sum(1), torch.ones(400))
    torch.testing.assert_close(p, torch.softmax(t(x), 1))
    hard = pseudo_dataset(t, small, MungeConfig(multiplier=2, labels="hard", include_original=True))
    assert len(hard) == 600 and hard.tensors[1].dtype == torch.long
    assert torch.equal(hard.tensors[1], t(hard.tensors[0]).argmax(1))


@pytest.mark.parametrize("labels", ["soft", "hard"])
def test_student_trained_only_on_pseudo_data_beats_chance(labels):
    data, t = splits(), teacher()
    torch.manual_seed(2)
    student = build_model("mlp", in_features=64, hidden=[16])
    result = compress_with_pseudo_data(
        student, t, data.train, None, MungeConfig(multiplier=3, labels=labels, seed=1), fast(6, batch_size=64)
    )
    assert result.transfer_size == 3 * len(data.train)
    err = error_rate(student, data.test)
    assert err < 0.15, err  # chance is 0.9
