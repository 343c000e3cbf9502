"""No traceback from any subcommand on any input (issue 14 part 3): every subcommand x every kind of
bad input is one stderr line, the exit code of its class, and nothing written."""

import pytest
import yaml

from netshrink import _faults as F
from netshrink.cli import EXIT_CODES, build_parser, main


@pytest.fixture
def files(tmp_path, monkeypatch):
    import torch

    from netshrink.models import build_model
    from netshrink.pack import pack

    monkeypatch.setenv("NETSHRINK_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    good = tmp_path / "in" / "good.nsk"
    good.parent.mkdir()
    pack(build_model("mlp", in_features=64, hidden=[16]).eval(), good)
    recipe = tmp_path / "in" / "good.yaml"
    recipe.write_text(yaml.safe_dump({"name": "ok", "model": "mlp", "model_args": {"in_features": 64, "hidden": [8]},
                                      "data": "digits", "train": {"epochs": 0}, "stages": [{"method": "huffman"}]}))
    return tmp_path / "work", good, recipe


def test_every_subcommand_and_bad_input_is_one_line_and_writes_nothing(files):
    folder, good, recipe = files
    cases = F.bad_input_cases(folder, good, recipe)
    assert {(c.command, c.kind) for c in cases} >= {(cmd, k) for cmd in ("info", "eval", "eval (onnx)", "unpack", "export", "run")
                                                    for k in F.BAD_INPUTS[:-1]}
    for case in cases:
        r = F.run_cli_case(case, folder)
        assert r["code"] == case.expected, r
        assert r["lines"] == 1 and not r["traceback"] and r["message"].startswith("netshrink: error:"), r
        assert not r["written"], r


def test_exit_codes_are_documented_in_the_help(capsys):
    text = build_parser().format_help()
    for code, meaning in EXIT_CODES.items():
        assert f"{code:>3}  {meaning}" in text


def test_a_yaml_alias_bomb_and_deep_nesting_are_refused(tmp_path, capsys):
    bomb = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]"
                                                     for p, c in zip("abcdefgh", "bcdefghi")]
    (tmp_path / "bomb.yaml").write_text("\n".join(bomb) + "\n")
    (tmp_path / "deep.yaml").write_text("x: " + "[" * 200 + "]" * 200 + "\n")
    for name, needle in (("bomb.yaml", "aliases"), ("deep.yaml", "nested deeper")):
        assert main(["run", str(tmp_path / name), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err
    assert not (tmp_path / "o").exists()


def test_an_onnx_file_with_external_data_or_failing_the_checker_is_refused(tmp_path, capsys):
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[64, 10])
    w.data_location = TensorProto.EXTERNAL
    w.external_data.add(key="location", value="../../etc/passwd")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], [w])
    (tmp_path / "ext.onnx").write_bytes(helper.make_model(graph).SerializeToString())
    bad_graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])])
    (tmp_path / "bad.onnx").write_bytes(helper.make_model(bad_graph).SerializeToString())
    for name, needle in (("ext.onnx", "external data"), ("bad.onnx", "invalid ONNX model")):
        assert main(["eval", str(tmp_path / name), "--data", "digits"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err


def test_a_gzip_bomb_idx_file_stops_at_the_limit(tmp_path, monkeypatch):
    import gzip

    from netshrink import _inputs
    from netshrink.data import load_idx
    from netshrink.errors import DataError

    monkeypatch.setattr(_inputs, "MAX_IDX_BYTES", 1 << 20)
    (tmp_path / "img.gz").write_bytes(gzip.compress(bytes(8 << 20)))  # 8 MiB of zeros in a few KB
    (tmp_path / "lab").write_bytes(bytes(16))
    with pytest.raises(DataError, match="gunzips past"):
        load_idx(tmp_path / "img.gz", tmp_path / "lab")
