"""The channel dependency graph: which channels of which layers must be removed together.

The model is traced with ``torch.fx`` and run once on an example input to learn every tensor's
shape. Each output channel of a convolution (or output feature of a linear layer) is an *atom*;
atoms flow through the graph along one tracked dimension of each tensor, and operations that tie
channels together merge atoms into one class (union-find):

- per-channel layers (BatchNorm, PReLU, depthwise convolutions) and elementwise ops pass atoms on;
- an addition / multiplication of two tracked tensors (a residual sum) merges them position by position;
- ``torch.cat`` along the tracked dimension concatenates the atom lists (index offsets);
- ``chunk`` / equal ``split`` along it gives each piece a slice and ties the pieces together
  (pruned alike, so the pieces stay equal);
- ``flatten`` / ``view`` / ``reshape`` that merge the channel dimension with the following ones repeat
  each atom over its block of features (flatten -> linear);
- ``permute`` / ``transpose`` / ``unsqueeze`` move the tracked dimension; spatial reductions,
  pooling and ``interpolate`` keep it;
- grouped convolutions tie channel ``i`` of every group together (all groups pruned alike);
- an attention layer (``nn.MultiheadAttention``, :class:`HeadAttention`, :class:`GroupedQueryAttention`;
  a leaf of the trace) consumes and produces channels like a Linear, and each of its heads (with
  grouped-query attention: each key/value group, or query head ``j`` of every group) is an atom of
  its own: a group of kind ``heads`` per layer (:mod:`.attention`).

A class is *pinned* (never removed) when any of its atoms reaches the model output, an op that
mixes channels (softmax / mean over channels, matmul), a hard-coded size in ``view``/``reshape``, an
explicit ``split`` size list, a LayerNorm over the channels (unless approximate pruning is asked
for), or an op the graph does not know: the reason is logged, or with ``strict`` an unknown op raises
:class:`ModelError` naming the op and the module. A *group* is the set of classes produced by the
same layers; it is what a pruning ratio applies to.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn import functional as F

from ...errors import ModelError
from .attention import ATTENTION_TYPES, GroupedQueryAttention, attn_shape, call_args, unsupported

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------- op tables

_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.Identity, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad2d,
    nn.ConstantPad1d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
)
_ELEMENTWISE_FUNCS = {
    torch.relu, torch.relu_, F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.softplus, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, torch.clamp, torch.abs,
    torch.exp, torch.neg, operator.neg, F.dropout, F.dropout2d, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d,
    F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool2d, F.interpolate, F.pad, torch.square, torch.sqrt,
}
_ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "tanh", "clamp", "clamp_", "abs", "exp", "neg", "contiguous", "clone", "detach",
    "float", "square", "sqrt", "pow",
}
_BINARY = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul, operator.truediv,
           torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_REDUCE = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_SHAPE_FREE_METHODS = {"size", "dim"}  # return no tensor


@dataclass
class TV:
    """A tracked tensor value: ``atoms[i]`` is the atom of position ``i`` along dimension ``dim``."""

    dim: int
    atoms: list[int]


@dataclass
class LayerUse:
    """A layer the slicer will resize: its kind, the atoms of its input channels (along the layer's
    channel dimension) and of its output channels (a depthwise conv's output atoms repeat its inputs')."""

    name: str
    kind: str  # conv | gconv | dwconv | convT | linear | bn | ln | prelu | attn
    in_atoms: list[int]
    out_atoms: list[int]
    # attention only: the atoms of the key and value inputs, one atom per query head and per key/value head
    k_atoms: list[int] = field(default_factory=list)
    v_atoms: list[int] = field(default_factory=list)
    heads: list[int] = field(default_factory=list)
    kv_heads: list[int] = field(default_factory=list)


@dataclass
class ChannelGroup:
    """Classes of coupled channels produced by the same layers; a pruning ratio applies per group."""

    producers: tuple[str, ...]
    classes: list[int]  # union-find roots, one per prunable channel
    members: dict[str, list[int]] = field(default_factory=dict)  # layer -> output positions of each class
    kind: str = "channels"  # or "heads": the classes are attention heads (groups of heads) of one layer

    @property
    def size(self) -> int:
        return len(self.classes)


class _Tracer(fx.Tracer):
    """A tracer that remembers which module it is in, so a failure names it."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.failed: str | None = None

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        self.stack.append(self.path_of_module(m) or type(m).__name__)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            self.failed = self.failed or self.stack[-1]  # the innermost module that failed
            raise
        finally:
            self.stack.pop()

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, ATTENTION_TYPES) or super().is_leaf_module(m, qualname)

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta["netshrink_module"] = self.stack[-1] if self.stack else "<root>"
        return node


