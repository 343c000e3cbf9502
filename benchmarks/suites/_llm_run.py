"""The body of the ``llm`` suite (see :mod:`benchmarks.suites.llm`)."""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from netshrink.export_lm import export_lm, lm_session, ort_perplexity
from netshrink.lowrank import AsvdConfig
from netshrink.prune import MagnitudeConfig, SparseGptConfig, WandaConfig
from netshrink.quantize import AwqConfig, GptqConfig, RtnConfig, SmoothQuantConfig
from netshrink._registry import handler_for
from netshrink.report import markdown_table
from netshrink.task import language_modeling
from netshrink.text import python_docs

from . import SummaryRow
from .llm import CALIB, EVAL_CHUNKS, MODEL_ARGS, SEQ, TRAIN, baseline

ORT_THREADS = 1
PROMPT, NEW_TOKENS, ROUNDS = 128, 64, 5
#: the token table and the LM head, which block-by-block calibration does not reach, rounded to 4 bits
EXTRA_RTN = RtnConfig(bits=4, group_size=128, layers=[], extra_layers=["embed", "lm_head"])
RT_BLOCKS = "ORT int4 blocks (GPTQ g128)"
RT_ALL = "ORT int4 everything (+ RTN embedding, head)"
RT_ALL_FAST = "ORT int4 everything, int8 activations"
#: wider models of the same architecture, random weights, for the speed of the int4 graph only
SCALE_ARGS = ({"dim": 1024, "hidden": 2816}, {"dim": 2048, "hidden": 5632})
SCALE_TOKENS, SCALE_ROUNDS = 16, 3


def get_row(rows: list[dict], label: str) -> dict:
    return rows[[r["method"] for r in rows].index(label)]


def _decode_rate(s, prompt: np.ndarray, n: int) -> float:
    from netshrink.export_lm import _empty

    k, v = _empty(s, 1)
    logits, k, v = s.run(None, {"input_ids": prompt, "past_k": k, "past_v": v})
    nxt = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
    t0 = time.perf_counter()
    for _ in range(n):
        logits, k, v = s.run(None, {"input_ids": nxt, "past_k": k, "past_v": v})
        nxt = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
    return n / (time.perf_counter() - t0)


def _scale_timing(work: Path, prompt: torch.Tensor) -> list[dict]:
    """Decode tokens/s of fp32 and int4 graphs of wider ``llama_lm`` models (random weights: speed and size
    only), each pair timed in alternating turns."""
    from netshrink.models import build_model

    out = []
    for extra in SCALE_ARGS:
        args = {**MODEL_ARGS, **extra}
        torch.manual_seed(0)
        m = build_model("llama_lm", **args).eval()
        params = sum(p.numel() for p in m.parameters())
        fp = export_lm(m, work / "scale_fp32.onnx")
        rtn = RtnConfig(bits=4, group_size=128, extra_layers=["embed", "lm_head"])
        handler_for(rtn)(m, rtn)
        q4 = export_lm(m, work / "scale_int4.onnx", weight_bits=4, accuracy_level=4)
        del m
        sessions = {"fp32": lm_session(fp.path, threads=ORT_THREADS), "int4": lm_session(q4.path, threads=ORT_THREADS)}
        ids = prompt.numpy()
        rates: dict[str, list[float]] = {"fp32": [], "int4": []}
        for r in range(SCALE_ROUNDS + 1):
            order = ("fp32", "int4") if r % 2 == 0 else ("int4", "fp32")
            for k in order:
                rate = _decode_rate(sessions[k], ids, SCALE_TOKENS)
                if r:  # round 0 is the warm-up
                    rates[k].append(rate)
        out.append({"args": args, "params": params, "fp32_bytes": fp.bytes, "int4_bytes": q4.bytes,
                    "fp32_tok_s": statistics.median(rates["fp32"]), "int4_tok_s": statistics.median(rates["int4"])})
        del sessions
        for f in (fp.path, q4.path):
            Path(f).unlink(missing_ok=True)
    return out


