"""Fixed-width bit packing of unsigned symbol arrays.

Each symbol is written in exactly ``bits`` bits, most significant bit first, and the symbols follow
each other with no padding; the last byte is zero-padded. This is the plain "k-bit index" storage of
Deep Compression (Han et al., ICLR 2016, §2-3) before its Huffman stage. Both directions are
vectorised with ``np.unpackbits`` / ``np.packbits`` and work in chunks so that memory stays bounded.
"""

from __future__ import annotations

import numpy as np

#: widest symbol supported
MAX_BITS = 64

# symbols per chunk; a multiple of 8 so every chunk but the last ends on a byte boundary
_CHUNK = 1 << 20


# values per chunk of :func:`pack_varwidth`
_VAR_CHUNK = 1 << 16


def pack_varwidth(values: np.ndarray, widths: np.ndarray) -> bytes:
    """Each value in its own width (0..63 bits), MSB first, back to back; the last byte zero-padded (the
    codewords of a Huffman stream, the tokens and raw bits of a rANS table). Works in chunks: bounded memory."""
    values = np.asarray(values, dtype=np.int64).reshape(-1)
    widths = np.asarray(widths, dtype=np.int64).reshape(-1)
    parts: list[bytes] = []
    pending = np.zeros(0, dtype=np.uint8)
    for a in range(0, values.size, _VAR_CHUNK):
        v, w = values[a : a + _VAR_CHUNK], widths[a : a + _VAR_CHUNK]
        keep = w > 0
        v, w = v[keep], w[keep]
        if v.size == 0:
            continue
        ends = np.cumsum(w)
        total = int(ends[-1])
        shift = np.repeat(w - 1, w) - (np.arange(total) - np.repeat(ends - w, w))
        bits = ((np.repeat(v, w) >> shift) & 1).astype(np.uint8)
        if pending.size:
            bits = np.concatenate([pending, bits])
        full = bits.size & ~7
        parts.append(np.packbits(bits[:full]).tobytes())
        pending = bits[full:]
    parts.append(np.packbits(pending).tobytes())
    return b"".join(parts)


def _container(bits: int) -> np.dtype:
    """Smallest big-endian unsigned dtype holding ``bits`` bits."""
    for width, dt in ((8, ">u1"), (16, ">u2"), (32, ">u4"), (64, ">u8")):
        if bits <= width:
            return np.dtype(dt)
    raise ValueError(f"bits must be in 1..{MAX_BITS}, got {bits}")


def bit_width(max_symbol: int) -> int:
    """Bits of a fixed-width code for symbols ``0..max_symbol`` (at least 1)."""
    return max(1, int(max_symbol).bit_length())


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that :func:`pack_fixed` writes for ``count`` symbols of ``bits`` bits."""
    return (int(count) * int(bits) + 7) // 8


def pack_fixed(symbols: np.ndarray, bits: int) -> bytes:
    """Pack unsigned integers into ``bits`` bits each, MSB first.

    Raises ``ValueError`` if a symbol is negative or does not fit in ``bits`` bits.
    """
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in 1..{MAX_BITS}, got {bits}")
    sym = np.asarray(symbols).reshape(-1)
    if sym.size == 0:
        return b""
    if sym.dtype.kind not in "iu":
        raise ValueError(f"symbols must be integers, got dtype {sym.dtype}")
    if sym.dtype.kind == "i" and int(sym.min()) < 0:
        raise ValueError("symbols must be non-negative")
    if bits < 64 and int(sym.max()) >> bits:
        raise ValueError(f"symbol {int(sym.max())} does not fit in {bits} bits")
    cont = _container(bits)
    width = cont.itemsize * 8
    out = []
    for start in range(0, sym.size, _CHUNK):
        chunk = sym[start : start + _CHUNK].astype(cont)
        rows = np.unpackbits(chunk.view(np.uint8).reshape(-1, cont.itemsize), axis=1)
        out.append(np.packbits(rows[:, width - bits :].reshape(-1)).tobytes())
    return b"".join(out)


def unpack_fixed(data: bytes | bytearray | memoryview | np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_fixed`: ``count`` symbols of ``bits`` bits as an ``int64`` array
    (``uint64`` when ``bits == 64``).

    Raises ``ValueError`` when ``data`` holds fewer than ``ceil(count * bits / 8)`` bytes.
    """
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in 1..{MAX_BITS}, got {bits}")
    if count < 0:
        raise ValueError(f"count must be non-negative, got {count}")
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.view(np.uint8).reshape(-1)
    need = packed_nbytes(count, bits)
    if buf.size < need:
        raise ValueError(f"{count} symbols of {bits} bits need {need} bytes, got {buf.size}")
    out_dtype = np.uint64 if bits == 64 else np.int64
    out = np.empty(count, dtype=out_dtype)
    cont = _container(bits)
    width = cont.itemsize * 8
    for start in range(0, count, _CHUNK):
        n = min(_CHUNK, count - start)
        first_bit = start * bits  # a multiple of 8 because _CHUNK is
        nbytes = packed_nbytes(n, bits)
        raw = np.unpackbits(buf[first_bit // 8 : first_bit // 8 + nbytes])[: n * bits].reshape(n, bits)
        rows = np.zeros((n, width), dtype=np.uint8)
        rows[:, width - bits :] = raw
        out[start : start + n] = np.packbits(rows, axis=1).view(cont).reshape(-1)
    return out
