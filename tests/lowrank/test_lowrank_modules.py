"""The replaceable-module registry and the edits mechanism of netshrink._modules."""

import pytest
import torch
from torch import nn

from netshrink._modules import (
    apply_edits,
    edits_of,
    module_class,
    module_types,
    register_module,
    replace_module,
)
from netshrink.errors import ModelError
from netshrink.lowrank import LowRankLinear
from netshrink.pack import packed_bytes


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Sequential(nn.ReLU(), nn.Linear(5, 3)))


def test_the_lowrank_types_are_registered():
    types = module_types()
    for name in ("lowrank_linear", "tucker2_conv", "cp_conv", "separable_conv"):
        assert name in types and types[name].netshrink_type == name
    assert module_class("lowrank_linear") is LowRankLinear
    with pytest.raises(ModelError, match="unknown module type 'nope'"):
        module_class("nope")


def test_register_module_checks_its_class():
    with pytest.raises(TypeError, match="netshrink_args"):
        register_module("test_no_args")(type("NoArgs", (nn.Module,), {}))
    with pytest.raises(TypeError, match="nn.Module"):
        register_module("test_not_module")(type("Plain", (), {"netshrink_args": lambda self: {}}))
    with pytest.raises(RuntimeError, match="registered twice"):
        register_module("lowrank_linear")(type("Other", (nn.Module,), {"netshrink_args": lambda self: {}}))


def test_replace_module_swaps_by_dotted_path_and_records():
    model = _model()
    old = replace_module(model, "1.1", LowRankLinear(5, 3, 2))
    assert isinstance(old, nn.Linear) and isinstance(model[1][1], LowRankLinear)
    args = {"in_features": 5, "out_features": 3, "rank": 2, "bias": True, "fixed": "none"}
    assert model.netshrink_edits == [{"path": "1.1", "type": "lowrank_linear", "args": args}]
    assert model(torch.randn(2, 6)).shape == (2, 3)
    edits = edits_of(model)
    edits[0]["path"] = "changed"
    assert model.netshrink_edits[0]["path"] == "1.1"  # edits_of hands out a copy


@pytest.mark.parametrize("path", ["", "2", "1.5", "0.weight", "1..1", "x.y"])
def test_replace_module_refuses_bad_paths(path):
    model = _model()
    with pytest.raises(ModelError, match="submodule|path"):
        replace_module(model, path, LowRankLinear(5, 3, 2))
    assert not hasattr(model, "netshrink_edits")


def test_replace_module_refuses_unregistered_modules():
    with pytest.raises(ModelError, match="not a registered module type"):
        replace_module(_model(), "0", type("Unregistered", (nn.Linear,), {})(6, 5))


def test_apply_edits_rebuilds_on_the_replaced_modules_device_and_dtype():
    source = _model()
    replace_module(source, "0", LowRankLinear(6, 5, 3, fixed="first"))
    target = _model().double()
    apply_edits(target, source.netshrink_edits)
    assert isinstance(target[0], LowRankLinear) and target[0].fixed == "first"
    assert target[0].first.weight.dtype == torch.float64 and target[0].second.weight.dtype == torch.float64
    assert target.netshrink_edits == source.netshrink_edits
    assert {k: v.shape for k, v in target.state_dict().items()} == {k: v.shape for k, v in source.state_dict().items()}


def test_apply_edits_errors_are_one_line_model_errors():
    with pytest.raises(ModelError, match=r"edits\[0\] \(0\): unknown module type"):
        apply_edits(_model(), [{"path": "0", "type": "mystery", "args": {}}])
    with pytest.raises(ModelError, match="expected an object"):
        apply_edits(_model(), [{"path": "0"}])
    with pytest.raises(ModelError, match="fixed must be"):
        apply_edits(_model(), [{"path": "0", "type": "lowrank_linear",
                                "args": {"in_features": 6, "out_features": 5, "rank": 2, "fixed": "both"}}])
    with pytest.raises(ModelError, match="exceed the limit of 10"):
        apply_edits(_model(), [{"path": "0", "type": "lowrank_linear",
                                "args": {"in_features": 6, "out_features": 5, "rank": 2}}], max_elements=10)


def test_a_malformed_edits_attribute_fails_before_packing():
    model = _model()
    model.netshrink_edits = [{"path": "0", "type": "lowrank_linear"}]
    with pytest.raises(ModelError, match="model.netshrink_edits"):
        packed_bytes(model)
