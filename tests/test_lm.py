"""The Llama-style decoder LM of the zoo: sizes, the KV cache, greedy decoding, bad arguments."""

import pytest
import torch

from netshrink.errors import ConfigError
from netshrink.lm import apply_rotary, rotary_tables
from netshrink.models import build_model


def test_default_size_is_in_the_papers_small_range():
    m = build_model("llama_lm")
    n = sum(p.numel() for p in m.parameters())
    assert 5_000_000 <= n <= 30_000_000
    assert m.netshrink_spec["zoo"] == "llama_lm"
    # grouped-query attention: 2 key/value heads of 32 for 8 query heads
    assert m.layers[0].attn.k_proj.weight.shape == (64, 256)


def test_cached_forward_equals_full_forward():
    torch.manual_seed(0)
    m = build_model("llama_tiny").eval()
    ids = torch.randint(0, 256, (2, 30))
    full = m(ids)
    k, v = m.empty_cache(2)
    a, k, v = m.forward_cached(ids[:, :17], k, v)
    b, k, v = m.forward_cached(ids[:, 17:], k, v)
    assert k.shape == (2, 2, 2, 30, 16)
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=1e-5, rtol=1e-5)


def test_greedy_generate_matches_step_by_step_argmax():
    torch.manual_seed(1)
    m = build_model("llama_tiny").eval()
    prompt = torch.randint(0, 256, (1, 5))
    out = m.generate(prompt, 4)
    seq = prompt
    for _ in range(4):
        seq = torch.cat([seq, m(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq[:, 5:])


def test_rotary_is_a_rotation():
    cos, sin = rotary_tables(8, 16)
    x = torch.randn(1, 1, 16, 8)
    y = apply_rotary(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(y[..., 0, :], x[..., 0, :])  # position 0 is not rotated


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(ConfigError, match="heads"):
        build_model("llama_lm", heads=3)
    with pytest.raises(ConfigError, match="kv_heads|heads"):
        build_model("llama_lm", kv_heads=3)
    m = build_model("llama_tiny")
    with pytest.raises(ConfigError, match="max_len"):
        m(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(ConfigError, match="batch, length"):
        m(torch.zeros(5, dtype=torch.long))
