"""Tasks: what a batch is, what the model's output is, the loss and the metric — for any model.

The data-driven code (the Trainer, the pruning criteria, sensitivity sweeps, calibration, layer-wise
reconstruction, budgets, distillation, early exit) never assumes ``(image, class)`` batches or a model
that returns one logits tensor. It asks a :class:`Task`:

- :meth:`Task.split` turns a batch into model inputs (:class:`Inputs`: positional and keyword
  tensors) and a target. A batch is a tuple/list ``(x, y)`` or ``(x1, x2, ..., y)``, a dict (the target
  under ``target_key``; every other entry is a keyword input), or a bare tensor (language modelling:
  the tokens are their own target).
- :meth:`Task.output` adapts what the model returns: a tensor as is; a tuple/list: its first element;
  a dict or a ``transformers`` ``ModelOutput``: ``output_key`` (default ``"logits"``), else the first tensor.
- :attr:`Task.loss` is a batch-mean scalar loss ``loss(output, target)``; :meth:`Task.metric` makes a
  fresh accumulating :class:`Metric` (error by default; perplexity for language models; MSE for regression).

Three tasks are built in and registered by name (``classification``, ``language_modeling``,
``regression``); a recipe says ``task: language_modeling`` or ``task: {name: regression}``; a Python
user passes any :class:`Task`. Causal language modelling predicts token ``t+1`` from tokens ``<= t``:
when the target comes from the inputs themselves (a bare tensor batch, or a dict whose ``labels`` are
the input ids in the ``transformers`` convention), :meth:`Task.split` shifts it, so position ``t`` of the
target holds token ``t+1`` and the last position is ignored (``IGNORE_INDEX``); a tuple ``(x, y)``
batch is taken as already aligned.

Perplexity is ``exp(sum of token negative log-likelihoods / number of scored tokens)`` over the whole
data set (not a mean of per-batch perplexities).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ._registry import Registry
from .errors import ConfigError, DataError, ModelError

#: target entries equal to this are not scored (PyTorch's and transformers' convention)
IGNORE_INDEX = -100
#: dict keys taken as the target when the task names none
TARGET_KEYS = ("labels", "label", "targets", "target", "y")


# ------------------------------------------------------------------------------------------ inputs


@dataclass
class Inputs:
    """What a model is called with: ``model(*args, **kwargs)``."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> "Inputs":
        return Inputs(tuple(_to(a, device) for a in self.args), {k: _to(v, device) for k, v in self.kwargs.items()})

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (*self.args, *self.kwargs.values()) if isinstance(t, torch.Tensor)]

    @property
    def batch_size(self) -> int:
        ts = self.tensors()
        return int(ts[0].shape[0]) if ts and ts[0].dim() > 0 else 1

    def take(self, n: int) -> "Inputs":
        """The first ``n`` examples of every tensor (an example input for tracing, export or timing)."""
        cut = lambda t: t[:n] if isinstance(t, torch.Tensor) and t.dim() > 0 else t  # noqa: E731
        return Inputs(tuple(cut(a) for a in self.args), {k: cut(v) for k, v in self.kwargs.items()})

    def call(self, model: nn.Module) -> Any:
        return model(*self.args, **self.kwargs)

    def as_tuple(self) -> tuple[Any, ...]:
        """Positional form for ``torch.onnx.export`` / ``torch.fx`` (keyword inputs appended as a dict)."""
        return (*self.args, self.kwargs) if self.kwargs else tuple(self.args)

    @staticmethod
    def of(example: Any) -> "Inputs":
        """An :class:`Inputs` from a tensor, a tuple of inputs, a dict of keyword inputs, or an Inputs."""
        if isinstance(example, Inputs):
            return example
        if isinstance(example, torch.Tensor):
            return Inputs((example,))
        if isinstance(example, Mapping):
            return Inputs((), dict(example))
        if isinstance(example, (tuple, list)):
            return Inputs(tuple(example))
        raise ConfigError("example_input", f"expected a tensor, a tuple of tensors or a dict, got {type(example).__name__}")


