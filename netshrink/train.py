"""The one Trainer: fitting and fine-tuning, with checkpoints, resume, LR schedules and progress.

Every method that needs training (fine-tuning after pruning or sharing, distillation, QAT) goes
through :class:`Trainer`. Masks and shared weights are parametrizations, so the Trainer respects
them simply by optimising the parameters that require grad: a masked layer trains ``original``,
whose pruned entries get zero gradient through the mask; a shared layer trains its ``codebook``
and freezes ``original``.

Example::

    trainer = Trainer(model, TrainConfig(epochs=5, lr=0.01, schedule="cosine"))
    result = trainer.fit(train_set, val_set, checkpoint_dir="runs/ft", resume=True)
    print(result.final_val_error)

Reproducibility: ``torch.manual_seed(seed)`` at the start of :meth:`Trainer.fit`; the shuffling of
epoch ``e`` comes from a ``torch.Generator`` seeded from ``(seed, e)`` alone, and a checkpoint stores
every RNG state, so a resumed run sees the same batches as an uninterrupted one and, on CPU, lands on
the same weights bit for bit.

Distributed data parallel (DDP): run the same script under ``torchrun --nproc_per_node N`` (and
``--nnodes``); the Trainer sees ``WORLD_SIZE > 1``, joins the process group (gloo on CPU, NCCL on
CUDA, one GPU per process from ``LOCAL_RANK``) and wraps the model in
:class:`~torch.nn.parallel.DistributedDataParallel`. ``batch_size`` stays the *global* batch: it must
be divisible by the world size ``W``, and rank ``r`` takes positions ``r, r + W, ...`` of each batch
the single-process run would have drawn (:class:`ShardedBatchSampler`, whose ``set_epoch`` reshuffles
like :class:`~torch.utils.data.DistributedSampler`'s, but which neither pads nor drops examples).
Each rank's loss is scaled by ``n_r * W / n`` (``n_r`` its examples of the ``n`` in the global batch)
so that DDP's gradient average is exactly the single-process batch-mean gradient, the last short
batch included; the W-process run thus follows the single-process trajectory up to float rounding
(dropout masks and batch-norm statistics, which are per rank, aside). Training loss and validation
error are all-reduced over ranks; only rank 0 logs and writes checkpoints; a resume reads the
checkpoint on every rank, so ``checkpoint_dir`` must be on a file system all nodes see.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Literal, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, Subset

from . import _checkpoint as ckpt
from ._checkpoint import CheckpointError
from .config import BaseConfig, check_range
from .errors import ConfigError, DataError, ModelError, NetshrinkError
from .task import DEFAULT_TASK, Inputs, Task, resolve_task

logger = logging.getLogger("netshrink.train")

LossFn = Callable[[torch.Tensor, Any], torch.Tensor]
#: ``extra_loss(model, inputs, target, output)``: ``inputs`` is the batch's :class:`~netshrink.task.Inputs`
ExtraLoss = Callable[[nn.Module, Inputs, Any, torch.Tensor], torch.Tensor]


class Callback:
    """Hooks into :meth:`Trainer.fit`; every method is a no-op unless overridden.

    Called in this order: ``on_fit_start``; per epoch ``on_epoch_start``, then per batch
    ``on_after_backward`` (gradients present, before clipping and the optimizer step) and
    ``on_step_end`` (after ``optimizer.step()``); ``on_epoch_end`` (with the epoch's stats, after
    validation); finally ``on_fit_end``. ``trainer.model``, ``trainer.optimizer`` and
    ``trainer.global_step`` (optimizer steps taken in this fit, resumed epochs included) are available.
    Methods that act while a model trains (Karnin's weight tracking, AGP's schedule, fixed-point
    rounding) are callbacks, so no optimizer hook or forward-time weight mutation is needed.
    """

    def on_fit_start(self, trainer: "Trainer") -> None: ...

    def on_epoch_start(self, trainer: "Trainer", epoch: int) -> None: ...

    def on_after_backward(self, trainer: "Trainer", step: int) -> None: ...

    def on_step_end(self, trainer: "Trainer", step: int) -> None: ...

    def on_epoch_end(self, trainer: "Trainer", epoch: int, stats: "EpochStats") -> None: ...

    def on_fit_end(self, trainer: "Trainer") -> None: ...

#: config fields that do not change the training trajectory (left out of the fingerprint)
_NOT_IN_FINGERPRINT = ("epochs", "progress", "num_workers", "device")


class DivergenceError(NetshrinkError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


# ------------------------------------------------------------------------------------- config


@dataclass
class TrainConfig(BaseConfig):
    """How to train or fine-tune: the ``train:`` / ``finetune:`` section of a recipe.

    - ``optimizer``: ``"sgd"`` (``momentum``, ``nesterov``) or ``"adam"`` (``momentum`` is its beta1,
      beta2 is 0.999). ``weight_decay`` is the coupled L2 penalty of both torch optimizers.
    - ``schedule``: the learning rate of 0-based epoch ``e`` of ``E = epochs`` (see :func:`lr_factor`):
      ``constant``: ``lr``; ``step``: ``lr * gamma ** floor(e / step_size)``;
      ``cosine``: ``lr * (1 + cos(pi * e / E)) / 2`` (annealing to 0, Loshchilov & Hutter, SGDR, 2017).
    - ``device``: ``"auto"`` picks CUDA when available. ``grad_clip``: max global L2 norm of the
      gradient, or None. ``progress``: a tqdm bar per epoch when stderr is a terminal.
    - ``amp``: mixed precision, ``"bf16"`` or ``"fp16"``: the forward pass and the loss run under
      :func:`torch.autocast` in that dtype (matmuls and convolutions in 16 bits, the weights and the
      optimizer stay fp32; Micikevicius et al., "Mixed Precision Training", ICLR 2018); fp16 adds
      dynamic loss scaling (:class:`torch.amp.GradScaler`, whose scale a checkpoint does not keep).
      None (default): fp32.
    """

    epochs: int = 10
    batch_size: int = 64
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: Literal["constant", "step", "cosine"] = "constant"
    step_size: int = 10
    gamma: float = 0.1
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: int = 0
    progress: bool = True
    grad_clip: Optional[float] = None
    amp: Optional[Literal["bf16", "fp16"]] = None

    def validate(self) -> None:
        _at_least("epochs", self.epochs, 0)
        _at_least("batch_size", self.batch_size, 1)
        _positive("lr", self.lr)
        check_range("momentum", self.momentum, 0.0, 1.0, hi_open=True)
        if self.nesterov and self.optimizer != "sgd":
            raise ConfigError("nesterov", f"applies only to optimizer 'sgd', not {self.optimizer!r}")
        if self.nesterov and self.momentum == 0:
            raise ConfigError("nesterov", "needs momentum > 0")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError("weight_decay", f"must be a finite number >= 0, got {self.weight_decay}")
        _at_least("step_size", self.step_size, 1)
        check_range("gamma", self.gamma, 0.0, 1.0, lo_open=True)
        if not 0 <= self.seed < 2**63:
            raise ConfigError("seed", f"must lie in [0, 2**63), got {self.seed}")
        _at_least("num_workers", self.num_workers, 0)
        if self.grad_clip is not None:
            _positive("grad_clip", self.grad_clip)

    def to_dict(self) -> dict[str, Any]:
        """As :meth:`BaseConfig.to_dict`, without ``amp`` when it is None nor ``strict`` when False, so that the dicts (and the keys
        hashed from them: checkpoint fingerprints, cached baselines) of fp32 configs are those written
        before the field existed."""
        out = super().to_dict()
        if out.get("amp") is None:
            out.pop("amp", None)
        if not out.get("strict"):  # BaseConfig's method-coverage switch: no meaning for training
            out.pop("strict", None)
        return out

    def fingerprint(self) -> str:
        """Hash of the fields that shape the trajectory (``epochs`` too, for the cosine schedule)."""
        return hashlib.sha256(json.dumps(_trajectory_fields(self.to_dict()), sort_keys=True).encode()).hexdigest()[:16]


def _at_least(name: str, value: int, lo: int) -> None:
    if value < lo:
        raise ConfigError(name, f"must be >= {lo}, got {value}")


def _positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(name, f"must be a finite number > 0, got {value}")


def _trajectory_fields(cfg: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in cfg.items() if k not in _NOT_IN_FINGERPRINT and not (k == "amp" and v is None)}
    if cfg.get("schedule") == "cosine":  # the cosine curve depends on the length of the run
        out["epochs"] = cfg.get("epochs")
    return out


def lr_factor(config: TrainConfig, epoch: int) -> float:
    """The multiplier of ``config.lr`` in 0-based ``epoch``.

    ``constant``: 1. ``step``: ``gamma ** floor(epoch / step_size)``.
    ``cosine``: ``(1 + cos(pi * epoch / epochs)) / 2`` — 1 in the first epoch, near 0 in the last.
    """
    if config.schedule == "step":
        return config.gamma ** (epoch // config.step_size)
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / config.epochs)) if config.epochs > 0 else 1.0
    return 1.0


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without CUDA is a :class:`ConfigError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "'cuda' was asked for but CUDA is not available here")
    return torch.device(name)


# ------------------------------------------------------------------------------------ results


@dataclass
class EpochStats:
    """One finished epoch (``epoch`` counts from 1); ``seconds`` covers training and validation.

    ``val_error`` holds the task's validation metric (top-1 error by default; perplexity, MSE);
    ``steps`` the optimizer steps of the epoch.
    """

    epoch: int
    train_loss: float
    val_error: float | None
    lr: float
    seconds: float
    steps: int = 0


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` did.

    ``history`` holds every finished epoch of the run, including those before a resume;
    ``epochs_run`` counts the epochs trained by this call, ``epochs_done`` all finished epochs,
    ``resumed_from`` the epoch a resume started after (0 for a fresh run).
    """

    history: list[EpochStats] = field(default_factory=list)
    final_val_error: float | None = None
    epochs_run: int = 0
    epochs_done: int = 0
    resumed_from: int = 0

    @property
    def final_train_loss(self) -> float | None:
        return self.history[-1].train_loss if self.history else None