def _cases() -> list[tuple[str, object]]:
    c = {"samples": CALIB, "batch_size": 8, "progress": False}
    blocks = ["layers.*"]
    return [
        ("magnitude 50%", MagnitudeConfig(sparsity=0.5, layers=blocks)),
        ("Wanda 50%", WandaConfig(sparsity=0.5, **c)),
        ("SparseGPT 50%", SparseGptConfig(sparsity=0.5, **c)),
        ("magnitude 70%", MagnitudeConfig(sparsity=0.7, layers=blocks)),
        ("Wanda 70%", WandaConfig(sparsity=0.7, **c)),
        ("SparseGPT 70%", SparseGptConfig(sparsity=0.7, **c)),
        ("magnitude 2:4", None),  # per-group magnitude: Wanda's N:M selection with unit input norms (below)
        ("Wanda 2:4", WandaConfig(n=2, m=4, **c)),
        ("SparseGPT 2:4", SparseGptConfig(n=2, m=4, **c)),
        ("RTN 4-bit g128", RtnConfig(bits=4, group_size=128)),
        ("GPTQ 4-bit g128", GptqConfig(bits=4, group_size=128, **c)),
        ("AWQ 4-bit g128", AwqConfig(bits=4, group_size=128, rows=2048, grid=10, **c)),
        ("RTN 4-bit per-channel", RtnConfig(bits=4, group_size=None)),
        ("GPTQ 4-bit per-channel", GptqConfig(bits=4, group_size=None, **c)),
        ("AWQ 4-bit per-channel", AwqConfig(bits=4, group_size=None, rows=2048, grid=10, **c)),
        ("RTN 3-bit g128", RtnConfig(bits=3, group_size=128)),
        ("GPTQ 3-bit g128", GptqConfig(bits=3, group_size=128, **c)),
        ("AWQ 3-bit g128", AwqConfig(bits=3, group_size=128, rows=2048, grid=10, **c)),
        ("RTN 3-bit per-channel", RtnConfig(bits=3, group_size=None)),
        ("GPTQ 3-bit per-channel", GptqConfig(bits=3, group_size=None, **c)),
        ("AWQ 3-bit per-channel", AwqConfig(bits=3, group_size=None, rows=2048, grid=10, **c)),
        ("GPTQ 4-bit g128 act-order", GptqConfig(bits=4, group_size=128, act_order=True, **c)),
        ("SparseGPT 50% + 4-bit g128", SparseGptConfig(sparsity=0.5, bits=4, group_size=128, **c)),
        ("SmoothQuant W8A8", SmoothQuantConfig(**c)),
        ("ASVD (SVD-LLM whitening) 20% fewer", AsvdConfig(ratio=0.8, **c)),
    ]


@torch.no_grad()
def _magnitude_nm(model: torch.nn.Module) -> dict:
    from netshrink.calibrate import block_layers, find_blocks
    from netshrink.prune._mask import apply_mask
    from netshrink.prune.wanda import wanda_mask

    path, blocks = find_blocks(model)
    for block in blocks:
        for _, m in block_layers(block).items():
            apply_mask(m, wanda_mask(m.weight.abs(), n=2, m=4))
    return {}


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _nsk_bytes(model: torch.nn.Module, path: Path) -> tuple[int | None, str]:
    from netshrink.pack import pack

    try:
        return pack(model, path).total_bytes, ""
    except Exception as err:  # report, do not hide: the row says why it has no .nsk size
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"


