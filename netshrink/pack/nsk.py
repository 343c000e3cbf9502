"""The packed .nsk file: pack a compressed model, load it back exactly, inspect it, export it.

This is the last stage of Deep Compression (Han, Mao & Dally, ICLR 2016): pruned weights are stored
as relative indices plus values (§2), shared weights as a codebook plus indices (§3), and each index
stream is Huffman-coded when that is smaller (§4). The container is described in
:mod:`netshrink.pack._format`; the tensor encodings in :mod:`netshrink.pack._tensors`.

A tensor's compression structure is read only through :func:`netshrink._state.weight_state`: a
codebook gives ``codebook``/``sparse_codebook``, a mask ``sparse`` (positions = the mask's True
entries), a plain tensor ``raw`` (or ``sparse`` when mostly zeros and smaller so).
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import torch
from torch import nn
from torch.nn.utils import parametrize

from .._modules import apply_edits, check_edits, edits_of
from .._state import WeightState, check_ties, effective_tensors, follow_ties_, retie_, tie_aliases, tie_groups, weight_state
from ..errors import ConfigError, FormatError, ModelError, NetshrinkError
from ..prune._mask import apply_mask, make_permanent
from ..quantize._sharing import apply_sharing
from ..quantize._storage import act_quant_specs, apply_act_quant, check_act_quant, restore_weight_quant, storage_hints
from ._format import PRELUDE, VERSION, atomic_write, field as hfield, parse, read_file, serialize
from ._streams import CODINGS
from ._budget import BuildBudget, BuildGuard
from ._schema import check_edit_args, check_model, element_limit
from ._tensors import Decoded, TensorSpec, check_entry, decode_tensor, encode_tensor

log = logging.getLogger(__name__)

FORMAT_NAME = "netshrink.nsk"


@dataclass(frozen=True)
class StreamInfo:
    """A coded symbol stream (positions or indices): ``coded_bits`` of codewords against the
    ``entropy_bits`` bound, in a section of ``section_bytes``; ``bits_per_kept`` = section bits per
    kept weight."""

    coding: str
    bits: int
    count: int
    coded_bits: int
    entropy_bits: float
    section_bytes: int
    bits_per_kept: float
    block: int = 1

    @property
    def bits_per_symbol(self) -> float:
        return self.coded_bits / self.count if self.count else 0.0

    @property
    def entropy_per_symbol(self) -> float:
        return self.entropy_bits / self.count if self.count else 0.0


@dataclass(frozen=True)
class SectionInfo:
    """One binary section: ``name`` = "tensor/part", absolute file ``offset``, size and file share."""

    name: str
    part: str
    offset: int
    nbytes: int
    share: float


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str
    encoding: str
    numel: int
    nonzeros: int
    kept: int
    masked: bool
    codebook_size: int | None
    nbytes: int
    share: float
    sections: tuple[SectionInfo, ...]
    streams: dict[str, StreamInfo] = field(default_factory=dict)

    @property
    def bits_per_kept(self) -> float:
        """All of this tensor's section bits per kept entry."""
        return 8.0 * self.nbytes / self.kept if self.kept else 0.0


@dataclass(frozen=True)
class PackStats:
    """Sizes of a packed file: total, header, per tensor / section / stream.

    ``dense_fp32_bytes`` counts every packed tensor at 4 bytes per element, so ``ratio`` is the
    compression ratio of DESIGN.md (dense fp32 model bytes / .nsk file bytes).
    """

    path: str | None
    total_bytes: int
    header_bytes: int
    dense_fp32_bytes: int
    tensors: tuple[TensorInfo, ...]

    @property
    def ratio(self) -> float:
        return self.dense_fp32_bytes / self.total_bytes if self.total_bytes else 0.0

    def tensor(self, name: str) -> TensorInfo:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)


@dataclass(frozen=True)
class NskInfo(PackStats):
    """:class:`PackStats` of a file on disk plus its version, model description and metadata."""

    version: int
    model: dict[str, Any]
    metadata: dict[str, Any]


# ---------------------------------------------------------------------------------------------- writing


def _model_spec(model: nn.Module) -> dict[str, Any]:
    spec = getattr(model, "netshrink_spec", None)
    if spec is None:
        cls = type(model)
        return {"user_supplied": True, "class": f"{cls.__module__}.{cls.__qualname__}"}
    if not isinstance(spec, dict) or not isinstance(spec.get("zoo"), str) or not isinstance(spec.get("args", {}), dict):
        raise ModelError(f"model.netshrink_spec must be a dict {{'zoo': name, 'args': {{...}}}}, got {spec!r}")
    out = {"zoo": spec["zoo"], "args": dict(spec.get("args", {}))}
    _check_json(out, lambda msg: ModelError(f"model.netshrink_spec: {msg}"))
    return out


