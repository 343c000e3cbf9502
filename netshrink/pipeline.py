"""Running a recipe: baseline -> stages (each optionally fine-tuned) -> measured rows -> packed file.

Every finished step is kept on disk under the output folder, so an interrupted run resumes without
losing it:

    OUT/run.json                 recipe fingerprint, and one per stage prefix: a resume of a recipe whose
                                 later stages changed keeps the finished stages before the first change
    OUT/checkpoints/<step>/      the Trainer's per-epoch checkpoints of the step in progress
    OUT/stages/NN-<method>.nsk   each finished stage, packed, with its measured row in the header
    OUT/model.nsk                the final packed model
    OUT/results.json, report.md, *.png

A resumed stage restores the previous stage's file with its masks and codebooks, re-applies the
stage's method (deterministic), then continues its fine-tuning from the last finished epoch.

Before anything is written, :func:`prepare` builds the model, loads the data and runs one batch through
the model, the task's loss and its metric: a model that rejects the inputs, a loss that is not a scalar
or a metric that fails is one clear error, and the output folder is not touched. The recipe's task is
given to the Trainer, to every evaluation and to every stage's handler (:class:`HandlerContext`); the
example inputs of MACs and timing are the task's (``task.example(data)``).

A stage whose fine-tuning has a ``distill`` block (or a recipe with a ``distill`` default) fine-tunes
with :class:`netshrink.distill.finetune.DistillFinetuneLoss`: the teacher is the trained baseline
(``teacher: baseline``, the default) or a frozen copy of the model just before the stage's method ran
(``teacher: previous``). A resume rebuilds the same teacher (the cached baseline, or the previous
stage's packed file), so it continues the same run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import metrics
from ._fileio import atomic_write_bytes, atomic_write_text, cache_root
from ._outdir import OutputError, output_errors, run_lock
from ._registry import HandlerContext, run_handler
from ._state import weight_state
from ._layers import weight_layers
from .errors import DataError, ModelError, NetshrinkError
from .pack import load as load_nsk, pack
from .pack.stage import CodingChoice
from .recipe import Recipe, Stage
from .task import Inputs, Task, batches
from .train import TrainConfig, Trainer

log = logging.getLogger("netshrink.pipeline")


@dataclass
class Row:
    """One measured line of the stage table."""

    stage: str
    method: str
    test_error: float
    val_error: float
    params: int
    nonzeros: int
    bytes: int
    ratio: float
    bits_per_nonzero: float
    macs_dense: int
    macs_effective: int
    coding: str
    seconds: float
    file: str | None = None
    #: the task's metric that ``test_error`` and ``val_error`` hold ("error", "perplexity", "mse")
    metric: str = "error"


@dataclass
class RunResult:
    rows: list[Row]
    out_dir: Path
    model_path: Path
    model: nn.Module
    layer_snapshots: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    report_path: Path | None = None
    speed: "Speed | None" = None


@dataclass
class Speed:
    """Latency of the dense baseline and of the decoded final model, timed in turns in the same run."""

    batch_sizes: list[int]
    baseline_ms: list[float]
    compressed_ms: list[float]
    threads: int
    macs_baseline: int
    macs_compressed: int

    def verdicts(self) -> list[str]:
        """One plain sentence per batch size: faster or not, by how much, and why."""
        mac_ratio = self.macs_baseline / max(1, self.macs_compressed)
        out = []
        for b, base, comp in zip(self.batch_sizes, self.baseline_ms, self.compressed_ms):
            r = base / comp if comp > 0 else float("inf")
            head = f"batch {b}: {base:.3f} ms dense, {comp:.3f} ms compressed"
            if r >= 1.05:
                line = f"{head}: {r:.2f}x faster ({mac_ratio:.2f}x fewer MACs)"
                if r < 0.8 * mac_ratio:
                    line += "; below the MAC reduction, because per-layer overhead and kernel efficiency weigh more than arithmetic at this size"
            elif mac_ratio < 1.05:
                word = "slower" if r < 0.95 else "not faster"
                line = (f"{head}: {word} ({r:.2f}x). The layers keep their dense shapes, so zeros and shared weights run on the same "
                        "dense kernels (masks alone never make a model faster); for speed remove whole channels (method `channel`), "
                        "factorize (`svd`, `tucker`) or run very sparse layers with CSR (`netshrink.prune.sparse_exec`)")
            else:
                word = "slower" if r < 0.95 else "not faster"
                line = (f"{head}: {word} ({r:.2f}x) despite {mac_ratio:.2f}x fewer MACs: at this batch size the time goes to "
                        "per-layer overhead rather than arithmetic")
            out.append(line + ".")
        return out


def example_arg(example: Any, model: nn.Module | None = None) -> Any:
    """What :mod:`netshrink.metrics` takes as an example input: the tensor of a one-tensor input, else the
    Inputs; on ``model``'s device when given (a model trained on CUDA stays there)."""
    if model is not None and isinstance(example, Inputs):
        param = next(model.parameters(), None)
        if param is not None:
            example = example.to(param.device)
    if isinstance(example, Inputs) and len(example.args) == 1 and not example.kwargs and isinstance(example.args[0], torch.Tensor):
        return example.args[0]
    return example


