import json

import pytest
import torch

from netshrink.data import digits
from netshrink.errors import NetshrinkError
from netshrink.pack import load, read_info
from netshrink.pipeline import run_recipe
from netshrink.recipe import parse_recipe
from netshrink.train import Trainer


def test_end_to_end_rows_files_and_exact_round_trip(digits_recipe, tmp_path):
    recipe = parse_recipe(digits_recipe)
    res = run_recipe(recipe, tmp_path / "out", progress=False)
    assert [r.stage for r in res.rows] == ["baseline", "prune 1/2", "prune 2/2", "share", "huffman"]
    base, *_, shared, final = res.rows
    assert base.ratio == 1.0 and base.nonzeros == base.params
    weights, biases = 64 * 48 + 48 * 24 + 24 * 10, 48 + 24 + 10
    assert final.nonzeros <= round(0.25 * weights) + biases  # biases are not pruned
    assert final.bytes == res.model_path.stat().st_size
    assert final.ratio == pytest.approx(4 * final.params / final.bytes)
    assert shared.ratio > 5
    assert final.test_error < 0.2
    # the packed model gives exactly the outputs the compressed model gave
    x = torch.stack([digits().test[i][0] for i in range(64)])
    res.model.eval()
    assert torch.equal(load(res.model_path)(x), res.model(x))
    info = read_info(res.model_path)
    assert all(s.coding == "huffman" for t in info.tensors for s in t.streams.values())
    for name in ("report.md", "results.json", "sparsity.png", "weights.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["rows"][-1]["bytes"] == final.bytes


def test_interrupted_run_resumes_to_the_same_result(digits_recipe, tmp_path, monkeypatch):
    recipe = parse_recipe(digits_recipe)
    straight = run_recipe(recipe, tmp_path / "a", progress=False)

    calls = {"n": 0}
    real = Trainer._run_epoch

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # the second fine-tuning epoch of the first pruning round
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(Trainer, "_run_epoch", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, tmp_path / "b", progress=False)
    assert not (tmp_path / "b" / "model.nsk").exists()
    assert (tmp_path / "b" / "checkpoints").exists()
    monkeypatch.setattr(Trainer, "_run_epoch", real)
    with pytest.raises(NetshrinkError, match="--resume"):
        run_recipe(recipe, tmp_path / "b", progress=False)
    resumed = run_recipe(recipe, tmp_path / "b", resume=True, progress=False)
    assert [(r.stage, r.test_error, r.nonzeros, r.bytes) for r in resumed.rows] == [
        (r.stage, r.test_error, r.nonzeros, r.bytes) for r in straight.rows
    ]
    assert (tmp_path / "a" / "model.nsk").read_bytes() == (tmp_path / "b" / "model.nsk").read_bytes()


def test_resume_refuses_a_different_recipe(digits_recipe, tmp_path):
    run_recipe(parse_recipe(digits_recipe), tmp_path / "o", progress=False)
    digits_recipe["stages"][1]["bits"] = 3
    with pytest.raises(NetshrinkError, match="different recipe"):
        run_recipe(parse_recipe(digits_recipe), tmp_path / "o", resume=True, progress=False)
