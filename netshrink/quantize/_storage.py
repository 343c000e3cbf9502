"""How a quantized model is stored: per-weight storage hints for the .nsk packer, and the
activation quantizers that a loaded model must get back.

The packer asks :func:`storage_hints` what each parametrized weight is made of:

* ``affine``: integer codes ``q`` with ``w = s (q - z)`` -- a :class:`~netshrink.quantize.fake.WeightFakeQuant`
  (uniform PTQ/QAT, 2 to 8 bits) or a fixed-point weight ⟨IL, FL⟩ (``s = 2^-FL``, ``z = 0``, ``IL + FL``
  bits; Gupta et al. 2015);
* ``binary``: ``w = α b``, ``b ∈ {-1, +1}`` (BinaryConnect / XNOR-Net), one bit per weight;
* ``ternary``: ``w = α t``, ``t ∈ {-1, 0, +1}`` (Ternary Weight Networks), two bits per weight;
* ``cast``: a float32 weight whose values are exact float16 or bfloat16 numbers (:class:`HalfConfig`).

A hint is only a proposal: the packer encodes, decodes and keeps the encoding only when the decoded
tensor equals the weight the forward pass uses. Activation (input) quantizers are not tensors of the
layer: :func:`act_quant_specs` describes them for the file header and :func:`apply_act_quant` attaches
them again (with their constructor arguments; their calibrated ranges are buffers packed with the
model), so a loaded model computes exactly what the quantized model computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from .._registry import handler, register
from ..config import BaseConfig
from ..errors import ConfigError, FormatError, ModelError
from ._common import WeightQuantizer, add_weight_quantizer, check_not_quantized, log, select_quantizable
from .affine import MAX_BITS, MIN_BITS
from .binary import BinaryWeightQuant, TernaryWeightQuant
from .fake import ActFakeQuant, WeightFakeQuant, attach_input_quant, input_quant_of
from .fixed_point import FixedPointWeights

HALF_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, eq=False)
class StorageHint:
    """What a weight is made of (see the module docstring). ``scale``/``zero_point``: 0-d or ``(C,)``
    (``axis`` 0) for ``affine``; ``bits``/``signed`` of its codes; ``dtype`` of a ``cast``."""

    kind: Literal["affine", "binary", "ternary", "cast"]
    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None
    bits: int = 0
    signed: bool = True
    axis: int | None = None
    dtype: str = ""


class CastWeight(WeightQuantizer):
    """Parametrization ``W -> float32(dtype(W))``: the weight rounded to float16 or bfloat16 (round to
    nearest even), computed in float32; the straight-through estimator passes the gradient."""

    def __init__(self, dtype: str = "bfloat16"):
        super().__init__()
        if dtype not in HALF_DTYPES:
            raise ConfigError("dtype", f"expected one of {', '.join(HALF_DTYPES)}, got {dtype!r}")
        self.dtype = dtype

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        r = w.detach().to(HALF_DTYPES[self.dtype]).to(w.dtype)
        return r + (w - w.detach()) if w.requires_grad else r

    def extra_repr(self) -> str:
        return f"dtype={self.dtype!r}"


@register("half", family="quantize")
@dataclass
class HalfConfig(BaseConfig):
    """Half-precision weights: each chosen layer's weight rounded to ``float16`` or ``bfloat16`` and stored in
    2 bytes in .nsk (IEEE 754-2008 binary16; bfloat16: Kalamkar et al., "A Study of BFLOAT16 for Deep
    Learning Training", 2019). The forward pass stays float32."""

    dtype: str = "bfloat16"
    layers: list[str] | None = None

    def validate(self) -> None:
        if self.dtype not in HALF_DTYPES:
            raise ConfigError("dtype", f"expected one of {', '.join(HALF_DTYPES)}, got {self.dtype!r}")

    def check_model(self, model: nn.Module) -> None:
        select_quantizable(model, self.layers, "half")


@handler(HalfConfig)
@torch.no_grad()
def half_quantize(model: nn.Module, config: HalfConfig, data: Any = None) -> dict[str, float]:
    """Round the chosen layers' weights to ``config.dtype`` in place; returns each layer's max abs change."""
    layers = select_quantizable(model, config.layers, "half")
    check_not_quantized(layers)
    out = {}
    for name, layer in layers.items():
        w = layer.weight.detach().clone()
        add_weight_quantizer(layer, CastWeight(config.dtype), where=name)
        out[name] = float((layer.weight.detach() - w).abs().max()) if w.numel() else 0.0
    log.info("half: %d layers rounded to %s", len(out), config.dtype)
    return out


def _hint(q: WeightQuantizer) -> StorageHint | None:
    if isinstance(q, WeightFakeQuant):
        return StorageHint("affine", q.scale.detach().cpu().float(), q.zero_point.detach().cpu().to(torch.int32), q.bits, q.signed, q.axis)
    if isinstance(q, FixedPointWeights):
        fmt = q.format
        if fmt.word_length > 24:
            return None
        scale = torch.tensor(2.0 ** -fmt.fl, dtype=torch.float32)
        return StorageHint("affine", scale, torch.zeros((), dtype=torch.int32), fmt.word_length, True, None)
    if isinstance(q, BinaryWeightQuant):
        return StorageHint("binary")
    if isinstance(q, TernaryWeightQuant):
        return StorageHint("ternary")
    if isinstance(q, CastWeight):
        return StorageHint("cast", dtype=q.dtype)
    return None


def storage_hints(model: nn.Module) -> dict[str, StorageHint]:
    """A :class:`StorageHint` per quantized tensor, by plain state_dict name (``fc1.weight``)."""
    out = {}
    for mod_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        for pname in module.parametrizations.keys():
            for p in module.parametrizations[pname]:
                if isinstance(p, WeightQuantizer):
                    h = _hint(p)
                    if h is not None:
                        out[prefix + pname] = h
    return out


def restore_weight_quant(module: nn.Module, info: dict[str, Any], name: str = "weight") -> bool:
    """Put back a :class:`WeightFakeQuant` with the stored ``scale``/``zero_point`` (an ``affine`` tensor
    decoded from .nsk) on ``module.name``; False (nothing done) where our quantizer cannot hold it
    (bits outside 2..8, e.g. fixed point; signed with a zero point). The weight is on the grid already,
    so the quantized weight equals it exactly."""
    bits, signed = info["bits"], info["signed"]
    symmetric = signed and not bool(torch.any(info["zero_point"] != 0))
    if not MIN_BITS <= bits <= MAX_BITS or signed != symmetric:
        return False
    w = getattr(module, name)
    q = WeightFakeQuant(w.detach(), bits, symmetric, info["axis"] == 0)
    with torch.no_grad():
        q.scale.copy_(info["scale"].reshape(q.scale.shape))
        q.zero_point.copy_(info["zero_point"].reshape(q.zero_point.shape))
    add_weight_quantizer(module, q.to(w.device), name)
    return True


# ------------------------------------------------------------------------------ activation quantizers

_ACT_KEYS = {"layer": str, "bits": int, "symmetric": bool, "observer": str, "percentile": (int, float), "ema": (int, float)}


def act_quant_specs(model: nn.Module) -> list[dict[str, Any]]:
    """The input quantizers of ``model``'s layers as JSON: ``[{"layer", "bits", "symmetric", "observer",
    "percentile", "ema"}, ...]`` in module order."""
    out = []
    for name, module in model.named_modules():
        q = input_quant_of(module)
        if q is not None:
            out.append({"layer": name, "bits": q.bits, "symmetric": bool(q.symmetric), "observer": q.observer_kind,
                        "percentile": float(q.percentile), "ema": float(q.ema)})
    return out


def check_act_quant(specs: Any, where: str) -> list[dict[str, Any]]:
    """``specs`` checked (types, ranges); any problem is one :class:`FormatError` naming ``where``."""
    if not isinstance(specs, list):
        raise FormatError(f"{where}: expected a list, got {type(specs).__name__}")
    for i, s in enumerate(specs):
        at = f"{where}[{i}]"
        if not isinstance(s, dict) or sorted(s) != sorted(_ACT_KEYS):
            raise FormatError(f"{at}: expected an object with keys {sorted(_ACT_KEYS)}")
        for key, kind in _ACT_KEYS.items():
            v = s[key]
            if not isinstance(v, kind) or (isinstance(v, bool) and kind is not bool):
                raise FormatError(f"{at}.{key}: wrong type {type(v).__name__}")
        if not MIN_BITS <= s["bits"] <= MAX_BITS:
            raise FormatError(f"{at}.bits: {s['bits']} is outside [{MIN_BITS}, {MAX_BITS}]")
        if s["observer"] not in ("minmax", "percentile", "mse"):
            raise FormatError(f"{at}.observer: unknown observer {s['observer']!r}")
        if not 0.0 <= s["ema"] <= 1.0 or not 0.0 < s["percentile"] <= 100.0:
            raise FormatError(f"{at}: ema or percentile out of range")
    return specs


def apply_act_quant(model: nn.Module, specs: list[dict[str, Any]], where: str) -> None:
    """Attach the input quantizers that ``specs`` (checked by :func:`check_act_quant`) describe, uncalibrated;
    their buffers are filled from the file next. A named layer that is missing is a :class:`ModelError`."""
    modules = dict(model.named_modules())
    for s in specs:
        layer = modules.get(s["layer"])
        if layer is None:
            raise ModelError(f"{where}: layer {s['layer']!r} of an input quantizer is not in the model")
        if input_quant_of(layer) is not None:
            continue  # already there (a model that was quantized before loading)
        q = ActFakeQuant(s["bits"], s["symmetric"], s["observer"], s["percentile"], s["ema"], f"input of layer {s['layer']!r}")
        dev = next((p.device for p in layer.parameters()), torch.device("cpu"))
        attach_input_quant(layer, q.to(dev))


__all__ = ["CastWeight", "HalfConfig", "StorageHint", "act_quant_specs", "apply_act_quant", "check_act_quant", "half_quantize",
           "restore_weight_quant", "storage_hints"]
