"""Quantization: weight sharing, uniform int-k PTQ/QAT, fixed point, binary/ternary, and the ``quantize_`` entry point."""

from __future__ import annotations

from typing import Any

from torch import nn

from .._registry import HandlerContext, handler_for, run_handler
from ..config import BaseConfig
from ._sharing import SharedWeights, apply_sharing, get_sharing
from .affine import (
    QuantParams,
    choose_qparams,
    dequantize,
    fake_quantize,
    stochastic_round,
)
from .affine import quantize as quantize_tensor
from .binary import BinaryConfig, LowBitResult, TernaryConfig, binarize, ternarize
from .bnn import BnnConfig, BnnResult, SignActivation
from .fake import ActFakeQuant, WeightFakeQuant
from .fixed_point import FixedPointConfig, FixedPointResult, FixedPointRounding, fixed_point_step_, to_fixed
from .kmeans import Codebook, KMeansConfig, ShareResult, kmeans_1d
from .mixed import MixedPrecisionConfig, MixedPrecisionResult
from .observers import (
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    ValueRange,
    make_observer,
    minmax_range,
    mse_range,
    percentile_range,
)
from ._storage import CastWeight, HalfConfig
from .ptq import (
    Int8Config,
    QATConfig,
    UniformConfig,
    UniformResult,
    bias_correct_,
    calibrate_,
)
from .xnor import XnorLinear, to_xnor_


def quantize_(model: nn.Module, config: BaseConfig, data: Any = None, task: Any = None) -> Any:
    """Quantize ``model`` in place by the method that ``config``'s type names, e.g.
    ``quantize_(model, KMeansConfig(bits=5))``. Returns the method's typed result."""
    handler_for(config, family="quantize")  # checks the family
    return run_handler(model, config, HandlerContext(data=data, task=task))  # data-driven methods read batches through ``task``


__all__ = ["quantize_", "KMeansConfig", "ShareResult", "Codebook", "kmeans_1d", "SharedWeights", "apply_sharing", "get_sharing"]
__all__ += [
    "ActFakeQuant",
    "BinaryConfig",
    "CastWeight",
    "HalfConfig",
    "FixedPointConfig",
    "FixedPointResult",
    "FixedPointRounding",
    "Int8Config",
    "LowBitResult",
    "MixedPrecisionConfig",
    "MixedPrecisionResult",
    "MSEObserver",
    "MinMaxObserver",
    "PercentileObserver",
    "QATConfig",
    "QuantParams",
    "TernaryConfig",
    "UniformConfig",
    "UniformResult",
    "ValueRange",
    "WeightFakeQuant",
    "bias_correct_",
    "binarize",
    "calibrate_",
    "choose_qparams",
    "dequantize",
    "fake_quantize",
    "fixed_point_step_",
    "make_observer",
    "minmax_range",
    "mse_range",
    "percentile_range",
    "quantize_tensor",
    "stochastic_round",
    "ternarize",
    "to_fixed",
]
__all__ += ["BnnConfig", "BnnResult", "SignActivation", "XnorLinear", "to_xnor_"]

# the OBS line on transformers (issue 15): GPTQ, RTN, AWQ, SmoothQuant over the sequential calibration
from .awq import AwqConfig
from .gptq import GptqConfig, GroupQuant, RtnConfig
from .smoothquant import SmoothQuantConfig, SmoothQuantLinear

__all__ += ["AwqConfig", "GptqConfig", "GroupQuant", "RtnConfig", "SmoothQuantConfig", "SmoothQuantLinear"]

# soft weight-sharing (Ullrich et al. 2017): a learned Gaussian mixture prior, merged, quantized to its means
from .soft_sharing import SoftSharingConfig, SoftSharingResult

__all__ += ["SoftSharingConfig", "SoftSharingResult"]
