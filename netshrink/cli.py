"""The ``netshrink`` command: run a recipe, inspect, evaluate, unpack and export .nsk files (and evaluate .onnx).

No subcommand prints a traceback on any input: every failure is one line on stderr
(``netshrink: error: ...``) and an exit code by error class (:data:`EXIT_CODES`); an interrupt ends
with exit code 130 and says how to resume.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from .errors import NetshrinkError

EXIT_USAGE = 2  # bad input: the command line, a recipe, or a file, data set or model handed in
EXIT_OUTPUT = 3  # an output cannot be written: read-only folder, full disk, a file or folder in the way
EXIT_BUSY = 4  # the output folder is in use by another run
EXIT_INTERNAL = 5  # a bug in netshrink, not a fault of the input (one line; -v adds the traceback)
EXIT_MEMORY = 6  # out of memory
EXIT_INTERRUPTED = 130
#: exit code -> what it means (printed by ``netshrink --help``)
EXIT_CODES = {
    0: "success",
    EXIT_USAGE: "bad input: the command line, a recipe, or a file, data set or model handed in (.nsk, .onnx, .npz, IDX, YAML)",
    EXIT_OUTPUT: "an output cannot be written (read-only folder, full disk, a file or folder in the way); earlier files are intact",
    EXIT_BUSY: "the output folder is in use by another run (its pid is named)",
    EXIT_INTERNAL: "internal error: a bug in netshrink, not in the input (run with -v for the traceback and report it)",
    EXIT_MEMORY: "out of memory",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); `netshrink run ... --resume` continues a run",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, as for any bad input
        self.exit(EXIT_USAGE, f"netshrink: error: {message}\n")


def _import_path(recipe_path: str) -> None:
    """Let a recipe's ``package.module:function`` factories import from the current folder and the
    recipe's folder (as ``python -m`` would), besides installed packages."""
    for folder in (str(Path(recipe_path).resolve().parent), os.getcwd()):
        if folder not in sys.path:
            sys.path.insert(0, folder)


