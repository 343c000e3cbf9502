"""The schema of an .nsk header: every field's type and bounds, checked before any decoder or model runs.

A header passes :func:`check_header` or raises one :class:`FormatError` naming the field
(``header.tensors[3] ('fc1.weight').parts.indices.bits``). What is checked:

* the top level: ``format``, ``model`` (a zoo name with JSON arguments of bounded size, or a
  user-supplied class), ``metadata`` (an object), ``edits``, ``act_quant``, ``tensors``;
* every tensor entry against its encoding's row of :data:`PARTS`: its keys, name, shape (at most
  :data:`MAX_DIMS` dimensions), dtype, ``kept``/``nonzeros`` within the element count, and each part:
  an *array* part (``dtype`` a known name, ``count`` exactly what the encoding needs) or a *stream*
  part (``coding`` fixed, huffman or rans, ``bits`` within the encoding's width, ``count`` what the encoding
  needs, ``block`` within what the writer uses, ``coded_bits`` within the section, ``entropy_bits``
  a finite number within ``count * bits``), and the ``quant`` fields of the quantized encodings;
* the whole file: the declared tensors' elements within a budget derived from the file's size
  (:func:`element_limit`), so no header can ask for more memory than its bytes justify.

Nothing is allocated before these checks pass; decoders then only check the bytes of the sections.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..errors import FormatError
from ._format import MAX_DIMS, field, int_field

# name -> (torch dtype, little-endian numpy dtype of the stored bytes)
DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "float32": (torch.float32, "<f4"),
    "float16": (torch.float16, "<f2"),
    "bfloat16": (torch.bfloat16, "<i2"),
    "float64": (torch.float64, "<f8"),
    "int64": (torch.int64, "<i8"),
    "int32": (torch.int32, "<i4"),
    "int16": (torch.int16, "<i2"),
    "int8": (torch.int8, "i1"),
    "uint8": (torch.uint8, "u1"),
    "bool": (torch.bool, "u1"),
}
FLOATS = ("float32", "float16", "bfloat16", "float64")
HALVES = ("float16", "bfloat16")
#: encoding -> its parts (in section order), each "array" or "stream"
PARTS: dict[str, dict[str, str]] = {
    "raw": {"data": "array"},
    "sparse": {"positions": "stream", "values": "array"},
    "codebook": {"codebook": "array", "indices": "stream"},
    "sparse_codebook": {"positions": "stream", "codebook": "array", "indices": "stream"},
    "affine": {"codes": "stream", "scale": "array"},
    "affine_zp": {"codes": "stream", "scale": "array", "zero_point": "array"},
    "binary": {"signs": "stream", "scale": "array"},
    "ternary": {"trits": "stream", "scale": "array"},
    "cast": {"data": "array"},
}
QUANT = ("affine", "affine_zp", "binary", "ternary", "cast")
#: widest affine code (fixed point up to 24-bit words)
MAX_CODE_BITS = 24
#: widest gap symbol of a position stream (as :data:`netshrink.pack.sparse.MAX_GAP_BITS`)
MAX_GAP_BITS = 24
MAX_CODEBOOK = 1 << 24
MAX_DIM = 1 << 40
MAX_NAME_CHARS = 1000
#: dense elements a file may decode to: at most this many in all ...
MAX_TOTAL_ELEMENTS = 1 << 31
#: ... and at most ``2**20 + ELEMENTS_PER_BYTE * file size`` (a 99.99 %-sparse file stays well inside)
ELEMENTS_PER_BYTE = 4096
#: bounds of a zoo model's stored arguments (checked before any constructor runs)
MAX_ARG_INT = 1 << 32
MAX_ARG_ITEMS = 4096
MAX_ARG_DEPTH = 8
MAX_ARG_CHARS = 1000

_ENTRY_KEYS = {"name", "shape", "dtype", "encoding", "masked", "nonzeros", "kept", "parts"}
_ARRAY_KEYS = {"section", "dtype", "count"}
_STREAM_KEYS = {"section", "coding", "bits", "count", "coded_bits", "entropy_bits"}
_CODINGS = ("fixed", "huffman", "rans")


def element_limit(file_bytes: int) -> int:
    """Most dense elements a file of ``file_bytes`` bytes may declare."""
    return min(MAX_TOTAL_ELEMENTS, (1 << 20) + ELEMENTS_PER_BYTE * int(file_bytes))


@dataclass(frozen=True)
class TensorSpec:
    """A checked header entry: what one tensor is and where its parts lie (section indices)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    encoding: str
    masked: bool
    nonzeros: int
    kept: int
    parts: dict[str, dict[str, Any]]
    quant: dict[str, Any] | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _keys(obj: dict, required: set[str], optional: set[str], where: str) -> None:
    missing = required - set(obj)
    extra = set(obj) - required - optional
    if missing or extra:
        what = f"missing key {sorted(missing)[0]!r}" if missing else f"unknown key {str(sorted(extra)[0])[:40]!r}"
        raise FormatError(f"{where}: {what}")


