"""A user's own model, data and task through recipes and `netshrink run`: factories, weights files,
.npz data with dict (token) batches, and the bad inputs of issue 13 (one line, exit 2, nothing written)."""

from __future__ import annotations

import itertools
import json
import textwrap

import numpy as np
import pytest
import torch
import yaml

from netshrink.cli import main
from netshrink.errors import ConfigError, DataError, ModelError
from netshrink.pack import load, read_info
from netshrink.pipeline import run_recipe
from netshrink.recipe import load_recipe, parse_recipe

_COUNTER = itertools.count()

USER_CODE = textwrap.dedent(
    '''
    import numpy as np
    import torch
    from torch import nn

    from netshrink.data import Splits
    from netshrink.task import Task


    class TokenClassifier(nn.Module):
        """Mean-pooled token embeddings -> MLP; takes input_ids and attention_mask, returns a dict."""

        def __init__(self, vocab=24, dim=16, hidden=32, classes=3):
            super().__init__()
            self.embed = nn.Embedding(vocab, dim)
            self.hidden = nn.Linear(dim, hidden)
            self.head = nn.Linear(hidden, classes)

        def forward(self, input_ids, attention_mask):
            m = attention_mask.unsqueeze(-1).to(self.embed.weight.dtype)
            h = (self.embed(input_ids) * m).sum(1) / m.sum(1).clamp(min=1.0)
            return {"logits": self.head(torch.relu(self.hidden(h)))}


    def build(vocab=24, dim=16, hidden=32, classes=3):
        return TokenClassifier(vocab, dim, hidden, classes)


    def broken(**kw):
        raise RuntimeError("the factory cannot build this")


    def token_arrays(n=900, length=10, vocab=24, seed=0):
        """Class c in {0, 1, 2} puts its marker token c (twice) among random tokens 3..vocab-1; padded."""
        g = np.random.default_rng(seed)
        ids = g.integers(3, vocab, size=(n, length))
        labels = g.integers(0, 3, size=n)
        lengths = g.integers(4, length + 1, size=n)
        for i in range(n):
            ids[i, g.choice(lengths[i], size=2, replace=False)] = labels[i]
        mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
        ids = ids * mask
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


    def make_splits(n=900, seed=0):
        from netshrink.data import DictDataset

        a = token_arrays(n=n, seed=seed)
        cut = {"train": slice(0, n * 2 // 3), "val": slice(n * 2 // 3, n * 5 // 6), "test": slice(n * 5 // 6, n)}
        return {s: DictDataset({k: torch.from_numpy(v[c]) for k, v in a.items()}) for s, c in cut.items()}


    def not_splits():
        return [1, 2, 3]


    def per_example_loss():
        return Task(name="per_example", loss=lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"))


    class _Broken:
        name = "broken"
        percent = False

        def update(self, output, target):
            raise ZeroDivisionError("no examples scored")

        def compute(self):
            return 0.0


    def failing_metric():
        return Task(name="failing_metric", metric=_Broken)
    '''
)


@pytest.fixture
def user_pkg(tmp_path, monkeypatch):
    """A user's package on sys.path (a unique name per test, so no module is reused); returns its name."""
    name = f"user_pkg_{next(_COUNTER)}_{tmp_path.name[-8:].replace('-', '_')}"
    pkg = tmp_path / "src" / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(USER_CODE)
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    monkeypatch.setenv("NETSHRINK_CACHE", str(tmp_path / "cache"))
    return name