def _timing(sessions: dict, model: torch.nn.Module, prompt: torch.Tensor) -> dict[str, dict[str, float]]:
    """Prompt and decode tokens/s per runtime, the runtimes timed in turns, ``ROUNDS`` rounds, medians."""
    from netshrink.export_lm import _empty

    def torch_run():
        k, v = model.empty_cache(1)
        t0 = time.perf_counter()
        logits, k, v = model.forward_cached(prompt, k, v)
        t1 = time.perf_counter()
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(NEW_TOKENS):
            logits, k, v = model.forward_cached(nxt, k, v)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
        return t1 - t0, time.perf_counter() - t1

    def ort_run(s):
        ids = prompt.numpy()
        k, v = _empty(s, 1)
        t0 = time.perf_counter()
        logits, k, v = s.run(None, {"input_ids": ids, "past_k": k, "past_v": v})
        t1 = time.perf_counter()
        nxt = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        for _ in range(NEW_TOKENS):
            logits, k, v = s.run(None, {"input_ids": nxt, "past_k": k, "past_v": v})
            nxt = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        return t1 - t0, time.perf_counter() - t1

    runners = {"torch fp32": torch_run, **{name: (lambda s=s: ort_run(s)) for name, s in sessions.items()}}
    for fn in runners.values():  # warm-up
        fn()
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in runners}
    for _ in range(ROUNDS):
        for name, fn in runners.items():
            times[name].append(fn())
    return {n: {"prompt_tok_s": PROMPT / statistics.median(p for p, _ in t), "decode_tok_s": NEW_TOKENS / statistics.median(d for _, d in t)}
            for n, t in times.items()}


