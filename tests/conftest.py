"""Shared fixtures: a small digits recipe, and one torch thread (tiny models run faster so)."""

import pytest
import torch

DIGITS_RECIPE = {
    "name": "digits-test",
    "model": "mlp",
    "model_args": {"in_features": 64, "hidden": [48, 24]},
    "data": "digits",
    "train": {"epochs": 6, "lr": 0.05, "schedule": "cosine", "batch_size": 32, "progress": False},
    "stages": [
        {"method": "magnitude", "label": "prune", "sparsity": 0.75, "steps": 2, "finetune": {"epochs": 2, "lr": 0.01, "batch_size": 32, "progress": False}},
        {"method": "kmeans", "label": "share", "bits": 4, "finetune": {"epochs": 2, "lr": 0.001, "batch_size": 32, "progress": False}},
        {"method": "huffman"},
    ],
}


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def digits_recipe(tmp_path, monkeypatch):
    """A fresh copy of the digits recipe, with the cache (trained baselines) in a temp folder."""
    import copy

    monkeypatch.setenv("NETSHRINK_CACHE", str(tmp_path / "cache"))
    return copy.deepcopy(DIGITS_RECIPE)