def _cmd_run(args: argparse.Namespace) -> int:
    from .recipe import load_recipe
    from .pipeline import prepare, run_recipe
    from .report import stage_cells, STAGE_COLUMNS, text_table

    _import_path(args.recipe)
    recipe = load_recipe(args.recipe)
    if args.check:
        ready = prepare(recipe)
        print(f"recipe {recipe.name}: valid; model {recipe.model} ({sum(p.numel() for p in ready.model.parameters()):,} parameters), "
              f"data {ready.splits.name} ({', '.join(f'{k} {v:,}' for k, v in ready.splits.sizes.items())}), task {recipe.task.name}, "
              f"{len(recipe.expanded())} stages; nothing written")
        return 0
    logging.getLogger("netshrink.train").setLevel(logging.INFO)  # a line per epoch where no bar shows
    out = Path(args.out) if args.out else Path("runs") / Path(args.recipe).stem
    print(f"recipe {recipe.name}: {len(recipe.expanded())} stages -> {out}", flush=True)

    def on_row(row) -> None:
        print(f"  done: {row.stage:<18} test {recipe.task.format(row.test_error)}  non-zeros {row.nonzeros:,}  {row.bytes:,} bytes  {row.ratio:.1f}x", flush=True)

    try:
        result = run_recipe(recipe, out, resume=args.resume, force=args.force, progress=not args.no_progress, on_row=on_row)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished work is kept in {out}; continue with: netshrink run {args.recipe} --out {out} --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    print()
    print(text_table(STAGE_COLUMNS, [stage_cells(r) for r in result.rows]))
    if result.speed is not None:
        print("\nspeed of the decoded model against the dense baseline:")
        for line in result.speed.verdicts():
            print(f"  {line}")
    print(f"\nwrote {result.model_path}, {result.report_path}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .pack import read_info
    from .run_report import info_text

    print(info_text(read_info(args.file)))
    return 0


def _eval_onnx(args: argparse.Namespace) -> int:
    from .data import INPUT_SHAPES, load_dataset
    from .errors import ConfigError
    from .export import onnx_input_shape, ort_error_rate, ort_latency, ort_session

    from ._inputs import check_onnx

    check_onnx(args.file)  # bounded size, parses, no external data, onnx.checker: before onnxruntime sees it
    session = ort_session(args.file, threads=args.threads)
    shape = onnx_input_shape(session)
    want = INPUT_SHAPES.get(args.data)
    if want is not None and tuple(want) != shape:
        raise ConfigError("--data", f"the ONNX model takes inputs of shape {shape}, {args.data} has {tuple(want)}")
    splits = load_dataset(args.data)
    err = ort_error_rate(session, splits.test)
    lat = ort_latency(session, shape, batch_sizes=tuple(args.batch_sizes), runs=args.runs)
    print(f"{args.file}: test error {100 * err:.2f}% on {len(splits.test):,} {args.data} test images (onnxruntime)")
    for bs, st in lat.items():
        print(f"  latency batch {bs:>4}: median {st.median_ms:.3f} ms  ({st.runs} runs, {st.threads} threads)")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from . import metrics
    from .data import load_dataset
    from .pack import load

    from .recipe import check_input

    if str(args.file).lower().endswith(".onnx"):
        return _eval_onnx(args)
    model = load(args.file)
    check_input(model, args.data, "--data")
    splits = load_dataset(args.data)
    err = metrics.error_rate(model, splits.test)
    x, _ = splits.test[0]
    lat = metrics.latency(model, tuple(x.shape), batch_sizes=tuple(args.batch_sizes), runs=args.runs, threads=args.threads)
    print(f"{args.file}: test error {100 * err:.2f}% on {len(splits.test):,} {args.data} test images")
    for bs, st in lat.items():
        print(f"  latency batch {bs:>4}: median {st.median_ms:.3f} ms  ({st.runs} runs, {st.threads} threads)")
    return 0


def _cmd_unpack(args: argparse.Namespace) -> int:
    from .pack import unpack_to_safetensors

    unpack_to_safetensors(args.file, args.output)
    print(f"wrote {args.output}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .data import INPUT_SHAPES, load_dataset
    from .errors import ConfigError
    from .export import export_onnx
    from .pack import load

    if args.calib < 1:
        raise ConfigError("--calib", f"must be at least 1, got {args.calib}")
    if args.data not in INPUT_SHAPES:
        raise ConfigError("--data", f"unknown data set {args.data!r} (known: {', '.join(INPUT_SHAPES)})")
    model = load(args.file, restore=True)  # int-k weights come back with their quantizers
    calib = load_dataset(args.data) if args.int8 else None
    res = export_onnx(model, args.output, INPUT_SHAPES[args.data], int8=args.int8, calibration=calib, calibration_samples=args.calib)
    kind = f"int8 QDQ ({len(res.quantized)} int8 layers)" if res.int8 else "fp32"
    print(f"wrote {res.path}: {kind}, {res.bytes:,} bytes")
    return 0


def _cmd_deploy(args: argparse.Namespace) -> int:
    from .data import INPUT_SHAPES, load_dataset
    from .deploy import deploy
    from .errors import ConfigError
    from .pack import load

    if args.data not in INPUT_SHAPES:
        raise ConfigError("--data", f"unknown data set {args.data!r} (known: {', '.join(INPUT_SHAPES)})")
    model = load(args.file, restore=True)
    splits = load_dataset(args.data)
    example = splits.test[0][0].unsqueeze(0)
    res = deploy(model, args.out, example, calibration=splits.train if args.int8 else None,
                 val=splits.val if args.int8 else None, batch_sizes=tuple(args.batch), threads=args.threads)
    print(res.table(), end="")
    where = f"wrote {res.path}" if res.path else "eager torch is the fastest form: no ONNX file written"
    print(f"fastest: {res.chosen}; {where}; timings in {args.out}/deploy.json")
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from ._registry import list_methods

    for info in list_methods():
        print(f"{info.family:<10} {info.name:<12} {info.summary}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    epilog = "exit codes:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES.items())
    p = _Parser(prog="netshrink", description="Compress and accelerate trained PyTorch networks.", epilog=epilog,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="run a YAML recipe end to end")
    r.add_argument("recipe")
    r.add_argument("--out", help="output folder (default runs/<recipe name>)")
    r.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    r.add_argument("--force", action="store_true", help="discard an earlier run in --out and start over")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--check", action="store_true",
                   help="only check the recipe: build the model, load the data, run one batch through the model, loss and metric; write nothing")
    r.set_defaults(fn=_cmd_run)

    i = sub.add_parser("info", help="per-layer breakdown of an .nsk file")
    i.add_argument("file")
    i.set_defaults(fn=_cmd_info)

    e = sub.add_parser("eval", help="test error and latency of an .nsk or .onnx file")
    e.add_argument("file")
    e.add_argument("--data", default="mnist")
    e.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    e.add_argument("--runs", type=int, default=30)
    e.add_argument("--threads", type=int, default=None)
    e.set_defaults(fn=_cmd_eval)

    u = sub.add_parser("unpack", help="write the decoded weights as safetensors")
    u.add_argument("file")
    u.add_argument("-o", "--output", required=True)
    u.set_defaults(fn=_cmd_unpack)

    x = sub.add_parser("export", help="export an .nsk file to ONNX (fp32, or int8 QDQ)")
    x.add_argument("file")
    x.add_argument("-o", "--output", required=True)
    x.add_argument("--int8", action="store_true", help="int8 QDQ; a model not yet quantized is calibrated first")
    x.add_argument("--calib", type=int, default=512, help="calibration examples from the training split (default 512)")
    x.add_argument("--data", default="mnist", help="data set for the input shape and calibration (default mnist)")
    x.set_defaults(fn=_cmd_export)

    d = sub.add_parser("deploy", help="time every runtime form of an .nsk model (torch, CSR, ORT fp32, ORT int8); write the fastest")
    d.add_argument("file")
    d.add_argument("--out", required=True, help="folder for model.onnx and deploy.json")
    d.add_argument("--data", default="mnist", help="data set for the example input and int8 calibration (default mnist)")
    d.add_argument("--int8", action="store_true", help="also try int8 QDQ (calibrated on the training split, checked on val)")
    d.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="batch sizes to time (default 1 32)")
    d.add_argument("--threads", type=int, default=1, help="threads for every runtime (default 1)")
    d.set_defaults(fn=_cmd_deploy)

    m = sub.add_parser("methods", help="list the registered methods")
    m.set_defaults(fn=_cmd_methods)
    return p