def _to(value: Any, device: torch.device | str) -> Any:
    return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value


# ----------------------------------------------------------------------------------------- outputs


def output_tensor(out: Any, key: str | None = "logits") -> torch.Tensor:
    """The tensor a task scores in what a model returned (see the module docstring)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):  # dict and transformers' ModelOutput (an OrderedDict)
        if key is not None and isinstance(out.get(key), torch.Tensor):
            return out[key]
        for v in out.values():
            if isinstance(v, torch.Tensor):
                return v
        raise ModelError(f"the model returned a mapping with no tensor (keys: {', '.join(map(str, out))})")
    if isinstance(out, (tuple, list)) and out:
        return output_tensor(out[0], key)
    raise ModelError(f"the model returned {type(out).__name__}; expected a tensor, a tuple, a dict or a ModelOutput")


# ----------------------------------------------------------------------------------------- metrics


class Metric:
    """An accumulating metric: ``update`` per batch, ``compute`` over everything seen."""

    name = "metric"
    #: shown as a percentage in logs and reports
    percent = False

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def compute(self) -> float:
        if self.count == 0:
            raise DataError(f"{self.name}: the data set is empty (no scored example)")
        return self.total / self.count


class ErrorMetric(Metric):
    """Top-1 error: the fraction of scored targets whose argmax over the last axis differs."""

    name = "error"
    percent = True

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        pred = output.argmax(dim=-1)
        if pred.shape != target.shape:
            raise DataError(f"error: predictions of shape {tuple(pred.shape)} do not fit targets of shape {tuple(target.shape)}")
        keep = target != IGNORE_INDEX
        self.total += float(((pred != target) & keep).sum())
        self.count += int(keep.sum())


class PerplexityMetric(Metric):
    """``exp(Σ NLL / tokens)`` over every scored token (targets equal to ``IGNORE_INDEX`` skipped)."""

    name = "perplexity"

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        logits = output.reshape(-1, output.shape[-1]).float()
        t = target.reshape(-1)
        if logits.shape[0] != t.shape[0]:
            raise DataError(f"perplexity: {logits.shape[0]} predictions for {t.shape[0]} targets")
        self.total += float(nn.functional.cross_entropy(logits, t, ignore_index=IGNORE_INDEX, reduction="sum"))
        self.count += int((t != IGNORE_INDEX).sum())

    def compute(self) -> float:
        nll = super().compute()
        return math.exp(min(nll, 700.0))


class MSEMetric(Metric):
    """Mean squared error over every output element."""

    name = "mse"

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        if output.shape != target.shape:
            raise DataError(f"mse: outputs of shape {tuple(output.shape)} do not fit targets of shape {tuple(target.shape)}")
        self.total += float((output.float() - target.float()).pow(2).sum())
        self.count += int(target.numel())


def _token_cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX)


def _mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(output, target.to(output.dtype))


# ------------------------------------------------------------------------------------------- tasks


@dataclass
class Task:
    """How a data-driven method reads batches, model outputs, the loss and the metric.

    ``loss(output, target)`` must return a scalar batch mean; ``metric`` is a zero-argument factory of a
    :class:`Metric`. ``target_key``: the dict key of the target (default: the first of ``TARGET_KEYS``
    present); ``input_keys``: the dict keys passed to the model (default: all but the target).
    ``shift``: causal LM shifting of a target that comes from the inputs (see the module docstring).
    """

    name: str = "classification"
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy
    metric: Callable[[], Metric] = ErrorMetric
    output_key: str | None = "logits"
    target_key: str | None = None
    input_keys: Sequence[str] | None = None
    shift: bool = False
    #: dict key of the token ids a language-model target comes from when the batch has no labels
    ids_key: str = "input_ids"

    # ---- batches
    def split(self, batch: Any) -> tuple[Inputs, Any]:
        """``(inputs, target)`` of one batch; a :class:`DataError` naming the batch's form if it fits none."""
        if isinstance(batch, torch.Tensor):
            if not self.shift:
                raise DataError(f"task {self.name!r}: a batch is a bare tensor with no target; give (inputs, target) pairs")
            return Inputs((batch,)), shift_targets(batch)
        if isinstance(batch, Mapping):
            return self._split_dict(batch)
        if isinstance(batch, (tuple, list)):
            if len(batch) < 2:
                raise DataError(f"task {self.name!r}: a batch must be (inputs..., target), got a {type(batch).__name__} of {len(batch)}")
            return Inputs(tuple(batch[:-1])), batch[-1]
        raise DataError(f"task {self.name!r}: a batch must be a tuple (inputs..., target), a dict or a tensor, got {type(batch).__name__}")

    def _split_dict(self, batch: Mapping[str, Any]) -> tuple[Inputs, Any]:
        key = self.target_key or next((k for k in TARGET_KEYS if k in batch), None)
        if key is not None and key not in batch:
            raise DataError(f"task {self.name!r}: the batch has no target key {key!r} (keys: {', '.join(map(str, batch))})")
        names = list(self.input_keys) if self.input_keys is not None else [k for k in batch if k != key]
        missing = [k for k in names if k not in batch]
        if missing:
            raise DataError(f"task {self.name!r}: the batch lacks input key(s) {', '.join(missing)} (keys: {', '.join(map(str, batch))})")
        inputs = Inputs((), {k: batch[k] for k in names})
        if key is None:
            if self.shift and isinstance(batch.get(self.ids_key), torch.Tensor):
                return inputs, shift_targets(batch[self.ids_key])
            raise DataError(f"task {self.name!r}: the batch has no target (looked for {', '.join(TARGET_KEYS)}; keys: {', '.join(map(str, batch))})")
        target = batch[key]
        return inputs, shift_targets(target) if self.shift else target

    # ---- model calls
    def output(self, raw: Any) -> torch.Tensor:
        return output_tensor(raw, self.output_key)

    def forward(self, model: nn.Module, inputs: Inputs) -> torch.Tensor:
        return self.output(inputs.call(model))

    def compute_loss(self, output: torch.Tensor, target: Any) -> torch.Tensor:
        """``loss(output, target)``, checked to be a finite-or-not scalar tensor."""
        try:
            value = self.loss(output, target)
        except (RuntimeError, ValueError, IndexError, TypeError) as err:
            raise DataError(f"task {self.name!r}: the loss failed on outputs {tuple(output.shape)}: {_first_line(err)}") from None
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise DataError(f"task {self.name!r}: the loss must return a scalar tensor, got {shape}")
        return value.reshape(())

    def count(self, target: Any) -> int:
        """How many examples a batch's target holds (the weight of its loss in an epoch mean)."""
        return int(target.shape[0]) if isinstance(target, torch.Tensor) and target.dim() > 0 else 1

    # ---- evaluation
    def evaluate(
        self, model: nn.Module, data: Dataset | DataLoader | Iterable[Any], *, batch_size: int = 256,
        device: torch.device | str | None = None, max_batches: int | None = None,
    ) -> float:
        """The task's metric of ``model`` over ``data`` (in eval mode; the model's mode is restored)."""
        return self.accumulate(model, data, batch_size=batch_size, device=device, max_batches=max_batches).compute()

    @torch.no_grad()
    def accumulate(
        self, model: nn.Module, data: Dataset | DataLoader | Iterable[Any], *, batch_size: int = 256,
        device: torch.device | str | None = None, max_batches: int | None = None,
    ) -> Metric:
        """The task's :class:`Metric` after every batch of ``data`` (its sums, e.g. to all-reduce them)."""
        if device is None:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
        metric = self.metric()
        was_training = model.training
        model.eval()
        try:
            for i, batch in enumerate(batches(data, batch_size)):
                if max_batches is not None and i >= max_batches:
                    break
                inputs, target = self.split(batch)
                out = self.forward(model, inputs.to(device))
                try:
                    metric.update(out, _to(target, device))
                except (RuntimeError, ValueError, IndexError, TypeError) as err:
                    raise DataError(f"task {self.name!r}: the metric {metric.name!r} failed: {_first_line(err)}") from None
        finally:
            model.train(was_training)
        return metric

    @property
    def metric_name(self) -> str:
        return self.metric().name

    def format(self, value: float) -> str:
        m = self.metric()
        return f"{m.name} {100 * value:.2f}%" if m.percent else f"{m.name} {value:.4g}"

    def example(self, data: Dataset | DataLoader | Iterable[Any], n: int = 1) -> Inputs:
        """The inputs of the first ``n`` examples of ``data`` (for tracing, export, MACs, timing)."""
        for batch in batches(data, n):
            inputs, _ = self.split(batch)
            return inputs.take(n)
        raise DataError("the data set is empty: no example input")


