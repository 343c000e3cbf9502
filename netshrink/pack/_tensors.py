"""Encoding one tensor into .nsk parts, and checking and decoding it back, exactly.

Encodings (the header entry's ``encoding``) and their parts (one section each):

* ``raw``: ``data`` — the tensor's bytes, little-endian, in its own dtype.
* ``sparse``: ``positions`` (gap stream, :mod:`netshrink.pack.sparse`) + ``values`` of the kept entries.
* ``codebook``: ``codebook`` (fp32 centroids) + ``indices`` (one symbol per weight, dense).
* ``sparse_codebook``: ``positions`` + ``codebook`` + ``indices`` of the kept entries only.
* ``affine`` / ``affine_zp``: ``codes`` (a stream of ``q - qmin``, ``bits`` wide, bit-packed or Huffman) +
  ``scale`` (fp32, one or one per output channel) [+ ``zero_point`` (int32)]; ``w = s (q - z)``
  (int-k PTQ/QAT, fixed point). The entry's ``quant`` holds ``bits``, ``signed`` and ``axis`` (null or 0).
* ``binary``: ``signs`` (1 bit per weight) + ``scale``; ``w = s (+1 or -1)``.
* ``ternary``: ``trits`` (2 bits per weight: bit 1 = sign, bit 0 = non-zero) + ``scale``; ``w = s t``,
  ``t`` in {+0, +1, -0, -1}, so that even the sign of a zero comes back.
* ``cast``: ``data`` in float16 or bfloat16 (its part's ``dtype``), decoded to the float32 tensor.

The values, the centroids and the raw bytes are stored bit for bit, and the pruned entries decode to
``+0.0`` as the mask parametrization produces them, so the decoded tensor equals the packed one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from .._state import WeightState
from ..errors import FormatError, ModelError
from . import sparse
from ._bits import bit_width
from ._format import int_field
from ._schema import DTYPES, FLOATS, MAX_CODE_BITS, MAX_CODEBOOK, PARTS, QUANT, TensorSpec, check_entry
from ._streams import code_stream, decode_stream

log = logging.getLogger(__name__)

_BITS_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float64: torch.int64}
_FLOATS = FLOATS
ENCODINGS = {name: tuple(parts) for name, parts in PARTS.items()}


def dtype_name(dtype: torch.dtype, name: str) -> str:
    for key, (dt, _) in DTYPES.items():
        if dt == dtype:
            return key
    raise ModelError(f"{name}: dtype {dtype} cannot be packed (supported: {', '.join(DTYPES)})")


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    elif t.dtype == torch.bool:
        t = t.view(torch.uint8)
    return t.numpy().astype(DTYPES[dtype_name(t.dtype, "")][1], copy=False).tobytes()


def bytes_tensor(data: memoryview, dtype: str, count: int, where: str) -> torch.Tensor:
    """1-d tensor of ``count`` elements of ``dtype`` from exactly ``count * itemsize`` bytes."""
    tdt, ndt = DTYPES[dtype]
    size = np.dtype(ndt).itemsize
    if len(data) != count * size:
        raise FormatError(f"{where}: {len(data)} bytes do not hold {count} {dtype} values")
    arr = np.frombuffer(data, dtype=ndt, count=count).astype(np.dtype(ndt).newbyteorder("="))
    t = torch.from_numpy(arr)
    if dtype == "bfloat16":
        return t.view(torch.bfloat16)
    if dtype == "bool":
        if count and int(arr.max()) > 1:
            raise FormatError(f"{where}: a bool value is neither 0 nor 1")
        return t.to(torch.bool)
    return t


@dataclass
class Encoded:
    """One tensor's header entry and its parts' bytes (in the entry's part order)."""

    entry: dict[str, Any]
    parts: list[tuple[str, bytes]]

    @property
    def nbytes(self) -> int:
        return sum(len(b) for _, b in self.parts)


def _positions_part(positions: np.ndarray, numel: int, coding: str) -> tuple[dict[str, Any], bytes]:
    choice = sparse.choose_gap_bits(positions, numel, coding)
    gaps = sparse.encode_positions(positions, numel, choice.bits)
    s = code_stream(gaps.symbols, choice.bits, coding)
    return s.describe(), s.data


def _encode_sparse(name: str, t: torch.Tensor, positions: np.ndarray, masked: bool, coding: str, base: dict) -> Encoded:
    pdesc, pdata = _positions_part(positions, t.numel(), coding)
    values = t.reshape(-1)[torch.from_numpy(positions)]
    vdesc = {"dtype": base["dtype"], "count": int(positions.size)}
    entry = dict(base, encoding="sparse", masked=masked, kept=int(positions.size), parts={"positions": pdesc, "values": vdesc})
    return Encoded(entry, [("positions", pdata), ("values", tensor_bytes(values))])


def _encode_codebook(name: str, t: torch.Tensor, ws: WeightState, coding: str, base: dict) -> Encoded | None:
    codebook = ws.codebook.reshape(-1).to(torch.float32)
    indices = ws.indices.reshape(-1).to(torch.int64)
    k = codebook.numel()
    if t.dtype != torch.float32 or indices.numel() != t.numel() or not 1 <= k <= MAX_CODEBOOK:
        return None
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= k):
        return None
    dense = codebook[indices]
    positions = None
    if ws.mask is not None:
        keep = ws.mask.reshape(-1).to(torch.bool)
        dense = torch.where(keep, dense, torch.zeros((), dtype=dense.dtype))
        positions = sparse.positions_from_mask(keep.numpy())
    if not torch.equal(dense.view(torch.int32), t.reshape(-1).view(torch.int32)):
        return None
    bits = bit_width(k - 1)
    cb_desc = {"dtype": "float32", "count": k}
    if positions is None:
        s = code_stream(indices.numpy(), bits, coding)
        entry = dict(base, encoding="codebook", masked=False, kept=t.numel(), parts={"codebook": cb_desc, "indices": s.describe()})
        return Encoded(entry, [("codebook", tensor_bytes(codebook)), ("indices", s.data)])
    pdesc, pdata = _positions_part(positions, t.numel(), coding)
    s = code_stream(indices.numpy()[positions], bits, coding)
    parts = {"positions": pdesc, "codebook": cb_desc, "indices": s.describe()}
    entry = dict(base, encoding="sparse_codebook", masked=True, kept=int(positions.size), parts=parts)
    return Encoded(entry, [("positions", pdata), ("codebook", tensor_bytes(codebook)), ("indices", s.data)])


