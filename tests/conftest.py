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


@pytest.fixture
def zoo_cnn():
    """Factory: a zoo CNN with random weights and non-trivial BatchNorm statistics, in eval mode."""
    from torch import nn

    from netshrink.models import build_model

    def build(name: str) -> "nn.Module":
        torch.manual_seed(0)
        model = build_model(name)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.normal_(0, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.1)
        return model.eval()

    return build


@pytest.fixture
def assert_packs_and_exports(tmp_path):
    """Checker for a compressed 1x28x28 model: the .nsk round trip is exact (its edits replayed), and the
    ONNX export gives torch's outputs in onnxruntime within float rounding."""
    from netshrink.export import export_onnx, ort_predict, ort_session
    from netshrink.pack import load, pack

    def check(model) -> None:
        x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
        model.eval()
        with torch.no_grad():
            want = model(x)
        pack(model, tmp_path / "m.nsk")
        loaded = load(tmp_path / "m.nsk").eval()
        assert getattr(loaded, "netshrink_edits", None) == getattr(model, "netshrink_edits", None)
        with torch.no_grad():
            assert torch.equal(loaded(x), want)
        res = export_onnx(model, tmp_path / "m.onnx", (1, 28, 28))
        got = ort_predict(ort_session(res.path, threads=1), x)
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)

    return check
