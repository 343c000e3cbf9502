"""The Python API on a user's own module and DataLoader: prune, fine-tune, share, fine-tune, pack, load."""

import torch
from torch import nn
from torch.utils.data import DataLoader

import netshrink as ns


class UserNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3)
        self.head = nn.Linear(6 * 6 * 6, 10)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


def test_user_module_full_pipeline(tmp_path):
    from netshrink.data import digits

    splits = digits()
    loader = DataLoader(splits.train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    net = UserNet()
    ns.Trainer(net, ns.TrainConfig(epochs=4, lr=0.05, progress=False)).fit(loader)
    dense_err = ns.error_rate(net, splits.test)

    ns.prune_(net, ns.MagnitudeConfig(sparsity=0.8))
    ns.Trainer(net, ns.TrainConfig(epochs=2, lr=0.01, progress=False)).fit(loader)
    ns.quantize_(net, ns.KMeansConfig(bits=4, layer_bits={"conv": 6}))
    ns.Trainer(net, ns.TrainConfig(epochs=1, lr=0.001, progress=False)).fit(loader)

    assert ns.count_nonzeros(net) <= 0.2 * (6 * 9 + 216 * 10) + 6 + 10 + 1
    stats = ns.pack(net, tmp_path / "user.nsk", coding="huffman")
    assert stats.total_bytes == (tmp_path / "user.nsk").stat().st_size
    assert ns.fp32_bytes(net) / stats.total_bytes > 4

    restored = ns.load(tmp_path / "user.nsk", model=UserNet())
    x = torch.stack([splits.test[i][0] for i in range(32)])
    net.eval()
    assert torch.equal(restored(x), net(x))
    assert ns.error_rate(restored, splits.test) < dense_err + 0.1
    info = ns.read_info(tmp_path / "user.nsk")
    assert info.model["user_supplied"] is True


def test_models_and_data_sets_registered_from_python_serve_recipes(monkeypatch):
    from netshrink import data, models
    from netshrink.data import Splits, digits

    monkeypatch.setattr(models, "_MODELS", models._MODELS.copy())
    monkeypatch.setattr(data, "_DATASETS", data._DATASETS.copy())

    @ns.register_model("api_net")
    def api_net(width: int = 8) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))

    @ns.register_dataset("api_digits")
    def api_digits(seed: int = 0) -> Splits:
        return digits(seed=seed)

    r = ns.parse_recipe({"model": "api_net", "model_args": {"width": 12}, "data": "api_digits", "data_args": {"seed": 1},
                         "stages": [{"method": "magnitude", "sparsity": 0.5}]})
    m = r.build_model()
    assert m[1].out_features == 12 and m.netshrink_spec == {"zoo": "api_net", "args": {"width": 12}}
    s = r.load_data()
    assert s.sizes == digits(seed=1).sizes and torch.equal(s.test[:][1], digits(seed=1).test[:][1])
    assert ns.load_data("api_digits").name == "digits"