def encode_tensor(name: str, tensor: torch.Tensor, ws: WeightState | None, coding: str, hint: Any = None) -> Encoded:
    """The smallest exact encoding of ``tensor`` given its compression structure ``ws``.

    A codebook gives ``codebook``/``sparse_codebook``, a mask gives ``sparse`` (positions from the mask),
    a plain tensor ``raw`` or, when mostly zeros and smaller so, ``sparse`` over its non-zero bit patterns.
    A structure that does not reproduce the tensor exactly falls back to the plain path with a warning.
    A quantization ``hint`` (:class:`netshrink.quantize._storage.StorageHint`) adds a quantized candidate
    (:mod:`netshrink.pack._qtensors`), kept when it decodes exactly and is the smallest.
    """
    t = tensor.detach().cpu().contiguous()
    dname = dtype_name(t.dtype, name)
    base = {"name": name, "shape": list(t.shape), "dtype": dname, "nonzeros": int(torch.count_nonzero(t))}
    if hint is not None:
        from ._qtensors import encode_quant

        qenc = encode_quant(name, t, hint, coding, base)
        if qenc is None:
            log.warning("%s: the %s storage does not reproduce the weight exactly; packing it in float", name, hint.kind)
        else:
            other = encode_tensor(name, tensor, ws, coding)
            return qenc if qenc.nbytes <= other.nbytes else other
    if ws is not None and ws.codebook is not None:
        enc = _encode_codebook(name, t, ws, coding, base)
        if enc is not None:
            return enc
        log.warning("%s: codebook and indices do not reproduce the weight exactly; packing it without sharing", name)
    if ws is not None and ws.mask is not None and dname in _FLOATS and ws.mask.shape == t.shape:
        keep = ws.mask.reshape(-1).to(torch.bool)
        outside = t.reshape(-1).view(_BITS_VIEW[t.dtype])[~keep]
        if not bool(torch.any(outside != 0)):
            enc = _encode_sparse(name, t, sparse.positions_from_mask(keep.numpy()), True, coding, base)
            from ._groupq import encode_nm  # N:M masks (issue 15)

            nm = encode_nm(name, t, ws.mask.to(torch.bool), coding, base)
            return nm if nm is not None and nm.nbytes <= enc.nbytes else enc
        log.warning("%s: weight is non-zero outside its mask; packing it without the mask", name)
    raw = Encoded(dict(base, encoding="raw", masked=False, kept=t.numel(), parts={"data": {"dtype": dname, "count": t.numel()}}), [("data", tensor_bytes(t))])
    if dname in _FLOATS and t.numel() >= 16:
        bits = t.reshape(-1).view(_BITS_VIEW[t.dtype]) != 0
        if int(bits.sum()) * 2 <= t.numel():
            cand = _encode_sparse(name, t, np.flatnonzero(bits.numpy()).astype(np.int64), False, coding, base)
            if cand.nbytes < raw.nbytes:
                return cand
    return raw


@dataclass
class Decoded:
    """A decoded tensor and, for ``restore``, its compression structure."""

    tensor: torch.Tensor
    mask: torch.Tensor | None = None
    codebook: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    quant: dict[str, Any] | None = None  # affine: scale, zero_point, bits, signed, axis (for restore)