def _one_line(text: str, limit: int = 2000) -> str:
    """``text`` on one line (line breaks of wrapped library messages become ' / '), at most ``limit`` characters."""
    flat = " / ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _fail(code: int, message: str) -> int:
    print(f"netshrink: error: {_one_line(message)}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; every failure is one stderr line and an exit code from :data:`EXIT_CODES`."""
    from ._outdir import OutputError, RunLockedError, describe_os_error

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except RunLockedError as err:
        return _fail(EXIT_BUSY, str(err))
    except OutputError as err:
        return _fail(EXIT_OUTPUT, str(err))
    except NetshrinkError as err:
        return _fail(EXIT_USAGE, str(err))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader (| head) went away: not an error of ours
        sys.stdout = open(os.devnull, "w")
        return 0
    except OSError as err:  # a read or write the code did not expect to fail (disk full, permissions)
        return _fail(EXIT_OUTPUT, f"input/output error: {describe_os_error(err)}")
    except MemoryError:
        return _fail(EXIT_MEMORY, "out of memory")
    except Exception as err:  # noqa: BLE001 - a bug: still one line, never a traceback unless asked for
        if args.verbose:
            import traceback

            traceback.print_exc()
        return _fail(EXIT_INTERNAL, f"internal error ({type(err).__name__}: {err}); this is a bug in netshrink, "
                                    "please report it with the output of -v")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
