
import pytest
import yaml

from netshrink.cli import main


def _write(tmp_path, data, name="r.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_run_info_eval_unpack(digits_recipe, tmp_path, capsys):
    r = _write(tmp_path, digits_recipe)
    out = tmp_path / "out"
    assert main(["run", str(r), "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "huffman" in text and "ratio" in text
    assert main(["info", str(out / "model.nsk")]) == 0
    info = capsys.readouterr().out
    assert "fc1.weight" in info and "sparse_codebook" in info and "entropy" in info
    assert main(["eval", str(out / "model.nsk"), "--data", "digits", "--runs", "20"]) == 0
    assert "test error" in capsys.readouterr().out
    st = tmp_path / "w.safetensors"
    assert main(["unpack", str(out / "model.nsk"), "-o", str(st)]) == 0
    from safetensors.numpy import load_file

    assert set(load_file(str(st))) >= {"fc1.weight", "fc1.bias"}


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda d: d.update(colour="red"), "colour: unknown key"),
        (lambda d: d["stages"][0].update(sparsity=1.0), "stages[0].sparsity"),
        (lambda d: d["stages"][1].update(bits=17), "stages[1].bits"),
        (lambda d: d["stages"][1].update(bits="five"), "stages[1].bits"),
        (lambda d: d["stages"][0].update(layers=["fc7"]), "no layer named 'fc7'"),
        (lambda d: d["stages"][2].update(method="teleport"), "unknown method 'teleport'"),
    ],
)
def test_bad_recipe_is_one_line_exit_2_and_writes_nothing(digits_recipe, tmp_path, capsys, change, needle):
    change(digits_recipe)
    r = _write(tmp_path, digits_recipe)
    out = tmp_path / "out"
    assert main(["run", str(r), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and err.startswith("netshrink: error:")
    assert not out.exists()


def test_bad_files_are_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "bad.nsk"
    bad.write_bytes(b"not an nsk file at all")
    for argv in (["info", str(bad)], ["eval", str(bad)], ["unpack", str(bad), "-o", str(tmp_path / "x.safetensors")], ["run", str(tmp_path / "missing.yaml")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("netshrink: error:"), argv
    assert not (tmp_path / "x.safetensors").exists()


def test_unwritable_unpack_target_is_one_line_and_keeps_what_is_there(tmp_path, capsys):
    from netshrink.models import build_model
    from netshrink.pack import pack

    f = tmp_path / "m.nsk"
    pack(build_model("mlp"), f)
    a_file = tmp_path / "plain.txt"
    a_file.write_text("keep me")
    a_dir = tmp_path / "a_dir"
    a_dir.mkdir()
    (a_dir / "inside").write_text("keep me too")
    for target in (a_file / "w.safetensors", a_dir):  # parent is a file; target is a folder
        assert main(["unpack", str(f), "-o", str(target)]) == 3  # EXIT_OUTPUT
        err = capsys.readouterr().err.strip()
        assert err.startswith("netshrink: error:") and len(err.splitlines()) == 1 and str(target) in err
    assert a_file.read_text() == "keep me" and (a_dir / "inside").read_text() == "keep me too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir", "m.nsk", "plain.txt"]


def test_eval_on_data_the_model_cannot_take(tmp_path, capsys):
    from netshrink.models import build_model
    from netshrink.pack import pack

    f = tmp_path / "l5.nsk"
    pack(build_model("lenet5"), f)
    assert main(["eval", str(f), "--data", "digits"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("netshrink: error: --data:") and len(err.splitlines()) == 1


def _digits_nsk(tmp_path, quantized=False):
    import torch

    from netshrink.data import load_dataset
    from netshrink.models import build_model
    from netshrink.pack import pack
    from netshrink.quantize import Int8Config, quantize_

    torch.manual_seed(0)
    m = build_model("mlp", in_features=64, hidden=[32])
    if quantized:
        quantize_(m, Int8Config(calibration_samples=64), data=load_dataset("digits"))
    p = tmp_path / ("q.nsk" if quantized else "m.nsk")
    pack(m.eval(), p)
    return p


def test_export_fp32_and_int8_then_eval_onnx(tmp_path, capsys):
    src = _digits_nsk(tmp_path)
    assert main(["export", str(src), "-o", str(tmp_path / "m.onnx"), "--data", "digits"]) == 0
    assert "fp32" in capsys.readouterr().out
    assert main(["export", str(src), "-o", str(tmp_path / "q.onnx"), "--data", "digits", "--int8", "--calib", "64"]) == 0
    assert "int8 QDQ (2 int8 layers)" in capsys.readouterr().out
    qsrc = _digits_nsk(tmp_path, quantized=True)  # already quantized: its own scales are exported
    assert main(["export", str(qsrc), "-o", str(tmp_path / "q2.onnx"), "--data", "digits", "--int8"]) == 0
    capsys.readouterr()
    for f in ("m.onnx", "q.onnx", "q2.onnx"):
        assert main(["eval", str(tmp_path / f), "--data", "digits", "--runs", "20", "--threads", "1"]) == 0
        out = capsys.readouterr().out
        assert "test error" in out and "onnxruntime" in out and "latency batch   64" in out


def test_export_and_onnx_eval_errors_are_one_line(tmp_path, capsys):
    src = _digits_nsk(tmp_path)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    cases = [
        ["export", str(src), "-o", str(tmp_path / "x.onnx"), "--calib", "0", "--int8"],
        ["export", str(src), "-o", str(tmp_path / "x.onnx"), "--data", "imagenet"],
        ["export", str(tmp_path / "missing.nsk"), "-o", str(tmp_path / "x.onnx")],
        ["eval", str(bad), "--data", "digits"],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("netshrink: error:"), (argv, err)
    assert main(["export", str(src), "-o", str(tmp_path / "m.onnx"), "--data", "digits"]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "m.onnx"), "--data", "mnist"]) == 2  # 8x8 model, 28x28 data: refused before loading
    assert "shape" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