def shift_targets(ids: torch.Tensor) -> torch.Tensor:
    """Causal LM targets: position ``t`` holds token ``t+1``; the last position is ``IGNORE_INDEX``."""
    if not isinstance(ids, torch.Tensor) or ids.dim() < 1:
        raise DataError("language modelling needs token ids of shape (batch, length)")
    target = torch.full_like(ids, IGNORE_INDEX)
    target[..., :-1] = ids[..., 1:]
    return target


def batches(data: Dataset | DataLoader | Iterable[Any], batch_size: int) -> Iterator[Any]:
    """Batches of ``data``: a DataLoader or any iterable of batches as given, a Dataset in order."""
    if isinstance(data, Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        yield from DataLoader(data, batch_size=batch_size, shuffle=False)
    else:
        yield from data


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


# ---------------------------------------------------------------------------------------- registry


def classification(**kw: Any) -> Task:
    """Cross-entropy over class logits, top-1 error (the default)."""
    return Task(name="classification", **kw)


def language_modeling(**kw: Any) -> Task:
    """Causal LM: token cross-entropy on shifted targets, perplexity."""
    kw.setdefault("shift", True)
    return Task(name="language_modeling", loss=_token_cross_entropy, metric=PerplexityMetric, **kw)


def regression(**kw: Any) -> Task:
    """Mean squared error as both loss and metric."""
    return Task(name="regression", loss=_mse, metric=MSEMetric, output_key=kw.pop("output_key", None), **kw)


#: task factories by name; extended by ``register_task`` and the ``netshrink.tasks`` entry points
_TASKS: Registry[Callable[..., Task]] = Registry("task", group="netshrink.tasks")
for _factory in (classification, language_modeling, regression):
    _TASKS.add(_factory.__name__, _factory)
_TASK_ARGS = {"output_key", "target_key", "input_keys", "shift", "ids_key"}


def register_task(name: str) -> Callable[[Callable[..., Task]], Callable[..., Task]]:
    """Decorator: register a task factory under ``name`` (for recipes' ``task:``)."""

    return _TASKS.register(name)


def list_tasks() -> list[str]:
    return _TASKS.names()


DEFAULT_TASK = classification()


def resolve_task(spec: Any = None, field: str = "task") -> Task:
    """A :class:`Task` from None (classification), a name, ``{name: ..., <args>}`` or a Task."""
    if spec is None:
        return classification()  # a fresh object: a caller that changes it changes no one else's task
    if isinstance(spec, Task):
        return spec
    args: dict[str, Any] = {}
    if isinstance(spec, Mapping):
        args = dict(spec)
        spec = args.pop("name", None)
        unknown = sorted(set(args) - _TASK_ARGS)
        if unknown:
            raise ConfigError(f"{field}.{unknown[0]}", f"unknown task argument (known: name, {', '.join(sorted(_TASK_ARGS))})")
    if not isinstance(spec, str):
        raise ConfigError(field, f"expected a task name or a mapping with 'name', got {type(spec).__name__}")
    return _TASKS.lookup(spec, field)(**args)


__all__ = [
    "DEFAULT_TASK",
    "IGNORE_INDEX",
    "ErrorMetric",
    "Inputs",
    "MSEMetric",
    "Metric",
    "PerplexityMetric",
    "Task",
    "batches",
    "classification",
    "language_modeling",
    "list_tasks",
    "output_tensor",
    "register_task",
    "regression",
    "resolve_task",
    "shift_targets",
]