class _Replay(nn.Module):
    """Calls ``model`` on one example's inputs repeated to the batch size of its one argument: how a
    model whose inputs are several tensors or keywords is timed by :func:`netshrink.metrics.latency`
    (which repeats one tensor's first row). Expanding is a view, so the timing is the model's."""

    def __init__(self, model: nn.Module, example: Inputs):
        super().__init__()
        self.model = model
        self.example = example.take(1)

    def forward(self, rows: torch.Tensor) -> Any:
        b = int(rows.shape[0])
        grow = lambda t: t.expand(b, *t.shape[1:]) if isinstance(t, torch.Tensor) and t.dim() > 0 else t  # noqa: E731
        return self.model(*[grow(a) for a in self.example.args], **{k: grow(v) for k, v in self.example.kwargs.items()})


def measure_speed(baseline: nn.Module, compressed: nn.Module, example: Any) -> Speed:
    """Time the dense baseline and the compressed model in turns (:func:`netshrink.metrics.compare_latency`)."""
    one = example_arg(example)
    models = {"baseline": baseline, "compressed": compressed}
    if not isinstance(one, torch.Tensor):  # several inputs or keyword inputs: time through _Replay
        models = {k: _Replay(m, example_arg(example, m)) for k, m in models.items()}
        one = torch.zeros(1, dtype=torch.long)
    timed = metrics.compare_latency(models, one, batch_sizes=(1, 64), runs=20)
    sizes = list(timed["baseline"])
    return Speed(
        batch_sizes=sizes,
        baseline_ms=[timed["baseline"][b].median_ms for b in sizes],
        compressed_ms=[timed["compressed"][b].median_ms for b in sizes],
        threads=timed["baseline"][sizes[0]].threads,
        macs_baseline=int(metrics.macs(baseline, example_arg(example, baseline)).dense),
        macs_compressed=int(metrics.macs(compressed, example_arg(example, compressed)).dense),
    )


@dataclass
class Prepared:
    """A recipe's model, data, task and example inputs, checked to work together."""

    model: nn.Module
    splits: Any
    task: Task
    example: Inputs


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _describe(inputs: Inputs) -> str:
    def one(t: Any) -> str:
        return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" if isinstance(t, torch.Tensor) else type(t).__name__
    parts = [one(a) for a in inputs.args] + [f"{k} {one(v)}" for k, v in inputs.kwargs.items()]
    return ", ".join(parts) or "no inputs"


def check_batch(model: nn.Module, task: Task, data: Any, n: int = 2) -> None:
    """Run ``n`` examples of ``data`` through ``model``, the task's loss and its metric (eval mode, no
    gradients); whatever fails is one line: :class:`ModelError` for the model, :class:`DataError` for the
    loss or the metric."""
    batch = next(iter(batches(data, n)), None)
    if batch is None:
        raise DataError("the training split is empty")
    inputs, target = task.split(batch)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                out = task.forward(model, inputs)
            except NetshrinkError:
                raise
            except Exception as err:  # the user's model: any exception, in one line
                raise ModelError(f"the model rejects the example inputs ({_describe(inputs)}): {_first_line(err)}") from None
            try:
                task.compute_loss(out, target)
            except NetshrinkError:
                raise
            except Exception as err:
                raise DataError(f"task {task.name!r}: the loss failed on outputs {tuple(out.shape)}: {_first_line(err)}") from None
            metric = task.metric()
            try:
                metric.update(out, target)
                metric.compute()
            except NetshrinkError:
                raise
            except Exception as err:
                raise DataError(f"task {task.name!r}: the metric {getattr(metric, 'name', type(metric).__name__)!r} failed: {_first_line(err)}") from None
    finally:
        model.train(was_training)


