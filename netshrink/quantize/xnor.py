"""Bit-packed XNOR–popcount inference for binarized Linear layers (binary weights, binary inputs).

For ``a, w ∈ {-1, +1}^n`` coded as bits (1 for -1, 0 for +1; ``sign(0) = +1``), the dot product is

    a · w = n - 2 popcount(bits(a) XOR bits(w))

(XNOR-Net, Rastegari et al., ECCV 2016, §3.2; BNN, Hubara et al., NeurIPS 2016, §3): ``n`` products
become ``n / 64`` XORs and popcounts of 64-bit words. A binarized layer ``y = α ⊙ (sign(x) sign(W)ᵀ) + b``
(``α`` per output row) is then ``y = α ⊙ (n - 2 popcount(X ⊕ W)) + b``; the weights take ``n / 8`` bytes
per row instead of ``4 n``.

:class:`XnorLinear` holds the packed sign bits of a binarized ``nn.Linear`` (uint64 words, kept in an
int64 buffer), ``α`` per row and the bias; its forward packs ``sign(x)`` (any float input is binarized)
and computes the popcounts with numpy's ``bitwise_count`` (numpy >= 2.0): one XOR, popcount and add per
64-bit word over a cache-sized block of (batch, output rows). The integer dot products are exact, so the output equals the
float computation ``α ⊙ (sign(x) @ sign(W)ᵀ) + b`` bit for bit (the same float32 multiply and add).
It also equals the binarized ``nn.Linear`` itself bit for bit when ``α = 1`` (the BNN paper's weights)
and the layer has no bias (a BN follows): sums of ±1 are exact in float32 for ``n < 2^24``. With another
``α`` the float layer sums ±α terms, so the two differ by float32 summation rounding only.

:func:`to_xnor_` swaps the binarized Linear layers of a model that take binary inputs (a
:class:`~netshrink.quantize.bnn.SignActivation` right before them in a ``Sequential``) for
:class:`XnorLinear`. It is an inference form: pack the binarized model to .nsk (1 bit per weight), not the
converted one.
"""

from __future__ import annotations

import fnmatch
import logging

import numpy as np
import torch
from torch import nn

from .._layers import select_layers
from ..errors import ConfigError, ModelError
from .bnn import SignActivation

log = logging.getLogger("netshrink.quantize")

WORD_BITS = 64
#: words of the (batch, rows) XOR block per chunk of output rows: 2^16 words = 512 KiB
CHUNK_WORDS = 1 << 16
#: modules skipped when looking for the module that feeds a layer in a Sequential
_TRANSPARENT = (nn.Flatten, nn.Dropout, nn.Identity)


def words_for(n: int) -> int:
    """64-bit words per row of ``n`` signs."""
    return (n + WORD_BITS - 1) // WORD_BITS


def pack_signs(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """``(..., n)`` values to ``(..., ceil(n / 64))`` uint64 words: bit ``i % 64`` of word ``i // 64``
    is 1 where ``x[..., i] < 0`` (so ``sign(0) = +1``); the padding bits of the last word are 0."""
    neg = (x.detach() < 0).cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x) < 0
    n = neg.shape[-1]
    b = np.packbits(neg, axis=-1, bitorder="little")
    pad = words_for(n) * 8 - b.shape[-1]
    if pad:
        b = np.concatenate([b, np.zeros(b.shape[:-1] + (pad,), dtype=np.uint8)], axis=-1)
    return np.ascontiguousarray(b).view("<u8").astype(np.uint64, copy=False)


def xnor_dot(xbits: np.ndarray, wbits: np.ndarray, n: int) -> np.ndarray:
    """``(B, words)`` and ``(O, words)`` packed signs to the ``(B, O)`` int32 dot products of the ±1
    vectors: ``n - 2 popcount(x XOR w)``. Padding bits are 0 on both sides, so they never count."""
    if xbits.ndim != 2 or wbits.ndim != 2 or xbits.shape[1] != wbits.shape[1]:
        raise ModelError(f"xnor_dot: packed shapes {xbits.shape} and {wbits.shape} do not match")
    return xnor_dot_t(xbits, np.ascontiguousarray(wbits.T), n)