def _str_in(obj: dict, key: str, allowed: Sequence[str], where: str) -> str:
    value = field(obj, key, str, where)
    if value not in allowed:
        raise FormatError(f"{where}.{key}: unknown {key} {value[:40]!r} (expected {', '.join(allowed)})")
    return value


def _max_block(bits: int) -> int:
    from ._streams import max_block

    return max_block(bits)


def _check_stream(desc: dict, where: str, section_bytes: int, max_bits: int, count: tuple[int, int], bits: int | None = None) -> None:
    _keys(desc, _STREAM_KEYS, {"block"}, where)
    _str_in(desc, "coding", _CODINGS, where)
    b = int_field(desc, "bits", where, 1, max_bits)
    if bits is not None and b != bits:
        raise FormatError(f"{where}.bits: expected {bits}, got {b}")
    n = int_field(desc, "count", where, *count)
    int_field(desc, "coded_bits", where, 0, 8 * section_bytes)
    if "block" in desc:
        int_field(desc, "block", where, 1, _max_block(b))
    ent = desc["entropy_bits"]
    if not isinstance(ent, (int, float)) or isinstance(ent, bool) or not 0 <= ent <= n * b + 1:
        raise FormatError(f"{where}.entropy_bits: expected a number in [0, {n * b + 1}], got {str(ent)[:40]}")


def _check_array(desc: dict, where: str, dtypes: Sequence[str], count: tuple[int, int]) -> None:
    _keys(desc, _ARRAY_KEYS, set(), where)
    _str_in(desc, "dtype", dtypes, where)
    int_field(desc, "count", where, *count)


def _section_bytes(desc: Any, where: str, sections: Sequence[int]) -> int:
    i = int_field(desc, "section", where, 0, len(sections) - 1)
    return sections[i]


def _check_quant(entry: dict, encoding: str, shape: tuple[int, ...], where: str) -> dict[str, Any]:
    """The ``quant`` fields of a quantized entry: ``axis`` (null or 0), and ``bits``/``signed`` for affine."""
    if encoding == "cast":
        if "quant" in entry:
            raise FormatError(f"{where}: unknown key 'quant'")
        return {}
    quant = field(entry, "quant", dict, where)
    _keys(quant, {"axis"} | ({"bits", "signed"} if encoding.startswith("affine") else set()), set(), f"{where}.quant")
    axis = quant["axis"]
    if axis not in (None, 0) or isinstance(axis, bool):
        raise FormatError(f"{where}.quant.axis: expected null or 0, got {str(axis)[:40]}")
    if axis == 0 and len(shape) == 0:
        raise FormatError(f"{where}.quant.axis: a 0-d tensor has no channel axis")
    out: dict[str, Any] = {"axis": axis}
    if encoding.startswith("affine"):
        out["bits"] = int_field(quant, "bits", f"{where}.quant", 1, MAX_CODE_BITS)
        out["signed"] = field(quant, "signed", bool, f"{where}.quant")
    return out


