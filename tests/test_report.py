import torch
from torch import nn

from netshrink.pack import pack, read_info
from netshrink.prune import MagnitudeConfig, prune_
from netshrink.quantize import KMeansConfig, quantize_
from netshrink.report import markdown_table, plot_sparsity, text_table
from netshrink.run_report import info_text, layer_rows, stream_rows


def _packed(tmp_path, coding):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(50, 40), nn.ReLU(), nn.Linear(40, 10))
    prune_(net, MagnitudeConfig(sparsity=0.8))
    quantize_(net, KMeansConfig(bits=4))
    path = tmp_path / f"{coding}.nsk"
    pack(net, path, coding=coding)
    return read_info(path)


def test_tables_align_and_keep_cells():
    md = markdown_table(("a", "b"), [["x", "1"], ["yy", "22"]])
    assert md.splitlines()[1] == "|---|---:|" and "| yy | 22 |" in md
    assert markdown_table(("a", "b"), [["mean|W|", 3]]).splitlines()[2] == "| mean\\|W\\| | 3 |"  # one row, two cells
    txt = text_table(("name", "n"), [["long name", "5"]]).splitlines()
    assert len({len(line) for line in txt}) == 1


def test_layer_rows_show_bits_before_and_after_huffman(tmp_path):
    fixed, huff = _packed(tmp_path, "fixed"), _packed(tmp_path, "huffman")
    rows = layer_rows(huff, fixed)
    assert [r[0] for r in rows] == ["0.weight", "2.weight"]
    assert rows[0][2] == "20.0%"
    assert float(rows[0][3]) == 4.0  # fixed 4-bit cluster indices before Huffman
    assert float(rows[0][4]) < 4.0  # Huffman codes them in fewer bits on average
    streams = stream_rows(huff)
    assert {r[0] for r in streams} == {"0.weight/positions", "0.weight/indices", "2.weight/positions", "2.weight/indices"}
    for r in streams:
        assert float(r[3]) >= float(r[4])  # never below the entropy bound


def test_info_text_names_every_tensor_and_section(tmp_path):
    info = _packed(tmp_path, "auto")
    text = info_text(info)
    for t in info.tensors:
        assert t.name in text
        for s in t.sections:
            assert s.name in text
    assert f"{info.total_bytes:,} bytes" in text


def test_sparsity_plot_is_a_png(tmp_path):
    out = plot_sparsity([("fc1", 100, 10), ("fc2", 50, 25)], tmp_path / "s.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