PartFn = Callable[[str], tuple[dict[str, Any], memoryview, str]]


def _decode_raw(spec: TensorSpec, part: PartFn) -> Decoded:
    desc, data, w = part("data")
    return Decoded(bytes_tensor(data, spec.dtype, spec.numel, w).reshape(spec.shape))


def _positions(spec: TensorSpec, part: PartFn) -> np.ndarray:
    desc, data, w = part("positions")
    gaps = decode_stream(desc, data, w, sparse.MAX_GAP_BITS, spec.numel)
    try:
        return sparse.decode_positions(gaps, int(desc["bits"]), spec.numel, spec.kept)
    except FormatError as exc:
        raise FormatError(f"{w}: {exc}") from None


def _decode_sparse(spec: TensorSpec, part: PartFn) -> Decoded:
    positions = _positions(spec, part)
    desc, data, w = part("values")
    values = bytes_tensor(data, spec.dtype, spec.kept, w)
    dense = torch.zeros(spec.numel, dtype=values.dtype)
    pos_t = torch.from_numpy(positions)
    dense[pos_t] = values
    mask = None
    if spec.masked:
        mask = torch.zeros(spec.numel, dtype=torch.bool)
        mask[pos_t] = True
        mask = mask.reshape(spec.shape)
    return Decoded(dense.reshape(spec.shape), mask=mask)


def _decode_codebook(spec: TensorSpec, part: PartFn) -> Decoded:
    positions = _positions(spec, part) if spec.encoding == "sparse_codebook" else None
    desc, data, w = part("codebook")
    k = int_field(desc, "count", w, 1, MAX_CODEBOOK)
    codebook = bytes_tensor(data, "float32", k, w)
    desc, data, w = part("indices")
    n_idx = spec.numel if positions is None else spec.kept
    idx = decode_stream(desc, data, w, MAX_CODE_BITS, n_idx)
    if idx.size != n_idx:
        raise FormatError(f"{w}: {idx.size} indices, expected {n_idx}")
    if idx.size and int(idx.max()) >= k:
        raise FormatError(f"{w}: an index exceeds the codebook of {k} entries")
    idx_t = torch.from_numpy(idx)
    if positions is None:
        return Decoded(codebook[idx_t].reshape(spec.shape), codebook=codebook, indices=idx_t.reshape(spec.shape))
    pos_t = torch.from_numpy(positions)
    dense = torch.zeros(spec.numel, dtype=torch.float32)
    dense[pos_t] = codebook[idx_t]
    full_idx = torch.zeros(spec.numel, dtype=torch.int64)
    full_idx[pos_t] = idx_t
    mask = torch.zeros(spec.numel, dtype=torch.bool)
    mask[pos_t] = True
    return Decoded(dense.reshape(spec.shape), mask.reshape(spec.shape), codebook, full_idx.reshape(spec.shape))


def _decode_quant(spec: TensorSpec, part: PartFn) -> Decoded:
    from ._qtensors import decode_quant

    tensor, quant = decode_quant(spec, part)
    return Decoded(tensor, quant=quant)


@dataclass(frozen=True)
class Codec:
    """One encoding: its parts (``"array"`` or ``"stream"``, in section order), the header check
    (:func:`netshrink.pack._schema.check_entry`, which reads :data:`PARTS`) and its decoder. Encoding
    is one function for all (:func:`encode_tensor`), since it chooses the encoding."""

    parts: dict[str, str]
    decode: Callable[[TensorSpec, PartFn], Decoded]
    check: Callable[..., TensorSpec] = check_entry


#: the codec table: encoding name -> parts, check and decode
CODECS: dict[str, Codec] = {
    "raw": Codec(PARTS["raw"], _decode_raw),
    "sparse": Codec(PARTS["sparse"], _decode_sparse),
    "codebook": Codec(PARTS["codebook"], _decode_codebook),
    "sparse_codebook": Codec(PARTS["sparse_codebook"], _decode_codebook),
    **{name: Codec(PARTS[name], _decode_quant) for name in QUANT},
}
from ._groupq import groupq_codecs  # noqa: E402  (group-quantized weights, issue 15)

CODECS.update(groupq_codecs())


def decode_tensor(spec: TensorSpec, views: list[memoryview], where: str) -> Decoded:
    """Dense tensor of ``spec`` (checked by :func:`check_entry`) from its sections; the decoders check
    every count against the section sizes."""
    at = f"{where}: tensor {spec.name!r}"

    def part(p: str) -> tuple[dict[str, Any], memoryview, str]:
        return spec.parts[p], views[spec.parts[p]["section"]], f"{at}, section '{spec.name}/{p}'"

    return CODECS[spec.encoding].decode(spec, part)
