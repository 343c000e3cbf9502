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

import torch
from torch import nn

from ._registry import Registry
from .errors import ConfigError

ModelBuilder = Callable[..., nn.Module]
#: the zoo: extended by ``register_model`` and by the ``netshrink.models`` entry points (netshrink._plugins)
_MODELS: Registry[ModelBuilder] = Registry("model", group="netshrink.models", field="model", duplicate=ConfigError)


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator: register a builder function (keyword arguments with defaults) under ``name``."""
    return _MODELS.register(name)


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return _MODELS.names()


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
    fn = _MODELS.lookup(name, "model")
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


class MLPBN(nn.Sequential):
    """An MLP with batch normalization after every layer, as BinaryConnect and BNN use on MNIST
    (Courbariaux et al. 2015; Hubara et al. 2016): ``flatten``, then per hidden layer ``fc{i}`` ->
    ``bn{i}`` -> ``relu{i}``, and ``fc{K}`` -> ``bn{K}`` on the class scores. The Linear layers have no
    bias unless ``bias`` (the BN that follows has one)."""

    def __init__(self, in_features: int = 784, hidden: Sequence[int] = (1024, 1024, 1024), num_classes: int = 10, bias: bool = False):
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten(1))
        widths = (*hidden, num_classes)
        prev = in_features
        for i, width in enumerate(widths, start=1):
            layers[f"fc{i}"] = nn.Linear(prev, width, bias=bias)
            layers[f"bn{i}"] = nn.BatchNorm1d(width)
            if i < len(widths):
                layers[f"relu{i}"] = nn.ReLU()
            prev = width
        super().__init__(layers)


@register_model("mlp_bn")
def mlp_bn(in_features: int = 784, hidden: Sequence[int] = (1024, 1024, 1024), num_classes: int = 10, bias: bool = False) -> nn.Module:
    """The BinaryConnect / BNN MNIST MLP (default 784-1024-1024-1024-10) with BN; see :class:`MLPBN`."""
    if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
        raise ConfigError("model.args.hidden", f"must be a list of positive integers, got {hidden!r}")
    if not isinstance(bias, bool):
        raise ConfigError("model.args.bias", f"must be true or false, got {bias!r}")
    widths = tuple(_positive(f"hidden[{i}]", h) for i, h in enumerate(hidden))
    return MLPBN(_positive("in_features", in_features), widths, _positive("num_classes", num_classes), bias)


__all__ = ["register_model", "build_model", "list_models", "lenet_300_100", "lenet5", "mlp", "LeNet300100", "LeNet5", "MLP", "mlp_bn", "MLPBN"]


# ------------------------------------------------------------------ CNNs for structured pruning (issue 3)


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    """``conv k x k (no bias, 'same' padding) -> BatchNorm -> act`` as ``conv``, ``bn``, ``act``."""
    parts: OrderedDict[str, nn.Module] = OrderedDict(
        conv=nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False), bn=nn.BatchNorm2d(cout)
    )
    if act is not None:
        parts["act"] = act()
    return nn.Sequential(parts)


class BasicBlock(nn.Module):
    """Residual block of He et al. 2016: ``relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x))``;
    the shortcut is a 1x1 conv + BN when the shape changes, else the identity."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = _conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    """ResNet-50's bottleneck: 1x1 reduce -> 3x3 -> 1x1 expand (x4), each with BN, plus the shortcut."""

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = 4 * width
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = _conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A ResNet (He et al., CVPR 2016): stem conv-BN-ReLU, stages of residual blocks, global average
    pooling, one linear classifier. ``block`` is ``"basic"`` or ``"bottleneck"``; ``stem_pool`` adds
    ImageNet's 7x7/2 stem and 3x3/2 max-pool (else a 3x3/1 stem conv for small images)."""

    def __init__(self, block: str, widths: Sequence[int], depths: Sequence[int], in_channels: int, num_classes: int, stem_pool: bool):
        super().__init__()
        stem_width = widths[0] if block == "basic" else 64
        if stem_pool:
            self.stem = nn.Sequential(_conv_bn(in_channels, stem_width, 7, 2), nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = _conv_bn(in_channels, stem_width, 3)
        stages, cin = [], stem_width
        for i, (w, d) in enumerate(zip(widths, depths)):
            blocks = []
            for j in range(d):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(cin, w, stride) if block == "basic" else Bottleneck(cin, w, stride))
                cin = w if block == "basic" else 4 * w
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.stages(self.stem(x)))))


