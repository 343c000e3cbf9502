"""SmoothQuant W8A8: migrate activation outliers into the weights, then int8 weights and activations.

Xiao, Lin, Seznec, Wu, Demouth & Han, "SmoothQuant: Accurate and Efficient Post-Training Quantization
for Large Language Models", ICML 2023. With per-input-channel maxima over the calibration tokens,

    s_j = max|X_j|^α / max|W_:j|^(1-α),     Y = (X diag(s)^-1) (diag(s) W^T) = X' W'^T

so the activation ``X'`` has flatter channels and ``W'`` absorbs the difference (α = 0.5 in the paper).
Then ``W'`` is quantized to int8 per output channel (symmetric, ``q = round(w / Δ)``, ``Δ = max|w| / 127``)
and ``X'`` to int8 per token at run time (dynamic, symmetric). :class:`SmoothQuantLinear` simulates this
in float32 (fake quantization): ``y = fq_tok(x / s) @ (Δ q)^T + b``. The paper folds ``1/s`` into the
preceding LayerNorm; here the division stays in the layer (one element-wise op).

transformers' GPT-2 ``Conv1D`` (``y = x @ W + b``, ``W`` stored ``(in, out)``) is the same map as a Linear
with weight ``W^T``: it is smoothed and replaced the same way, from its ``(out, in)`` matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._modules import register_module, replace_module
from .._registry import handler, register
from .._layers import is_gpt2_conv1d
from ..calibrate import CalibConfig, OneShotResult, calibration_data, linear_weight, lm_task, run_one_shot
from ..config import check_range
from ..errors import ConfigError


def smooth_scales(act_max: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^α / max|W_:j|^(1-α)`` (channels with no signal get ``s_j = 1``)."""
    a = act_max.float().clamp_min(1e-5)
    w = weight.abs().amax(0).float().clamp_min(1e-5)
    s = a.pow(alpha) / w.pow(1 - alpha)
    return torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))


def fake_quant_per_token(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Symmetric per-token (last dimension) fake quantization: ``Δ round(x / Δ)``, ``Δ = max|x| / (2^(b-1) - 1)``."""
    qmax = (1 << (bits - 1)) - 1
    d = x.abs().amax(-1, keepdim=True).clamp_min(1e-8) / qmax
    return torch.clamp(torch.round(x / d), -qmax, qmax) * d


@register_module("smoothquant_linear")
class SmoothQuantLinear(nn.Module):
    """``y = fq_token(x / smooth) @ weight^T + bias`` with ``weight`` on the int8 grid ``Δ_row q``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, act_bits: int = 8):
        super().__init__()
        self.in_features, self.out_features, self.act_bits, self._bias = in_features, out_features, act_bits, bias
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.register_buffer("smooth", torch.ones(in_features))
        #: the int8 step of each weight row (``weight = w_step q``), for int8 storage in .nsk
        self.register_buffer("w_step", torch.ones(out_features))

    def netshrink_args(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self._bias, "act_bits": self.act_bits}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fake_quant_per_token(x / self.smooth, self.act_bits) @ self.weight.t()
        return y if self.bias is None else y + self.bias


def replace_reason(mod: nn.Module) -> str | None:
    """Why a block layer cannot be replaced by a new module (None: it can): an ``nn.Linear`` or GPT-2
    ``Conv1D`` whose weight carries no parametrization (a mask or quantizer the replacement would drop)."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(mod):
        return f"its weight is parametrized ({type(mod).__name__}): replacing it would drop the mask or quantizer on it"
    if type(mod) is nn.Linear or (is_gpt2_conv1d(mod) and type(mod).__name__ == "Conv1D"):
        return None
    return f"{type(mod).__name__} is not an nn.Linear or GPT-2 Conv1D"


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 codes and steps of ``w``."""
    d = w.abs().amax(1).clamp_min(1e-12) / 127
    return torch.clamp(torch.round(w / d[:, None]), -127, 127), d


@register("smoothquant", family="quantize")
@dataclass
class SmoothQuantConfig(CalibConfig):
    """SmoothQuant W8A8: per-channel smoothing, int8 weights per channel, int8 activations per token (Xiao et al. 2023)."""

    alpha: float = 0.5
    act_bits: int = 8

    def validate(self) -> None:
        super().validate()
        check_range("alpha", self.alpha, 0.0, 1.0)
        if not 2 <= self.act_bits <= 8:
            raise ConfigError("act_bits", f"must be an integer from 2 to 8, got {self.act_bits}")


@handler(SmoothQuantConfig)
@torch.no_grad()
def smoothquant_(model: nn.Module, config: SmoothQuantConfig, data: Any = None, task: Any = None) -> OneShotResult:
    """Replace every nn.Linear (and GPT-2 Conv1D) in the model's blocks with a :class:`SmoothQuantLinear`
    (others are skipped, said so)."""
    skipped_types: dict[str, str] = {}

    def layer(name: str, mod: nn.Module, st, _block, _local) -> dict:
        why = replace_reason(mod)
        if why is not None:
            skipped_types[name] = why
            return {"skipped": True}
        w = linear_weight(mod).float()  # (out, in); a Conv1D's stored (in, out) weight transposed
        s = smooth_scales(st.abs_max, w, config.alpha)
        q, d = int8_rows(w * s[None, :])
        new = SmoothQuantLinear(w.shape[1], w.shape[0], mod.bias is not None, config.act_bits)
        new.to(mod.weight.device)
        new.weight.data.copy_(q * d[:, None])
        new.smooth.copy_(s)
        new.w_step.copy_(d)
        if mod.bias is not None:
            new.bias.data.copy_(mod.bias.data)
        replace_module(model, name, new)
        return {"act_max": float(st.abs_max.max()), "smoothed_act_max": float((st.abs_max / s).max())}

    res = run_one_shot(model, config, calibration_data(data, config.seq_len), layer, task=lm_task(task), hessian=False)
    for n in skipped_types:
        res.layers.pop(n, None)
    res.skipped.update(skipped_types)
    return res


__all__ = ["SmoothQuantConfig", "SmoothQuantLinear", "smoothquant_", "smooth_scales", "fake_quant_per_token"]
