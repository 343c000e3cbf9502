"""Registries and plugins: one Registry mechanism, entry points read by one composition root, extras."""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import netshrink
from netshrink import _registry, data, models
from netshrink._extras import MissingExtraError, require
from netshrink._registry import Registry
from netshrink.errors import ConfigError

PLUGIN = textwrap.dedent(
    '''
    from dataclasses import dataclass

    import torch
    from torch import nn

    import netshrink
    from netshrink.config import BaseConfig, check_range
    from netshrink.data import Splits


    def build(width=5):
        return nn.Sequential(nn.Flatten(), nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 2))


    def make(n=40):
        from torch.utils.data import TensorDataset

        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 4, generator=g)
        ds = TensorDataset(x, (x[:, 0] > 0).long())
        return Splits("plugdata", ds, ds, ds, num_classes=2)


    @netshrink.register_method("plug_shrink", family="prune")
    @dataclass
    class ShrinkConfig(BaseConfig):
        """Scale every Linear weight by a factor (a plugin method)."""

        factor: float = 0.5

        def validate(self):
            check_range("factor", self.factor, 0.0, 1.0)


    @netshrink.method_handler(ShrinkConfig)
    def _shrink(model, config, data=None, task=None):
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Linear):
                    m.weight.mul_(config.factor)
        return task
    '''
)


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """A distribution that is not installed, only put on sys.path: a dist-info folder declaring entry
    points in the three groups (one of them broken), and the module they name."""
    site = tmp_path / "site"
    dist = site / "netshrink_plugdemo-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: netshrink-plugdemo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[netshrink.models]\nplug_net = plugdemo_mod:build\nplug_broken = plugdemo_missing:build\n\n"
        "[netshrink.datasets]\nplug_data = plugdemo_mod:make\n\n"
        "[netshrink.methods]\nplug_shrink = plugdemo_mod\n"
    )
    (site / "plugdemo_mod.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(site))
    yield
    for reg, name in ((models._MODELS, "plug_net"), (data._DATASETS, "plug_data"), (_registry.METHODS, "plug_shrink")):
        reg._items.pop(name, None)
    models._MODELS.broken.pop("plug_broken", None)
    from netshrink import _plugins

    _plugins._tried.difference_update({k for k in _plugins._tried if k[1].startswith("plug_")})


def test_entry_points_extend_models_data_and_methods(installed_plugin, tmp_path, monkeypatch):
    from importlib.metadata import entry_points

    assert "plug_net" in {ep.name for ep in entry_points(group="netshrink.models")}
    m = netshrink.build_model("plug_net", width=7)
    assert m[1].out_features == 7 and m.netshrink_spec == {"zoo": "plug_net", "args": {"width": 7}}
    assert "plug_net" in netshrink.list_models()
    splits = data.load_dataset("plug_data", n=30)
    assert splits.name == "plugdata" and len(splits.train) == 30
    # the method: resolved by name, validated, run through the pipeline's handler call with the task
    cfg_type = _registry.config_type("plug_shrink")
    with pytest.raises(ConfigError, match="factor"):
        cfg_type(factor=2.0)
    assert any(i.name == "plug_shrink" and i.family == "prune" for i in netshrink.list_methods())
    before = m[1].weight.detach().clone()
    from netshrink.task import resolve_task

    task = resolve_task("regression")
    out = _registry.run_handler(m, cfg_type(factor=0.25), _registry.HandlerContext(data=splits, task=task))
    assert out is task and torch.allclose(m[1].weight, 0.25 * before)
    # and through a recipe, end to end
    from netshrink.pipeline import run_recipe
    from netshrink.recipe import parse_recipe

    monkeypatch.setenv("NETSHRINK_CACHE", str(tmp_path / "cache"))
    r = parse_recipe({"model": "plug_net", "data": "plug_data", "train": {"epochs": 1, "progress": False},
                      "stages": [{"method": "plug_shrink", "factor": 0.5}]})
    res = run_recipe(r, tmp_path / "out", progress=False)
    assert [row.method for row in res.rows] == ["baseline", "plug_shrink"]


def test_a_broken_entry_point_is_named_not_fatal(installed_plugin):
    with pytest.raises(ConfigError, match="plug_broken.*plugin that failed to load.*plugdemo_missing"):
        netshrink.build_model("plug_broken")
    assert "lenet5" in netshrink.list_models()  # the rest still works


def test_registry_mechanism():
    reg: Registry[int] = Registry("widget", field="widgets")
    reg.add("a", 1)
    reg.register("b")(2)
    assert reg.names() == ["a", "b"] and reg["a"] == 1 and "b" in reg and "c" not in reg
    with pytest.raises(RuntimeError, match="registered twice"):
        reg.add("a", 3)
    reg.add("a", 1)  # the same object again is fine
    with pytest.raises(ConfigError, match=r"widgets: unknown widget 'c' \(known: a, b\)"):
        reg.lookup("c")
    copy = reg.copy()
    copy.add("c", 3)
    assert "c" not in reg and copy.lookup("c") == 3


def test_the_registries_import_no_family():
    """The registry is a leaf: it imports nothing of netshrink but errors; the composition root imports
    the families."""
    tree = ast.parse(Path(_registry.__file__).read_text())
    relative = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level >= 1}
    absolute = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert relative == {"errors"} and not any(a.startswith("netshrink") for a in absolute), (relative, absolute)
    from netshrink import _plugins

    assert {"netshrink.prune", "netshrink.quantize", "netshrink.lowrank"} <= set(_plugins.FAMILIES)


def test_require_names_the_extra():
    assert require("json") is __import__("json")
    with pytest.raises(MissingExtraError, match=r"pip install 'netshrink\[onnx\]'"):
        require("netshrink_no_such_module_xyz", "onnx")
    # a NetshrinkError: the CLI shows it as one line with exit 2
    assert issubclass(MissingExtraError, netshrink.NetshrinkError)


def test_user_splits_without_tensors_have_an_input_shape():
    from netshrink.data import DictDataset, Splits

    ds = DictDataset({"input_ids": torch.zeros(4, 7, dtype=torch.long), "labels": torch.zeros(4, dtype=torch.long)})
    assert Splits("d", ds, ds, ds).input_shape == (7,)


def test_a_missing_extra_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    import sys

    from netshrink.cli import main

    with monkeypatch.context() as mp:
        for name in ("sklearn", "sklearn.datasets"):  # as if scikit-learn were not installed
            mp.setitem(sys.modules, name, None)
        with pytest.raises(MissingExtraError, match=r"pip install 'netshrink\[digits\]'"):
            data.digits()
    m = netshrink.build_model("mlp", in_features=64, hidden=[8])
    netshrink.pack(m, tmp_path / "m.nsk")
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert main(["export", str(tmp_path / "m.nsk"), "-o", str(tmp_path / "m.onnx"), "--data", "digits"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'netshrink[onnx]'" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "m.onnx").exists()
