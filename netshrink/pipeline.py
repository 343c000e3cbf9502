"""Running a recipe: baseline -> stages (each optionally fine-tuned) -> measured rows -> packed file.

Every finished step is kept on disk under the output folder, so an interrupted run resumes without
losing it:

    OUT/run.json                 recipe fingerprint (a resume must match it)
    OUT/checkpoints/<step>/      the Trainer's per-epoch checkpoints of the step in progress
    OUT/stages/NN-<method>.nsk   each finished stage, packed, with its measured row in the header
    OUT/model.nsk                the final packed model
    OUT/results.json, report.md, *.png

A resumed stage restores the previous stage's file with its masks and codebooks, re-applies the
stage's method (deterministic), then continues its fine-tuning from the last finished epoch.

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
from ._registry import handler_for
from ._state import weight_state
from ._layers import weight_layers
from .errors import NetshrinkError
from .pack import load as load_nsk, pack
from .pack.stage import CodingChoice
from .recipe import Recipe, Stage
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


def measure_speed(baseline: nn.Module, compressed: nn.Module, example: torch.Tensor) -> Speed:
    """Time the dense baseline and the compressed model in turns (:func:`netshrink.metrics.compare_latency`)."""
    shape = tuple(example.shape[1:])
    timed = metrics.compare_latency({"baseline": baseline, "compressed": compressed}, shape, batch_sizes=(1, 64), runs=20)
    sizes = list(timed["baseline"])
    return Speed(
        batch_sizes=sizes,
        baseline_ms=[timed["baseline"][b].median_ms for b in sizes],
        compressed_ms=[timed["compressed"][b].median_ms for b in sizes],
        threads=timed["baseline"][sizes[0]].threads,
        macs_baseline=int(metrics.macs(baseline, example).dense),
        macs_compressed=int(metrics.macs(compressed, example).dense),
    )


def _example_input(dataset) -> torch.Tensor:
    x, _ = dataset[0]
    return x.unsqueeze(0)


def _measure(model: nn.Module, splits, example: torch.Tensor, coding: str, stage: str, method: str, seconds: float, packed: int | None) -> Row:
    params = metrics.count_params(model)
    nnz = metrics.count_nonzeros(model)
    fp32 = metrics.fp32_bytes(model)
    size = fp32 if packed is None else packed
    mac = metrics.macs(model, example)
    return Row(
        stage=stage,
        method=method,
        test_error=metrics.error_rate(model, splits.test),
        val_error=metrics.error_rate(model, splits.val),
        params=params,
        nonzeros=nnz,
        bytes=size,
        ratio=fp32 / size,
        bits_per_nonzero=8.0 * size / max(1, nnz),
        macs_dense=int(mac.dense),
        macs_effective=int(mac.effective),
        coding=coding,
        seconds=seconds,
    )


def _snapshot(model: nn.Module) -> dict[str, list[float]]:
    """The non-zero weights of every weight layer (for the before/after sharing histogram)."""
    out = {}
    for name, m in weight_layers(model).items():
        v = weight_state(m).values
        out[name] = v[v != 0].tolist()
    return out


def baseline_cache_path(recipe: Recipe) -> Path:
    key = json.dumps(
        {"model": recipe.model, "args": recipe.model_args, "data": recipe.data, "seed": recipe.seed, "train": _train_key(recipe.train)},
        sort_keys=True,
    )
    import hashlib

    return cache_root() / "baselines" / f"{recipe.model}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"


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
    trainer = Trainer(model, _with_seed(recipe.train, recipe.seed, progress))
    trainer.fit(splits.train, splits.val, checkpoint_dir=out_dir / "checkpoints" / "baseline", resume=resume)
    from safetensors.torch import save

    blob = save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, blob)
    shutil.rmtree(out_dir / "checkpoints" / "baseline", ignore_errors=True)


def _finetune(model: nn.Module, stage: Stage, teacher: nn.Module | None, splits, example: torch.Tensor,
              cfg: TrainConfig, checkpoint_dir: Path, resume: bool) -> None:
    """Fine-tune after a stage: plain cross-entropy, or distillation from ``teacher``."""
    if teacher is None:
        Trainer(model, cfg).fit(splits.train, splits.val, checkpoint_dir=checkpoint_dir, resume=resume)
        return
    from .distill.finetune import DistillFinetuneLoss, check_teacher_fits

    check_teacher_fits(teacher, model, example, stage.distill_field)
    kd = DistillFinetuneLoss(teacher, model, stage.distill)
    try:
        Trainer(model, cfg, loss_fn=kd.hard_loss, extra_loss=kd).fit(
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
                raise NetshrinkError(f"{out_dir}: holds a run of a different recipe; it cannot be resumed with this one")
        elif force:
            for sub in ("stages", "checkpoints"):
                shutil.rmtree(out_dir / sub, ignore_errors=True)
        else:
            raise NetshrinkError(f"{out_dir}: holds an earlier run; pass --resume to continue it or --force to start over")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_file, json.dumps({"recipe": recipe.name, "fingerprint": recipe.fingerprint()}, indent=2))
    except OSError as err:
        raise NetshrinkError(f"{out_dir}: cannot write the output folder ({err.strerror or err})") from None


def run_recipe(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    on_row: Callable[[Row], None] | None = None,
) -> RunResult:
    """Run ``recipe`` end to end into ``out_dir``; see the module docstring for what is written."""
    from .data import load_dataset
    from .models import build_model

    out_dir = Path(out_dir)
    _check_out_dir(recipe, out_dir, resume, force)
    torch.manual_seed(recipe.seed)
    splits = load_dataset(recipe.data)
    model = build_model(recipe.model, **recipe.model_args)
    example = _example_input(splits.test)

    t0 = time.perf_counter()
    train_baseline(recipe, model, splits, out_dir, resume=resume, progress=progress)
    rows = [_measure(model, splits, example, "dense fp32", "baseline", "baseline", time.perf_counter() - t0, None)]
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
            model = load_nsk(path, restore=True)
            rows.append(Row(**saved["row"]))
            log.info("stage %d (%s) already done: %s", i, stage.label, path)
        else:
            t0 = time.perf_counter()
            tuned = stage.finetune is not None and stage.finetune.epochs > 0
            teacher = None
            if tuned and stage.distill is not None:
                teacher = baseline if stage.distill.teacher == "baseline" else freeze_teacher(copy.deepcopy(model))
            outcome = handler_for(stage.config)(model, stage.config, data=splits)
            if isinstance(outcome, CodingChoice):
                coding = outcome.coding
            if tuned:
                _finetune(model, stage, teacher, splits, example, _with_seed(stage.finetune, recipe.seed + i, progress),
                          out_dir / "checkpoints" / f"stage-{i:02d}", resume)
            seconds = time.perf_counter() - t0
            path.parent.mkdir(parents=True, exist_ok=True)
            packed = pack(model, path, coding=coding)
            row = _measure(model, splits, example, coding, stage.label, stage.config.method, seconds, packed.total_bytes)
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
    speed = measure_speed(baseline, load_nsk(model_path), example)
    result = RunResult(rows, out_dir, model_path, model, snapshots, speed=speed)
    results = {"recipe": recipe.name, "rows": [dataclasses.asdict(r) for r in rows], "speed": dataclasses.asdict(speed)}
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2))
    from .run_report import write_run_report

    result.report_path = write_run_report(result, recipe)
    return result
