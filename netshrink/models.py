"""The model zoo: a registry of network builders the recipes, the CLI and the packer name.

``build_model(name, **kwargs)`` builds a registered network and records how it was built in
``model.netshrink_spec = {"zoo": name, "args": {...}}`` (a plain, JSON-able dict, every argument
with its default filled in), so a packed ``.nsk`` file can rebuild the same architecture with
``build_model(spec["zoo"], **spec["args"])``.

Layers carry stable names (``fc1``, ``conv1``, ...) because configs select layers by name.
"""

from __future__ import annotations

import inspect
import json
from collections import OrderedDict
from typing import Any, Callable, Sequence

from torch import nn

from .errors import ConfigError

ModelBuilder = Callable[..., nn.Module]
_MODELS: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator: register a builder function (keyword arguments with defaults) under ``name``."""

    def deco(fn: ModelBuilder) -> ModelBuilder:
        if name in _MODELS and _MODELS[name] is not fn:
            raise ConfigError("model", f"model {name!r} is already registered")
        _MODELS[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_MODELS)


def _jsonable(value: Any, field: str) -> Any:
    """``value`` as plain JSON data (tuples become lists); a :class:`ConfigError` if it is not."""
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{field}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _jsonable(v, f"{field}.{k}") for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ConfigError(field, f"model arguments must be plain JSON values, got {value!r}")


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` with ``kwargs`` and attach ``netshrink_spec``.

    An unknown name, an unknown or missing argument, or an invalid value raises
    :class:`ConfigError` naming it.
    """
    try:
        fn = _MODELS[name]
    except (KeyError, TypeError):
        raise ConfigError("model", f"unknown model {name!r} (known: {', '.join(list_models())})") from None
    sig = inspect.signature(fn)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    unknown = [] if takes_any else [k for k in kwargs if k not in sig.parameters]
    if unknown:
        known = ", ".join(sig.parameters) or "none"
        raise ConfigError(f"model.args.{unknown[0]}", f"unknown argument of model {name!r} (known: {known})")
    try:
        bound = sig.bind(**kwargs)
    except TypeError as err:
        raise ConfigError("model.args", f"bad arguments for model {name!r}: {err}") from None
    bound.apply_defaults()
    args = {k: _jsonable(v, f"model.args.{k}") for k, v in bound.arguments.items()}
    model = fn(**kwargs)
    model.netshrink_spec = {"zoo": name, "args": json.loads(json.dumps(args))}
    return model


def _positive(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"model.args.{field}", f"must be a positive integer, got {value!r}")
    return value


def _linear_stack(in_features: int, widths: Sequence[int]) -> "OrderedDict[str, nn.Module]":
    """``flatten, fc1, relu1, fc2, relu2, ..., fcK`` (no activation after the last layer)."""
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten(1))
    prev = in_features
    for i, width in enumerate(widths, start=1):
        layers[f"fc{i}"] = nn.Linear(prev, width)
        if i < len(widths):
            layers[f"relu{i}"] = nn.ReLU()
        prev = width
    return layers


class LeNet300100(nn.Sequential):
    """LeNet-300-100: fully connected 784-300-100-10 with ReLU (LeCun et al., Proc. IEEE 1998).

    Parameters: ``784*300+300 + 300*100+100 + 100*10+10 = 266,610``. Accepts ``(N, 1, 28, 28)``
    or ``(N, 784)``; the first module flattens.
    """

    def __init__(self, in_features: int = 784, num_classes: int = 10):
        super().__init__(_linear_stack(in_features, (300, 100, num_classes)))


class LeNet5(nn.Sequential):
    """Caffe's LeNet-5 (``examples/mnist/lenet.prototxt``), the model of Han et al. 2015/2016.

    conv1 5x5x20 -> maxpool 2 -> conv2 5x5x50 -> maxpool 2 -> fc1 800->500 -> ReLU -> fc2 500->10;
    as in Caffe, the only non-linearity is the ReLU after fc1. For a 28x28 input the feature map
    before fc1 is 50x4x4 = 800 and the parameters number
    ``(20*25+20) + (50*20*25+50) + (800*500+500) + (500*10+10) = 431,080``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 28):
        side = ((input_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ConfigError("model.args.input_size", f"lenet5 needs inputs of at least 16x16, got {input_size}")
        super().__init__(
            OrderedDict(
                conv1=nn.Conv2d(in_channels, 20, kernel_size=5),
                pool1=nn.MaxPool2d(2),
                conv2=nn.Conv2d(20, 50, kernel_size=5),
                pool2=nn.MaxPool2d(2),
                flatten=nn.Flatten(1),
                fc1=nn.Linear(50 * side * side, 500),
                relu1=nn.ReLU(),
                fc2=nn.Linear(500, num_classes),
            )
        )


class MLP(nn.Sequential):
    """A small multilayer perceptron ``in -> hidden... -> classes`` with ReLU; flattens its input."""

    def __init__(self, in_features: int = 64, hidden: Sequence[int] = (32,), num_classes: int = 10):
        super().__init__(_linear_stack(in_features, (*hidden, num_classes)))


@register_model("lenet_300_100")
def lenet_300_100(in_features: int = 784, num_classes: int = 10) -> nn.Module:
    """LeNet-300-100 for MNIST (266,610 parameters); see :class:`LeNet300100`."""
    return LeNet300100(_positive("in_features", in_features), _positive("num_classes", num_classes))


@register_model("lenet5")
def lenet5(in_channels: int = 1, num_classes: int = 10, input_size: int = 28) -> nn.Module:
    """Caffe's LeNet-5 for MNIST (431,080 parameters on 28x28); see :class:`LeNet5`."""
    return LeNet5(_positive("in_channels", in_channels), _positive("num_classes", num_classes), _positive("input_size", input_size))


@register_model("mlp")
def mlp(in_features: int = 64, hidden: Sequence[int] = (32,), num_classes: int = 10) -> nn.Module:
    """A small MLP (default 64-32-10, for the 8x8 digits in fast tests); layers fc1, fc2, ..."""
    if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
        raise ConfigError("model.args.hidden", f"must be a list of positive integers, got {hidden!r}")
    widths = tuple(_positive(f"hidden[{i}]", h) for i, h in enumerate(hidden))
    return MLP(_positive("in_features", in_features), widths, _positive("num_classes", num_classes))


__all__ = ["register_model", "build_model", "list_models", "lenet_300_100", "lenet5", "mlp", "LeNet300100", "LeNet5", "MLP"]
