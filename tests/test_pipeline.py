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
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["rows"][-1]["bytes"] == final.bytes
    # masks and shared weights keep the dense shapes: same MACs, and the report says how fast it runs
    speed = res.speed
    assert speed.batch_sizes == [1, 64] and speed.macs_compressed == speed.macs_baseline
    assert saved["speed"]["compressed_ms"] == speed.compressed_ms and min(speed.compressed_ms) > 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Speed" in report and all(v in report for v in speed.verdicts())


def test_speed_verdicts_say_why_a_model_is_not_faster():
    from netshrink.pipeline import Speed

    masked = Speed([1, 64], [1.0, 10.0], [1.0, 11.0], threads=2, macs_baseline=1000, macs_compressed=1000)
    same, slower = masked.verdicts()
    assert "not faster (1.00x)" in same and "dense kernels" in same
    assert "slower (0.91x)" in slower
    pruned = Speed([1, 64], [1.0, 10.0], [0.9, 2.5], threads=2, macs_baseline=4000, macs_compressed=1000)
    b1, b64 = pruned.verdicts()
    assert "1.11x" in b1 and "per-layer overhead" in b1 and "4.00x fewer MACs" in b1
    assert "4.00x faster" in b64 and "below the MAC reduction" not in b64


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


def test_resume_of_a_changed_recipe_keeps_the_stages_before_the_change(digits_recipe, tmp_path):
    import copy

    run_recipe(parse_recipe(digits_recipe), tmp_path / "o", progress=False)
    stages = tmp_path / "o" / "stages"
    pruned = {f.name: f.stat().st_mtime_ns for f in stages.glob("0[12]-*")}
    assert len(pruned) == 4  # two pruning rounds: .nsk and .json each
    changed = copy.deepcopy(digits_recipe)
    changed["stages"][1]["bits"] = 3  # the sharing stage: the pruning rounds before it stay valid
    resumed = run_recipe(parse_recipe(changed), tmp_path / "o", resume=True, progress=False)
    assert {f.name: f.stat().st_mtime_ns for f in stages.glob("0[12]-*")} == pruned  # not redone
    fresh = run_recipe(parse_recipe(changed), tmp_path / "fresh", progress=False)
    assert [(r.stage, r.test_error, r.nonzeros, r.bytes) for r in resumed.rows] == [
        (r.stage, r.test_error, r.nonzeros, r.bytes) for r in fresh.rows]
    # a different baseline (model, data or training) leaves nothing to keep: one clear error
    changed["train"]["epochs"] = changed["train"]["epochs"] + 1
    with pytest.raises(NetshrinkError, match="different recipe"):
        run_recipe(parse_recipe(changed), tmp_path / "o", resume=True, progress=False)
