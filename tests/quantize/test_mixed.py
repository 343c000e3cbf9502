"""Mixed precision: bits per layer from a sensitivity sweep under a size budget."""

import copy
import itertools
import math

import numpy as np
import pytest
import torch

import netshrink as ns
from netshrink._registry import config_type
from netshrink.data import digits
from netshrink.errors import ConfigError
from netshrink.pack import load, pack, read_info
from netshrink.quantize import MixedPrecisionConfig, UniformConfig, quantize_
from netshrink.quantize.fake import WeightFakeQuant
from netshrink.quantize.mixed import BitSensitivity, allocate_bits, layer_bytes


@pytest.fixture(scope="module")
def trained():
    splits = digits()
    torch.manual_seed(0)
    model = ns.build_model("mlp", in_features=64, hidden=[48, 24])
    ns.Trainer(model, ns.TrainConfig(epochs=6, lr=0.05, batch_size=32, progress=False)).fit(splits.train)
    return model, splits


def _uniform_bytes(model, bits):
    return sum(layer_bytes(m.weight.numel(), bits, m.weight.shape[0]) for m in (model.fc1, model.fc2, model.fc3))


def test_bits_meet_the_budget_pack_at_those_widths_and_round_trip(trained, tmp_path):
    model, splits = trained
    q = copy.deepcopy(model)
    budget = _uniform_bytes(model, 3)
    res = quantize_(q, MixedPrecisionConfig(budget_bytes=budget, samples=270), data=splits)
    alloc = res.allocation
    assert set(alloc.layer_bits) == {"fc1", "fc2", "fc3"} and set(alloc.layer_bits.values()) <= {2, 3, 4, 6, 8}
    assert alloc.weight_bytes <= budget and alloc.weight_bytes == sum(
        layer_bytes(getattr(q, n).weight.numel(), b, getattr(q, n).weight.shape[0]) for n, b in alloc.layer_bits.items())
    assert res.bits == alloc.layer_bits
    for n, b in alloc.layer_bits.items():
        wq = getattr(q, n).parametrizations.weight[0]
        assert isinstance(wq, WeightFakeQuant) and wq.bits == b
    # the least-loss choice beats (or ties) uniform 3 bits, which fits the same budget, on the predicted rise
    uni = sum(float(res.curves.rise(n)[res.curves.bits.index(3)]) for n in res.curves.layers)
    assert alloc.predicted_rise <= uni + 1e-12
    # .nsk: each weight is an affine tensor of b-bit codes; fixed width, its sections are exactly S_l(b)
    stats = pack(q, tmp_path / "mixed.nsk", coding="fixed")
    for n, b in alloc.layer_bits.items():
        t = stats.tensor(f"{n}.weight")
        m = getattr(q, n).weight
        assert t.encoding == "affine" and t.streams["codes"].bits == b
        assert t.nbytes == layer_bytes(m.numel(), b, m.shape[0])
    back = load(tmp_path / "mixed.nsk", ns.build_model("mlp", in_features=64, hidden=[48, 24]))
    x = splits.test.tensors[0][:64]
    assert torch.equal(back(x), q.eval()(x))
    assert read_info(tmp_path / "mixed.nsk").total_bytes == stats.total_bytes


def test_avg_bits_budget_and_loose_budget(trained):
    model, splits = trained
    q = copy.deepcopy(model)
    res = quantize_(q, MixedPrecisionConfig(avg_bits=4, bits=[2, 4, 8], samples=270, metric="error"), data=splits.val)
    assert res.weight_bytes <= _uniform_bytes(model, 4)
    assert set(res.bits.values()) <= {2, 4, 8}
    q8 = copy.deepcopy(model)
    loose = quantize_(q8, MixedPrecisionConfig(budget_bytes=10**7, samples=270), data=splits)
    assert set(loose.bits.values()) == {8}  # nothing to trade: the widest bits everywhere (ties keep the wider)
    assert loose.avg_bits == 8.0


def test_allocation_is_the_brute_force_optimum():
    rng = np.random.default_rng(0)
    bits = [2, 3, 4, 6, 8]
    names = ["a", "b", "c", "d"]
    params = {"a": 500, "b": 2000, "c": 120, "d": 900}
    sizes = {n: [layer_bytes(params[n], b, 10) for b in bits] for n in names}
    loss = {n: sorted(rng.uniform(0, 2, 5).tolist(), reverse=True) for n in names}
    curves = BitSensitivity(bits, 0.1, 0.0, {n: [0.1] * 5 for n in names}, loss, params, sizes)
    for budget in (1200, 1800, 2500, 3500):
        alloc = allocate_bits(curves, budget)
        best = min(
            (sum(loss[n][j] for n, j in zip(names, js)), js)
            for js in itertools.product(range(5), repeat=4)
            if sum(sizes[n][j] for n, j in zip(names, js)) <= budget
        )
        assert math.isclose(alloc.predicted_rise, best[0], abs_tol=1e-9)
        assert alloc.weight_bytes <= budget


