"""The coding stage of a recipe: from here on, packed streams are Huffman coded (Deep Compression §4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .._registry import handler, register
from ..config import BaseConfig


@register("huffman", family="pack")
@dataclass
class HuffmanConfig(BaseConfig):
    """Canonical Huffman coding of the weight-index and index-gap streams (Han et al. 2016 §4);
    ``coding: auto`` takes per stream the smallest of fixed, Huffman and rANS, ``rans`` forces rANS."""

    coding: Literal["huffman", "auto", "fixed", "rans"] = "huffman"


@dataclass
class CodingChoice:
    """What a coding stage returns: the stream coding that later packing uses."""

    coding: str


@handler(HuffmanConfig)
def huffman_stage(model, config: HuffmanConfig, data=None) -> CodingChoice:
    """Leaves the model as it is; sets the coding of the packed file."""
    return CodingChoice(config.coding)
