"""Uniform integer quantization of weights and activations: post-training (PTQ) and quantization-aware
training (QAT), dispatched by ``quantize_``.

PTQ (``UniformConfig``, method ``"uniform"``; ``Int8Config``, ``"int8"``; Jacob et al., CVPR 2018;
Krishnamoorthi, "Quantizing deep convolutional networks for efficient inference", 2018):

1. each chosen Linear/Conv weight (and transformers' GPT-2 ``Conv1D``, per channel along its axis 1) gets a :class:`~netshrink.quantize.fake.WeightFakeQuant`, its range
   chosen by the weight observer (per output channel or per tensor, symmetric or not);
2. with ``activations``, each chosen layer's input gets an
   :class:`~netshrink.quantize.fake.ActFakeQuant`, calibrated by running the calibration data through
   the model (weights already quantized);
3. with ``bias_correction``, layer by layer in definition order, the bias absorbs the mean output error
   on the calibration data (Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias
   Correction", ICCV 2019, §4.2, empirical variant):
   ``b <- b + E[y_float] - E[y_quant]`` per output channel, where ``y = W x + b`` is the layer's output
   in the float model and ``ŷ = Ŵ x̃ + b`` in the quantized one (``x̃`` its input there, after the
   layers before it are quantized and corrected) -- for the first layer ``E[Wx] - E[Ŵx]``.

Every ``nn.MultiheadAttention`` in scope is first converted to an equivalent module with separate
q/k/v/out ``nn.Linear`` projections (:func:`netshrink._attention.convert_attention_`): the fused module reads
``out_proj.weight`` itself and packs q/k/v into one parameter, so no observer would see those inputs.
Before anything is quantized, with ``fold_bn`` (the default), every BatchNorm that follows a Conv/Linear
layer is folded into it (:mod:`netshrink.quantize.fold`; Jacob et al. 2018 §3.2), so the quantizers see
the weights that integer kernels run. Calibration batches are read through a :class:`~netshrink.task.Task`
(tuples, dicts of keyword inputs, any dtype); a chosen layer that the model never calls on them is left
in float and reported in ``UniformResult.skipped``.

QAT (``QATConfig``, ``"qat"``; Jacob et al. 2018 §3): the same modules, with weight ranges re-observed
at every training step and activation ranges tracked by an exponential moving average; ``quantize_``
prepares the model, then the :class:`~netshrink.train.Trainer` (or a recipe's ``finetune``) trains it,
the straight-through estimator carrying the gradient to the float weights.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._layers import is_gpt2_conv1d, out_axis, per_layer
from .._registry import handler, register
from ..config import BaseConfig, check_range
from ..errors import ConfigError, DataError
from ..metrics import sqnr_db
from ..task import DEFAULT_TASK, Inputs, Task
from ._common import (
    add_weight_quantizer,
    check_not_quantized,
    log,
    model_device,
    select_quantizable,
)
from .affine import MAX_BITS, MIN_BITS, QuantParams
from .fake import ActFakeQuant, WeightFakeQuant, attach_input_quant, remove_input_quant
from .fold import fold_batchnorm_
from .observers import ObserverKind, check_finite, check_percentile


@register("uniform", family="quantize")
@dataclass
class UniformConfig(BaseConfig):
    """Uniform affine post-training quantization of weights and activations, 2 to 8 bits (Jacob et al. 2018).

    - ``bits`` / ``layer_bits``: weight bits (globs as keys); ``per_channel``: one scale per output channel;
      ``symmetric``: signed weights with zero point 0 (else asymmetric, unsigned, with a zero point);
    - ``observer``: how weight ranges are chosen (``minmax``, ``percentile``, ``mse``);
    - ``activations``: quantize each chosen layer's input to ``act_bits``, range by ``act_observer``
      (``act_symmetric`` False: unsigned with a zero point, the usual choice after ReLU);
    - ``percentile``: of both percentile observers; ``bias_correction``: Nagel et al. 2019;
    - ``calibration_samples`` examples of the data (drawn with ``seed``), in batches of ``batch_size``;
    - ``fold_bn``: fold each BatchNorm that follows a Conv/Linear into it first (needs data to see which).
    """

    bits: int = 8
    layer_bits: dict[str, int] = field(default_factory=dict)
    per_channel: bool = True
    symmetric: bool = True
    observer: ObserverKind = "minmax"
    activations: bool = True
    act_bits: int = 8
    act_observer: ObserverKind = "minmax"
    act_symmetric: bool = False
    percentile: float = 99.99
    bias_correction: bool = False
    calibration_samples: int = 512
    batch_size: int = 128
    layers: list[str] | None = None
    seed: int = 0
    fold_bn: bool = True

    def validate(self) -> None:
        check_range("bits", self.bits, MIN_BITS, MAX_BITS)
        for name, b in self.layer_bits.items():
            check_range(f"layer_bits.{name}", b, MIN_BITS, MAX_BITS)
        check_range("act_bits", self.act_bits, MIN_BITS, MAX_BITS)
        check_percentile(self.percentile)
        if self.calibration_samples < 1:
            raise ConfigError("calibration_samples", f"must be at least 1, got {self.calibration_samples}")
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be at least 1, got {self.batch_size}")

    def check_model(self, model: nn.Module) -> None:
        from .._attention import converted_copy  # layer names as quantize_ will see them (MHA converted)

        per_layer(select_quantizable(converted_copy(model, self.layers), self.layers, self.method or "uniform"), self.layer_bits, self.bits, "layer_bits")


@register("int8", family="quantize")
@dataclass
class Int8Config(UniformConfig):
    """int8 post-training quantization: symmetric per-channel int8 weights, uint8 activations (Jacob et al. 2018)."""

    def validate(self) -> None:
        super().validate()
        if self.bits != 8 or any(b != 8 for b in self.layer_bits.values()):
            raise ConfigError("bits", f"int8 quantizes to 8 bits; use method 'uniform' for {self.bits}")
        if self.act_bits != 8:
            raise ConfigError("act_bits", f"int8 quantizes activations to 8 bits, got {self.act_bits}")


@register("qat", family="quantize")
@dataclass
class QATConfig(UniformConfig):
    """Quantization-aware training: fake-quantized weights and activations trained with the STE (Jacob et al. 2018).

    As :class:`UniformConfig`, plus ``act_ema``: the weight of each training batch in the moving
    average of activation ranges (0 freezes the calibrated ranges). Calibration data is optional: without
    it the activation ranges start from the first training batch.
    """

    bits: int = 4
    act_ema: float = 0.01

    def validate(self) -> None:
        super().validate()
        check_range("act_ema", self.act_ema, 0.0, 1.0)
        if self.bias_correction:
            raise ConfigError("bias_correction", "is a post-training method; QAT learns the biases")


@dataclass
class UniformResult:
    """What uniform quantization did, per quantized layer.

    ``bits``: weight bits; ``weight_sqnr_db``: SQNR of the quantized weight against the float one;
    ``inputs``: the calibrated input quantizer (absent when activations are off or not yet calibrated);
    ``bias_shift``: L2 norm of each bias correction; ``skipped``: chosen layers left in float, with the
    reason (never called on the calibration data); ``bn_folded``: BatchNorm -> the layer it was folded
    into; ``bn_kept``: BatchNorms left as they are, with the reason; ``converted_attention``: the
    ``nn.MultiheadAttention`` modules converted to separate q/k/v/out projections first.
    """

    bits: dict[str, int] = field(default_factory=dict)
    weight_sqnr_db: dict[str, float] = field(default_factory=dict)
    inputs: dict[str, QuantParams] = field(default_factory=dict)
    bias_shift: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    bn_folded: dict[str, str] = field(default_factory=dict)
    bn_kept: dict[str, str] = field(default_factory=dict)
    converted_attention: list[str] = field(default_factory=list)


def _with_gpt2_conv1d(model: nn.Module, chosen: dict[str, nn.Module], patterns: list[str] | None) -> dict[str, nn.Module]:
    """``chosen`` plus the transformers ``Conv1D`` layers (GPT-2; ``y = x W + b``, ``W`` of shape (in, out))
    that ``patterns`` name (all when None), in model order."""
    import fnmatch

    extra = {n: m for n, m in model.named_modules() if "parametrizations" not in n.split(".") and is_gpt2_conv1d(m)
             and (patterns is None or any(fnmatch.fnmatchcase(n, p) for p in patterns))}
    if not extra:
        return chosen
    return {n: m for n, m in model.named_modules() if n in chosen or n in extra}


def _unsupported(model: nn.Module, chosen: dict[str, nn.Module], patterns: list[str] | None) -> dict[str, str]:
    """Modules with a matrix weight in scope that uniform quantization does not handle, with the reason."""
    import fnmatch

    from ._common import SUPPORTED, _has_matrix_weight

    out = {}
    for n, m in model.named_modules():
        if n in chosen or not _has_matrix_weight(m) or "parametrizations" in n.split(".") or isinstance(m, nn.MultiheadAttention):
            continue
        if any(n.startswith(c + ".") for c in chosen):
            continue
        if patterns is None or any(fnmatch.fnmatchcase(n, p) for p in patterns):
            out[n] = f"a {type(m).__name__} is not a layer type uniform quantization handles ({SUPPORTED}); it stays in float"
    return out


def _call(model: nn.Module, batch: Any) -> Any:
    return Inputs.of(batch).call(model)


def calibration_inputs(
    data: Any, samples: int, batch_size: int, seed: int = 0, device: torch.device | None = None, task: Task | None = None
) -> list[Inputs]:
    """Up to ``samples`` examples of ``data`` as model inputs, in batches of ``batch_size``.

    ``data``: a :class:`netshrink.data.Splits` (its ``train`` split), a map-style Dataset (a random
    subset drawn with ``seed``), a DataLoader or any iterable of batches (its first batches), an input
    tensor, or example inputs (:class:`~netshrink.task.Inputs`, a dict of keyword inputs). Each batch
    is split by ``task`` (tuples ``(x..., y)``, dicts; a bare tensor is an input). Empty data, or float
    inputs holding NaN or inf, raise :class:`DataError`; integer inputs (token ids) keep their dtype.
    """
    from collections.abc import Mapping

    from torch.utils.data import DataLoader, Dataset, Subset

    task = task or DEFAULT_TASK
    if data is None:
        raise DataError("calibration data is missing: pass data= (a Dataset, DataLoader or Splits)")
    if not isinstance(data, (Dataset, DataLoader, torch.Tensor)) and isinstance(getattr(data, "train", None), Dataset):
        data = data.train

    def inputs_of(batch: Any) -> Inputs:
        if isinstance(batch, torch.Tensor):
            return Inputs((batch,))
        return task.split(batch)[0]

    out: list[Inputs] = []
    if isinstance(data, Inputs) or isinstance(data, Mapping):
        ex = Inputs.of(data)
        out = [ex.take(samples)]
    elif isinstance(data, torch.Tensor):
        out = [Inputs((x,)) for x in data[:samples].split(batch_size)]
    elif isinstance(data, Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        try:
            n = len(data)  # type: ignore[arg-type]
        except TypeError:
            raise DataError("calibration data must have a length (a map-style Dataset) or be a DataLoader") from None
        if n > 0:
            g = torch.Generator().manual_seed(seed)
            idx = torch.randperm(n, generator=g)[: min(n, samples)].sort().values.tolist()
            out = [inputs_of(b) for b in DataLoader(Subset(data, idx), batch_size=batch_size, shuffle=False)]
    elif isinstance(data, (DataLoader, list, tuple)) or hasattr(data, "__iter__"):
        seen = 0
        for batch in data:
            x = inputs_of(batch).take(samples - seen)
            out.append(x)
            seen += x.batch_size
            if seen >= samples:
                break
    else:
        raise DataError(f"calibration data must be a Dataset, DataLoader, Splits or tensor, got {type(data).__name__}")
    out = [x for x in out if x.tensors() and all(t.numel() > 0 for t in x.tensors())]
    if not out:
        raise DataError("calibration data is empty: nothing to calibrate the quantizers on")
    for x in out:
        for t in x.tensors():
            if t.is_floating_point():
                check_finite(t, "calibration data")
    return [x.to(device) if device is not None else x for x in out]


@torch.no_grad()
def called_layers(model: nn.Module, layers: dict[str, nn.Module], batch: Any) -> set[str]:
    """The names of ``layers`` that one forward pass of ``model`` on ``batch`` calls (eval mode)."""
    hit: set[str] = set()
    handles = [m.register_forward_pre_hook(lambda _m, _i, n=n: hit.add(n)) for n, m in layers.items()]
    was = model.training
    model.eval()
    try:
        _call(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return hit


@torch.no_grad()
def calibrate_(model: nn.Module, quantizers: dict[str, ActFakeQuant], batches: list[Any]) -> dict[str, QuantParams]:
    """Run ``batches`` (input tensors or :class:`~netshrink.task.Inputs`) through ``model`` in eval mode
    with every quantizer observing; freeze them. A quantizer that saw nothing stays uncalibrated and is
    left out of the returned dict."""
    was_training = model.training
    model.eval()
    try:
        for q in quantizers.values():
            q.start_observing()
        for x in batches:
            _call(model, x)
        return {n: q.finish_observing() for n, q in quantizers.items() if q.seen > 0}
    finally:
        for q in quantizers.values():
            q.stop_observing()
        model.train(was_training)


def _channel_mean(y: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """Per output channel (last axis for Linear, axis 1 for Conv) the sum of ``y`` over everything else."""
    axis = -1 if isinstance(layer, nn.Linear) or is_gpt2_conv1d(layer) else 1
    return y.detach().to(torch.float64).movedim(axis, 0).reshape(y.shape[axis], -1).sum(dim=1)


@torch.no_grad()
def _mean_output(model: nn.Module, layer: nn.Module, batches: list[Any]) -> torch.Tensor:
    """``E[y]`` per output channel of ``layer``'s output while ``batches`` run through ``model``.

    A forward hook only measures here; it is removed before this returns."""
    total: list[torch.Tensor] = []
    count = [0]

    def grab(_m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        total.append(_channel_mean(out, layer))
        axis = -1 if isinstance(layer, nn.Linear) or is_gpt2_conv1d(layer) else 1
        count[0] += out.numel() // out.shape[axis]

    handle = layer.register_forward_hook(grab)
    try:
        for x in batches:
            _call(model, x)
    finally:
        handle.remove()
    if not total:
        raise DataError("bias correction: the layer was never called on the calibration data")
    return torch.stack(total).sum(dim=0) / count[0]


@torch.no_grad()
def bias_correct_(
    model: nn.Module, reference: nn.Module, layers: dict[str, nn.Module], batches: list[Any]
) -> dict[str, float]:
    """Nagel et al. 2019 empirical bias correction, in place, layer by layer in the order given:
    ``b <- b + E[y_reference] - E[y_model]`` over ``batches``. Returns ``||shift||_2`` per layer.

    ``reference`` is the float model (same module names). Layers without a bias are left alone."""
    ref_modules = dict(reference.named_modules())
    was = (model.training, reference.training)
    model.eval()
    reference.eval()
    shifts: dict[str, float] = {}
    try:
        for name, layer in layers.items():
            if getattr(layer, "bias", None) is None:
                continue
            want = _mean_output(reference, ref_modules[name], batches)
            got = _mean_output(model, layer, batches)
            shift = (want - got).to(layer.bias.dtype)
            layer.bias.add_(shift.to(layer.bias.device))
            shifts[name] = float(shift.norm())
    finally:
        model.train(was[0])
        reference.train(was[1])
    return shifts


def _prepare(model: nn.Module, config: UniformConfig, data: Any, qat: bool, task: Task | None = None) -> UniformResult:
    method = config.method or "uniform"
    from .._attention import convert_attention_, in_scope

    converted: list[str] = []
    if in_scope(model, config.layers):  # MHA reads out_proj.weight itself: separate q/k/v/out Linear layers first
        converted = convert_attention_(model, config.layers)
        log.info("%s: converted nn.MultiheadAttention %s to separate q/k/v/out projections first", method, ", ".join(converted))
    layers = _with_gpt2_conv1d(model, select_quantizable(model, config.layers, method), config.layers)
    bits = per_layer(layers, config.layer_bits, config.bits, "layer_bits")
    check_not_quantized(layers)
    device = model_device(model)
    needs_data = config.bias_correction or (config.activations and not (qat and data is None and getattr(config, "act_ema", 0) > 0))
    if config.fold_bn and data is not None and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        needs_data = True
    batches = calibration_inputs(data, config.calibration_samples, config.batch_size, config.seed, device, task) if needs_data else []

    result = UniformResult(converted_attention=converted)
    result.skipped.update(_unsupported(model, layers, config.layers))
    if config.fold_bn:
        if batches:
            folded = fold_batchnorm_(model, batches[0].call)
            result.bn_folded, result.bn_kept = folded.folded, folded.kept
        else:
            from torch.nn.modules.batchnorm import _BatchNorm

            result.bn_kept = {n: "no calibration data to find the layer it follows" for n, m in model.named_modules() if isinstance(m, _BatchNorm)}
        if result.bn_kept:
            log.warning("%s: BatchNorm left unfolded: %s", method, "; ".join(f"{n}: {r}" for n, r in result.bn_kept.items()))
    if batches:  # a layer the model never calls stays in float (its input cannot be calibrated)
        called = called_layers(model, layers, batches[0])
        for name in [n for n in layers if n not in called]:
            result.skipped[name] = "never called by the model's forward on the calibration data"
            del layers[name]
        if result.skipped:
            log.warning("%s: skipped layers %s (never called by forward)", method, ", ".join(result.skipped))
    reference = copy.deepcopy(model) if config.bias_correction else None

    for name, layer in layers.items():
        w = layer.weight.detach().clone()
        q = WeightFakeQuant(w, bits[name], config.symmetric, config.per_channel, config.observer, config.percentile, dynamic=qat,
                            channel_axis=out_axis(layer))
        add_weight_quantizer(layer, q, where=name)
        result.bits[name] = bits[name]
        result.weight_sqnr_db[name] = sqnr_db(w, layer.weight.detach())

    if config.activations:
        ema = config.act_ema if isinstance(config, QATConfig) else 0.0
        act = {
            name: ActFakeQuant(config.act_bits, config.act_symmetric, config.act_observer, config.percentile, ema, f"input of layer {name!r}", config.seed)
            for name in layers
        }
        for name, q in act.items():
            attach_input_quant(layers[name], q.to(device))
        if batches:
            result.inputs = calibrate_(model, act, batches)
            for name in [n for n in act if n not in result.inputs]:  # called on the first batch only? never on these
                remove_input_quant(layers[name])
                result.skipped[name] = "its input quantizer saw no calibration value"

    if reference is not None:
        result.bias_shift = bias_correct_(model, reference, {n: m for n, m in layers.items() if n not in result.skipped}, batches)
    log.info("%s: %d layers quantized (%s)", method, len(layers), ", ".join(f"{n}: {b} bits" for n, b in bits.items() if n in layers))
    return result


@handler(UniformConfig)
def uniform_quantize(model: nn.Module, config: UniformConfig, data: Any = None, task: Task | None = None) -> UniformResult:
    """Post-training uniform quantization, in place (see the module docstring). ``data`` (a Dataset,
    DataLoader, :class:`~netshrink.data.Splits`, input tensor or example inputs; batches read by ``task``)
    is needed for activations, BatchNorm folding and bias correction."""
    return _prepare(model, config, data, qat=False, task=task)


@handler(Int8Config)
def int8_quantize(model: nn.Module, config: Int8Config, data: Any = None, task: Task | None = None) -> UniformResult:
    """:func:`uniform_quantize` at 8 bits."""
    return _prepare(model, config, data, qat=False, task=task)


@handler(QATConfig)
def qat_prepare(model: nn.Module, config: QATConfig, data: Any = None, task: Task | None = None) -> UniformResult:
    """Insert trainable fake quantizers, in place; then train with :class:`~netshrink.train.Trainer`.
    With ``fold_bn`` and data, BatchNorms are folded first: the model then trains without them."""
    return _prepare(model, config, data, qat=True, task=task)


__all__ = [
    "Int8Config",
    "QATConfig",
    "UniformConfig",
    "UniformResult",
    "bias_correct_",
    "calibrate_",
    "calibration_inputs",
    "called_layers",
    "int8_quantize",
    "qat_prepare",
    "uniform_quantize",
]