def _check_json(value: Any, error: Any) -> None:
    """Raise ``error(message)`` unless ``value`` is strict JSON (no NaN/Infinity, string keys)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise error(f"not JSON-serializable: {exc}") from None


def _packable(model: nn.Module) -> dict[str, torch.Tensor]:
    """State tensors by plain state_dict name, as the forward pass sees them (no non-persistent buffers;
    a tied parameter once, under the first name of its group)."""
    skip = tie_aliases(model)
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        skip.update(prefix + b for b in getattr(module, "_non_persistent_buffers_set", ()))
    return {
        name: t
        for name, t in effective_tensors(model).items()
        if name not in skip and "parametrizations" not in name.split(".")
    }


def _structures(model: nn.Module) -> dict[str, WeightState]:
    out = {}
    for mod_name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            prefix = f"{mod_name}." if mod_name else ""
            for pname in module.parametrizations.keys():
                out[prefix + pname] = weight_state(module, pname)
    return out


def _emit(f: BinaryIO, model: nn.Module, coding: str, metadata: dict[str, Any] | None, path: str | None) -> PackStats:
    """Encode ``model`` and write the whole file to ``f``; the one code path of pack and packed_bytes."""
    if coding not in CODINGS:
        raise ConfigError("coding", f"must be one of {', '.join(CODINGS)}, got {coding!r}")
    if metadata is not None and not isinstance(metadata, dict):
        raise ConfigError("metadata", f"must be a dict, got {type(metadata).__name__}")
    _check_json(metadata, lambda msg: ConfigError("metadata", msg))
    structures = _structures(model)
    from ._groupq import groupq_hints

    hints = {**storage_hints(model), **groupq_hints(model)}
    entries, sections = [], []
    for name, tensor in _packable(model).items():
        enc = encode_tensor(name, tensor, structures.get(name), coding, hints.get(name))
        parts = {}
        for pname, data in enc.parts:
            parts[pname] = dict(enc.entry["parts"][pname], section=len(sections))
            sections.append((f"{name}/{pname}", data))
        entries.append(dict(enc.entry, parts=parts))
    header = {"format": FORMAT_NAME, "model": _model_spec(model), "edits": edits_of(model),
              "metadata": dict(metadata or {}), "tensors": entries}
    ties = tie_groups(model)
    if ties:  # tied parameters, packed once under the first name, tied again on load (absent when none)
        header["ties"] = ties
    act = act_quant_specs(model)
    if act:  # input quantizers to attach again on load (absent when there are none)
        header["act_quant"] = act
    blob, final, hlen = serialize(header, sections)
    f.write(blob)
    specs = [check_entry(e, "header", [len(d) for _, d in sections]) for e in entries]
    return _stats(PackStats, final, specs, len(blob), hlen, path)


def pack(model: nn.Module, path: str | os.PathLike, *, coding: str = "auto", metadata: dict[str, Any] | None = None) -> PackStats:
    """Write ``model`` to ``path`` as .nsk and return its sizes.

    ``coding``: ``"auto"`` takes the smallest of fixed-width, Huffman and rANS per stream (tables
    included), ``"fixed"`` forces fixed width (the size before Huffman coding), ``"huffman"`` forces
    Huffman, ``"rans"`` forces rANS (:mod:`netshrink.pack.rans`). ``metadata`` (a
    JSON-serializable dict, e.g. the run's metrics) is stored in the header. The write is atomic: on
    any error no file is left behind and an existing file at ``path`` is intact.
    """
    target = os.fspath(path)
    result: list[PackStats] = []
    atomic_write(target, lambda f: result.append(_emit(f, model, coding, metadata, target)))
    log.info("packed %s: %d bytes (%.1fx smaller than dense fp32)", target, result[0].total_bytes, result[0].ratio)
    return result[0]


def packed_bytes(model: nn.Module, coding: str = "auto", *, metadata: dict[str, Any] | None = None) -> int:
    """Size in bytes of the .nsk file :func:`pack` would write (nothing touches the disk)."""
    buf = io.BytesIO()
    _emit(buf, model, coding, metadata, None)
    return buf.tell()


# ---------------------------------------------------------------------------------------------- reading


@dataclass
class _Opened:
    path: str
    header: dict[str, Any]
    views: list[memoryview]
    specs: list[TensorSpec]
    size: int
    header_bytes: int


def _open(path: str | os.PathLike) -> _Opened:
    where = os.fspath(path)
    buf = read_file(where)
    header, views = parse(buf, where)
    fmt = hfield(header, "format", str, f"{where}: header")
    if fmt != FORMAT_NAME:
        raise FormatError(f"{where}: header.format is {fmt!r}, not {FORMAT_NAME!r}")
    check_model(hfield(header, "model", dict, f"{where}: header"), f"{where}: header.model")
    hfield(header, "metadata", dict, f"{where}: header")
    check_edits(header.setdefault("edits", []), f"{where}: header.edits")  # absent in older files
    check_edit_args(header["edits"], f"{where}: header.edits")
    check_act_quant(header.setdefault("act_quant", []), f"{where}: header.act_quant")
    check_ties(header.setdefault("ties", []), f"{where}: header.ties")
    entries = hfield(header, "tensors", list, f"{where}: header")
    lengths = [len(v) for v in views]
    specs = [check_entry(e, f"{where}: header.tensors[{i}]", lengths) for i, e in enumerate(entries)]
    names, used = set(), []
    for s in specs:
        if s.name in names:
            raise FormatError(f"{where}: tensor {s.name!r} appears twice in the header")
        names.add(s.name)
        used.extend(p["section"] for p in s.parts.values())
    if sorted(used) != list(range(len(views))):
        raise FormatError(f"{where}: the tensors' parts do not use every section exactly once")
    total = sum(s.numel for s in specs)
    limit = element_limit(len(buf))
    if total > limit:
        raise FormatError(f"{where}: tensors of {total} elements in all exceed the limit of {limit} for this file")
    hlen = len(buf) - PRELUDE.size - int(header["data_bytes"])
    return _Opened(where, header, views, specs, len(buf), hlen)


def _stats(cls: type, header: dict[str, Any], specs: list[TensorSpec], size: int, hlen: int, path: str | None, **extra: Any) -> Any:
    table = header["sections"]
    base = PRELUDE.size + hlen
    tensors = []
    for s in specs:
        secs, streams = [], {}
        for pname, desc in s.parts.items():
            sec = table[desc["section"]]
            secs.append(SectionInfo(sec["name"], pname, base + sec["offset"], sec["length"], sec["length"] / size))
            if "coding" in desc:
                streams[pname] = StreamInfo(
                    desc["coding"], desc["bits"], desc["count"], desc["coded_bits"], float(desc["entropy_bits"]), sec["length"], 8.0 * sec["length"] / s.kept if s.kept else 0.0,
                    int(desc.get("block", 1)),
                )
        nbytes = sum(x.nbytes for x in secs)
        k = int(s.parts["codebook"]["count"]) if "codebook" in s.parts else None
        tensors.append(
            TensorInfo(s.name, s.shape, s.dtype, s.encoding, s.numel, s.nonzeros, s.kept, s.masked, k, nbytes,
                       nbytes / size, tuple(secs), streams)
        )
    dense = 4 * sum(s.numel for s in specs)
    return cls(path, size, PRELUDE.size + hlen, dense, tuple(tensors), **extra)


def read_info(path: str | os.PathLike) -> NskInfo:
    """Header-level description of an .nsk file (every checksum verified; no tensor decoded)."""
    o = _open(path)
    return _stats(NskInfo, o.header, o.specs, o.size, o.header_bytes, o.path, version=VERSION,
                  model=dict(o.header["model"]), metadata=dict(o.header["metadata"]))


def _decode_all(o: _Opened) -> dict[str, Decoded]:
    return {s.name: decode_tensor(s, o.views, o.path) for s in o.specs}


def _zoo_model(spec: dict[str, Any], where: str) -> nn.Module:
    if "zoo" not in spec:
        raise ModelError(f"{where} holds a user-supplied model ({spec.get('class')}); pass model= to load it into")
    try:
        from ..models import build_model
    except ImportError as exc:
        raise ModelError(f"{where}: the model zoo is not available ({exc})") from None
    try:
        return build_model(spec["zoo"], **spec["args"])
    except NetshrinkError:
        raise
    except Exception as exc:  # a zoo constructor rejecting the stored arguments
        args = json.dumps(spec["args"])
        raise ModelError(f"{where}: cannot build zoo model {spec['zoo'][:100]!r} with {args[:200]}: {str(exc)[:200]}") from None


def _check_fits(model: nn.Module, o: _Opened) -> None:
    """The model's state tensors are exactly the file's, by name and shape (nothing decoded yet)."""
    targets = _packable(model)
    stored = {s.name: s for s in o.specs}
    missing = [n for n in targets if n not in stored]
    extra = [n for n in stored if n not in targets]
    if missing or extra:
        what = f"model tensor {missing[0]!r} is not in the file" if missing else f"file tensor {extra[0][:80]!r} is not in the model"
        raise ModelError(f"{o.path}: {what} ({len(missing)} missing, {len(extra)} unexpected)")
    for name, t in targets.items():
        if tuple(t.shape) != stored[name].shape:
            raise ModelError(f"{o.path}: tensor {name!r} has shape {list(stored[name].shape)[:8]} in the file, {list(t.shape)} in the model")


def _build(o: _Opened, model: nn.Module | None, guard: BuildGuard, meta: bool) -> nn.Module:
    """The file's model (from the zoo when ``model`` is None) with its edits and input quantizers, built
    inside ``guard`` (on the meta device when ``meta``)."""
    edits_at, act_at = f"{o.path}: header.edits", f"{o.path}: header.act_quant"
    if model is None:
        with guard.scope(meta=meta):
            model = _zoo_model(o.header["model"], o.path)
            apply_edits(model, o.header["edits"], where=edits_at)
            apply_act_quant(model, o.header["act_quant"], where=act_at)
        retie_(model, o.header["ties"], f"{o.path}: header.ties")
        return model
    apply_edits(model, o.header["edits"], where=edits_at, guard=guard)  # each edit probed on meta first
    with guard.scope(meta=False):
        apply_act_quant(model, o.header["act_quant"], where=act_at)
    if o.header["ties"]:
        make_permanent(model)  # ties are set on plain parameters
        retie_(model, o.header["ties"], f"{o.path}: header.ties")
    return model


def load(path: str | os.PathLike, model: nn.Module | None = None, *, restore: bool = False) -> nn.Module:
    """Load an .nsk file into ``model`` (built from the zoo when the file names one and ``model`` is None).

    Without ``restore`` the model gets plain dense weights (any parametrization on ``model`` is made
    permanent first). With ``restore=True`` the compression structure comes back: ``apply_mask`` for
    sparse weights (mask = stored positions), ``apply_sharing`` for codebook weights, a
    :class:`~netshrink.quantize.WeightFakeQuant` with the stored scales for int-k affine weights, so the model
    fine-tunes and re-packs exactly as before. The file's ``edits`` (layers replaced by registered module
    types, :mod:`netshrink._modules`) are replayed on ``model`` first.

    Nothing is built before the header passed its schema; a zoo model is first built on the meta
    device within a budget derived from the file (:mod:`netshrink.pack._budget`) and its tensor names
    and shapes compared with the file's, and only then built for real. Names and shapes are checked
    before anything is decoded.
    """
    o = _open(path)
    guard = BuildGuard(BuildBudget.for_file(len(o.specs), sum(s.numel for s in o.specs), f"{o.path}: header.model"))
    if model is None:
        if "zoo" not in o.header["model"]:
            raise ModelError(f"{o.path} holds a user-supplied model ({o.header['model'].get('class')}); pass model= to load it into")
        _check_fits(_build(o, None, guard, meta=True), o)
    model = _build(o, model, guard, meta=False)
    _check_fits(model, o)
    decoded = _decode_all(o)
    make_permanent(model)
    with torch.no_grad():
        for name, d in decoded.items():
            mod_name, _, attr = name.rpartition(".")
            getattr(model.get_submodule(mod_name), attr).copy_(d.tensor)
    if restore:
        for name, d in decoded.items():
            if d.quant is not None:  # an affine tensor gets its uniform quantizer back
                mod_name, _, attr = name.rpartition(".")
                restore_weight_quant(model.get_submodule(mod_name), d.quant, attr)
                continue
            if d.mask is None and d.codebook is None:
                continue
            mod_name, _, attr = name.rpartition(".")
            module = model.get_submodule(mod_name)
            dev = getattr(module, attr).device
            if d.mask is not None:
                apply_mask(module, d.mask.to(dev), attr)
            if d.codebook is not None:
                apply_sharing(module, d.codebook.to(dev), d.indices.to(dev), attr)
        follow_ties_(model, o.header["ties"])
    return model


def unpack_to_safetensors(path: str | os.PathLike, out_path: str | os.PathLike) -> None:
    """Decode ``path`` and write its tensors, dense, by state_dict name, as a .safetensors file.

    Floating tensors are written as fp32; integer and bool buffers keep their dtype. Atomic write.
    """
    from safetensors.torch import save

    o = _open(path)
    tensors = {}
    for name, d in _decode_all(o).items():
        t = d.tensor
        tensors[name] = (t.to(torch.float32) if t.is_floating_point() else t).contiguous()
    blob = save(tensors, metadata={"source": FORMAT_NAME, "model": str(o.header["model"])[:1000]})
    atomic_write(out_path, lambda f: f.write(blob))