def run(work: Path, results: Path, machine: list[str]) -> list[SummaryRow]:
    work.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()[0]
    corpus = python_docs()
    base, info = baseline(corpus)
    task = language_modeling()
    test = corpus.chunks("test", SEQ, max_chunks=EVAL_CHUNKS)
    train = corpus.chunks("train", SEQ, stride=SEQ // 2)
    calib = Subset(train, torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[:CALIB].tolist())
    n_params = sum(p.numel() for p in base.parameters())
    fp32_bytes = n_params * 4
    t0 = time.perf_counter()
    dense_ppl = task.evaluate(base, test, batch_size=16)
    eval_s = time.perf_counter() - t0
    dense_nsk, _ = _nsk_bytes(base, work / "dense.nsk")
    rows = [{"method": "dense fp32", "ppl": dense_ppl, "bytes": dense_nsk, "seconds": 0.0, "peak": None, "act": None, "note": ""}]
    models: dict[str, torch.nn.Module] = {}
    for label, cfg in _cases():
        m = copy.deepcopy(base)
        rss0 = _rss()
        t0 = time.perf_counter()
        res = _magnitude_nm(m) if cfg is None else handler_for(cfg)(m, cfg, data=calib)
        secs = time.perf_counter() - t0
        rep = getattr(res, "report", None)
        ppl = task.evaluate(m, test, batch_size=16)
        nbytes, why = _nsk_bytes(m, work / f"{label.split()[0]}-{len(rows)}.nsk")
        rows.append({"method": label, "ppl": ppl, "bytes": nbytes, "seconds": secs,
                     "peak": rep.peak_rss_bytes if rep else None, "rss_before": rss0, "act": rep.activation_bytes if rep else None,
                     "stats": rep.stats_bytes if rep else None, "note": why})
        if label in ("GPTQ 4-bit g128", "RTN 4-bit g128", "GPTQ 4-bit per-channel"):
            models[label] = m
        print(f"{label}: ppl {ppl:.2f} ({secs:.1f} s)", flush=True)

    # ---- the whole model on 4 bits: GPTQ's blocks, then RTN on the token table and the head (outside the blocks)
    label = "GPTQ 4-bit g128 + RTN 4-bit embedding and head"
    all4 = copy.deepcopy(models["GPTQ 4-bit g128"])
    t0 = time.perf_counter()
    handler_for(EXTRA_RTN)(all4, EXTRA_RTN)
    secs = get_row(rows, "GPTQ 4-bit g128")["seconds"] + time.perf_counter() - t0
    nbytes, why = _nsk_bytes(all4, work / "all4.nsk")
    rows.append({"method": label, "ppl": task.evaluate(all4, test, batch_size=16), "bytes": nbytes, "seconds": secs, "peak": None,
                 "act": None, "note": why})

    # ---- runtime: int4 / int8 MatMulNBits against fp32 in onnxruntime and torch
    int8 = copy.deepcopy(base)
    handler_for(RtnConfig(bits=8, group_size=128))(int8, RtnConfig(bits=8, group_size=128))
    sq = copy.deepcopy(base)
    handler_for(SmoothQuantConfig())(sq, SmoothQuantConfig(samples=CALIB, batch_size=8, progress=False), data=calib)
    exports = {
        "ORT fp32": export_lm(base, work / "fp32.onnx"),
        RT_BLOCKS: export_lm(models["GPTQ 4-bit g128"], work / "int4_blocks.onnx", weight_bits=4),
        RT_ALL: export_lm(all4, work / "int4_all.onnx", weight_bits=4),
        RT_ALL_FAST: export_lm(all4, work / "int4_all_fast.onnx", weight_bits=4, accuracy_level=4),
        "ORT int8 weights (RTN g128), int8 activations": export_lm(int8, work / "int8.onnx", weight_bits=8, accuracy_level=4),
        "ORT SmoothQuant W8A8": export_lm(sq, work / "smoothquant.onnx", weight_bits=8, accuracy_level=4),
    }
    sim = {"ORT fp32": base, RT_BLOCKS: models["GPTQ 4-bit g128"], RT_ALL: all4, RT_ALL_FAST: all4,
           "ORT int8 weights (RTN g128), int8 activations": int8, "ORT SmoothQuant W8A8": sq}
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(ORT_THREADS)
    sessions = {n: lm_session(e.path, threads=ORT_THREADS) for n, e in exports.items()}
    ort_ppl = {n: ort_perplexity(s, test, batch_size=16) for n, s in sessions.items()}
    sim_ppl = {n: task.evaluate(m, test, batch_size=16) for n, m in sim.items()}
    prompt = test[0][:PROMPT][None]
    timing = _timing(sessions, base, prompt)
    del sessions
    scale = _scale_timing(work, prompt)
    torch.set_num_threads(torch_threads)
    load1 = os.getloadavg()[0]

    # ---- write
    doc = _document(machine, info, n_params, fp32_bytes, dense_ppl, eval_s, rows, exports, ort_ppl, sim_ppl, timing, scale, load0, load1, corpus)
    (results / "llm.md").write_text(doc)
    (work / "rows.json").write_text(json.dumps({"rows": rows, "timing": timing, "scale": scale, "ort_ppl": ort_ppl, "sim_ppl": sim_ppl},
                                               indent=1, default=str))
    summary = []
    for r in rows:
        if r["method"] in ("dense fp32", "SparseGPT 50%", "GPTQ 4-bit g128", "SparseGPT 50% + 4-bit g128"):
            # the summary's error column is a percentage: perplexity / 100 shows as the perplexity with a % sign
            summary.append(SummaryRow("llm", f"{r['method']} (test perplexity in the error column)", "llama_lm", r["ppl"] / 100.0,
                                      n_params, n_params, r["bytes"] or 0, fp32_bytes / r["bytes"] if r["bytes"] else 0.0, 0, 0, 0.0, 0.0))
    return summary


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def _document(machine, info, n_params, fp32_bytes, dense_ppl, eval_s, rows, exports, ort_ppl, sim_ppl, timing, scale, load0, load1, corpus) -> str:
    get = {r["method"]: r for r in rows}
    table = []
    for r in rows:
        d = r["ppl"] / dense_ppl - 1
        table.append([r["method"], f"{r['ppl']:.2f}", f"{100 * d:+.1f}%", "-" if r["bytes"] is None else f"{r['bytes']:,}",
                      "-" if r["bytes"] is None else f"{fp32_bytes / r['bytes']:.2f}x", f"{r['seconds']:.1f}", _mib(r.get("peak")),
                      _mib(r.get("act")), _mib(r.get("stats")), r["note"]])
    rt = []
    base_ort = timing["ORT fp32"]
    for name, t in timing.items():
        e = exports.get(name)
        rt.append([name, "-" if e is None else f"{e.bytes:,}", "-" if e is None else f"{e.bytes / exports['ORT fp32'].bytes:.3f}",
                   f"{t['prompt_tok_s']:.0f}", f"{t['decode_tok_s']:.1f}", f"{t['decode_tok_s'] / base_ort['decode_tok_s']:.2f}x",
                   f"{t['prompt_tok_s'] / base_ort['prompt_tok_s']:.2f}x",
                   "-" if name not in ort_ppl else f"{ort_ppl[name]:.3f} / {sim_ppl[name]:.3f}"])

    def loss(label):
        return get[label]["ppl"] - dense_ppl

    checks = []
    for sp in (50, 70):
        mag = loss(f"magnitude {sp}%")
        for lab in (f"SparseGPT {sp}%", f"Wanda {sp}%"):
            frac = loss(lab) / mag if mag > 0 else float("nan")
            verdict = ("met" if frac <= 0.25 else "MISSED") if sp == 50 else "(not a target: the pattern at a sparsity where magnitude hurts)"
            checks.append(f"- {lab} loses {loss(lab):.2f} perplexity points against magnitude's {mag:.2f}: {frac:.2f} of it "
                          f"(target at most 0.25 at 50%): {verdict}")
    g4 = get["GPTQ 4-bit g128"]["ppl"] / dense_ppl - 1
    checks.append(f"- GPTQ 4-bit g128 is {100 * g4:+.1f}% from dense (target within 5%): {'met' if g4 <= 0.05 else 'MISSED'}")
    for bits in (4, 3):
        for g in ("g128", "per-channel"):
            gp, rp = get[f"GPTQ {bits}-bit {g}"]["ppl"], get[f"RTN {bits}-bit {g}"]["ppl"]
            checks.append(f"- GPTQ {bits}-bit {g} {gp:.2f} vs RTN {rp:.2f}: {'GPTQ better' if gp < rp else 'GPTQ NOT better'}")
    g3 = get["GPTQ 3-bit g128"]["ppl"] / dense_ppl
    checks.append(f"- GPTQ 3-bit g128 at {g3:.2f}x dense perplexity (target at most 2x): {'met' if g3 <= 2 else 'MISSED'}")
    sp = timing[RT_ALL_FAST]["decode_tok_s"] / base_ort["decode_tok_s"]
    fr = exports[RT_ALL].bytes / exports["ORT fp32"].bytes
    checks.append(f"- int4 decode at batch 1 on the trained model: {sp:.2f}x fp32 onnxruntime (target at least 3x): {'met' if sp >= 3 else 'MISSED'}")
    for sc in scale:
        r = sc["int4_tok_s"] / sc["fp32_tok_s"]
        checks.append(f"- int4 decode at batch 1, width {sc['args']['dim']} ({sc['params'] / 1e6:.0f}M parameters, random weights): "
                      f"{r:.2f}x fp32 onnxruntime (target at least 3x): {'met' if r >= 3 else 'MISSED'}")
    checks.append(f"- int4 file (every matrix on 4 bits) {fr:.3f} of fp32 (target at most 0.16): {'met' if fr <= 0.16 else 'MISSED'}")
    for name in (RT_ALL, RT_ALL_FAST):
        gap = ort_ppl[name] / sim_ppl[name] - 1
        checks.append(f"- {name}: perplexity in onnxruntime {ort_ppl[name]:.4f} vs simulated {sim_ppl[name]:.4f} ({100 * gap:+.3f}%)")
    gptq_s = max(get[k]["seconds"] for k in get if k.startswith(("GPTQ", "SparseGPT")))
    checks.append(f"- the slowest SparseGPT/GPTQ compression of the whole model took {gptq_s:.0f} s on this machine (target: a few minutes)")
    train_line = (f"trained here with the Trainer in {info['train_seconds'] / 60:.1f} min ({info['steps']} Adam steps of "
                  f"{TRAIN['batch_size']} x {SEQ} tokens = {info['train_tokens']:,} tokens, {info['train_tokens'] / corpus.train.numel():.2f} "
                  f"of an epoch; warm-up 20 steps then cosine from lr {TRAIN['lr']}, grad clip {TRAIN['grad_clip']}; "
                  f"{info.get('threads')} torch threads)")
    if info.get("cached"):
        train_line += " — loaded from the baseline cache in this run"
    return "\n".join([
        "# The OBS line on a language model trained here (issue 15)", "",
        *machine,
        f"- load average {load0:.1f} at the start, {load1:.1f} at the end (2 cores shared with other jobs)", "",
        f"Model: `llama_lm` {json.dumps(MODEL_ARGS)} — {n_params:,} parameters ({fp32_bytes:,} bytes fp32), {train_line}.",
        f"Data: {corpus.source}; document splits train/val/test {corpus.documents} with "
        f"{corpus.text_bytes['train']:,} / {corpus.text_bytes['val']:,} / {corpus.text_bytes['test']:,} bytes of text; "
        f"BPE {corpus.tokenizer.vocab_size} trained on train ({corpus.train.numel():,} train tokens).",
        f"Test perplexity: over the first {EVAL_CHUNKS} windows of {SEQ} tokens of the test split "
        f"({EVAL_CHUNKS * SEQ:,} tokens; {eval_s:.0f} s per evaluation). Dense: **{dense_ppl:.2f}**.",
        f"Calibration: {CALIB} random windows of {SEQ} train tokens ({CALIB * SEQ:,} tokens), block by block (AWQ: 2,048 input rows per layer, a grid of 10 exponents), every Linear of the "
        "4 blocks (the embedding and the LM head stay fp32, as in the papers, except in the row that rounds them too).", "",
        "## Compression", "",
        "bytes: the whole model packed as .nsk (`netshrink.pack.pack`); peak RSS: the process's high-water mark during the call "
        "(reset at its start), which includes this benchmark's own copies of the model; activations: one block's inputs and "
        "outputs for all calibration tokens; statistics: the largest block's X^T X and channel statistics.", "",
        markdown_table(["method", "test ppl", "vs dense", ".nsk bytes", "ratio", "seconds", "peak RSS MiB", "activations MiB",
                        "statistics MiB", "note"], table), "",
        "## Runtime: greedy decoding with a KV cache at batch 1", "",
        f"Prompt of {PROMPT} tokens, then {NEW_TOKENS} generated tokens; {ORT_THREADS} thread for onnxruntime (intra-op; inter-op 1) "
        f"and for torch; the runtimes timed in turns, {ROUNDS} rounds after a warm-up, medians.", "",
        markdown_table(["runtime", "ONNX bytes", "of fp32", "prompt tok/s", "decode tok/s", "decode vs ORT fp32", "prompt vs ORT fp32",
                        "ppl ORT / simulated"], rt), "",
        "## Runtime at larger widths: the same architecture, random weights (speed and size only)", "",
        f"Depth 4, vocabulary 4096; fp32 against every matrix on 4 bits (RTN g128, MatMulNBits / GatherBlockQuantized, "
        f"accuracy_level 4); {SCALE_TOKENS} decoded tokens after the {PROMPT}-token prompt, {ORT_THREADS} thread, the two graphs "
        f"timed in alternating turns, {SCALE_ROUNDS} rounds after a warm-up, medians.", "",
        markdown_table(["width", "hidden", "parameters", "fp32 ONNX bytes", "int4 ONNX bytes", "of fp32", "fp32 decode tok/s",
                        "int4 decode tok/s", "int4 vs fp32"],
                       [[str(sc["args"]["dim"]), str(sc["args"]["hidden"]), f"{sc['params']:,}", f"{sc['fp32_bytes']:,}", f"{sc['int4_bytes']:,}",
                         f"{sc['int4_bytes'] / sc['fp32_bytes']:.3f}", f"{sc['fp32_tok_s']:.1f}", f"{sc['int4_tok_s']:.1f}",
                         f"{sc['int4_tok_s'] / sc['fp32_tok_s']:.2f}x"] for sc in scale]), "",
        "## Against the issue's targets", "",
        *checks, "",
    ])
