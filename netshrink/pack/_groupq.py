"""Group-quantized weights in .nsk at their true bit widths (GPTQ, RTN, AWQ, SparseGPT + bits).

Encodings (one header entry per tensor; every part one section):

* ``groupq``: ``codes`` — a stream of the ``(out, in)`` weight's codes ``q`` in ``[0, 2^bits)``, ``bits``
  wide (bit-packed, or Huffman where smaller); ``scale`` — float32, one per row and group;
  ``zero`` — a stream of the integer zero points, ``bits`` wide, one per row and group. The weight is
  ``w_ij = s_{i,g} (q_ij - z_{i,g})`` with ``g = j // group_size``.
* ``groupq_awq``: the same plus ``in_scale`` — float32, one per input column (AWQ): ``w_ij /= a_j``.
* ``nm_sparse``: an N:M-pruned weight (``n`` zeros in every ``m`` consecutive weights of a row; SparseGPT,
  Wanda 2:4): ``slots`` — a stream of each kept weight's position inside its group of ``m``,
  ``ceil(log2 m)`` bits wide (1 bit per weight for 2:4), strictly increasing inside a group; ``values``
  — the kept weights in their own dtype. The mask comes back with the tensor.

The entry's ``groupq`` field holds ``bits`` (2-8) and ``group_size`` (divides the input width). The
check validates every field, count and stream width against the shape before anything is decoded;
the decoder computes the weights with the operations of
:meth:`netshrink.quantize.gptq.GroupQuant.dequantize`, and the encoder keeps the encoding only when
the decoded tensor equals the weight bit for bit. A SparseGPT + bits weight stores its pruned entries
as the zero-point code, which decodes to exactly +0.0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import FormatError
from ._format import int_field
from ._schema import DTYPES, MAX_CODE_BITS, MAX_DIM, MAX_NAME_CHARS, TensorSpec, _check_array, _check_stream, _keys, _section_bytes, _str_in, field

GROUPQ_PARTS: dict[str, dict[str, str]] = {
    "groupq": {"codes": "stream", "scale": "array", "zero": "stream"},
    "groupq_awq": {"codes": "stream", "scale": "array", "zero": "stream", "in_scale": "array"},
}
_ENTRY_KEYS = {"name", "shape", "dtype", "encoding", "masked", "nonzeros", "kept", "parts", "groupq"}
NM_PARTS = {"slots": "stream", "values": "array"}
ENCODINGS = (*GROUPQ_PARTS, "nm_sparse")


@dataclass(frozen=True)
class GroupHint:
    """Storage hint of a weight that carries group codes (``module.netshrink_groupq``)."""

    gq: Any
    conv1d: bool = False
    kind: str = "groupq"


def groupq_hints(model: nn.Module) -> dict[str, GroupHint]:
    """A :class:`GroupHint` per Linear or Embedding weight with group codes, by plain state_dict name."""
    from ..quantize._storage import StorageHint

    out: dict[str, Any] = {}
    for name, m in model.named_modules():
        gq = getattr(m, "netshrink_groupq", None)
        key = f"{name}.weight" if name else "weight"
        if gq is not None and isinstance(m, (nn.Linear, nn.Embedding)):
            out[key] = GroupHint(gq)
        elif gq is not None and type(m).__name__ == "Conv1D":  # transformers' GPT-2 layer: weight (in, out), codes (out, in)
            out[key] = GroupHint(gq, conv1d=True)
        elif type(m).__name__ == "SmoothQuantLinear" and isinstance(getattr(m, "w_step", None), torch.Tensor):
            # SmoothQuant's int8 rows: the existing per-channel affine encoding (checked exact by its encoder)
            out[key] = StorageHint("affine", scale=m.w_step, zero_point=torch.zeros_like(m.w_step, dtype=torch.int32), bits=8,
                                   signed=True, axis=0)
    return out


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int, in_scale: torch.Tensor | None) -> torch.Tensor:
    """``s (q - z)`` [``/ a``] in float32, as :meth:`GroupQuant.dequantize` computes it."""
    s = scale.float().repeat_interleave(group, dim=1)
    z = zero.float().repeat_interleave(group, dim=1)
    w = s * (q.float() - z)
    return w if in_scale is None else w / in_scale.float()[None, :]


def encode_groupq(name: str, t: torch.Tensor, hint: GroupHint, coding: str, base: dict) -> Any:
    """The ``groupq`` / ``groupq_awq`` encoding of ``t``, or None when the codes do not reproduce it exactly."""
    from ._streams import code_stream
    from ._tensors import Encoded, tensor_bytes

    gq = hint.gq
    q, scale, zero = gq.q, gq.scale, gq.zero
    bits, group = int(gq.bits), int(gq.group_size)
    if t.dim() == 2 and hint.conv1d:
        t = t.t()  # the codes index the (out, in) matrix; the stored tensor is its transpose
    if t.dtype != torch.float32 or t.dim() != 2 or tuple(q.shape) != tuple(t.shape) or not 2 <= bits <= 8:
        return None
    rows, cols = t.shape
    if group < 1 or cols % group or tuple(scale.shape) != (rows, cols // group) or tuple(zero.shape) != (rows, cols // group):
        return None
    qn, zn = q.to(torch.int64), zero.to(torch.int64)
    if int(qn.min()) < 0 or int(qn.max()) >= 1 << bits or int(zn.min()) < 0 or int(zn.max()) >= 1 << bits:
        return None
    a = None if gq.in_scale is None else gq.in_scale.detach().float().contiguous()
    w = dequantize(qn, scale.float(), zn, group, a)
    if not torch.equal(w.view(torch.int32), t.contiguous().view(torch.int32)):
        return None
    cs = code_stream(qn.numpy().reshape(-1), bits, coding)
    zs = code_stream(zn.numpy().reshape(-1), bits, coding)
    sc = scale.detach().float().contiguous().reshape(-1)
    parts = {"codes": cs.describe(), "scale": {"dtype": "float32", "count": sc.numel()}, "zero": zs.describe()}
    data = [("codes", cs.data), ("scale", tensor_bytes(sc)), ("zero", zs.data)]
    encoding = "groupq"
    if a is not None:
        encoding = "groupq_awq"
        parts["in_scale"] = {"dtype": "float32", "count": cols}
        data.append(("in_scale", tensor_bytes(a)))
    meta = {"bits": bits, "group_size": group, **({"transposed": True} if hint.conv1d else {})}
    entry = dict(base, encoding=encoding, masked=False, kept=t.numel(), parts=parts, groupq=meta)
    return Encoded(entry, data)


def _slot_bits(m: int) -> int:
    return max(1, (m - 1).bit_length())


def encode_nm(name: str, t: torch.Tensor, keep: torch.Tensor, coding: str, base: dict) -> Any:
    """The ``nm_sparse`` encoding of ``t`` under the keep-mask ``keep`` when the mask is N:M along rows, else None."""
    from ._streams import code_stream
    from ._tensors import Encoded, tensor_bytes

    if t.dim() < 2 or t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None
    cols = t.shape[-1]
    k = keep.reshape(-1, cols)
    for m in (4, 8, 16):
        if cols % m:
            continue
        per = k.reshape(-1, cols // m, m).sum(-1)
        kept_per = int(per.reshape(-1)[0]) if per.numel() else 0
        if per.numel() and 0 < kept_per < m and bool((per == kept_per).all()):
            break
    else:
        return None
    n = m - kept_per
    if bool(torch.any(t.reshape(-1)[~keep.reshape(-1)] != 0)):
        return None
    slots = k.reshape(-1, m).nonzero()[:, 1].numpy()
    st = code_stream(slots, _slot_bits(m), coding)
    values = t.reshape(-1)[keep.reshape(-1)]
    entry = dict(base, encoding="nm_sparse", masked=True, kept=int(values.numel()),
                 parts={"slots": st.describe(), "values": {"dtype": base["dtype"], "count": int(values.numel())}}, nm={"n": n, "m": m})
    return Encoded(entry, [("slots", st.data), ("values", tensor_bytes(values))])


def _check_nm_entry(entry: dict, where: str, sections: Sequence[int]) -> TensorSpec:
    name = field(entry, "name", str, where)
    where = f"{where} ({name[:80]!r})"
    _keys(entry, {"name", "shape", "dtype", "encoding", "masked", "nonzeros", "kept", "parts", "nm"}, set(), where)
    shape = field(entry, "shape", list, where)
    if not 2 <= len(shape) <= 8:
        raise FormatError(f"{where}.shape: nm_sparse needs 2 to 8 dimensions, got {len(shape)}")
    dims = tuple(int_field({f"[{i}]": d}, f"[{i}]", f"{where}.shape", 1, MAX_DIM) for i, d in enumerate(shape))
    numel = math.prod(dims)
    dtype = _str_in(entry, "dtype", ("float32", "float16", "bfloat16"), where)
    nm = field(entry, "nm", dict, where)
    _keys(nm, {"n", "m"}, set(), f"{where}.nm")
    m = int_field(nm, "m", f"{where}.nm", 2, 16)
    n = int_field(nm, "n", f"{where}.nm", 1, m - 1)
    if dims[-1] % m:
        raise FormatError(f"{where}.nm.m: {m} does not divide the last dimension {dims[-1]}")
    kept = int_field(entry, "kept", where, 0, numel)
    if kept != numel // m * (m - n):
        raise FormatError(f"{where}.kept: {n}:{m} keeps {numel // m * (m - n)} of {numel}, header says {kept}")
    nonzeros = int_field(entry, "nonzeros", where, 0, kept)
    if field(entry, "masked", bool, where) is not True:
        raise FormatError(f"{where}.masked: nm_sparse always stores its mask")
    parts = field(entry, "parts", dict, where)
    if set(parts) != set(NM_PARTS):
        raise FormatError(f"{where}.parts: nm_sparse needs parts {list(NM_PARTS)}, got {sorted(map(str, parts))[:8]}")
    _check_stream(parts["slots"], f"{where}.parts.slots", _section_bytes(parts["slots"], f"{where}.parts.slots", sections),
                  MAX_CODE_BITS, (kept, kept), _slot_bits(m))
    _section_bytes(parts["values"], f"{where}.parts.values", sections)
    _check_array(parts["values"], f"{where}.parts.values", (dtype,), (kept, kept))
    return TensorSpec(name, dims, dtype, "nm_sparse", True, nonzeros, kept, parts, {"n": n, "m": m})


def _decode_nm(spec: TensorSpec, part: Any) -> Any:
    from ._streams import decode_stream
    from ._tensors import Decoded, bytes_tensor

    n, m = int(spec.quant["n"]), int(spec.quant["m"])
    desc, data, w = part("slots")
    slots = decode_stream(desc, data, w, _slot_bits(m), spec.kept)
    if slots.size != spec.kept:
        raise FormatError(f"{w}: {slots.size} slots, expected {spec.kept}")
    sl = torch.from_numpy(slots.astype(np.int64)).reshape(-1, m - n)
    if sl.numel() and (int(sl.max()) >= m or (m - n > 1 and bool((sl[:, 1:] <= sl[:, :-1]).any()))):
        raise FormatError(f"{w}: a slot lies outside its group of {m} or repeats")
    desc, data, w = part("values")
    values = bytes_tensor(data, spec.dtype, spec.kept, w)
    mask = torch.zeros(spec.numel // m, m, dtype=torch.bool)
    mask.scatter_(1, sl, True)
    mask = mask.reshape(-1)
    dense = torch.zeros(spec.numel, dtype=values.dtype)
    dense[mask] = values
    return Decoded(dense.reshape(spec.shape), mask=mask.reshape(spec.shape))


def check_groupq_entry(entry: Any, where: str, sections: Sequence[int]) -> TensorSpec:
    """Validate a ``groupq`` / ``groupq_awq`` / ``nm_sparse`` header entry (types, bounds, counts, stream widths)."""
    if not isinstance(entry, dict):
        raise FormatError(f"{where}: expected a mapping")
    if entry.get("encoding") == "nm_sparse":
        return _check_nm_entry(entry, where, sections)
    name = field(entry, "name", str, where)
    if not 0 < len(name) <= MAX_NAME_CHARS:
        raise FormatError(f"{where}.name: expected 1 to {MAX_NAME_CHARS} characters")
    where = f"{where} ({name[:80]!r})"
    encoding = _str_in(entry, "encoding", tuple(GROUPQ_PARTS), where)
    _keys(entry, _ENTRY_KEYS, set(), where)
    shape = field(entry, "shape", list, where)
    if len(shape) != 2:
        raise FormatError(f"{where}.shape: {encoding} needs a 2-D weight, got {len(shape)} dimensions")
    rows, cols = (int_field({f"[{i}]": d}, f"[{i}]", f"{where}.shape", 1, MAX_DIM) for i, d in enumerate(shape))
    g = field(entry, "groupq", dict, where)
    _keys(g, {"bits", "group_size"}, {"transposed"}, f"{where}.groupq")
    transposed = field(g, "transposed", bool, f"{where}.groupq") if "transposed" in g else False
    if transposed:  # the codes index the transposed matrix (a GPT-2 Conv1D weight stored (in, out))
        rows, cols = cols, rows
    dtype = _str_in(entry, "dtype", tuple(DTYPES), where)
    if dtype != "float32":
        raise FormatError(f"{where}.dtype: {encoding} needs float32, got {dtype}")
    numel = rows * cols
    kept = int_field(entry, "kept", where, numel, numel)
    nonzeros = int_field(entry, "nonzeros", where, 0, numel)
    masked = field(entry, "masked", bool, where)
    if masked:
        raise FormatError(f"{where}.masked: {encoding} stores no mask")
    bits = int_field(g, "bits", f"{where}.groupq", 2, 8)
    group = int_field(g, "group_size", f"{where}.groupq", 1, cols)
    if cols % group:
        raise FormatError(f"{where}.groupq.group_size: {group} does not divide the input width {cols}")
    groups = rows * (cols // group)
    parts = field(entry, "parts", dict, where)
    want = GROUPQ_PARTS[encoding]
    if set(parts) != set(want):
        raise FormatError(f"{where}.parts: {encoding} needs parts {list(want)}, got {sorted(map(str, parts))[:8]}")
    for pname in want:
        desc, pw = parts[pname], f"{where}.parts.{pname}"
        nbytes = _section_bytes(desc, pw, sections)
        if pname == "codes":
            _check_stream(desc, pw, nbytes, MAX_CODE_BITS, (numel, numel), bits)
        elif pname == "zero":
            _check_stream(desc, pw, nbytes, MAX_CODE_BITS, (groups, groups), bits)
        elif pname == "scale":
            _check_array(desc, pw, ("float32",), (groups, groups))
        else:
            _check_array(desc, pw, ("float32",), (cols, cols))
    shape_ = (cols, rows) if transposed else (rows, cols)
    return TensorSpec(name, shape_, dtype, encoding, False, nonzeros, kept, parts, {"bits": bits, "group_size": group, "transposed": transposed})


def _decode_groupq(spec: TensorSpec, part: Any) -> Any:
    from ._streams import decode_stream
    from ._tensors import Decoded, bytes_tensor

    transposed = bool(spec.quant.get("transposed", False))
    rows, cols = spec.shape[::-1] if transposed else spec.shape
    bits, group = int(spec.quant["bits"]), int(spec.quant["group_size"])
    groups = rows * (cols // group)
    desc, data, w = part("codes")
    q = decode_stream(desc, data, w, bits, spec.numel)
    if q.size != spec.numel:
        raise FormatError(f"{w}: {q.size} codes, expected {spec.numel}")
    desc, data, w = part("zero")
    z = decode_stream(desc, data, w, bits, groups)
    if z.size != groups:
        raise FormatError(f"{w}: {z.size} zero points, expected {groups}")
    desc, data, w = part("scale")
    s = bytes_tensor(data, "float32", groups, w)
    a = None
    if spec.encoding == "groupq_awq":
        desc, data, w = part("in_scale")
        a = bytes_tensor(data, "float32", cols, w)
    qt = torch.from_numpy(q.astype(np.int64)).reshape(rows, cols)
    zt = torch.from_numpy(z.astype(np.int64)).reshape(rows, cols // group)
    w = dequantize(qt, s.reshape(rows, cols // group), zt, group, a)
    return Decoded(w.t().contiguous() if transposed else w)


def groupq_codecs() -> dict[str, Any]:
    """The codec table entries of the group encodings (see :data:`netshrink.pack._tensors.CODECS`)."""
    from ._tensors import Codec

    table = {name: Codec(parts, _decode_groupq, check_groupq_entry) for name, parts in GROUPQ_PARTS.items()}
    table["nm_sparse"] = Codec(NM_PARTS, _decode_nm, check_groupq_entry)
    return table


__all__ = ["ENCODINGS", "GROUPQ_PARTS", "GroupHint", "check_groupq_entry", "encode_groupq", "encode_nm", "groupq_codecs", "groupq_hints"]