def prepare(recipe: Recipe) -> Prepared:
    """The recipe's model (weights loaded), data and task, checked on one batch; nothing is written."""
    splits = recipe.load_data()
    model = recipe.build_model()
    task = recipe.task
    check_batch(model, task, splits.train)
    example = task.example(splits.test, 1)
    return Prepared(model, splits, task, example)


def _measure(model: nn.Module, splits, example: Any, coding: str, stage: str, method: str, seconds: float, packed: int | None,
             task: Task | None = None) -> Row:
    from .task import DEFAULT_TASK

    task = task or DEFAULT_TASK
    params = metrics.count_params(model)
    nnz = metrics.count_nonzeros(model)
    fp32 = metrics.fp32_bytes(model)
    size = fp32 if packed is None else packed
    mac = metrics.macs(model, example_arg(example, model))
    return Row(
        stage=stage,
        method=method,
        test_error=task.evaluate(model, splits.test),
        val_error=task.evaluate(model, splits.val),
        params=params,
        nonzeros=nnz,
        bytes=size,
        ratio=fp32 / size,
        bits_per_nonzero=8.0 * size / max(1, nnz),
        macs_dense=int(mac.dense),
        macs_effective=int(mac.effective),
        coding=coding,
        seconds=seconds,
        metric=task.metric_name,
    )


def _snapshot(model: nn.Module) -> dict[str, list[float]]:
    """The non-zero weights of every weight layer (for the before/after sharing histogram)."""
    out = {}
    for name, m in weight_layers(model).items():
        v = weight_state(m).values
        out[name] = v[v != 0].tolist()
    return out


def _file_digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _code_digest(spec: str) -> str:
    """The source of the package a ``package.module:function`` factory lives in (every ``.py`` file of its
    top-level package, or its one module): changed code is a new cached baseline."""
    import hashlib
    import sys

    top = sys.modules.get(spec.split(":", 1)[0].split(".", 1)[0])
    file = getattr(top, "__file__", None)
    if not file or not Path(file).is_file():
        return spec
    path = Path(file)
    files = sorted(path.parent.rglob("*.py")) if path.name == "__init__.py" else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path.parent)).encode() + b"\0" + _file_digest(f).encode())
    return h.hexdigest()


def _content_key(recipe: Recipe) -> dict[str, Any]:
    """What a user's model and data are made of, beyond their names: file contents and factory code."""
    from ._plugins import is_object_spec
    from .data import dataset_names

    key: dict[str, Any] = {}
    if recipe.user_model:
        key["model_code"] = _code_digest(recipe.model)
    if recipe.weights is not None:
        key["weights"] = _file_digest(Path(recipe.weights))
    if is_object_spec(recipe.data):
        key["data_code"] = _code_digest(recipe.data)
    elif recipe.data not in dataset_names():
        key["data_file"] = _file_digest(Path(recipe.data))
    if recipe.data_args:
        key["data_args"] = recipe.data_args
    if "task" in recipe.source:
        key["task"] = spec = recipe.source["task"]
        name = spec.get("name") if isinstance(spec, dict) else spec
        if is_object_spec(name):
            key["task_code"] = _code_digest(name)
    return key


def baseline_cache_path(recipe: Recipe) -> Path:
    key = json.dumps(
        {"model": recipe.model, "args": recipe.model_args, "data": recipe.data, "seed": recipe.seed, "train": _train_key(recipe.train),
         **_content_key(recipe)},
        sort_keys=True, default=str,
    )
    import hashlib
    import re

    stem = re.sub(r"[^\w.-]", "_", recipe.model)[:80]
    return cache_root() / "baselines" / f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"


def _train_key(cfg: TrainConfig) -> dict[str, Any]:
    d = cfg.to_dict()
    for k in ("progress", "device", "num_workers"):
        d.pop(k, None)
    return d


def _with_seed(cfg: TrainConfig, seed: int, progress: bool) -> TrainConfig:
    """The step's training config with its seed offset by the recipe's (and the step's) seed."""
    return dataclasses.replace(cfg, seed=cfg.seed + seed, progress=progress and cfg.progress)


