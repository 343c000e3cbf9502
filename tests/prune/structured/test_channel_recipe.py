"""The structured pruning method in a recipe: parsed by name, run by the pipeline, packed with its
resized layers, and resumed from the packed file."""

from __future__ import annotations

from netshrink.pack.nsk import load
from netshrink.pipeline import run_recipe
from netshrink.recipe import parse_recipe


def test_channel_stage_in_a_recipe_shrinks_packs_and_resumes(digits_recipe, tmp_path):
    digits_recipe["train"]["epochs"] = 2
    digits_recipe["stages"] = [{"method": "channel", "label": "channels", "ratio": 0.5, "criterion": "taylor", "batches": 2,
                                "finetune": {"epochs": 1, "lr": 0.01, "batch_size": 32, "progress": False}}]
    recipe = parse_recipe(digits_recipe)
    res = run_recipe(recipe, tmp_path / "run", progress=False)
    base, final = res.rows[0], res.rows[-1]
    assert final.params < 0.6 * base.params and final.macs_dense < 0.6 * base.macs_dense
    assert res.model.fc1.out_features == 24 and res.model.fc2.out_features == 12
    assert res.speed.macs_compressed == final.macs_dense < res.speed.macs_baseline  # the decoded file is the small model
    loaded = load(res.model_path)
    assert loaded.fc2.in_features == 24
    again = run_recipe(recipe, tmp_path / "run", resume=True, progress=False)
    assert again.rows[-1].test_error == final.test_error
