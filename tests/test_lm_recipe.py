"""A language-model recipe end to end: the registered Python-docs corpus (here from a folder of text),
llama_tiny, GPTQ on the blocks and RTN on the token table and head, perplexity in every row."""

import pytest

from netshrink.data import load_dataset
from netshrink.errors import ConfigError
from netshrink.pack import read_info
from netshrink.pipeline import run_recipe
from netshrink.recipe import parse_recipe


@pytest.fixture()
def text_folder(tmp_path):
    folder = tmp_path / "text"
    folder.mkdir()
    for i in range(60):
        (folder / f"doc{i}.txt").write_text(f"Section {i}. The quick brown fox jumps over the lazy dog, then rests. " * 12)
    return folder


def _recipe(folder) -> dict:
    return {
        "name": "tiny-lm", "model": "llama_tiny", "data": "python_docs", "task": "language_modeling", "seed": 0,
        "data_args": {"seq_len": 64, "tokenizer": "byte", "source": str(folder), "max_train_chunks": 48, "max_eval_chunks": 8},
        "train": {"epochs": 2, "optimizer": "adam", "lr": 0.003, "batch_size": 8, "progress": False},
        "stages": [
            {"method": "gptq", "bits": 4, "group_size": 32, "samples": 16, "progress": False},
            {"method": "rtn", "label": "rtn head", "layers": [], "extra_layers": ["embed", "lm_head"], "bits": 4, "group_size": 32},
        ],
    }


def test_the_corpus_is_a_registered_data_set(text_folder):
    s = load_dataset("python_docs", seq_len=32, tokenizer="byte", source=str(text_folder), max_eval_chunks=4)
    assert s.num_classes == 256 and len(s.test) == 4 and tuple(s.train[0].shape) == (32,)
    with pytest.raises(ConfigError, match="seq_len"):
        load_dataset("python_docs", seq_len=1, source=str(text_folder))
    for bad in ("x", -3, 0, True):
        with pytest.raises(ConfigError, match="data_args.max_train_chunks"):
            load_dataset("python_docs", source=str(text_folder), max_train_chunks=bad)


def test_gptq_then_int4_head_recipe(text_folder, tmp_path):
    res = run_recipe(parse_recipe(_recipe(text_folder)), tmp_path / "out", progress=False)
    base, gptq, head = res.rows
    assert base.test_error < 32  # it learned: a uniform byte model has perplexity 256
    assert gptq.test_error < 1.1 * base.test_error and head.test_error < 1.1 * base.test_error
    assert base.bytes / head.bytes > 5  # every matrix on 4 bits
    enc = {t.name: t.encoding for t in read_info(res.model_path).tensors}
    assert enc["embed.weight"] == enc["lm_head.weight"] == enc["layers.0.mlp.up_proj.weight"] == "groupq"
