"""Coding stage of Deep Compression and the packed .nsk file.

* :mod:`netshrink.pack.huffman` — canonical, length-limited Huffman coding of integer streams.
* :mod:`netshrink.pack.sparse` — relative (gap) index coding of sparse positions.
* :mod:`netshrink.pack.nsk` — the .nsk format: :func:`pack`, :func:`packed_bytes`, :func:`load`,
  :func:`read_info`, :func:`unpack_to_safetensors`.
"""

from .nsk import (
    NskInfo,
    PackStats,
    SectionInfo,
    StreamInfo,
    TensorInfo,
    load,
    pack,
    packed_bytes,
    read_info,
    unpack_to_safetensors,
)

__all__ = [
    "NskInfo",
    "PackStats",
    "SectionInfo",
    "StreamInfo",
    "TensorInfo",
    "load",
    "pack",
    "packed_bytes",
    "read_info",
    "unpack_to_safetensors",
]