def _token_npz(path, user_pkg):
    import importlib

    arrays = importlib.import_module(f"{user_pkg}.nets").token_arrays()
    n = len(arrays["labels"])
    cut = {"train": slice(0, n * 2 // 3), "val": slice(n * 2 // 3, n * 5 // 6), "test": slice(n * 5 // 6, n)}
    np.savez(path, **{f"{s}_{k}": v[c] for s, c in cut.items() for k, v in arrays.items()})
    return path


def _recipe(user_pkg, **over):
    r = {
        "name": "tokens",
        "model": f"{user_pkg}.nets:build",
        "model_args": {"hidden": 32},
        "data": f"{user_pkg}.nets:make_splits",
        "train": {"epochs": 8, "lr": 0.1, "batch_size": 32, "progress": False},
        "stages": [
            {"method": "magnitude", "sparsity": 0.5, "layers": ["hidden", "head"],
             "finetune": {"epochs": 2, "lr": 0.02, "batch_size": 32, "progress": False}},
            {"method": "huffman"},
        ],
    }
    r.update(over)
    return r


def _write(tmp_path, data, name="r.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_token_classifier_from_a_factory_runs_end_to_end(user_pkg, tmp_path):
    recipe = parse_recipe(_recipe(user_pkg))
    res = run_recipe(recipe, tmp_path / "out", progress=False)
    base, *_, final = res.rows
    assert base.test_error < 0.25, base  # learnt from dict batches (chance is 0.67)
    assert final.test_error < base.test_error + 0.1
    assert final.metric == "error" and final.macs_dense > 0
    # half of the hidden and head weights are gone
    assert final.nonzeros < base.nonzeros - 0.45 * (16 * 32 + 32 * 3)
    assert read_info(res.model_path).model["user_supplied"] is True
    # the packed user model gives exactly the compressed model's outputs on dict inputs
    import importlib

    fresh = importlib.import_module(f"{user_pkg}.nets").build(hidden=32)
    restored = load(res.model_path, model=fresh).eval()
    batch = recipe.load_data().test[:]
    res.model.eval()
    a = res.model(batch["input_ids"], batch["attention_mask"])["logits"]
    b = restored(batch["input_ids"], batch["attention_mask"])["logits"]
    assert torch.equal(a, b)
    assert res.speed is not None and len(res.speed.baseline_ms) == 2


def test_npz_dict_data_weights_file_and_the_cli(user_pkg, tmp_path, capsys):
    import importlib

    nets = importlib.import_module(f"{user_pkg}.nets")
    _token_npz(tmp_path / "tokens.npz", user_pkg)
    torch.manual_seed(3)
    trained = nets.build()
    from netshrink.train import TrainConfig, Trainer

    splits = parse_recipe(_recipe(user_pkg, data="tokens.npz"), base=tmp_path).load_data()
    Trainer(trained, TrainConfig(epochs=8, lr=0.1, batch_size=32, progress=False)).fit(splits.train)
    torch.save(trained.state_dict(), tmp_path / "weights.pt")
    from netshrink.task import DEFAULT_TASK

    err = DEFAULT_TASK.evaluate(trained, splits.test)
    r = _recipe(user_pkg, data="tokens.npz", weights="weights.pt", model_args={}, train={"epochs": 0},
                stages=[{"method": "kmeans", "bits": 4, "layers": ["hidden", "head"]}])
    path = _write(tmp_path, r)
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "kmeans" in text
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows[0]["test_error"] == pytest.approx(err)  # no training: the baseline is the weights file
    assert rows[-1]["test_error"] < err + 0.1
    # --check validates everything and writes nothing
    assert main(["run", str(path), "--out", str(tmp_path / "checked"), "--check"]) == 0
    assert "nothing written" in capsys.readouterr().out and not (tmp_path / "checked").exists()


def test_safetensors_weights_and_their_mismatch(user_pkg, tmp_path):
    import importlib

    from safetensors.torch import load_file, save_file

    nets = importlib.import_module(f"{user_pkg}.nets")
    save_file(nets.build().state_dict(), str(tmp_path / "w.safetensors"))
    r = parse_recipe(_recipe(user_pkg, weights=str(tmp_path / "w.safetensors")))
    m = r.build_model()
    assert torch.equal(m.hidden.weight, load_file(str(tmp_path / "w.safetensors"))["hidden.weight"])
    save_file(nets.build(hidden=8).state_dict(), str(tmp_path / "w8.safetensors"))
    with pytest.raises(ModelError, match="'hidden.weight' has shape"):
        parse_recipe(_recipe(user_pkg, weights=str(tmp_path / "w8.safetensors"))).build_model()
    (tmp_path / "pickle.pt").write_bytes(b"\x80\x04\x95not a real pickle")
    with pytest.raises(DataError, match="weights_only=True"):
        parse_recipe(_recipe(user_pkg, weights=str(tmp_path / "pickle.pt"))).build_model()
    with pytest.raises(ConfigError, match="weights: .*file not found"):
        parse_recipe(_recipe(user_pkg, weights=str(tmp_path / "none.pt")))


def test_regression_task_from_a_recipe_on_npz(tmp_path, monkeypatch):
    monkeypatch.setenv("NETSHRINK_CACHE", str(tmp_path / "cache"))
    g = np.random.default_rng(0)
    x = g.normal(size=(400, 8)).astype(np.float32)
    y = (x @ g.normal(size=(8, 2))).astype(np.float32)
    np.savez(tmp_path / "reg.npz", x=x, y=y)
    r = {"model": "mlp", "model_args": {"in_features": 8, "hidden": [32], "num_classes": 2}, "data": str(tmp_path / "reg.npz"),
         "task": "regression", "train": {"epochs": 15, "lr": 0.05, "batch_size": 32, "progress": False},
         "stages": [{"method": "magnitude", "sparsity": 0.3}]}
    res = run_recipe(parse_recipe(r), tmp_path / "out", progress=False)
    base, pruned = res.rows
    assert base.metric == "mse" and 0 <= base.test_error < 0.3 * float(np.var(y)), base
    assert pruned.test_error < 2 * base.test_error + 0.05


# ------------------------------------------------------------------------------- bad input (issue 13)


def _bad(user_pkg, tmp_path):
    """Each bad recipe and the words its one-line error must contain."""
    np.savez(tmp_path / "mismatch.npz", train_x=np.zeros((10, 4), np.float32), train_y=np.zeros(9, np.int64),
             val_x=np.zeros((5, 4), np.float32), val_y=np.zeros(5, np.int64), test_x=np.zeros((5, 4), np.float32), test_y=np.zeros(5, np.int64))
    np.savez(tmp_path / "ok4.npz", x=np.zeros((30, 4), np.float32), y=np.zeros(30, np.int64))
    small = {"train": {"epochs": 1, "progress": False}, "stages": [{"method": "magnitude", "sparsity": 0.5}]}
    return [
        (_recipe(user_pkg, model="no_such_pkg.nets:build"), "cannot import 'no_such_pkg.nets'"),
        (_recipe(user_pkg, model=f"{user_pkg}.nets:nothing_here"), "has no attribute 'nothing_here'"),
        (_recipe(user_pkg, model=f"{user_pkg}.nets:broken"), "the factory"),
        (_recipe(user_pkg, data=f"{user_pkg}.nets:broken"), "cannot build this"),
        (_recipe(user_pkg, data=f"{user_pkg}.nets:not_splits"), "expected netshrink.data.Splits"),
        ({"model": "mlp", "model_args": {"in_features": 7}, "data": str(tmp_path / "ok4.npz"), **small}, "the model rejects the example inputs"),
        (_recipe(user_pkg, task=f"{user_pkg}.nets:per_example_loss"), "the loss must return a scalar"),
        (_recipe(user_pkg, task=f"{user_pkg}.nets:failing_metric"), "the metric 'broken' failed"),
        ({"model": "mlp", "model_args": {"in_features": 4}, "data": str(tmp_path / "mismatch.npz"), **small}, "mismatched lengths"),
        (_recipe(user_pkg, data=str(tmp_path / "none.npz")), "none.npz: no such file or folder"),
    ]


def test_bad_inputs_are_one_line_exit_2_and_write_nothing(user_pkg, tmp_path, capsys):
    for i, (recipe, needle) in enumerate(_bad(user_pkg, tmp_path)):
        path = _write(tmp_path, recipe, f"bad{i}.yaml")
        out = tmp_path / f"out{i}"
        assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 2, needle
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1 and err.startswith("netshrink: error:"), (needle, err)
        assert not out.exists(), needle
    assert not (tmp_path / "cache").exists()  # not even a cached baseline


def test_factory_error_names_the_field(user_pkg):
    with pytest.raises(ConfigError) as err:
        parse_recipe(_recipe(user_pkg, model=f"{user_pkg}.nets:broken"))
    assert err.value.field == "model" and "RuntimeError: the factory cannot build this" in str(err.value)
    with pytest.raises(ConfigError, match="'package.module:function'"):
        parse_recipe(_recipe(user_pkg, model="not a model"))
    with pytest.raises(ConfigError, match="task: unknown task 'translation'"):
        parse_recipe(_recipe(user_pkg, task="translation"))


def test_relative_paths_start_at_the_recipe_folder(user_pkg, tmp_path, monkeypatch):
    sub = tmp_path / "project"
    sub.mkdir()
    _token_npz(sub / "tokens.npz", user_pkg)
    path = _write(sub, _recipe(user_pkg, data="tokens.npz"))
    monkeypatch.chdir(tmp_path)
    r = load_recipe(path)
    assert r.data == str(sub / "tokens.npz") and len(r.load_data().train) == 600


def test_a_user_model_run_resumes_to_the_same_result(user_pkg, tmp_path, monkeypatch):
    from netshrink.train import Trainer

    ft = {"epochs": 2, "lr": 0.02, "batch_size": 32, "progress": False}
    recipe = parse_recipe(_recipe(user_pkg, train={"epochs": 3, "lr": 0.1, "batch_size": 32, "progress": False}, stages=[
        {"method": "magnitude", "sparsity": 0.5, "layers": ["hidden", "head"], "finetune": ft},
        {"method": "kmeans", "bits": 4, "layers": ["hidden", "head"], "finetune": ft},
        {"method": "huffman"},
    ]))
    straight = run_recipe(recipe, tmp_path / "a", progress=False)
    calls = {"n": 0}
    real = Trainer._run_epoch

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # (the baseline is cached) the 2nd fine-tuning epoch after k-means: stage 1 is packed
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(Trainer, "_run_epoch", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, tmp_path / "b", progress=False)
    assert (tmp_path / "b" / "stages" / "01-magnitude.nsk").exists() and not (tmp_path / "b" / "model.nsk").exists()
    monkeypatch.setattr(Trainer, "_run_epoch", real)
    resumed = run_recipe(recipe, tmp_path / "b", resume=True, progress=False)
    assert [(r.stage, r.test_error, r.nonzeros, r.bytes) for r in resumed.rows] == [
        (r.stage, r.test_error, r.nonzeros, r.bytes) for r in straight.rows
    ]
    assert (tmp_path / "a" / "model.nsk").read_bytes() == (tmp_path / "b" / "model.nsk").read_bytes()


def test_a_user_model_that_rejects_a_built_in_data_set_is_caught_at_parse_time(user_pkg, tmp_path, capsys):
    path = _write(tmp_path, _recipe(user_pkg, data="digits"))  # the token model cannot take images
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "data: the model does not take digits inputs of shape (1, 8, 8)" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
