"""Reports built from a run and its packed files: ``netshrink info`` text and the run's report.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from ._extras import MissingExtraError
from .pack import NskInfo, read_info
from .report import markdown_table, plot_sparsity, plot_weight_sharing, stage_table, text_table, write_markdown


def _is_layer_weight(t: Any) -> bool:
    """A Linear/Conv weight (BatchNorm's 1-D weight is not one)."""
    return t.name.endswith("weight") and len(t.shape) >= 2


def stream_rows(info: NskInfo) -> list[list[str]]:
    """Per coded stream against its Shannon bound ``n*H``: the whole section (head, code table, sync
    index and codewords) in 'bits/symbol' and 'over entropy', the codewords alone in 'coded bits' and
    'codewords over entropy'. Huffman's codewords are within 1 bit/symbol of ``H``; rANS's within a
    few bits in all, so its table decides how close the section comes."""
    rows = []
    for t in info.tensors:
        for name, s in t.streams.items():
            if not s.count:
                continue
            bits = 8 * s.section_bytes
            over = 100.0 * (bits / s.entropy_bits - 1.0) if s.entropy_bits > 0 else 0.0
            over_cw = 100.0 * (s.coded_bits / s.entropy_bits - 1.0) if s.entropy_bits > 0 else 0.0
            rows.append(
                [
                    f"{t.name}/{name}",
                    s.coding if s.block == 1 else f"{s.coding} (blocks of {s.block})",
                    f"{s.count:,}",
                    f"{bits / s.count:.3f}",
                    f"{s.entropy_per_symbol:.3f}",
                    f"{over:+.2f}%",
                    f"{s.coded_bits:,}",
                    f"{s.entropy_bits:,.0f}",
                    f"{s.section_bytes:,}",
                    f"{over_cw:+.2f}%",
                ]
            )
    return rows


STREAM_COLUMNS = ("stream", "coding", "symbols", "bits/symbol (section)", "entropy bits/symbol", "over entropy (section, table included)",
                  "coded bits", "entropy bound bits", "section bytes", "codewords over entropy")


def layer_rows(final: NskInfo, before_huffman: NskInfo | None) -> list[list[str]]:
    """Deep Compression's Table 2: per layer, weights kept, weight (index) bits and position bits
    before and after Huffman coding, and the layer's compression ratio."""
    prev = {t.name: t for t in before_huffman.tensors} if before_huffman is not None else {}
    rows = []
    for t in final.tensors:
        if not _is_layer_weight(t):
            continue
        p = prev.get(t.name, t)
        idx, pos = t.streams.get("indices"), t.streams.get("positions")
        pidx, ppos = p.streams.get("indices"), p.streams.get("positions")
        cell = lambda s, per: "-" if s is None else f"{s.coded_bits / max(1, per):.2f}"  # noqa: E731
        rows.append(
            [
                t.name,
                f"{t.numel:,}",
                f"{100.0 * t.nonzeros / max(1, t.numel):.1f}%",
                cell(pidx, p.kept) if pidx is not None else ("32" if p.encoding in ("raw", "sparse") else "-"),
                cell(idx, t.kept) if idx is not None else ("32" if t.encoding in ("raw", "sparse") else "-"),
                cell(ppos, p.kept),
                cell(pos, t.kept),
                f"{4 * t.numel / max(1, t.nbytes):.1f}x",
            ]
        )
    return rows


LAYER_COLUMNS = ("layer", "weights", "kept", "weight bits (P+Q)", "weight bits (P+Q+H)", "index bits (P+Q)", "index bits (P+Q+H)", "ratio")


def info_text(info: NskInfo) -> str:
    """What ``netshrink info`` prints: the file, each tensor, each section and each coded stream."""
    model = info.model.get("zoo") or info.model.get("class", "user-supplied")
    lines = [
        f"{info.path}: .nsk version {info.version}, model {model} {json.dumps(info.model.get('args', {}))}",
        f"  {info.total_bytes:,} bytes ({info.header_bytes:,} header), dense fp32 {info.dense_fp32_bytes:,} bytes: {info.ratio:.1f}x",
        "",
    ]
    rows = [
        [
            t.name,
            "x".join(map(str, t.shape)) or "scalar",
            t.encoding,
            f"{t.nonzeros:,}",
            f"{100.0 * t.kept / max(1, t.numel):.1f}%",
            str(t.codebook_size) if t.codebook_size else "-",
            f"{t.bits_per_kept:.2f}",
            f"{t.nbytes:,}",
            f"{100.0 * t.share:.1f}%",
        ]
        for t in info.tensors
    ]
    lines.append(text_table(("tensor", "shape", "encoding", "non-zeros", "kept", "codebook", "bits/kept", "bytes", "share"), rows))
    lines += ["", text_table(("section", "offset", "bytes", "share"), [[s.name, f"{s.offset:,}", f"{s.nbytes:,}", f"{100.0 * s.share:.1f}%"] for t in info.tensors for s in t.sections])]
    streams = stream_rows(info)
    if streams:
        lines += ["", text_table(STREAM_COLUMNS, streams)]
    return "\n".join(lines)


def coverage_sections(result: Any) -> str:
    """Markdown: per method applied in this run, its summary, notes and a table of every parameter
    (compressed and how, skipped and why, excluded, kept); "" when no method recorded one."""
    from ._coverage import COLUMNS, coverage_log

    model = getattr(result, "model", None)
    logs = coverage_log(model) if model is not None else []
    parts = []
    for i, cov in enumerate(logs, start=1):
        lines = [f"**{i}. {cov.summary()}**"]
        lines += [f"- {n}" for n in cov.notes]
        skipped = cov.skipped
        if skipped:
            lines.append(f"- skipped: {', '.join(skipped)} (the reasons are in the table)")
        lines += ["", markdown_table(COLUMNS, cov.rows())]
        parts.append("\n".join(lines))
    if parts:
        parts.insert(0, "Statuses: compressed (how), skipped (a layer weight the method could not handle: why; "
                        "`strict: true` makes it an error), excluded (outside the stage's `layers`), kept (not what "
                        "the method acts on). Tied parameters appear once, with their other names. Stages resumed "
                        "from a file are not listed.")
    return "\n\n".join(parts)


def write_run_report(result: Any, recipe: Any) -> Path:
    """report.md, weights.png and sparsity.png in the run's folder."""
    out = Path(result.out_dir)
    final = read_info(result.model_path)
    fixed_files = [Path(r.file) for r in result.rows if r.file and r.coding == "fixed"]
    before = read_info(fixed_files[-1]) if fixed_files else None
    sections: list[tuple[str, str]] = [
        ("Stages", stage_table(result.rows) + "\n\nbits/nz = bits of the whole file per non-zero weight; ratio = dense fp32 bytes / file bytes."),
        ("Layers (P = pruning, Q = quantization, H = Huffman coding)", markdown_table(LAYER_COLUMNS, layer_rows(final, before))),
    ]
    streams = stream_rows(final)
    if streams:
        sections.append(("Coded streams against their entropy bound", markdown_table(STREAM_COLUMNS, streams)))
    speed = getattr(result, "speed", None)
    if speed is not None:
        table = markdown_table(
            ("model", "MACs", *[f"batch {b} (ms)" for b in speed.batch_sizes]),
            [["dense baseline", f"{speed.macs_baseline:,}", *[f"{v:.3f}" for v in speed.baseline_ms]],
             ["compressed (decoded model.nsk)", f"{speed.macs_compressed:,}", *[f"{v:.3f}" for v in speed.compressed_ms]]],
        )
        note = (f"Median latency in torch on this machine ({speed.threads} threads), the two models timed in turns in the "
                "same run (`netshrink.metrics.compare_latency`).")
        sections.append(("Speed", table + "\n\n" + note + "\n\n" + "\n".join(f"- {v}" for v in speed.verdicts())))
    try:  # plots need the `plot` extra; without it the report says so and the run still ends well
        weights = plot_weight_sharing(result.layer_snapshots, out / "weights.png")
        layers = [(t.name.rsplit(".", 1)[0], t.numel, t.nonzeros) for t in final.tensors if _is_layer_weight(t)]
        plot_sparsity(layers, out / "sparsity.png")
        pics = "![non-zero weights per layer](sparsity.png)"
        if weights is not None:
            pics = "![weights before and after sharing](weights.png)\n\n" + pics
    except MissingExtraError as err:
        pics = f"Not drawn: {err}"
    sections.append(("Plots", pics))
    coverage = coverage_sections(result)
    if coverage:
        sections.append(("Coverage: what each method did to each parameter", coverage))
    return write_markdown(out / "report.md", sections, f"netshrink run: {recipe.name}")


__all__: Sequence[str] = ["coverage_sections", "info_text", "write_run_report", "layer_rows", "stream_rows"]