def check_entry(entry: Any, where: str, sections: Sequence[int]) -> TensorSpec:
    """Validate one header tensor entry against the schema; ``sections`` = the sections' byte lengths."""
    if isinstance(entry, dict) and entry.get("encoding") in ("groupq", "groupq_awq", "nm_sparse"):
        from ._groupq import check_groupq_entry  # group-quantized weights (issue 15)

        return check_groupq_entry(entry, where, sections)
    name = field(entry, "name", str, where)
    if not 0 < len(name) <= MAX_NAME_CHARS:
        raise FormatError(f"{where}.name: expected 1 to {MAX_NAME_CHARS} characters")
    where = f"{where} ({name[:80]!r})"
    encoding = _str_in(entry, "encoding", tuple(PARTS), where)
    _keys(entry, _ENTRY_KEYS, {"quant"} if encoding in QUANT else set(), where)
    shape = field(entry, "shape", list, where)
    if len(shape) > MAX_DIMS:
        raise FormatError(f"{where}.shape: {len(shape)} dimensions exceed the limit of {MAX_DIMS}")
    shape_t = tuple(int_field({f"[{i}]": d}, f"[{i}]", f"{where}.shape", 0, MAX_DIM) for i, d in enumerate(shape))
    dtype = _str_in(entry, "dtype", tuple(DTYPES), where)
    numel = math.prod(shape_t)
    kept = int_field(entry, "kept", where, 0, numel)
    nonzeros = int_field(entry, "nonzeros", where, 0, numel)
    masked = field(entry, "masked", bool, where)
    parts = field(entry, "parts", dict, where)
    want = PARTS[encoding]
    if set(parts) != set(want):
        raise FormatError(f"{where}.parts: {encoding} needs parts {list(want)}, got {sorted(map(str, parts))[:8]}")
    if encoding in ("codebook", "sparse_codebook") + QUANT and dtype != "float32":
        raise FormatError(f"{where}.dtype: {encoding} needs float32, got {dtype}")
    if encoding == "sparse" and dtype not in FLOATS:
        raise FormatError(f"{where}.dtype: sparse needs a floating dtype, got {dtype}")
    if encoding in ("raw", "codebook") + QUANT and kept != numel:
        raise FormatError(f"{where}.kept: {encoding} keeps all {numel} entries, header says {kept}")
    quant = _check_quant(entry, encoding, shape_t, where) if encoding in QUANT else None
    channels = 1 if not quant or quant.get("axis") is None else shape_t[0]
    for pname, kind in want.items():
        desc, pw = parts[pname], f"{where}.parts.{pname}"
        nbytes = _section_bytes(desc, pw, sections)
        if pname == "data":
            _check_array(desc, pw, HALVES if encoding == "cast" else (dtype,), (numel, numel))
        elif pname == "values":
            _check_array(desc, pw, (dtype,), (kept, kept))
        elif pname == "codebook":
            _check_array(desc, pw, ("float32",), (1, MAX_CODEBOOK))
        elif pname == "scale":
            _check_array(desc, pw, ("float32",), (channels, channels))
        elif pname == "zero_point":
            _check_array(desc, pw, ("int32",), (channels, channels))
        elif pname == "positions":
            _check_stream(desc, pw, nbytes, MAX_GAP_BITS, (kept, numel))
        elif pname == "indices":
            n = numel if encoding == "codebook" else kept
            _check_stream(desc, pw, nbytes, MAX_CODE_BITS, (n, n))
        else:  # codes / signs / trits
            bits = quant["bits"] if pname == "codes" else (1 if pname == "signs" else 2)
            _check_stream(desc, pw, nbytes, MAX_CODE_BITS, (numel, numel), bits)
    return TensorSpec(name, shape_t, dtype, encoding, masked, nonzeros, kept, parts, quant)


def _check_json_value(value: Any, where: str, depth: int = 0) -> None:
    """A stored model argument: bounded ints, strings, lists and nesting."""
    if depth > MAX_ARG_DEPTH:
        raise FormatError(f"{where}: nested deeper than {MAX_ARG_DEPTH}")
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return
    if isinstance(value, int):
        if not -MAX_ARG_INT <= value <= MAX_ARG_INT:
            raise FormatError(f"{where}: {str(value)[:30]} is outside [-2**32, 2**32]")
        return
    if isinstance(value, str):
        if len(value) > MAX_ARG_CHARS:
            raise FormatError(f"{where}: a string longer than {MAX_ARG_CHARS} characters")
        return
    if isinstance(value, list):
        if len(value) > MAX_ARG_ITEMS:
            raise FormatError(f"{where}: {len(value)} items exceed the limit of {MAX_ARG_ITEMS}")
        for i, v in enumerate(value):
            _check_json_value(v, f"{where}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        if len(value) > MAX_ARG_ITEMS:
            raise FormatError(f"{where}: {len(value)} keys exceed the limit of {MAX_ARG_ITEMS}")
        for k, v in value.items():
            _check_json_value(v, f"{where}.{str(k)[:40]}", depth + 1)
        return
    raise FormatError(f"{where}: unexpected value {type(value).__name__}")


def check_model(model: Any, where: str) -> dict[str, Any]:
    """``header.model``: ``{"zoo": name, "args": {...}}`` with bounded arguments, or a user-supplied class."""
    if not isinstance(model, dict):
        raise FormatError(f"{where}: expected an object, got {type(model).__name__}")
    if "zoo" in model:
        _keys(model, {"zoo", "args"}, set(), where)
        zoo = field(model, "zoo", str, where)
        if not 0 < len(zoo) <= 100:
            raise FormatError(f"{where}.zoo: expected a model name of 1 to 100 characters")
        _check_json_value(field(model, "args", dict, where), f"{where}.args")
    elif model.get("user_supplied") is not True or not isinstance(model.get("class"), str) or len(model["class"]) > MAX_ARG_CHARS:
        raise FormatError(f"{where} must name a zoo model or a user-supplied class")
    return model


def check_edit_args(edits: list[dict[str, Any]], where: str) -> None:
    """Every edit's arguments bounded as a zoo model's are."""
    for i, e in enumerate(edits):
        _check_json_value(e["args"], f"{where}[{i}].args")
