"""Layer-by-layer low-rank replacement with a reconstruction objective and fine-tuning between layers.

The flow of the survey's Figure 2 (Cheng et al. 2017) as Jaderberg et al. (BMVC 2014) and Zhang et al.
(TPAMI 2016) run it: for each chosen layer ``L``, in model order,

1. replace ``L`` by its low-rank approximation ``L_hat`` (any ``lowrank`` method: ``svd``, ``tucker``,
   ``cp``, ``separable``, with its own rank rule);
2. fit ``L_hat`` to ``L``: ``min sum_x ||L(x) - L_hat(x)||^2`` over the inputs ``x`` the layer sees in
   the model *as already changed* (so each layer corrects the error of those before it);
3. fine-tune the whole model on the task loss for a few steps before the next layer.

Batches are read through a :class:`~netshrink.task.Task` (tuples, dicts, token tensors): the fit needs
only the layer's inputs, so any task's data serves; the fine-tuning steps use the task's loss
(cross-entropy by default, token cross-entropy for a language model, MSE for regression).
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .._registry import config_type, handler, handler_for, register
from ..config import BaseConfig, check_range
from ..errors import ConfigError
from .._allocate import iter_batches, train_source
from ..quantize._common import model_device
from ..quantize.ptq import calibration_inputs
from ..task import Inputs, Task, resolve_task
from ._common import FactorizeResult
from ._fit import layer_inputs, mimic_, relative_output_error

log = logging.getLogger(__name__)

#: the inner methods a layer-wise run may use
INNER_METHODS = ("svd", "tucker", "cp", "separable")


@register("layerwise", family="lowrank")
@dataclass
class LayerwiseConfig(BaseConfig):
    """Layer-by-layer low-rank replacement: fit each layer's outputs, fine-tune between layers (Figure 2)."""

    replaces_modules: ClassVar[bool] = True

    method: str = "tucker"  # the low-rank method applied to each layer
    args: dict[str, Any] = field(default_factory=dict)  # its config fields (not ``layers``)
    layers: list[str] | None = None
    fit_steps: int = 100  # Adam steps fitting each new layer to the original's outputs
    fit_lr: float = 1e-3
    finetune_steps: int = 20  # SGD steps on the task loss after each layer (0: none)
    finetune_lr: float = 0.01
    samples: int = 256  # inputs the fit uses
    batch_size: int = 64
    seed: int = 0

    def validate(self) -> None:
        if self.method not in INNER_METHODS:
            raise ConfigError("method", f"must be one of {', '.join(INNER_METHODS)}, got {self.method!r}")
        if "layers" in self.args:
            raise ConfigError("args.layers", "give the layers in this config's own `layers` field")
        self.inner()  # checks the inner config's fields
        for name in ("samples", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be at least 1, got {getattr(self, name)}")
        for name in ("fit_steps", "finetune_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be at least 0, got {getattr(self, name)}")
        check_range("fit_lr", self.fit_lr, 0.0, 10.0, lo_open=True)
        check_range("finetune_lr", self.finetune_lr, 0.0, 10.0, lo_open=True)

    def inner(self, layers: list[str] | None = None) -> BaseConfig:
        """The inner method's config (restricted to ``layers`` when given)."""
        cfg = config_type(self.method, "method").from_dict(dict(self.args), "args")
        if layers is None:
            return dataclasses.replace(cfg, layers=self.layers)
        # per-layer ranks: keep the patterns that name these layers (the others would match nothing)
        kept = {p: r for p, r in cfg.layer_rank.items() if any(fnmatch.fnmatchcase(n, p) for n in layers)}
        return dataclasses.replace(cfg, layers=layers, layer_rank=kept)

    def check_model(self, model: nn.Module) -> None:
        self.inner().check_model(model)


def _finetune(model: nn.Module, batches: list[tuple[Inputs, Any]], steps: int, lr: float, task: Task) -> None:
    if steps <= 0 or not batches:
        return
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    was_training = model.training
    model.train()
    for step in range(steps):
        x, y = batches[step % len(batches)]
        opt.zero_grad()
        task.compute_loss(task.forward(model, x), y).backward()
        opt.step()
    model.train(was_training)


@handler(LayerwiseConfig)
def layerwise_factorize(model: nn.Module, config: LayerwiseConfig, data: Any = None, task: Task | None = None) -> FactorizeResult:
    """Replace, fit and fine-tune the chosen layers of ``model`` one by one (see the module doc);
    ``task`` reads the batches and gives the fine-tuning loss (classification when None)."""
    task = resolve_task(task)
    if data is None:
        raise ConfigError("data", "layerwise fits each layer on sample inputs: pass data= (Splits, Dataset or DataLoader)")
    inner = config.inner()
    names = list(inner.targets(model))
    inner.check_model(model)
    device = model_device(model)
    inputs = calibration_inputs(data, config.samples, config.batch_size, config.seed, device, task)
    tune = []
    if config.finetune_steps > 0:
        source = train_source(data, "layerwise")
        n = min(config.finetune_steps, 64)
        tune = list(iter_batches(source, n, config.batch_size, config.seed + 1, device, task))
    done = {}
    for name in names:
        reference = copy.deepcopy(model.get_submodule(name))
        step = handler_for(inner, family="lowrank")(model, config.inner([name]), data=None).layers[name]
        new = model.get_submodule(name)
        seen = layer_inputs(model, new, inputs)
        before = relative_output_error(reference, new, seen)
        mimic_(new, reference, seen, config.fit_steps, config.fit_lr, config.seed)
        after = relative_output_error(reference, new, seen)
        log.info("layerwise %s: output error %.4f -> %.4f after %d fit steps", name, before, after, config.fit_steps)
        done[name] = dataclasses.replace(step, output_error=after, fit_from=before)
        _finetune(model, tune, config.finetune_steps, config.finetune_lr, task)
    return FactorizeResult(done)


__all__ = ["LayerwiseConfig", "layerwise_factorize"]
