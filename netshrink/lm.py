"""A Llama-style decoder-only language model for the zoo (``llama_lm``, ``llama_tiny``).

Architecture (Touvron et al., "LLaMA", arXiv 2302.13971, 2023): token embedding -> ``depth`` pre-norm
blocks -> RMSNorm -> untied Linear head. Each block::

    h = x + o_proj(attn(rope(q_proj(n1(x))), rope(k_proj(n1(x))), v_proj(n1(x))))
    y = h + down_proj(silu(gate_proj(n2(h))) * up_proj(n2(h)))

- RMSNorm ``x / sqrt(mean(x^2) + eps) * g`` (Zhang & Sennrich, NeurIPS 2019);
- rotary position embeddings, rotating pairs ``(x_i, x_{i+d/2})`` by ``pos * theta^(-2i/d)`` (Su et al.,
  RoFormer, 2021);
- grouped-query attention: ``kv_heads`` key/value heads shared by ``heads / kv_heads`` query heads
  (Ainslie et al., EMNLP 2023), causal;
- SwiGLU feed-forward ``down(silu(gate x) * up x)`` (Shazeer, 2020).

No Linear has a bias. ``forward(ids) -> logits``; :meth:`LlamaLM.forward_cached` takes and returns a
key/value cache stacked as ``(depth, batch, kv_heads, past, head_dim)`` for greedy decoding in torch
and in the exported ONNX graph. The blocks are ``model.layers`` (a ModuleList), which the sequential
calibration of :mod:`netshrink.calibrate` finds.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .errors import ConfigError
from .models import register_model


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight``."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary_tables(head_dim: int, max_len: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of shape ``(max_len, head_dim)`` for rotating pairs ``(i, i + head_dim/2)``."""
    inv = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = torch.arange(max_len, dtype=torch.float64)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().float(), ang.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` with ``rotate_half([a, b]) = [-b, a]``; x is ``(B, H, T, D)``."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


class Attention(nn.Module):
    """Causal grouped-query attention with rotary embeddings (no biases)."""

    def __init__(self, dim: int, heads: int, kv_heads: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, dim, bias=False)

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = y.shape
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x, cos, sin)
        rep = self.heads // self.kv_heads
        y = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True)
        return self._out(y)

    def forward_cached(self, x, cos, sin, past_k, past_v):
        """Attention over ``past`` plus the new positions; explicit matmuls so that it exports to ONNX."""
        q, k, v = self._qkv(x, cos, sin)
        k = torch.cat([past_k, k], dim=2)
        v = torch.cat([past_v, v], dim=2)
        rep = self.heads // self.kv_heads
        kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        t, total = q.shape[2], k.shape[2]
        scores = q @ kk.transpose(-1, -2) / math.sqrt(self.head_dim)
        # query i (at absolute position total - t + i) sees keys j <= total - t + i
        qpos = torch.arange(t, device=x.device)[:, None] + (total - t)
        kpos = torch.arange(total, device=x.device)[None, :]
        scores = scores.masked_fill(kpos > qpos, float("-inf"))
        return self._out(scores.softmax(-1) @ vv), k, v


class SwiGLU(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nn.Module):
    """Pre-norm block: ``h = x + attn(norm1(x)); y = h + mlp(norm2(h))``."""

    def __init__(self, dim: int, heads: int, kv_heads: int, hidden: int):
        super().__init__()
        self.attn_norm = RMSNorm(dim)
        self.attn = Attention(dim, heads, kv_heads)
        self.mlp_norm = RMSNorm(dim)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attn(self.attn_norm(x), cos, sin)
        return h + self.mlp(self.mlp_norm(h))

    def forward_cached(self, x, cos, sin, past_k, past_v):
        a, k, v = self.attn.forward_cached(self.attn_norm(x), cos, sin, past_k, past_v)
        h = x + a
        return h + self.mlp(self.mlp_norm(h)), k, v


class LlamaLM(nn.Module):
    """See the module docstring."""

    def __init__(self, vocab_size: int, dim: int, depth: int, heads: int, kv_heads: int, hidden: int, max_len: int):
        super().__init__()
        self.vocab_size, self.dim, self.depth, self.max_len = vocab_size, dim, depth, max_len
        self.kv_heads, self.head_dim = kv_heads, dim // heads
        self.embed = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList(DecoderBlock(dim, heads, kv_heads, hidden) for _ in range(depth))
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        cos, sin = rotary_tables(self.head_dim, max_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * self.depth) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def _check(self, ids: torch.Tensor, past: int = 0) -> None:
        if ids.dim() != 2:
            raise ConfigError("input_ids", f"expected token ids of shape (batch, length), got {tuple(ids.shape)}")
        if past + ids.shape[1] > self.max_len:
            raise ConfigError("input_ids", f"{past + ids.shape[1]} positions exceed the model's max_len {self.max_len}")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            self._check(input_ids)
        t = input_ids.shape[1]
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        x = self.embed(input_ids)
        for block in self.layers:
            x = block(x, cos, sin)
        return self.lm_head(self.norm(x))

    def empty_cache(self, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """An empty key/value cache ``(depth, batch, kv_heads, 0, head_dim)`` for :meth:`forward_cached`."""
        p = self.embed.weight
        z = torch.zeros(self.depth, batch, self.kv_heads, 0, self.head_dim, dtype=p.dtype, device=p.device)
        return z, z.clone()

    def forward_cached(self, input_ids: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor):
        """``(logits, present_k, present_v)`` for ``input_ids`` following ``past`` cached positions."""
        p, t = past_k.shape[3], input_ids.shape[1]
        cos, sin = self.rope_cos[p : p + t], self.rope_sin[p : p + t]
        x = self.embed(input_ids)
        ks, vs = [], []
        for i, block in enumerate(self.layers):
            x, k, v = block.forward_cached(x, cos, sin, past_k[i], past_v[i])
            ks.append(k)
            vs.append(v)
        return self.lm_head(self.norm(x)), torch.stack(ks), torch.stack(vs)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy decoding with the key/value cache; returns the ``new_tokens`` generated ids ``(B, n)``."""
        self._check(prompt, new_tokens)
        k, v = self.empty_cache(prompt.shape[0])
        logits, k, v = self.forward_cached(prompt, k, v)
        out = []
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(new_tokens):
            out.append(nxt)
            if len(out) == new_tokens:
                break
            logits, k, v = self.forward_cached(nxt, k, v)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
        return torch.cat(out, dim=1)


def _pos(field: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"model.args.{field}", f"must be a positive integer, got {value!r}")
    return value


@register_model("llama_lm")
def llama_lm(vocab_size: int = 4096, dim: int = 256, depth: int = 6, heads: int = 8, kv_heads: int = 2, hidden: int = 704,
             max_len: int = 512) -> nn.Module:
    """A Llama-style decoder LM (see :mod:`netshrink.lm`). The defaults hold 6.3M parameters:
    6 blocks of width 256, 8 query and 2 key/value heads of 32, SwiGLU hidden 704, vocabulary 4096."""
    for f, v in (("vocab_size", vocab_size), ("dim", dim), ("depth", depth), ("hidden", hidden), ("max_len", max_len)):
        _pos(f, v)
    if dim % _pos("heads", heads) or heads % _pos("kv_heads", kv_heads) or (dim // heads) % 2:
        raise ConfigError("model.args.heads", f"heads must divide dim {dim} into an even head size and be a multiple of kv_heads {kv_heads}, got {heads}")
    return LlamaLM(vocab_size, dim, depth, heads, kv_heads, hidden, max_len)


@register_model("llama_tiny")
def llama_tiny(vocab_size: int = 256, dim: int = 64, depth: int = 2, heads: int = 4, kv_heads: int = 2, hidden: int = 128,
               max_len: int = 128) -> nn.Module:
    """The tiny configuration of :func:`llama_lm` for tests (about 0.1M parameters, byte vocabulary)."""
    return llama_lm(vocab_size, dim, depth, heads, kv_heads, hidden, max_len)


__all__ = ["LlamaLM", "DecoderBlock", "Attention", "SwiGLU", "RMSNorm", "llama_lm", "llama_tiny", "rotary_tables", "apply_rotary"]