def xnor_dot_t(xbits: np.ndarray, wbits_t: np.ndarray, n: int) -> np.ndarray:
    """:func:`xnor_dot` with the weight words word-major, ``(words, O)``: for each word ``j`` one pass
    ``acc += popcount(x[:, j] XOR w[j, :])`` over a ``(B, rows)`` block (rows chunked so the block stays
    in cache); no reduction over a short axis, which is what makes numpy slow."""
    if xbits.ndim != 2 or wbits_t.ndim != 2 or xbits.shape[1] != wbits_t.shape[0]:
        raise ModelError(f"xnor_dot: packed shapes {xbits.shape} and {wbits_t.shape} (word-major) do not match")
    batch, words = xbits.shape
    rows = wbits_t.shape[1]
    out = np.empty((batch, rows), dtype=np.int32)
    if batch == 0 or rows == 0:
        return out
    acc_t = np.uint16 if n < (1 << 16) else np.uint32
    chunk = max(1, min(rows, CHUNK_WORDS // batch))
    tmp = np.empty((batch, chunk), dtype=np.uint64)
    cnt = np.empty((batch, chunk), dtype=np.uint8)
    acc = np.empty((batch, chunk), dtype=acc_t)
    for r0 in range(0, rows, chunk):
        r1 = min(rows, r0 + chunk)
        t, c, a = tmp[:, : r1 - r0], cnt[:, : r1 - r0], acc[:, : r1 - r0]
        a.fill(0)
        for j in range(words):
            np.bitwise_xor(xbits[:, j, None], wbits_t[None, j, r0:r1], out=t)
            np.bitwise_count(t, out=c)
            np.add(a, c, out=a)
        np.subtract(n, 2 * a.astype(np.int32), out=out[:, r0:r1])
    return out


def _binary_rows(layer: nn.Linear, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The deployed (eval-mode) weight of ``layer`` as ``(α per row, sign bits as bool)``; a :class:`ModelError`
    unless every row is ``±α`` (a binarized layer, or a plain layer loaded from a binary .nsk tensor)."""
    was = layer.training
    layer.eval()  # a stochastic binarizer gives the deterministic sign in eval
    try:
        with torch.no_grad():
            w = layer.weight.detach().to(torch.float32).cpu()
    finally:
        layer.train(was)
    a = w.abs()
    alpha = a.amax(dim=1) if w.shape[1] else torch.zeros(w.shape[0])
    if not bool(torch.all(a == alpha[:, None])) or not bool(torch.all(torch.isfinite(alpha))):
        raise ModelError(f"{where}: the weight is not binary (each row must be ±α); binarize it first (method 'binary' or 'bnn')")
    return alpha, w < 0


class XnorLinear(nn.Module):
    """Inference form of a binarized Linear: ``y = α ⊙ (n - 2 popcount(bits(sign x) XOR bits(W))) + b``.

    Buffers: ``weight_bits`` ``(ceil(in / 64), out)`` (int64 storage of uint64 words, word-major), ``alpha`` ``(out,)``,
    ``bias`` ``(out,)`` or None. Inputs are float ``(..., in_features)``; any value is binarized by sign.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(name, f"must be a positive integer, got {v!r}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_bits", torch.zeros(words_for(in_features), out_features, dtype=torch.int64))
        self.register_buffer("alpha", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, layer: nn.Module, where: str = "") -> "XnorLinear":
        """The XNOR form of a binarized ``nn.Linear`` (its eval-mode weight must be ``±α`` per row)."""
        where = where or type(layer).__name__
        if not isinstance(layer, nn.Linear):
            raise ModelError(f"{where}: XNOR inference replaces nn.Linear layers only, got {type(layer).__name__}")
        alpha, neg = _binary_rows(layer, where)
        new = cls(layer.in_features, layer.out_features, layer.bias is not None)
        words = pack_signs(torch.where(neg, -1.0, 1.0))
        with torch.no_grad():
            new.weight_bits.copy_(torch.from_numpy(np.ascontiguousarray(words.T).view(np.int64)))
            new.alpha.copy_(alpha)
            if layer.bias is not None:
                new.bias.copy_(layer.bias.detach().to(torch.float32).cpu())
        return new

    def packed_weight(self) -> np.ndarray:
        """The sign bits as ``(out, words)`` uint64 words (row-major, as :func:`pack_signs` gives them)."""
        return np.ascontiguousarray(self._words_t().T)

    def _words_t(self) -> np.ndarray:
        return self.weight_bits.detach().cpu().numpy().view(np.uint64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ModelError(f"XnorLinear: expected inputs of shape (..., {self.in_features}), got {tuple(x.shape)}")
        lead = x.shape[:-1]
        k = xnor_dot_t(pack_signs(x.reshape(-1, self.in_features)), self._words_t(), self.in_features)
        y = torch.from_numpy(k).to(torch.float32) * self.alpha
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features).to(x.device)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def reference_forward(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The float computation that :class:`XnorLinear` reproduces exactly: ``α ⊙ (sign(x) @ sign(W)ᵀ) + b``
    in float32 (the ±1 sums are exact), from the layer's deployed weight."""
    alpha, neg = _binary_rows(layer, type(layer).__name__)
    s = torch.where(x.detach().to(torch.float32) >= 0, 1.0, -1.0)
    y = torch.nn.functional.linear(s, torch.where(neg, -1.0, 1.0)) * alpha
    return y + layer.bias.detach() if layer.bias is not None else y


def _feeds_binary(model: nn.Module) -> set[str]:
    """Names of the modules whose input in a ``Sequential`` is a :class:`SignActivation`'s output
    (skipping Flatten, Dropout and Identity in between)."""
    out = set()
    for pname, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        prev = None
        for cname, child in parent.named_children():
            if isinstance(child, _TRANSPARENT):
                continue
            if isinstance(prev, SignActivation):
                out.add(f"{pname}.{cname}" if pname else cname)
            prev = child
    return out


def to_xnor_(model: nn.Module, layers: list[str] | None = None) -> dict[str, XnorLinear]:
    """Replace binarized Linear layers by :class:`XnorLinear` in place; returns the new modules by name.

    ``layers`` None: every binarized ``nn.Linear`` that takes binary inputs (a :class:`SignActivation`
    right before it in a ``Sequential``), so the model's outputs do not change. Named layers (names or
    globs) must be binarized ``nn.Linear``; one whose input is not known to be binary is converted with a
    logged warning (its input gets binarized by sign). Everything is checked before anything changes.
    """
    binary_in = _feeds_binary(model)
    if layers is None:
        chosen = {n: m for n, m in model.named_modules() if n in binary_in and isinstance(m, nn.Linear)}
        if not chosen:
            raise ConfigError("layers", "no binarized nn.Linear takes binary inputs (a SignActivation right before it in a Sequential); name the layers")
    else:
        chosen = select_layers(model, layers, "layers")
        for n, m in chosen.items():
            if not isinstance(m, nn.Linear):
                i = next(i for i, p in enumerate(layers) if p == n or fnmatch.fnmatchcase(n, p))
                raise ConfigError(f"layers[{i}]", f"layer {n!r} is a {type(m).__name__}; the XNOR path replaces nn.Linear only")
    new = {n: XnorLinear.from_linear(m, where=n) for n, m in chosen.items()}  # raises before any swap
    for n, m in new.items():
        if n not in binary_in:
            log.warning("to_xnor_: the input of %r is not known to be binary; XnorLinear binarizes it by sign", n)
        parent_name, _, attr = n.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, m.to(next((b.device for b in chosen[n].parameters()), torch.device("cpu"))))
    return new


__all__ = ["XnorLinear", "pack_signs", "reference_forward", "to_xnor_", "words_for", "xnor_dot", "xnor_dot_t"]
