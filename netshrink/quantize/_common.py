"""Plumbing shared by the uniform, fixed-point and binary quantizers: which layers to act on, the
weight-quantizer parametrization slot, and calibration batches from whatever data the caller has."""

from __future__ import annotations

import fnmatch
import logging
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, Dataset, Subset

from .._layers import WEIGHT_LAYERS, select_layers
from ..errors import ConfigError, DataError, ModelError
from .observers import check_finite

log = logging.getLogger("netshrink.quantize")

SUPPORTED = "Linear and Conv1d/2d/3d"


class WeightQuantizer(nn.Module):
    """Base class of the parametrizations that quantize a weight (uniform, fixed point, binary,
    ternary); at most one sits on a weight, after any pruning mask or weight sharing."""


def weight_quantizer_of(module: nn.Module, name: str = "weight") -> WeightQuantizer | None:
    """The :class:`WeightQuantizer` parametrizing ``module.name``, or None."""
    if not parametrize.is_parametrized(module, name):
        return None
    for p in module.parametrizations[name]:
        if isinstance(p, WeightQuantizer):
            return p
    return None


def add_weight_quantizer(module: nn.Module, quantizer: WeightQuantizer, name: str = "weight", where: str = "") -> None:
    """Append ``quantizer`` to the parametrizations of ``module.name`` (a mask or codebook there stays
    first, so pruned zeros and shared values are what gets quantized)."""
    old = weight_quantizer_of(module, name)
    if old is not None:
        raise ModelError(f"{where or type(module).__name__}.{name} is already quantized by {type(old).__name__}")
    parametrize.register_parametrization(module, name, quantizer, unsafe=True)


def check_not_quantized(layers: dict[str, nn.Module], names: tuple[str, ...] = ("weight",)) -> None:
    """A :class:`ModelError` naming the first layer that already carries a quantizer, checked before
    anything is changed, so a refused call leaves the model as it was."""
    for layer_name, layer in layers.items():
        for t in names:
            old = weight_quantizer_of(layer, t) if getattr(layer, t, None) is not None else None
            if old is not None:
                raise ModelError(f"{layer_name or type(layer).__name__}.{t} is already quantized by {type(old).__name__}")
        if "input_quant" in layer._modules:
            raise ModelError(f"{layer_name or type(layer).__name__} already has an input quantizer")


def _has_matrix_weight(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() >= 2


def select_quantizable(model: nn.Module, patterns: list[str] | None, method: str, field: str = "layers") -> dict[str, nn.Module]:
    """The supported weight layers chosen by ``patterns`` (all when None).

    A pattern naming a module of an unsupported type raises :class:`ConfigError` naming the pattern;
    modules with a matrix weight of unsupported type (ConvTranspose, Embedding, ...) that would
    otherwise be chosen are left in float, with a logged warning.
    """
    modules = dict(model.named_modules())
    for i, pat in enumerate(patterns or []):
        m = modules.get(pat)
        if m is not None and not isinstance(m, WEIGHT_LAYERS):
            raise ConfigError(f"{field}[{i}]", f"layer {pat!r} is a {type(m).__name__}; {method} quantizes only {SUPPORTED} layers")
    chosen = select_layers(model, patterns, field)
    for n, m in modules.items():
        if isinstance(m, WEIGHT_LAYERS) or not _has_matrix_weight(m) or "parametrizations" in n.split("."):
            continue
        if patterns is None or any(fnmatch.fnmatchcase(n, p) for p in patterns):
            log.warning("%s: layer %r (%s) is not a supported type (%s); it stays in float", method, n, type(m).__name__, SUPPORTED)
    return chosen


def model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _inputs_of(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise DataError(f"calibration batches must be tensors or (inputs, targets) pairs, got {type(batch).__name__}")


def calibration_batches(data: Any, samples: int, batch_size: int, seed: int = 0, device: torch.device | None = None) -> list[torch.Tensor]:
    """Up to ``samples`` inputs from ``data``, in batches of ``batch_size``.

    ``data``: a :class:`netshrink.data.Splits` (its ``train`` split), a Dataset of ``(x, y)`` or of
    ``x`` (a random subset drawn with ``seed``), a DataLoader (its first batches), or a tensor of
    inputs. Empty data, or inputs holding NaN or inf, raise :class:`DataError`.
    """
    if data is None:
        raise DataError("calibration data is missing: pass data= (a Dataset, DataLoader or Splits)")
    if not isinstance(data, (Dataset, DataLoader, torch.Tensor)) and isinstance(getattr(data, "train", None), Dataset):
        data = data.train
    out: list[torch.Tensor] = []
    if isinstance(data, torch.Tensor):
        out = list(data[:samples].split(batch_size))
    elif isinstance(data, DataLoader):
        seen = 0
        for batch in data:
            x = _inputs_of(batch)[: samples - seen]
            out.append(x)
            seen += int(x.shape[0])
            if seen >= samples:
                break
    elif isinstance(data, Dataset):
        try:
            n = len(data)  # type: ignore[arg-type]
        except TypeError:
            raise DataError("calibration data must have a length (a map-style Dataset) or be a DataLoader") from None
        if n > 0:
            g = torch.Generator().manual_seed(seed)
            idx = torch.randperm(n, generator=g)[: min(n, samples)].sort().values.tolist()
            loader = DataLoader(Subset(data, idx), batch_size=batch_size, shuffle=False)
            out = [_inputs_of(b) for b in loader]
    else:
        raise DataError(f"calibration data must be a Dataset, DataLoader, Splits or tensor, got {type(data).__name__}")
    out = [x for x in out if x.shape[0] > 0]
    if not out:
        raise DataError("calibration data is empty: nothing to calibrate the quantizers on")
    for x in out:
        check_finite(x, "calibration data")
    return [x.to(device) if device is not None else x for x in out]


__all__ = ["WeightQuantizer", "add_weight_quantizer", "calibration_batches", "check_not_quantized", "model_device", "select_quantizable", "weight_quantizer_of"]
