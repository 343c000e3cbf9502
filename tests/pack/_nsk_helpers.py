"""Small compressed models and file-surgery helpers shared by the .nsk tests."""

import json
import struct
import zlib

import torch
from torch import nn

from netshrink.prune._mask import apply_mask
from netshrink.quantize._sharing import apply_sharing

PRELUDE = struct.Struct("<8sHHII")


def plain_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 6 * 6, 24), nn.ReLU(), nn.Linear(24, 10),
    ).eval()


def compressed_model(seed: int = 0, bits: int = 4) -> nn.Module:
    """Conv masked; first Linear masked and shared; last Linear shared; BN with real statistics."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    m = plain_model()
    with torch.no_grad():
        m[1].running_mean.normal_(generator=g)
        m[1].running_var.uniform_(0.5, 2.0, generator=g)
        m[1].weight.normal_(generator=g)
        m[1].num_batches_tracked += 11
    apply_mask(m[0], torch.rand(m[0].weight.shape, generator=g) > 0.5)
    w = m[4].weight.detach()
    cb = torch.linspace(float(w.min()), float(w.max()), 2**bits)
    apply_mask(m[4], torch.rand(w.shape, generator=g) > 0.8)
    apply_sharing(m[4], cb, (w.reshape(-1, 1) - cb).abs().argmin(1).reshape(w.shape))
    apply_sharing(m[6], cb[:4].clone(), torch.randint(0, 4, m[6].weight.shape, generator=g))
    return m


def split(blob: bytes) -> tuple[dict, list[bytes]]:
    """Header dict and section bytes of a well-formed file."""
    _, _, flags, hlen, _ = PRELUDE.unpack_from(blob, 0)
    text = blob[PRELUDE.size : PRELUDE.size + hlen]
    header = json.loads(zlib.decompress(text) if flags & 1 else text)
    base = PRELUDE.size + hlen
    return header, [blob[base + s["offset"] : base + s["offset"] + s["length"]] for s in header["sections"]]


def assemble(header: dict, sections: list[bytes], *, fix_sections: bool = True, version: int = 1,
             magic: bytes = b"\x89NSK\r\n\x1a\n", header_text: bytes | None = None) -> bytes:
    """A file from parts, with valid checksums (so only the crafted defect is left to find)."""
    if fix_sections:
        off = 0
        for s, data in zip(header["sections"], sections):
            s.update(offset=off, length=len(data), crc32=zlib.crc32(data))
            off += len(data)
        header["data_bytes"] = off
    text = header_text if header_text is not None else json.dumps(header).encode()
    return PRELUDE.pack(magic, version, 0, len(text), zlib.crc32(text)) + text + b"".join(sections)