class VGGNet(nn.Sequential):
    """A VGG-style CNN (Simonyan & Zisserman 2015): per stage two 3x3 conv-BN-ReLU then a 2x2
    max-pool; the feature map is flattened into a two-layer classifier (so flatten -> linear couples
    each channel to a block of ``side*side`` features)."""

    def __init__(self, in_channels: int, widths: Sequence[int], hidden: int, num_classes: int, input_size: int):
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        cin, side = in_channels, input_size
        for i, w in enumerate(widths, start=1):
            layers[f"block{i}"] = nn.Sequential(_conv_bn(cin, w, 3), _conv_bn(w, w, 3))
            layers[f"pool{i}"] = nn.MaxPool2d(2)
            cin, side = w, side // 2
        if side < 1:
            raise ConfigError("model.args.input_size", f"vgg_small with {len(widths)} stages needs inputs of at least {2 ** len(widths)} pixels")
        layers["flatten"] = nn.Flatten(1)
        layers["fc1"] = nn.Linear(cin * side * side, hidden)
        layers["relu"] = nn.ReLU()
        layers["fc2"] = nn.Linear(hidden, num_classes)
        super().__init__(layers)


class MobileNetSmall(nn.Sequential):
    """A MobileNet-style CNN (Howard et al. 2017): a 3x3 stem, then depthwise-separable blocks —
    depthwise 3x3 conv-BN-ReLU6 (``groups = channels``) followed by pointwise 1x1 conv-BN-ReLU6 —
    global average pooling and a linear classifier."""

    def __init__(self, in_channels: int, widths: Sequence[int], strides: Sequence[int], num_classes: int):
        layers: OrderedDict[str, nn.Module] = OrderedDict(stem=_conv_bn(in_channels, widths[0], 3, 1, act=nn.ReLU6))
        cin = widths[0]
        for i, (w, s) in enumerate(zip(widths[1:], strides), start=1):
            layers[f"block{i}"] = nn.Sequential(
                OrderedDict(dw=_conv_bn(cin, cin, 3, s, groups=cin, act=nn.ReLU6), pw=_conv_bn(cin, w, 1, act=nn.ReLU6))
            )
            cin = w
        layers["pool"] = nn.AdaptiveAvgPool2d(1)
        layers["flatten"] = nn.Flatten(1)
        layers["fc"] = nn.Linear(cin, num_classes)
        super().__init__(layers)


class ConcatMLP(nn.Module):
    """An MLP with a skip concatenation: ``h1 = relu(fc1 x)``, ``h2 = relu(fc2 h1)``,
    ``logits = fc3(cat[h1, h2])`` (DenseNet-style reuse of the first hidden layer)."""

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int):
        super().__init__()
        self.flatten = nn.Flatten(1)
        self.fc1 = nn.Linear(in_features, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[0] + hidden[1], num_classes)

    def forward(self, x):
        h1 = torch.relu(self.fc1(self.flatten(x)))
        h2 = torch.relu(self.fc2(h1))
        return self.fc3(torch.cat([h1, h2], dim=1))


def _widths(field: str, value: Any, n: int | None = None) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ConfigError(f"model.args.{field}", f"must be a non-empty list of positive integers, got {value!r}")
    if n is not None and len(value) != n:
        raise ConfigError(f"model.args.{field}", f"must have {n} entries, got {len(value)}")
    return tuple(_positive(f"{field}[{i}]", v) for i, v in enumerate(value))


@register_model("resnet_small")
def resnet_small(in_channels: int = 1, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64), depths: Sequence[int] = (1, 1, 1)) -> nn.Module:
    """A small ResNet with BatchNorm for 28x28 / 32x32 inputs (basic blocks; 3 stages by default,
    77,754 parameters); layers ``stem.conv``, ``stages.0.0.conv1``, ..., ``fc``. See :class:`ResNet`."""
    w = _widths("widths", widths)
    d = _widths("depths", depths, len(w))
    return ResNet("basic", w, d, _positive("in_channels", in_channels), _positive("num_classes", num_classes), stem_pool=False)


@register_model("resnet50")
def resnet50(in_channels: int = 3, num_classes: int = 1000) -> nn.Module:
    """A ResNet-50-sized network (bottleneck blocks 3-4-6-3, 25.56M parameters, ImageNet stem) with
    random weights, for scale tests of the dependency graph and the slicers. See :class:`ResNet`."""
    return ResNet("bottleneck", (64, 128, 256, 512), (3, 4, 6, 3), _positive("in_channels", in_channels), _positive("num_classes", num_classes), stem_pool=True)


@register_model("vgg_small")
def vgg_small(in_channels: int = 1, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64), hidden: int = 128, input_size: int = 28) -> nn.Module:
    """A VGG-style CNN with BatchNorm (for 28x28: 64x3x3 features -> 128 -> 10); see :class:`VGGNet`."""
    return VGGNet(_positive("in_channels", in_channels), _widths("widths", widths), _positive("hidden", hidden),
                  _positive("num_classes", num_classes), _positive("input_size", input_size))