def train_baseline(recipe: Recipe, model: nn.Module, splits, out_dir: Path, *, resume: bool, progress: bool) -> None:
    """Train the recipe's baseline, or load it from the cache of trained baselines."""
    from safetensors.torch import load_file

    path = baseline_cache_path(recipe)
    if path.exists():
        log.info("reusing the cached baseline %s", path)
        try:
            state = load_file(str(path))
            model.load_state_dict(state)
            return
        except Exception as err:  # a corrupt cache entry is retrained, not fatal
            log.warning("cached baseline %s unreadable (%s); training again", path, err)
    if recipe.train.epochs == 0:
        return
    trainer = Trainer(model, _with_seed(recipe.train, recipe.seed, progress), task=recipe.task)
    trainer.fit(splits.train, splits.val, checkpoint_dir=out_dir / "checkpoints" / "baseline", resume=resume)
    from safetensors.torch import save

    blob = save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, blob)
    shutil.rmtree(out_dir / "checkpoints" / "baseline", ignore_errors=True)


def _finetune(model: nn.Module, stage: Stage, teacher: nn.Module | None, splits, example: Any,
              cfg: TrainConfig, checkpoint_dir: Path, resume: bool, task: Task | None = None) -> None:
    """Fine-tune after a stage: the task's loss, or distillation from ``teacher``."""
    if teacher is None:
        Trainer(model, cfg, task=task).fit(splits.train, splits.val, checkpoint_dir=checkpoint_dir, resume=resume)
        return
    from .distill.finetune import DistillFinetuneLoss, check_teacher_fits

    check_teacher_fits(teacher, model, example_arg(example), stage.distill_field, task=task)
    kd = DistillFinetuneLoss(teacher, model, stage.distill, task)  # the hard loss is the task's
    try:
        Trainer(model, cfg, loss_fn=kd.hard_loss, extra_loss=kd, task=task).fit(
            splits.train, splits.val, checkpoint_dir=checkpoint_dir, resume=resume
        )
    finally:
        kd.close()


def _stage_file(out_dir: Path, i: int, stage: Stage) -> Path:
    return out_dir / "stages" / f"{i:02d}-{stage.config.method}.nsk"


def _check_out_dir(recipe: Recipe, out_dir: Path, resume: bool, force: bool) -> None:
    run_file = out_dir / "run.json"
    if run_file.exists():
        try:
            old = json.loads(run_file.read_text())
        except (OSError, ValueError):
            old = {}
        if resume:
            if old.get("fingerprint") != recipe.fingerprint():
                _keep_shared_stages(recipe, old, out_dir)
        elif force:
            for sub in ("stages", "checkpoints"):
                shutil.rmtree(out_dir / sub, ignore_errors=True)
        else:
            raise NetshrinkError(f"{out_dir}: holds an earlier run; pass --resume to continue it or --force to start over")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_file, json.dumps({"recipe": recipe.name, "fingerprint": recipe.fingerprint(),
                                                "base": recipe.base_fingerprint(), "stages": recipe.stage_fingerprints()}, indent=2))
    except OSError as err:
        raise OutputError(f"{out_dir}: cannot write the output folder ({err.strerror or err})") from None


def _keep_shared_stages(recipe: Recipe, old: dict, out_dir: Path) -> None:
    """Resume a changed recipe: with the same model, data, task and baseline training, keep the finished
    stages of the longest stage prefix it shares with the run in ``out_dir`` and remove the later ones.
    A different baseline, or a folder without per-stage fingerprints, is the usual one-line error."""
    new = recipe.stage_fingerprints()
    saved = old.get("stages")
    if not isinstance(saved, list):
        raise NetshrinkError(f"{out_dir}: holds a run of a different recipe; it cannot be resumed with this one")
    shared = 0
    for a, b in zip(saved, new):
        if not isinstance(a, list) or len(a) != 2 or a[0] != b[0]:
            break
        shared += 1
    if old.get("base") != recipe.base_fingerprint():
        raise NetshrinkError(f"{out_dir}: holds a run of a different recipe (model, data or training differ); it cannot be resumed with this one")
    keep = sum(n for _, n in new[:shared])
    for name in ("model.nsk", "results.json", "report.md"):  # the old run's outputs, rewritten at the end
        (out_dir / name).unlink(missing_ok=True)
    for f in sorted((out_dir / "stages").glob("*")):
        num = f.name.split("-", 1)[0]
        if num.isdigit() and int(num) > keep:
            f.unlink()
    for d in (out_dir / "checkpoints").glob("stage-*"):
        if d.name[6:].isdigit() and int(d.name[6:]) > keep:
            shutil.rmtree(d, ignore_errors=True)
    log.info("%s: the recipe changed after stage %d of %d; the finished stages up to it are kept", out_dir, shared, len(new))


