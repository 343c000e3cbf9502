"""The quantized tensor encodings of .nsk: affine integer codes, binary and ternary signs, half casts.

Formats (parts and fields in :mod:`netshrink.pack._tensors`):

* ``affine``/``affine_zp``: ``w = s (q - z)`` with ``q = sym + qmin`` from a stream of ``bits``-bit
  symbols (Jacob et al., CVPR 2018, eq. 1), ``qmin = -2^(bits-1)`` signed, ``0`` unsigned; ``s`` and
  ``z`` per tensor or per output channel (axis 0). The decoder computes ``s (q - z)`` in float32 with
  the operations of :func:`netshrink.quantize.affine.fake_quantize`, so the values are bit-identical.
* ``binary``: one bit per weight (its sign; Courbariaux et al. 2015, Rastegari et al. 2016) and ``α``;
  ``w = α (±1)``: 1/32 of the fp32 bytes plus the scales.
* ``ternary``: two bits per weight, ``sign << 1 | nonzero`` (Li & Liu 2016), and ``α``; ``w = α t``.
* ``cast``: the float16/bfloat16 bytes of a float32 tensor whose values are exactly such numbers.

The encoder only proposes: every candidate is decoded and compared with the tensor, and dropped
(``None``) unless equal -- bit for bit for binary, ternary and cast; as numbers for affine (a
fixed-point ``-0.0`` comes back as ``+0.0``).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from ..errors import FormatError
from ._format import int_field
from ._streams import code_stream, decode_stream
from ._tensors import MAX_CODE_BITS, Encoded, TensorSpec, bytes_tensor, tensor_bytes

_HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_TRIT = torch.tensor([0.0, 1.0, -0.0, -1.0], dtype=torch.float32)


def _shape_for(scale: torch.Tensor, t: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None:
        return scale.reshape(())
    return scale.reshape((-1,) + (1,) * (t.dim() - 1))


def _qmin(bits: int, signed: bool) -> int:
    return -(1 << (bits - 1)) if signed else 0


def affine_values(sym: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, signed: bool, axis: int | None) -> torch.Tensor:
    """``s (q - z)`` in float32 from symbols ``q - qmin`` (already in the tensor's shape)."""
    s = _shape_for(scale.to(torch.float32), sym, axis)
    z = _shape_for(zero.to(torch.float32), sym, axis)
    q = (sym.to(torch.int64) + _qmin(bits, signed)).to(torch.float32)
    return s * (q - z)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def _encode_affine(t: torch.Tensor, hint: Any, coding: str, base: dict) -> Encoded | None:
    bits, signed, axis = int(hint.bits), bool(hint.signed), hint.axis
    if not 1 <= bits <= MAX_CODE_BITS or axis not in (None, 0) or (axis == 0 and t.dim() == 0):
        return None
    scale = hint.scale.detach().cpu().to(torch.float32).reshape(-1 if axis == 0 else ())
    zero = hint.zero_point.detach().cpu().to(torch.int32).reshape(scale.shape)
    if axis == 0 and scale.numel() != t.shape[0]:
        return None
    if not bool(torch.all(torch.isfinite(scale) & (scale > 0))):
        return None
    qmin, qmax = _qmin(bits, signed), ((1 << (bits - 1)) - 1 if signed else (1 << bits) - 1)
    s, z = _shape_for(scale, t, axis), _shape_for(zero.to(torch.float32), t, axis)
    q = torch.round(t / s) + z
    if not bool(torch.all(torch.isfinite(q))) or (q.numel() and (float(q.min()) < qmin or float(q.max()) > qmax)):
        return None
    sym = (q - qmin).to(torch.int64)
    if not torch.equal(affine_values(sym, scale, zero, bits, signed, axis), t):
        return None
    stream = code_stream(sym.reshape(-1).numpy(), bits, coding)
    count = int(scale.numel())
    parts = {"codes": stream.describe(), "scale": {"dtype": "float32", "count": count}}
    data = [("codes", stream.data), ("scale", tensor_bytes(scale))]
    encoding = "affine"
    if bool(torch.any(zero != 0)):
        encoding = "affine_zp"
        parts["zero_point"] = {"dtype": "int32", "count": count}
        data.append(("zero_point", tensor_bytes(zero)))
    entry = dict(base, encoding=encoding, masked=False, kept=t.numel(), parts=parts,
                 quant={"bits": bits, "signed": signed, "axis": axis})
    return Encoded(entry, data)


def _magnitude_scale(t: torch.Tensor, nonzero_only: bool) -> tuple[torch.Tensor, int | None] | None:
    """``(α, axis)`` such that every (non-zero) magnitude of ``t`` is ``α`` per tensor, else per row."""
    a = t.abs()
    sel = a != 0 if nonzero_only else torch.ones_like(a, dtype=torch.bool)
    alpha = a.max() if a.numel() else torch.zeros(())
    if bool(torch.all((a == alpha) | ~sel)):
        return alpha.reshape(()), None
    if t.dim() == 0 or t.shape[0] == 0:
        return None
    rows = a.reshape(t.shape[0], -1)
    alpha = rows.amax(dim=1) if rows.shape[1] else torch.zeros(t.shape[0])
    if bool(torch.all((rows == alpha[:, None]) | ~sel.reshape(rows.shape))):
        return alpha, 0
    return None


def _encode_signs(t: torch.Tensor, kind: str, coding: str, base: dict) -> Encoded | None:
    found = _magnitude_scale(t, nonzero_only=kind == "ternary")
    if found is None:
        return None
    alpha, axis = found
    neg = torch.signbit(t).to(torch.int64)
    if kind == "binary":
        sym, bits, pname = neg, 1, "signs"
    else:
        sym, bits, pname = neg * 2 + (t != 0).to(torch.int64), 2, "trits"
    if not _bits_equal(sign_values(sym, alpha, kind, axis), t):
        return None
    stream = code_stream(sym.reshape(-1).numpy(), bits, coding)
    parts = {pname: stream.describe(), "scale": {"dtype": "float32", "count": int(alpha.numel())}}
    entry = dict(base, encoding=kind, masked=False, kept=t.numel(), parts=parts, quant={"axis": axis})
    return Encoded(entry, [(pname, stream.data), ("scale", tensor_bytes(alpha.to(torch.float32)))])


def sign_values(sym: torch.Tensor, alpha: torch.Tensor, kind: str, axis: int | None) -> torch.Tensor:
    """``α (±1)`` (binary, ``sym`` = sign bit) or ``α t`` (ternary, ``sym`` = sign << 1 | nonzero)."""
    a = _shape_for(alpha.to(torch.float32), sym, axis)
    if kind == "binary":
        u = torch.where(sym.to(torch.bool), -1.0, 1.0).to(torch.float32)
    else:
        u = _TRIT[sym.to(torch.int64)]
    return a * u


def _encode_cast(t: torch.Tensor, dtype: str, base: dict) -> Encoded | None:
    if dtype not in _HALF:
        return None
    h = t.to(_HALF[dtype])
    if not _bits_equal(h.to(torch.float32), t):
        return None
    entry = dict(base, encoding="cast", masked=False, kept=t.numel(), parts={"data": {"dtype": dtype, "count": t.numel()}})
    return Encoded(entry, [("data", tensor_bytes(h))])


def encode_quant(name: str, t: torch.Tensor, hint: Any, coding: str, base: dict) -> Encoded | None:
    """The ``hint.kind`` encoding of the float32 tensor ``t``, or None when it does not reproduce ``t``."""
    if t.dtype != torch.float32:
        return None
    if hint.kind == "affine":
        return _encode_affine(t, hint, coding, base)
    if hint.kind in ("binary", "ternary"):
        return _encode_signs(t, hint.kind, coding, base)
    if hint.kind == "cast":
        return _encode_cast(t, hint.dtype, base)
    if hint.kind == "groupq":  # GPTQ / RTN / AWQ codes (issue 15)
        from ._groupq import encode_groupq

        return encode_groupq(name, t, hint, coding, base)
    return None


# ---------------------------------------------------------------------------------------------- reading


def decode_quant(spec: TensorSpec, part: Callable[[str], tuple[dict[str, Any], memoryview, str]]) -> tuple[torch.Tensor, dict[str, Any] | None]:
    """The float32 tensor of a quantized ``spec`` and, for ``affine``, its quantizer (``scale``, ``zero_point``,
    ``bits``, ``signed``, ``axis``); every count, width and value range is checked."""
    numel, q = spec.numel, spec.quant or {}
    if spec.encoding == "cast":
        desc, data, w = part("data")
        if int_field(desc, "count", w) != numel:
            raise FormatError(f"{w}: count disagrees with the tensor")
        return bytes_tensor(data, desc["dtype"], numel, w).to(torch.float32).reshape(spec.shape), None
    axis = q["axis"]
    channels = 1 if axis is None else spec.shape[0]
    desc, data, w = part("scale")
    if desc.get("dtype") != "float32" or int_field(desc, "count", w) != channels:
        raise FormatError(f"{w}: expected {channels} float32 scales")
    scale = bytes_tensor(data, "float32", channels, w)
    scale = scale.reshape(()) if axis is None else scale
    if not bool(torch.all(torch.isfinite(scale))):
        raise FormatError(f"{w}: a scale is not finite")
    stream = "codes" if spec.encoding.startswith("affine") else ("signs" if spec.encoding == "binary" else "trits")
    desc, data, w = part(stream)
    if int_field(desc, "count", w) != numel:
        raise FormatError(f"{w}: {desc['count']} symbols, expected {numel}")
    sym = torch.from_numpy(np.ascontiguousarray(decode_stream(desc, data, w, MAX_CODE_BITS, numel), dtype=np.int64)).reshape(spec.shape)
    if spec.encoding in ("binary", "ternary"):
        return sign_values(sym, scale, spec.encoding, axis), None
    if not bool(torch.all(scale > 0)):
        raise FormatError(f"{w}: a scale is not positive")
    bits, signed = q["bits"], q["signed"]
    zero = torch.zeros_like(scale, dtype=torch.int32)
    if spec.encoding == "affine_zp":
        desc, data, w = part("zero_point")
        if desc.get("dtype") != "int32" or int_field(desc, "count", w) != channels:
            raise FormatError(f"{w}: expected {channels} int32 zero points")
        zero = bytes_tensor(data, "int32", channels, w).reshape(scale.shape)
        lo, hi = _qmin(bits, signed), ((1 << (bits - 1)) - 1 if signed else (1 << bits) - 1)
        if zero.numel() and (int(zero.min()) < lo or int(zero.max()) > hi):
            raise FormatError(f"{w}: a zero point lies outside [{lo}, {hi}]")
    info = {"scale": scale, "zero_point": zero, "bits": bits, "signed": signed, "axis": axis}
    return affine_values(sym, scale, zero, bits, signed, axis), info
