"""netshrink: compress and accelerate trained PyTorch networks, and measure the result honestly.

    import netshrink as ns
    ns.prune_(model, ns.MagnitudeConfig(sparsity=0.9))
    ns.Trainer(model, ns.TrainConfig(epochs=3, lr=0.01)).fit(train_set, val_set)
    ns.quantize_(model, ns.KMeansConfig(bits=5))
    ns.pack(model, "model.nsk", coding="huffman")
    restored = ns.load("model.nsk", model=fresh_instance)
"""

from ._attention import convert_attention_
from ._coverage import Coverage
from ._modules import register_module
from ._registry import handler as method_handler, list_methods, register as register_method
from .data import load_data, register_dataset
from .errors import ConfigError, DataError, FormatError, ModelError, NetshrinkError
from .lowrank import CPConfig, SeparableConfig, SvdConfig, TuckerConfig, factorize_
from .lowrank import LayerwiseConfig, RankBudgetConfig
from .filters import CReLUConfig, DepthwiseConfig, EquivariantConfig, compact_
from .matrices import CirculantConfig, HashedConfig, ToeplitzConfig, structure_
from .metrics import count_nonzeros, count_params, error_rate, fp32_bytes, latency, macs, sqnr_db
from .models import build_model, list_models, register_model
from .pack import load, pack, packed_bytes, read_info, unpack_to_safetensors
from .pack.stage import HuffmanConfig
from .pipeline import run_recipe
from .prune import MagnitudeConfig, make_permanent, prune_
from .quantize import KMeansConfig, quantize_
from .recipe import load_recipe, parse_recipe
from .train import TrainConfig, Trainer

__version__ = "0.1.0"

__all__ = [
    "prune_",
    "quantize_",
    "MagnitudeConfig",
    "KMeansConfig",
    "HuffmanConfig",
    "make_permanent",
    "factorize_",
    "SvdConfig",
    "TuckerConfig",
    "CPConfig",
    "SeparableConfig",
    "RankBudgetConfig",
    "LayerwiseConfig",
    "structure_",
    "CirculantConfig",
    "ToeplitzConfig",
    "HashedConfig",
    "compact_",
    "CReLUConfig",
    "EquivariantConfig",
    "DepthwiseConfig",
    "Trainer",
    "TrainConfig",
    "pack",
    "packed_bytes",
    "load",
    "read_info",
    "unpack_to_safetensors",
    "build_model",
    "list_models",
    "list_methods",
    "register_model",
    "register_dataset",
    "register_method",
    "method_handler",
    "register_module",
    "convert_attention_",
    "Coverage",
    "load_data",
    "load_recipe",
    "parse_recipe",
    "run_recipe",
    "count_params",
    "count_nonzeros",
    "fp32_bytes",
    "macs",
    "latency",
    "error_rate",
    "sqnr_db",
    "NetshrinkError",
    "ConfigError",
    "DataError",
    "FormatError",
    "ModelError",
]
