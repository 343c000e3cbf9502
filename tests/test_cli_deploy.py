"""`netshrink deploy`: every runtime form of a packed model timed, the fastest written, bad input one line."""

from __future__ import annotations

import json

import pytest
import torch

from netshrink.cli import main
from netshrink.models import build_model
from netshrink.pack import pack
from netshrink.prune import MagnitudeConfig, prune_

pytest.importorskip("onnxruntime")


def test_deploy_command_writes_the_fastest_form(tmp_path, capsys):
    torch.manual_seed(0)
    m = build_model("mlp", in_features=64, hidden=[32], num_classes=10)
    prune_(m, MagnitudeConfig(sparsity=0.9))
    pack(m, tmp_path / "m.nsk")
    out = tmp_path / "dep"
    assert main(["deploy", str(tmp_path / "m.nsk"), "--out", str(out), "--data", "digits", "--batch", "1", "4"]) == 0
    text = capsys.readouterr().out
    info = json.loads((out / "deploy.json").read_text())
    assert f"fastest: {info['chosen']}" in text
    assert {f["name"] for f in info["forms"]} == {"torch", "torch-sparse", "onnx-fp32"}
    assert (out / "model.onnx").exists() == (info["chosen"] != "torch" and info["chosen"] != "torch-sparse")


def test_deploy_bad_input_is_one_line(tmp_path, capsys):
    assert main(["deploy", str(tmp_path / "missing.nsk"), "--out", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.nsk" in err[0]
    pack(build_model("mlp", in_features=64, hidden=[8], num_classes=10), tmp_path / "m.nsk")
    assert main(["deploy", str(tmp_path / "m.nsk"), "--out", str(tmp_path / "o"), "--data", "cifar"]) == 2
    assert "--data" in capsys.readouterr().err