def trace(model: nn.Module) -> fx.GraphModule:
    """``model`` traced by torch.fx; an untraceable model raises a one-line :class:`ModelError`
    that names the innermost module being traced."""
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure becomes one clear line
        where = tracer.failed or "<root>"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"torch.fx cannot trace {type(model).__name__} at module {where!r} "
                         f"({type(exc).__name__}: {first[:200]}); make that module a leaf or remove the dynamic control flow") from None
    return fx.GraphModule(tracer.root, graph)


class DependencyGraph:
    """Build with :meth:`build`; holds the union-find over atoms, the layers to slice, the pinned
    classes (with reasons) and the prunable :class:`ChannelGroup`\\ s."""

    def __init__(self, model: nn.Module, strict: bool = False, approximate_layernorm: bool = False,
                 gqa_heads: str = "kv"):
        self.model = model
        self.strict = strict
        self.approx_ln = approximate_layernorm
        self.gqa_heads = gqa_heads
        self.parent: list[int] = []
        self.pinned: dict[int, str] = {}  # atom -> reason
        self.layers: dict[str, LayerUse] = {}
        self.producer_of: dict[int, str] = {}
        self.messages: list[str] = []
        self.groups: list[ChannelGroup] = []
        self._tied: set[str] = set()  # sliced layers whose parameters are also read directly

    # ------------------------------------------------------------------ union-find
    def new_atoms(self, n: int, pin: str | None = None) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        if pin is not None:
            for a in range(start, start + n):
                self.pinned[a] = pin
        return list(range(start, start + n))

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def union_lists(self, xs: Sequence[int], ys: Sequence[int]) -> None:
        for a, b in zip(xs, ys):
            self.union(a, b)

    def pin(self, atoms: Sequence[int], reason: str) -> None:
        for a in atoms:
            self.pinned.setdefault(a, reason)

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, model: nn.Module, example_inputs: Sequence[torch.Tensor], *, strict: bool = False,
              approximate_layernorm: bool = False, gqa_heads: str = "kv") -> DependencyGraph:
        """Trace ``model``, propagate shapes on ``example_inputs`` (eval mode, no grad; the model's
        modes are restored) and build the graph. ``gqa_heads``: how a grouped-query layer loses heads
        (``kv``: a key/value head with its query heads; ``query``: the same query heads of every group)."""
        if gqa_heads not in ("kv", "query"):
            raise ModelError(f"gqa_heads must be 'kv' or 'query', got {gqa_heads!r}")
        g = cls(model, strict, approximate_layernorm, gqa_heads)
        gm = trace(model)
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(*example_inputs)
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"{type(model).__name__} fails on the example input of shape "
                             f"{[tuple(t.shape) for t in example_inputs]}: {str(exc).splitlines()[0][:200]}") from None
        finally:
            for m, mode in modes:
                m.training = mode
        g._propagate(gm)
        g._make_groups()
        return g

    def _shape(self, node: Any) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def _unknown(self, node: fx.Node, what: str, values: list[Any]) -> None:
        module = node.meta.get("netshrink_module", "<root>")
        msg = f"structured pruning does not handle {what} (node {node.name!r} in module {module!r}); its channels stay unpruned"
        if self.strict:
            raise ModelError(msg.replace("; its channels stay unpruned", ""))
        self.messages.append(msg)
        log.warning(msg)
        for v in values:
            self._pin_value(v, f"reaches {what}")

    def _pin_value(self, v: Any, reason: str) -> None:
        if isinstance(v, TV):
            self.pin(v.atoms, reason)
        elif isinstance(v, (list, tuple)):
            for x in v:
                self._pin_value(x, reason)
        elif isinstance(v, dict):
            for x in v.values():
                self._pin_value(x, reason)

    def _atoms_at(self, v: Any, shape: tuple[int, ...], dim: int, why: str) -> list[int]:
        """The atoms of ``v`` along ``dim``; an untracked value (or one tracked along another
        dimension, whose atoms are then pinned) gets fresh pinned atoms."""
        if isinstance(v, TV) and v.dim == dim:
            return v.atoms
        if isinstance(v, TV):
            self.pin(v.atoms, why)
        return self.new_atoms(shape[dim], pin="fixed by an input, the output, or an op that mixes channels")

    def _propagate(self, gm: fx.GraphModule) -> None:
        env: dict[fx.Node, Any] = {}
        modules = dict(gm.named_modules())
        sliced = {n for n, m in self.model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))}
        for node in gm.graph.nodes:
            args = fx.node.map_arg(node.args, lambda n: env.get(n))
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env.get(n))
            if node.op == "placeholder" or node.op == "get_attr":
                env[node] = None
                if node.op == "get_attr" and node.target.rpartition(".")[0] in sliced:
                    self._unknown(node, f"direct access to the parameter {node.target!r}", [])
                    self._tied.add(node.target.rpartition(".")[0])
            elif node.op == "output":
                self._pin_value(args, "reaches the model output")
            elif node.op == "call_module":
                env[node] = self._module(node, modules[node.target], args, kwargs)
            else:
                env[node] = self._function(node, args, kwargs)
        for name in self._tied:
            if name in self.layers:
                self.pin(self.layers[name].out_atoms + self.layers[name].in_atoms, "parameter used outside its module")

    # ------------------------------------------------------------------ modules
    def _record(self, name: str, kind: str, in_atoms: list[int], out_atoms: list[int]) -> None:
        old = self.layers.get(name)
        if old is None:
            self.layers[name] = LayerUse(name, kind, in_atoms, out_atoms)
            return
        self.union_lists(old.in_atoms, in_atoms)  # a module called twice sees the same channels
        self.union_lists(old.out_atoms, out_atoms)

    def _module(self, node: fx.Node, m: nn.Module, args: tuple, kwargs: dict) -> Any:
        name = node.target
        x = args[0] if args else None
        in_shape = self._shape(node.args[0]) if node.args else None
        out_shape = self._shape(node)
        if isinstance(m, ATTENTION_TYPES):
            return self._attention(node, m, args, kwargs)
        if isinstance(m, nn.modules.conv._ConvNd) and in_shape is not None and len(in_shape) == m.weight.dim():
            cin = m.in_channels
            if isinstance(m, nn.modules.conv._ConvTransposeNd):
                if m.groups != 1:
                    self._unknown(node, f"a grouped transposed convolution ({type(m).__name__})", [x])
                    return None
                ins = self._atoms_at(x, in_shape, 1, "")
                prev = self.layers.get(name)
                outs = prev.out_atoms if prev else self.new_atoms(m.out_channels)
                self._record(name, "convT", ins, outs)
                return TV(1, outs)
            ins = self._atoms_at(x, in_shape, 1, "")
            if m.groups == 1:
                prev = self.layers.get(name)
                outs = prev.out_atoms if prev else self.new_atoms(m.out_channels)
                self._record(name, "conv", ins, outs)
            elif m.groups == cin:  # depthwise: output channel j reads input channel j // multiplier
                mult = m.out_channels // cin
                outs = [a for a in ins for _ in range(mult)]
                self._record(name, "dwconv", ins, outs)
            else:  # grouped: prune channel i of every group alike
                prev = self.layers.get(name)
                outs = prev.out_atoms if prev else self.new_atoms(m.out_channels)
                gi, go = cin // m.groups, m.out_channels // m.groups
                for k in range(1, m.groups):
                    self.union_lists(ins[:gi], ins[k * gi:(k + 1) * gi])
                    self.union_lists(outs[:go], outs[k * go:(k + 1) * go])
                self._record(name, "gconv", ins, outs)
            return TV(1, outs)
        if isinstance(m, nn.Linear) and in_shape is not None:
            ins = self._atoms_at(x, in_shape, len(in_shape) - 1, "")
            prev = self.layers.get(name)
            outs = prev.out_atoms if prev else self.new_atoms(m.out_features)
            self._record(name, "linear", ins, outs)
            return TV(len(out_shape) - 1, outs)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and in_shape is not None:
            ins = self._atoms_at(x, in_shape, 1, "")
            self._record(name, "bn", ins, ins)
            return TV(1, ins)
        if isinstance(m, nn.PReLU) and in_shape is not None:
            if m.num_parameters == 1:
                return x
            ins = self._atoms_at(x, in_shape, 1, "")
            self._record(name, "prelu", ins, ins)
            return TV(1, ins)
        if isinstance(m, nn.LayerNorm) and in_shape is not None:
            k = len(m.normalized_shape)
            if isinstance(x, TV) and x.dim >= len(in_shape) - k:
                if self.approx_ln and k == 1:
                    self._record(name, "ln", x.atoms, x.atoms)
                    return x
                self._pin_value(x, "normalized by a LayerNorm (pass approximate_layernorm=True to prune it)")
                msg = f"LayerNorm {name!r} normalizes over the tracked channels; they stay unpruned (exact mode)"
                self.messages.append(msg)
                log.info(msg)
            return x
        if isinstance(m, nn.Flatten):
            return self._reshape(node, x, in_shape, out_shape, literal_ok=True)
        if isinstance(m, (nn.Softmax, nn.LogSoftmax)):
            return self._softmax(node, x, in_shape, m.dim)
        if isinstance(m, _ELEMENTWISE_MODULES):
            return self._keep_dim(node, x, in_shape, out_shape, type(m).__name__)
        self._unknown(node, f"the module type {type(m).__name__}", [args, kwargs])
        return None

    def _attention(self, node: fx.Node, m: nn.Module, args: tuple, kwargs: dict) -> Any:
        """An attention layer: its inputs and outputs are channels as for a Linear; its heads are
        classes of their own (one per head; with ``gqa_heads`` ``kv`` a key/value head and its query
        heads, with ``query`` query head ``j`` of every group)."""
        name, why = node.target, unsupported(m)
        if why is not None:
            self._unknown(node, why, [args, kwargs])
            return None
        a, env = call_args(m, node.args, node.kwargs), call_args(m, args, kwargs)  # fx nodes, tracked values
        for mask in ("attn_mask", "key_padding_mask"):
            self._pin_value(env.get(mask), f"used as the {mask} of {name!r}")
        p, prev = attn_shape(m), self.layers.get(name)
        ins = [self._atoms_at(env.get(k), self._shape(a[k]), len(self._shape(a[k])) - 1, "") for k in ("query", "key", "value")]
        outs = prev.out_atoms if prev else self.new_atoms(p.out)
        if prev:
            heads, kv = prev.heads, prev.kv_heads
            for old, new in zip((prev.in_atoms, prev.k_atoms, prev.v_atoms), ins):
                self.union_lists(old, new)
        else:
            heads = self.new_atoms(p.heads)
            g = p.heads // p.kv_heads
            if g == 1:
                kv = heads
            elif self.gqa_heads == "kv":  # a key/value head goes with its query heads
                kv = self.new_atoms(p.kv_heads)
                for h in range(p.heads):
                    self.union(heads[h], kv[h // g])
            else:  # query head j of every group goes together; the key/value heads stay
                kv = self.new_atoms(p.kv_heads, pin="key/value heads stay (gqa_heads: query)")
                for h in range(g, p.heads):
                    self.union(heads[h % g], heads[h])
            self.layers[name] = LayerUse(name, "attn", ins[0], outs, ins[1], ins[2], heads, kv)
        mask = self._shape(a.get("attn_mask"))
        gqa = isinstance(m, GroupedQueryAttention)
        weights_used = not gqa and a.get("need_weights", True) is not False and any(
            not (u.op == "call_function" and u.target is operator.getitem and (u.args[1] == 0 or not u.users)) for u in node.users)
        for reason in (["its attention weights are used"] if weights_used else []) + (
                ["a per-head (3-D) attn_mask"] if mask is not None and len(mask) == 3 else []):
            self.pin(heads + kv, f"{reason} ({name!r})")
            msg = f"attention {name!r}: {reason}, so its heads stay unpruned"
            self.messages.append(msg)
            log.warning(msg)
        out = TV(len(self._shape(a["query"])) - 1, outs)
        return out if gqa else (out, None)

    # ------------------------------------------------------------------ functions and methods
    def _keep_dim(self, node: fx.Node, x: Any, in_shape: Any, out_shape: Any, what: str) -> Any:
        if not isinstance(x, TV):
            return x
        if in_shape and out_shape and len(in_shape) == len(out_shape) and in_shape[x.dim] == out_shape[x.dim]:
            return x
        self._unknown(node, f"{what} changing the tracked dimension", [x])
        return None

    def _softmax(self, node: fx.Node, x: Any, in_shape: Any, dim: Any) -> Any:
        if isinstance(x, TV) and (dim is None or dim % len(in_shape) == x.dim):
            self.pin(x.atoms, "softmax over the channels")
            return None
        return x

    def _function(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        t = node.target
        method = node.op == "call_method"
        x = args[0] if args else None
        in_shape = self._shape(node.args[0]) if node.args else None
        out_shape = self._shape(node)
        tracked = [v for v in list(args) + list(kwargs.values()) if _has_tv(v)]
        if not tracked:
            return None  # nothing prunable flows through (shapes, sizes, constants)
        if (method and t in _ELEMENTWISE_METHODS) or (not method and t in _ELEMENTWISE_FUNCS):
            return self._keep_dim(node, x, in_shape, out_shape, str(getattr(t, "__name__", t)))
        if (method and t in _BINARY_METHODS) or (not method and t in _BINARY):
            return self._binary(node, args, kwargs, out_shape)
        if not method and t is operator.getitem:
            return self._getitem(node, x, args[1], in_shape, out_shape)
        if (method and t in ("view", "reshape", "flatten")) or (not method and t in (torch.reshape, torch.flatten)):
            return self._reshape(node, x, in_shape, out_shape, literal_ok=t in ("flatten", torch.flatten),
                                 sizes=node.args[1:] if t != torch.reshape else node.args[1])
        if (method and t in ("permute", "transpose", "unsqueeze", "squeeze")) or (
                not method and t in (torch.permute, torch.transpose, torch.unsqueeze, torch.squeeze)):
            return self._move_dim(node, x, str(getattr(t, "__name__", t)), node.args[1:], in_shape, out_shape)
        if not method and t is torch.cat:
            return self._cat(node, args[0], kwargs.get("dim", args[1] if len(args) > 1 else 0), out_shape)
        if (method and t in ("chunk", "split")) or (not method and t in (torch.chunk, torch.split)):
            size = node.args[1] if len(node.args) > 1 else node.kwargs.get("split_size_or_sections", node.kwargs.get("chunks"))
            by_size = t in ("split", torch.split)  # split takes sizes (fixed unless computed), chunk a count
            return self._split(node, x, size, kwargs.get("dim", args[2] if len(args) > 2 else 0), in_shape, by_size)
        if (method and t in _REDUCE_METHODS) or (not method and t in _REDUCE):
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            keep = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
            return self._reduce(node, x, dim, keep, in_shape)
        if (method and t in ("softmax", "log_softmax")) or (not method and t in (torch.softmax, F.softmax, F.log_softmax)):
            return self._softmax(node, x, in_shape, kwargs.get("dim", args[1] if len(args) > 1 else None))
        if (method and t in _SHAPE_FREE_METHODS) or (t is getattr and args[1] in ("shape", "dtype", "device", "ndim")):
            return None
        name = t if method else getattr(t, "__name__", str(t))
        self._unknown(node, f"the {'method' if method else 'function'} {name!r}", [args, kwargs])
        return None

    def _binary(self, node: fx.Node, args: tuple, kwargs: dict, out_shape: tuple[int, ...]) -> Any:
        rank = len(out_shape)
        out: TV | None = None
        for src, v in zip(list(node.args) + list(node.kwargs.values()), list(args) + list(kwargs.values())):
            shape = self._shape(src) if isinstance(src, fx.Node) else None
            if isinstance(v, TV):
                dim = v.dim + rank - len(shape)
                if shape[v.dim] != out_shape[dim] or (out is not None and out.dim != dim):
                    self._unknown(node, "a broadcast over the tracked channels", [args, kwargs])
                    return None
                if out is None:
                    out = TV(dim, v.atoms)
                else:
                    self.union_lists(out.atoms, v.atoms)
        for src, v in zip(list(node.args) + list(node.kwargs.values()), list(args) + list(kwargs.values())):
            shape = self._shape(src) if isinstance(src, fx.Node) else None
            if not isinstance(v, TV) and shape is not None:
                d = out.dim - (rank - len(shape))
                if d >= 0 and shape[d] != 1:  # a per-channel constant (input, parameter) ties the channels
                    self.pin(out.atoms, f"combined with the per-channel tensor {src.name!r}")
        return out

    def _getitem(self, node: fx.Node, x: Any, idx: Any, in_shape: Any, out_shape: Any) -> Any:
        if isinstance(x, (list, tuple)):
            return x[idx] if isinstance(idx, int) else None
        if not isinstance(x, TV):
            return None
        items = idx if isinstance(idx, tuple) else (idx,)
        if all(isinstance(i, slice) for i in items) and (len(items) <= x.dim or items[x.dim] == slice(None)):
            return x
        self._unknown(node, "indexing along the tracked channels", [x])
        return None

    def _reshape(self, node: fx.Node, x: Any, in_shape: Any, out_shape: Any, literal_ok: bool, sizes: Any = ()) -> Any:
        if not isinstance(x, TV):
            return x
        if isinstance(sizes, (list, tuple)) and len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
            sizes = sizes[0]
        in_shape, out_shape = list(in_shape), list(out_shape)
        d = x.dim
        # find a run [d0, d1] of input dims merged into one output dim d0 around the tracked dim
        d0 = 0
        while d0 < min(len(in_shape), len(out_shape)) and in_shape[d0] == out_shape[d0] and d0 < d:
            d0 += 1
        tail = len(in_shape) - (len(out_shape) - d0 - 1)
        if (d0 <= d < tail and in_shape[tail:] == out_shape[d0 + 1:] and out_shape[d0] == math.prod(in_shape[d0:tail])):
            if not literal_ok and isinstance(sizes, (list, tuple)) and len(sizes) > d0:
                lit = sizes[d0]
                if isinstance(lit, int) and lit != -1:
                    self.pin(x.atoms, f"a hard-coded size {lit} in {node.name!r}")
                    msg = f"node {node.name!r} reshapes to the hard-coded size {lit}: its channels stay unpruned (use -1 or x.size())"
                    self.messages.append(msg)
                    log.warning(msg)
                    return None
            inner = math.prod(in_shape[d + 1:tail])
            return TV(d0, [a for a in x.atoms for _ in range(inner)] * math.prod(in_shape[d0:d]))
        self._unknown(node, f"a reshape from {in_shape} to {out_shape} that splits the tracked channels", [x])
        return None

    def _move_dim(self, node: fx.Node, x: Any, op: str, params: tuple, in_shape: Any, out_shape: Any) -> Any:
        if not isinstance(x, TV):
            return x
        rank = len(in_shape)
        if op == "permute":
            perm = params[0] if len(params) == 1 and isinstance(params[0], (list, tuple)) else params
            perm = [p % rank for p in perm]
            return TV(perm.index(x.dim), x.atoms)
        if op == "transpose":
            a, b = (p % rank for p in params)
            return TV(b if x.dim == a else a if x.dim == b else x.dim, x.atoms)
        if op == "unsqueeze":
            p = params[0] % (rank + 1)
            return TV(x.dim + (p <= x.dim), x.atoms)
        removed = [i for i, s in enumerate(in_shape) if s == 1] if not params else [params[0] % rank]
        removed = [i for i in removed if in_shape[i] == 1]
        if x.dim in removed:
            self._unknown(node, "squeeze of the tracked channels", [x])
            return None
        return TV(x.dim - sum(i < x.dim for i in removed), x.atoms)

    def _cat(self, node: fx.Node, items: Any, dim: int, out_shape: tuple[int, ...]) -> Any:
        dim %= len(out_shape)
        tvs = [v for v in items if isinstance(v, TV)]
        srcs = node.args[0]
        if any(v.dim == dim for v in tvs):  # concatenation along the channels: index offsets
            atoms: list[int] = []
            for src, v in zip(srcs, items):
                atoms += self._atoms_at(v, self._shape(src), dim, "concatenated along another dimension")
            return TV(dim, atoms)
        base = tvs[0]
        for v in tvs[1:]:
            if v.dim != base.dim:
                self._unknown(node, "a concatenation of differently tracked tensors", [items])
                return None
            self.union_lists(base.atoms, v.atoms)
        if len(tvs) < len(items):
            self.pin(base.atoms, "concatenated with an untracked tensor")
        return base

    def _split(self, node: fx.Node, x: Any, size: Any, dim: int, in_shape: Any, by_size: bool) -> Any:
        meta = node.meta.get("tensor_meta")
        n = len(meta) if isinstance(meta, (list, tuple)) else 0
        if not isinstance(x, TV) or n == 0:
            return [x] * max(n, 1)
        dim %= len(in_shape)
        if dim != x.dim:
            return [x] * n
        sizes = [tuple(m.shape)[dim] for m in meta]
        if (by_size and not isinstance(size, fx.Node)) or len(set(sizes)) != 1:
            self.pin(x.atoms, f"split into unequal or listed sizes at {node.name!r}")
            msg = f"node {node.name!r} splits the channels into the fixed sizes {sizes}: they stay unpruned"
            self.messages.append(msg)
            log.warning(msg)
            return [None] * n
        k = sizes[0]
        pieces = [x.atoms[i * k:(i + 1) * k] for i in range(n)]
        for p in pieces[1:]:
            self.union_lists(pieces[0], p)  # equal pieces stay equal
        return [TV(dim, p) for p in pieces]

    def _reduce(self, node: fx.Node, x: Any, dim: Any, keep: bool, in_shape: Any) -> Any:
        if not isinstance(x, TV):
            return x
        rank = len(in_shape)
        dims = None if dim is None else [d % rank for d in (dim if isinstance(dim, (list, tuple)) else [dim])]
        if dims is None or x.dim in dims:
            self.pin(x.atoms, f"reduced over the channels at {node.name!r}")
            return None
        return TV(x.dim if keep else x.dim - sum(d < x.dim for d in dims), x.atoms)

    # ------------------------------------------------------------------ groups
    def _make_groups(self) -> None:
        bad = {self.find(a) for a in self.pinned}
        by_class: dict[int, set[str]] = {}
        head_groups: list[ChannelGroup] = []
        for use in self.layers.values():
            if use.kind in ("conv", "gconv", "convT", "linear", "attn"):
                for a in use.out_atoms:
                    r = self.find(a)
                    if r not in bad:
                        by_class.setdefault(r, set()).add(use.name)
            if use.kind == "attn":
                classes = sorted({self.find(a) for a in use.heads + use.kv_heads} - bad)
                if classes:
                    head_groups.append(ChannelGroup((use.name,), classes, kind="heads"))
        grouped: dict[tuple[str, ...], list[int]] = {}
        for r, prods in by_class.items():
            grouped.setdefault(tuple(sorted(prods)), []).append(r)
        self.groups = [ChannelGroup(k, sorted(v)) for k, v in sorted(grouped.items(), key=lambda kv: min(kv[1]))]
        self.groups += head_groups

    def roots(self, atoms: Sequence[int]) -> list[int]:
        return [self.find(a) for a in atoms]

    def summary(self) -> str:
        lines = [f"{len(self.groups)} prunable channel groups, {len(self.layers)} layers to slice"]
        for g in self.groups:
            lines.append(f"  {g.size:5d} {g.kind}: {', '.join(g.producers)}")
        return "\n".join(lines + [f"  note: {m}" for m in self.messages])


def _has_tv(v: Any) -> bool:
    if isinstance(v, TV):
        return True
    if isinstance(v, (list, tuple)):
        return any(_has_tv(x) for x in v)
    if isinstance(v, dict):
        return any(_has_tv(x) for x in v.values())
    return False


__all__ = ["TV", "ChannelGroup", "DependencyGraph", "LayerUse", "trace"]