@register_model("mobilenet_small")
def mobilenet_small(in_channels: int = 1, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64, 64), strides: Sequence[int] = (2, 2, 1)) -> nn.Module:
    """A MobileNet-style CNN with depthwise-separable blocks; see :class:`MobileNetSmall`."""
    w = _widths("widths", widths)
    if len(w) < 2:
        raise ConfigError("model.args.widths", "needs at least two widths (stem and one block)")
    return MobileNetSmall(_positive("in_channels", in_channels), w, _widths("strides", strides, len(w) - 1), _positive("num_classes", num_classes))


@register_model("mlp_concat")
def mlp_concat(in_features: int = 784, hidden: Sequence[int] = (256, 128), num_classes: int = 10) -> nn.Module:
    """An MLP with a skip concatenation (fc3 sees ``cat[h1, h2]``); see :class:`ConcatMLP`."""
    return ConcatMLP(_positive("in_features", in_features), _widths("hidden", hidden, 2), _positive("num_classes", num_classes))


__all__ += ["resnet_small", "resnet50", "vgg_small", "mobilenet_small", "mlp_concat", "ResNet", "BasicBlock", "Bottleneck",
            "VGGNet", "MobileNetSmall", "ConcatMLP"]


class _AttentionBlock(nn.Module):
    """A pre-norm transformer block: ``x + attn(LN x)``, then ``x + fc2(gelu(fc1(LN x)))``."""

    def __init__(self, dim: int, heads: int, kv_heads: int | None, mlp: int):
        super().__init__()
        from .prune.structured.attention import GroupedQueryAttention  # lazy: the prune family imports late

        self.mha = kv_heads is None  # nn.MultiheadAttention (called as attn(q, k, v)) or a grouped-query block
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True) if self.mha else GroupedQueryAttention(dim, heads, kv_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

    def forward(self, x):
        h = self.norm1(x)
        x = x + (self.attn(h, h, h, need_weights=False)[0] if self.mha else self.attn(h))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))


class PatchTransformer(nn.Module):
    """A small vision transformer: non-overlapping ``patch x patch`` patches -> Linear embedding +
    learned position embedding -> ``depth`` pre-norm attention blocks -> LayerNorm -> mean over
    patches -> Linear classifier (Dosovitskiy et al., ICLR 2021, without the class token)."""

    def __init__(self, in_channels: int, num_classes: int, input_size: int, patch: int, dim: int, depth: int, heads: int,
                 kv_heads: int | None, mlp: int):
        super().__init__()
        self.in_channels, self.patch, self.side = in_channels, patch, input_size // patch
        self.embed = nn.Linear(in_channels * patch * patch, dim)
        self.pos = nn.Parameter(torch.randn(1, self.side * self.side, dim) * 0.02)
        self.blocks = nn.ModuleList(_AttentionBlock(dim, heads, kv_heads, mlp) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        n, p, s = x.shape[0], self.patch, self.side
        x = x.reshape(n, self.in_channels, s, p, s, p).permute(0, 2, 4, 1, 3, 5).reshape(n, s * s, -1)
        x = self.embed(x) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))


@register_model("vit_tiny")
def vit_tiny(in_channels: int = 1, num_classes: int = 10, input_size: int = 28, patch: int = 7, dim: int = 64, depth: int = 2,
             heads: int = 8, kv_heads: int | None = None, mlp: int = 128) -> nn.Module:
    """A small patch transformer for MNIST (16 patches of 7x7, width 64, 2 blocks of 8 heads): with
    ``kv_heads`` None the blocks use ``nn.MultiheadAttention``, else grouped-query attention with
    ``kv_heads`` key/value heads. See :class:`PatchTransformer`."""
    for field, value in (("patch", patch), ("dim", dim), ("heads", heads), ("mlp", mlp), ("depth", depth)):
        _positive(field, value)
    if _positive("input_size", input_size) % patch:
        raise ConfigError("model.args.patch", f"must divide input_size {input_size}, got {patch}")
    if dim % heads or (kv_heads is not None and heads % _positive("kv_heads", kv_heads)):
        raise ConfigError("model.args.heads", f"must divide dim {dim} and be a multiple of kv_heads {kv_heads}, got {heads}")
    return PatchTransformer(_positive("in_channels", in_channels), _positive("num_classes", num_classes), input_size, patch,
                            dim, depth, heads, kv_heads, mlp)


__all__ += ["vit_tiny", "PatchTransformer"]

# the language models of issue 15 register themselves (netshrink/lm.py)
from . import lm as _lm  # noqa: E402,F401