# ------------------------------------------------------------------------------------ trainer


class Trainer:
    """Trains ``model`` with ``config``; the one trainer behind fitting and fine-tuning.

    ``task`` (a :class:`~netshrink.task.Task` or its name; classification by default) says how a batch
    splits into model inputs and a target, how the model's output is read (tuple, dict, ModelOutput),
    the loss and the validation metric (error, perplexity, MSE). ``loss_fn(output, target)``, when
    given, replaces the task's loss. ``extra_loss(model, inputs, target, output)``, when given, is added
    to the loss of every batch (the hook for distillation and regularisers); both are batch means (or
    batch-independent terms). ``callbacks``: :class:`Callback` objects. The optimizer gets only the parameters with
    ``requires_grad``. After :meth:`fit`, ``optimizer``, ``scheduler`` and ``device`` are available as
    attributes and the model stays on ``device``.

    ``distributed``: None (default) trains with DDP when a process group is initialised or the
    environment says ``WORLD_SIZE > 1`` (torchrun); False never does. See the module docstring.
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig | Mapping[str, Any] | None = None,
        *,
        task: Task | str | Mapping[str, Any] | None = None,
        loss_fn: LossFn | None = None,
        extra_loss: ExtraLoss | None = None,
        callbacks: Iterable[Callback] = (),
        distributed: bool | None = None,
    ):
        if config is None:
            config = TrainConfig()
        elif isinstance(config, Mapping):
            config = TrainConfig.from_dict(dict(config))
        elif not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig or a mapping, got {type(config).__name__}")
        self.model = model
        self.config: TrainConfig = config
        self.task: Task = resolve_task(task)
        self.loss_fn: LossFn | None = loss_fn
        self.extra_loss = extra_loss
        self.callbacks: list[Callback] = list(callbacks)
        for cb in self.callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be netshrink.train.Callback objects, got {type(cb).__name__}")
        # a module that must act while it trains (fixed-point rounding) names its callback class: added once
        for make in dict.fromkeys(getattr(m, "trainer_callback") for m in model.modules() if hasattr(m, "trainer_callback")):
            if not any(type(cb) is make for cb in self.callbacks):
                self.callbacks.append(make())
        self.global_step = 0
        self.device: torch.device | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.distributed = distributed
        self.rank, self.world_size = 0, 1
        self._ddp: nn.Module | None = None
        self._amp: dict[str, Any] | None = None
        self._scaler: torch.amp.GradScaler | None = None

    @property
    def is_main(self) -> bool:
        """True on rank 0 (and in a single-process run): the process that logs and writes."""
        return self.rank == 0

    # -------------------------------------------------------------------------------- building

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The model's parameters that require grad (each once), in ``model.parameters()`` order."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def _build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        cfg = self.config
        if cfg.optimizer == "adam":
            return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )

    def _build_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        cfg = self.config

        def factor(epoch: int) -> float:  # a plain function: LambdaLR's state_dict then holds no code
            return lr_factor(cfg, epoch)

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def _make_sampler(self, dataset: Dataset, epoch: int) -> Sampler[int]:
        """The sampler of ``epoch``: a random permutation seeded from ``(seed, epoch)``."""
        return RandomSampler(dataset, generator=_generator(self.config.seed, epoch))

    def _make_loader(self, data: Dataset | DataLoader, epoch: int) -> DataLoader:
        """The loader of ``epoch``: built here from a Dataset; a user's DataLoader is used as given
        (its ``sampler.set_epoch`` is called when it has one; its shuffling is then its own)."""
        if isinstance(data, DataLoader):
            set_epoch = getattr(data.sampler, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(epoch)
            return data
        assert self.device is not None
        if self.world_size > 1:
            sampler = ShardedBatchSampler(len(data), self.config.batch_size, self.rank, self.world_size, self.config.seed)
            sampler.set_epoch(epoch)
            return DataLoader(
                data, batch_sampler=sampler, num_workers=self.config.num_workers,
                pin_memory=self.device.type == "cuda", generator=_generator(self.config.seed, epoch, salt=1),
            )
        return DataLoader(
            data,
            batch_size=self.config.batch_size,
            sampler=self._make_sampler(data, epoch),
            num_workers=self.config.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=_generator(self.config.seed, epoch, salt=1),  # worker seeds
        )

    # ------------------------------------------------------------------------------------ fit

    def fit(
        self,
        train_data: Dataset | DataLoader,
        val_data: Dataset | DataLoader | None = None,
        *,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        resume: bool = False,
    ) -> TrainResult:
        """Train for ``config.epochs`` epochs; validate after each when ``val_data`` is given.

        With ``checkpoint_dir``, a checkpoint is written atomically after every epoch. With
        ``resume=True`` a run continues after the last finished epoch of that checkpoint (or starts
        afresh when there is none); a finished run returns at once, with its weights loaded into the
        model. An interrupted epoch (Ctrl-C, a kill) is lost; the checkpoint before it stays valid.
        """
        cfg = self.config
        if resume and checkpoint_dir is None:
            raise CheckpointError("resume=True needs a checkpoint_dir")
        path = ckpt.checkpoint_path(checkpoint_dir) if checkpoint_dir is not None else None
        self.device = self._setup_distributed()
        model = self.model.to(self.device)
        was_training = model.training
        torch.manual_seed(cfg.seed)
        params = self.trainable_parameters()
        if not params:
            raise ModelError("the model has no parameter that requires grad: nothing to train")
        self.optimizer = self._build_optimizer(params)
        self.scheduler = self._build_scheduler(self.optimizer)
        self._amp = _autocast_args(cfg.amp, self.device)
        self._scaler = torch.amp.GradScaler(self.device.type) if cfg.amp == "fp16" else None

        history: list[EpochStats] = []
        start = 0
        exists = self._all_agree_exists(path) if path is not None else False
        if path is not None and resume and exists:
            start, history = self._resume(path)
            if self.is_main:
                logger.info("resuming from %s after epoch %d of %d", path, start, cfg.epochs)
        elif path is not None and exists and self.is_main:
            logger.warning("%s exists and resume=False: it will be overwritten by this run", path)
        self._ddp = None
        self.global_step = sum(h.steps for h in history)
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self._ddp = DistributedDataParallel(model, device_ids=ids)  # broadcasts rank 0's weights

        if start >= cfg.epochs:
            return self._result(history, val_data, epochs_run=0, resumed_from=start)
        if not isinstance(train_data, DataLoader) and hasattr(train_data, "__len__") and len(train_data) == 0:
            raise DataError("train_data is empty")

        epoch = start
        self._emit("on_fit_start")
        try:
            for epoch in range(start, cfg.epochs):
                history.append(self._run_epoch(train_data, val_data, epoch))
                if path is not None:
                    self._save(path, epoch + 1, history)
            self._emit("on_fit_end")
        except KeyboardInterrupt:
            logger.warning(
                "interrupted during epoch %d; %s", epoch + 1,
                f"the checkpoint after epoch {epoch} in {path} stays valid" if path is not None and epoch > 0
                else "no epoch of this run was saved",
            )
            raise
        finally:
            model.train(was_training)
        return self._result(history, val_data, epochs_run=cfg.epochs - start, resumed_from=start)

    def evaluate(self, data: Dataset | DataLoader) -> float:
        """The task's metric (top-1 error by default) of the model on ``data``."""
        return self.task.evaluate(self.model, data, device=self.device)  # None: the model's own device

    def _emit(self, event: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(self, *args)

    def _val_error(self, data: Any) -> float:
        """Validation metric; with DDP each rank scores every ``W``-th example and the sums are added."""
        if self.world_size == 1 or isinstance(data, DataLoader) or not hasattr(data, "__len__"):
            return self.task.evaluate(self.model, data, device=self.device)
        part = Subset(data, range(self.rank, len(data), self.world_size))
        metric = self.task.metric()
        if len(part):
            metric = self.task.accumulate(self.model, part, device=self.device)
        sums = torch.tensor([metric.total, metric.count], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(sums)
        metric.total, metric.count = float(sums[0]), int(sums[1])
        return metric.compute()

    # ---------------------------------------------------------------------------- distributed

    def _setup_distributed(self) -> torch.device:
        """Join the process group when asked (or told by torchrun's environment); the device to use."""
        cfg = self.config
        want = self.distributed
        if want is None:
            want = (dist.is_available() and dist.is_initialized()) or int(os.environ.get("WORLD_SIZE", "1")) > 1
        if not want:
            self.rank, self.world_size = 0, 1
            return resolve_device(cfg.device)
        if not dist.is_available():
            raise ConfigError("distributed", "torch.distributed is not available in this build of torch")
        device = resolve_device(cfg.device)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            if "MASTER_ADDR" not in os.environ and "TORCHELASTIC_RUN_ID" not in os.environ:
                raise ConfigError("distributed", "no process group and no torchrun environment: launch with torchrun")
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if cfg.batch_size % self.world_size:
            raise ConfigError(
                "batch_size",
                f"{cfg.batch_size} is not divisible by the world size {self.world_size} (batch_size is the global "
                "batch; each process takes batch_size / world_size examples per step)",
            )
        if self.is_main:
            logger.info("distributed: %d processes (%s), %d examples per process per step",
                        self.world_size, dist.get_backend(), cfg.batch_size // self.world_size)
        return device

    def _comm_device(self) -> torch.device:
        return self.device if self.device is not None and dist.get_backend() == "nccl" else torch.device("cpu")

    def _all_agree_exists(self, path: os.PathLike[str]) -> bool:
        here = os.path.exists(path)
        if self.world_size == 1:
            return here
        flags = torch.tensor([float(here), 1.0], device=self._comm_device())
        dist.all_reduce(flags)
        if 0 < flags[0] < flags[1]:
            raise CheckpointError(
                f"checkpoint {path} is visible on {int(flags[0])} of {self.world_size} processes: "
                "put checkpoint_dir on a file system every node sees"
            )
        return here

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def _result(self, history: list[EpochStats], val_data: Any, *, epochs_run: int, resumed_from: int) -> TrainResult:
        if history:
            final = history[-1].val_error
        else:  # epochs == 0: measure the model as it is
            final = self._val_error(val_data) if val_data is not None else None
        return TrainResult(list(history), final, epochs_run, len(history), resumed_from)

    # ---------------------------------------------------------------------------------- epoch

    def _run_epoch(self, train_data: Dataset | DataLoader, val_data: Any, epoch: int) -> EpochStats:
        cfg, model = self.config, self.model
        assert self.optimizer is not None and self.scheduler is not None and self.device is not None
        t0 = time.perf_counter()
        lr = float(self.optimizer.param_groups[0]["lr"])
        loader = self._make_loader(train_data, epoch)
        bar = _progress_bar(loader, f"epoch {epoch + 1}/{cfg.epochs}") if cfg.progress and self.is_main else None
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        forward = self._ddp if self._ddp is not None else model
        shards = getattr(loader, "batch_sampler", None)
        shards = shards if isinstance(shards, ShardedBatchSampler) else None

        model.train()
        task = self.task
        self._emit("on_epoch_start", epoch)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        for step, batch in enumerate(bar if bar is not None else loader):
            inputs, y = task.split(batch)
            inputs = inputs.to(self.device)
            y = y.to(self.device, non_blocking=True) if isinstance(y, torch.Tensor) else y
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(**self._amp) if self._amp else contextlib.nullcontext():
                out = task.forward(forward, inputs)
                loss = self.loss_fn(out, y) if self.loss_fn is not None else task.compute_loss(out, y)
                if self.extra_loss is not None:
                    loss = loss + self.extra_loss(model, inputs, y, out)
            loss = loss.float()
            n = task.count(y)
            scaled = loss
            if shards is not None:  # DDP averages gradients: weight this rank by its share of the batch
                n, scale = shards.share(step)
                scaled = loss * scale
            (self._scaler.scale(scaled) if self._scaler is not None else scaled).backward()
            self._emit("on_after_backward", step)
            if self._scaler is not None and cfg.grad_clip is not None:
                self._scaler.unscale_(self.optimizer)
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            if self._scaler is not None:
                self._scaler.step(self.optimizer)
                self._scaler.update()
            else:
                self.optimizer.step()
            self.global_step += 1
            self._emit("on_step_end", step)
            total += loss.detach().to(torch.float64) * n
            count += n
            if bar is not None and step % 10 == 0:
                bar.set_postfix(loss=f"{float(total) / max(count, 1):.4f}", refresh=False)
        if self.world_size > 1:
            sums = torch.stack([total, torch.tensor(float(count), dtype=torch.float64, device=self.device)])
            sums = sums.to(self._comm_device())
            dist.all_reduce(sums)
            total, count = sums[0], int(sums[1])
        if count == 0:
            raise DataError("train_data yielded no batch")
        train_loss = float(total) / count
        if not math.isfinite(train_loss):
            if bar is not None:
                bar.close()
            raise DivergenceError(
                f"the training loss became {train_loss} in epoch {epoch + 1} (lr {lr:g}); "
                "lower lr or set grad_clip"
            )

        val_error = self._val_error(val_data) if val_data is not None else None
        self.scheduler.step()
        stats = EpochStats(epoch + 1, train_loss, val_error, lr, time.perf_counter() - t0, step + 1)
        self._emit("on_epoch_end", epoch, stats)
        line = _describe(stats, cfg.epochs, task)
        if bar is not None:
            bar.set_postfix_str(line.split(": ", 1)[1], refresh=True)
            bar.close()
            logger.debug(line)
        elif self.is_main:
            logger.info(line)
        return stats

    # ----------------------------------------------------------------------------- checkpoint

    def _save(self, path: os.PathLike[str], epochs_done: int, history: list[EpochStats]) -> None:
        """Rank 0 writes the checkpoint (every rank holds the same state); the others wait for it."""
        if not self.is_main:
            self._barrier()
            return
        assert self.optimizer is not None and self.scheduler is not None
        cfg = self.config
        payload = ckpt.build_payload(
            epochs_done=epochs_done,
            epochs=cfg.epochs,
            model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            history=[asdict(s) for s in history],
            config=cfg.to_dict(),
            fingerprint=cfg.fingerprint(),
        )
        try:
            ckpt.save_atomic(payload, path)
        finally:
            self._barrier()

    def _resume(self, path: os.PathLike[str]) -> tuple[int, list[EpochStats]]:
        """Load a checkpoint into the model, optimizer, scheduler and RNGs; (epochs done, history)."""
        assert self.optimizer is not None and self.scheduler is not None
        cfg = self.config
        state = ckpt.load_checkpoint(path)
        if state["fingerprint"] != cfg.fingerprint():
            now = cfg.to_dict()
            keys = sorted(set(_trajectory_fields(state["config"])) | set(_trajectory_fields(now)))
            ckpt.raise_config_mismatch(path, state["config"], now, keys)
        ckpt.check_model_fits(state["model"], self.model, path)
        try:
            history = [EpochStats(**h) for h in state["history"]]
        except TypeError:
            raise CheckpointError(f"checkpoint {path} is corrupt: its history is malformed") from None
        if len(history) != state["epochs_done"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: history and epochs_done disagree")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            ckpt.restore_rng(state["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:
            raise CheckpointError(
                f"checkpoint {path} does not fit this model and optimizer ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:200] if str(err) else 'no detail'})"
            ) from None
        done = state["epochs_done"]
        if done > cfg.epochs:
            logger.warning("checkpoint %s holds %d epochs, more than the %d asked for", path, done, cfg.epochs)
        return done, history


# ------------------------------------------------------------------------------------ helpers


def _generator(seed: int, epoch: int, salt: int = 0) -> torch.Generator:
    """A CPU generator seeded from ``(seed, epoch, salt)`` alone (63 bits of a SHA-256)."""
    digest = hashlib.sha256(f"netshrink:{seed}:{epoch}:{salt}".encode()).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return g


class ShardedBatchSampler(Sampler[list[int]]):
    """Rank ``rank``'s share of the batches a single process would draw, for DDP.

    Epoch ``e`` permutes ``0..n-1`` with the generator seeded from ``(seed, e)`` (the single-process
    :class:`~torch.utils.data.RandomSampler`'s permutation), cuts it into global batches of
    ``batch_size`` and gives rank ``r`` the positions ``r, r + W, r + 2W, ...`` of each. Nothing is
    padded or dropped: a rank with no example in the last short batch gets one example with weight 0,
    so that every rank runs the same number of steps. :meth:`share` tells the loss scale.
    """

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, seed: int):
        if n <= 0:
            raise DataError("train_data is empty")
        self.n, self.batch_size, self.rank, self.world_size, self.seed = n, batch_size, rank, world_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def share(self, step: int) -> tuple[int, float]:
        """``(n_r, n_r * W / n)`` of ``step``: this rank's true example count and its loss scale."""
        n = min(self.batch_size, self.n - step * self.batch_size)
        mine = len(range(self.rank, n, self.world_size))
        return mine, mine * self.world_size / n

    def __iter__(self):
        perm = torch.randperm(self.n, generator=_generator(self.seed, self.epoch)).tolist()
        for start in range(0, self.n, self.batch_size):
            batch = perm[start:start + self.batch_size]
            mine = batch[self.rank::self.world_size]
            yield mine if mine else batch[:1]


def _autocast_args(amp: str | None, device: torch.device) -> dict[str, Any] | None:
    """``torch.autocast`` arguments for ``amp`` on ``device`` (None: no autocast); a :class:`ConfigError`
    naming ``amp`` when this torch build cannot autocast to that dtype there."""
    if amp is None:
        return None
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    with warnings.catch_warnings(record=True) as caught:  # torch warns, then disables, for an unsupported dtype
        warnings.simplefilter("always")
        try:
            with torch.autocast(device.type, dtype=dtype):
                enabled = torch.is_autocast_enabled(device.type)
        except (RuntimeError, TypeError) as err:
            raise ConfigError("amp", f"{amp} autocast is not supported on {device.type} by torch {torch.__version__}: {err}") from None
    if not enabled or any("not supported" in str(w.message) for w in caught):
        raise ConfigError("amp", f"{amp} autocast is not supported on {device.type} by torch {torch.__version__}")
    return {"device_type": device.type, "dtype": dtype}


def _stderr_is_tty() -> bool:
    stream = sys.stderr
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):
        return False


def _progress_bar(loader: Iterable[Any], desc: str) -> Any:
    """A tqdm bar over ``loader`` when stderr is a terminal, else None."""
    if not _stderr_is_tty():
        return None
    from tqdm import tqdm

    return tqdm(loader, desc=desc, unit="batch", leave=True, dynamic_ncols=True, file=sys.stderr)


def _describe(stats: EpochStats, epochs: int, task: Task = DEFAULT_TASK) -> str:
    val = f", val {task.format(stats.val_error)}" if stats.val_error is not None else ""
    return (
        f"epoch {stats.epoch}/{epochs}: train loss {stats.train_loss:.4f}{val}, "
        f"lr {stats.lr:.3g}, {stats.seconds:.1f} s"
    )


__all__ = [
    "Callback",
    "CheckpointError",
    "DivergenceError",
    "EpochStats",
    "ShardedBatchSampler",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "lr_factor",
    "resolve_device",
]