def test_a_budget_that_cannot_be_met_is_a_clear_error(trained):
    model, splits = trained
    q = copy.deepcopy(model)
    too_small = _uniform_bytes(model, 2) - 1
    with pytest.raises(ConfigError) as ei:
        quantize_(q, MixedPrecisionConfig(budget_bytes=too_small), data=splits)
    assert ei.value.field == "budget_bytes" and "cannot be met" in str(ei.value)
    with pytest.raises(ConfigError) as ei:
        quantize_(q, MixedPrecisionConfig(avg_bits=3, bits=[4, 8]), data=splits)
    assert ei.value.field == "avg_bits"
    assert not hasattr(q.fc1, "parametrizations")  # refused before anything changed
    with pytest.raises(ConfigError) as ei:
        quantize_(q, MixedPrecisionConfig(avg_bits=4))  # no data for the sweep
    assert ei.value.field == "data"


@pytest.mark.parametrize(
    "args, field",
    [
        ({}, "budget_bytes"),
        ({"budget_bytes": 100, "avg_bits": 4}, "budget_bytes"),
        ({"budget_bytes": 0}, "budget_bytes"),
        ({"avg_bits": 0.5}, "avg_bits"),
        ({"avg_bits": 4, "bits": [2, 9]}, "bits[1]"),
        ({"avg_bits": 4, "bits": [4, 4]}, "bits"),
        ({"avg_bits": 4, "bits": []}, "bits"),
        ({"avg_bits": 4, "metric": "acc"}, "metric"),
        ({"avg_bits": 4, "samples": 0}, "samples"),
    ],
)
def test_bad_config_names_the_field(args, field):
    with pytest.raises(ConfigError) as ei:
        config_type("mixed_precision").from_dict(args)
    assert ei.value.field == field


def test_mixed_and_uniform_share_the_quantizer(trained):
    """Every layer at one width through mixed_precision is the uniform quantizer at that width."""
    model, splits = trained
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    quantize_(a, MixedPrecisionConfig(bits=[4], avg_bits=4, samples=100), data=splits)
    quantize_(b, UniformConfig(bits=4, activations=False))
    x = splits.test.tensors[0][:32]
    assert torch.equal(a(x), b(x))


def test_a_recipe_stage_allocates_fine_tunes_and_packs_at_the_chosen_bits(digits_recipe, tmp_path):
    from netshrink.pack import load as load_nsk
    from netshrink.pipeline import run_recipe
    from netshrink.recipe import parse_recipe

    digits_recipe["stages"] = [
        {"method": "mixed_precision", "avg_bits": 3, "samples": 270,
         "finetune": {"epochs": 1, "lr": 0.01, "batch_size": 32, "progress": False}},
    ]
    res = run_recipe(parse_recipe(digits_recipe), tmp_path / "out", progress=False)
    assert res.rows[-1].test_error < 0.3
    info = read_info(res.model_path)
    widths = {t.name: t.streams["codes"].bits for t in info.tensors if t.encoding == "affine"}
    assert set(widths) == {"fc1.weight", "fc2.weight", "fc3.weight"} and set(widths.values()) <= {2, 3, 4, 6, 8}
    x = digits().test.tensors[0][:64]
    res.model.eval()
    assert torch.equal(load_nsk(res.model_path)(x), res.model(x))


def test_mixed_precision_on_a_language_model_with_dict_batches():
    from netshrink.task import language_modeling
    from tests._task_models import trained_lm

    torch.set_num_threads(1)
    model, _, val = trained_lm()
    task = language_modeling()
    q = copy.deepcopy(model)
    budget = layer_bytes(240, 3, 24) + layer_bytes(288, 3, 12)  # fc1 and head at 3 bits each
    res = quantize_(q, MixedPrecisionConfig(budget_bytes=budget, bits=[2, 3, 4, 8], samples=48, layers=["fc1", "head"]),
                    data=val, task=task)
    assert res.curves.metric_name == "perplexity" and res.curves.samples == 48
    assert res.allocation.weight_bytes <= budget and set(res.bits) == {"fc1", "head"}
    # the sweep's dense point is the task's perplexity on the same examples
    assert res.curves.base_error == pytest.approx(task.evaluate(model, ns._allocate.eval_subset(val, 48, task=task).batches))
    assert task.evaluate(q, val) < 2 * task.evaluate(model, val)