def run_recipe(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    on_row: Callable[[Row], None] | None = None,
) -> RunResult:
    """Run ``recipe`` end to end into ``out_dir``; see the module docstring for what is written.

    The run holds the folder's lock throughout (a second run into it is refused; a killed run's lock
    and temporary files are taken over), and a failed write is one :class:`OutputError` line
    (:mod:`netshrink._outdir`).
    """
    out_dir = Path(out_dir)
    torch.manual_seed(recipe.seed)
    ready = prepare(recipe)  # before the output folder is touched
    with run_lock(out_dir), output_errors(out_dir):
        return _run_prepared(recipe, out_dir, ready, resume, force, progress, on_row)


def _run_prepared(recipe: Recipe, out_dir: Path, ready: Any, resume: bool, force: bool, progress: bool,
                  on_row: Callable[[Row], None] | None) -> RunResult:
    splits, model, task, example = ready.splits, ready.model, ready.task, ready.example
    _check_out_dir(recipe, out_dir, resume, force)

    def fresh() -> nn.Module | None:  # the module a user's model is loaded into (a zoo model is rebuilt from the file)
        return recipe.build_model(weights=False) if recipe.user_model else None

    t0 = time.perf_counter()
    train_baseline(recipe, model, splits, out_dir, resume=resume, progress=progress)
    rows = [_measure(model, splits, example, "dense fp32", "baseline", "baseline", time.perf_counter() - t0, None, task)]
    if on_row:
        on_row(rows[-1])

    import copy

    from .distill.finetune import freeze_teacher

    baseline = freeze_teacher(copy.deepcopy(model))  # the teacher of `distill: {teacher: baseline}` and the speed reference
    coding = "fixed"
    snapshots: dict[str, dict[str, list[float]]] = {}
    stages = recipe.expanded()
    last_file: Path | None = None
    for i, stage in enumerate(stages, start=1):
        path = _stage_file(out_dir, i, stage)
        before = _snapshot(model) if stage.config.method == "kmeans" else None
        done = path.with_suffix(".json")
        if resume and done.exists() and path.exists():
            saved = json.loads(done.read_text())
            coding = saved["coding"]
            model = load_nsk(path, fresh(), restore=True)
            rows.append(Row(**saved["row"]))
            log.info("stage %d (%s) already done: %s", i, stage.label, path)
        else:
            t0 = time.perf_counter()
            tuned = stage.finetune is not None and stage.finetune.epochs > 0
            teacher = None
            if tuned and stage.distill is not None:
                teacher = baseline if stage.distill.teacher == "baseline" else freeze_teacher(copy.deepcopy(model))
            outcome = run_handler(model, stage.config, HandlerContext(data=splits, task=task, example=example))
            if isinstance(outcome, CodingChoice):
                coding = outcome.coding
            if tuned:
                _finetune(model, stage, teacher, splits, example, _with_seed(stage.finetune, recipe.seed + i, progress),
                          out_dir / "checkpoints" / f"stage-{i:02d}", resume, task)
            seconds = time.perf_counter() - t0
            path.parent.mkdir(parents=True, exist_ok=True)
            packed = pack(model, path, coding=coding)
            row = _measure(model, splits, example, coding, stage.label, stage.config.method, seconds, packed.total_bytes, task)
            row.file = str(path)
            # the row is written after the packed file: a stage counts as done only when both exist
            atomic_write_text(done, json.dumps({"coding": coding, "row": dataclasses.asdict(row)}, indent=2))
            rows.append(row)
            shutil.rmtree(out_dir / "checkpoints" / f"stage-{i:02d}", ignore_errors=True)
        if before is not None:
            snapshots = {"before": before, "after": _snapshot(model)}
        last_file = path
        if on_row:
            on_row(rows[-1])

    model_path = out_dir / "model.nsk"
    if last_file is None:
        pack(model, model_path, coding=coding)
    else:
        atomic_write_bytes(model_path, last_file.read_bytes())
    speed = measure_speed(baseline, load_nsk(model_path, fresh()), example)
    result = RunResult(rows, out_dir, model_path, model, snapshots, speed=speed)
    results = {"recipe": recipe.name, "rows": [dataclasses.asdict(r) for r in rows], "speed": dataclasses.asdict(speed)}
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2))
    from .run_report import write_run_report

    result.report_path = write_run_report(result, recipe)
    return result
