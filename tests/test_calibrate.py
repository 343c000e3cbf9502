"""Sequential calibration: block discovery, statistics from compressed predecessors, bad input, HF models."""

import pytest
import torch
from torch import nn

from lm_helpers import SEQ, calib, tiny_lm
from netshrink.calibrate import damped_hessian, find_blocks, inverse_cholesky_upper, sequential
from netshrink.errors import ConfigError, DataError, ModelError
from netshrink.models import build_model


def test_finds_the_decoder_blocks():
    m = build_model("llama_tiny")
    path, blocks = find_blocks(m)
    assert path == "layers" and len(blocks) == 2
    with pytest.raises(ConfigError, match="no module"):
        find_blocks(m, "nope")


def test_model_without_blocks_is_one_clear_error():
    with pytest.raises(ModelError, match="no block structure"):
        sequential(build_model("mlp"), [(torch.zeros(2, 64), torch.zeros(2, dtype=torch.long))], lambda *a: None)


def test_hessian_is_xtx_over_tokens_and_blocks_see_compressed_inputs():
    m = tiny_lm()
    data = calib(8)
    seen = {}

    def layer(name, mod, st, block, local):
        seen[name] = st
        if name.startswith("layers.0."):
            mod.weight.data.zero_()  # block 0 becomes the identity (both branches add zero)

    _, skipped, report = sequential(m, data, layer, samples=8, batch_size=4, progress=False)
    ids = torch.stack([data[i] for i in range(8)])
    x0 = m.layers[0].attn_norm(m.embed(ids)).reshape(-1, 64)
    st = seen["layers.0.attn.q_proj"]
    assert st.tokens == 8 * SEQ
    torch.testing.assert_close(st.hessian, (x0.double().t() @ x0.double()) / x0.shape[0], rtol=1e-6, atol=1e-8)
    # block 1 was fed the output of the zeroed block 0, i.e. the embeddings themselves
    x1 = m.layers[1].attn_norm(m.embed(ids)).reshape(-1, 64)
    torch.testing.assert_close(seen["layers.1.attn.q_proj"].abs_mean.float(), x1.abs().mean(0), rtol=1e-4, atol=1e-6)
    assert "lm_head" in skipped and report.tokens == 8 * SEQ and report.blocks == 2
    assert report.peak_rss_bytes > 0 and report.activation_bytes >= 2 * 8 * SEQ * 64 * 4


def test_calibration_shorter_than_context_or_group():
    m = tiny_lm()
    with pytest.raises(DataError, match="shorter than the context"):
        sequential(m, calib(4), lambda *a: None, samples=4, seq_len=SEQ + 1, progress=False)
    with pytest.raises(DataError, match="fewer than one group"):
        sequential(m, [torch.zeros(1, 8, dtype=torch.long)], lambda *a: None, samples=1, min_group=128, progress=False)
    with pytest.raises(DataError, match="needs calibration data"):
        sequential(m, None, lambda *a: None, progress=False)


def test_dead_and_singular_hessians_are_damped_not_nan():
    h = torch.zeros(6, 6, dtype=torch.float64)
    u, dead = inverse_cholesky_upper(h, 0.01)
    assert dead.all() and torch.isfinite(u).all()
    x = torch.randn(100, 6, dtype=torch.float64)
    x[:, 2] = 0
    x[:, 4] = x[:, 3]  # rank deficient
    hd, dead = damped_hessian(x.t() @ x, 0.01)
    assert dead.tolist() == [False, False, True, False, False, False]
    assert torch.linalg.cholesky_ex(hd).info == 0


def _hf_batches(vocab):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (4, 32), generator=g) for _ in range(2)]


def test_hf_llama_and_gpt2_are_compressed_block_by_block():
    transformers = pytest.importorskip("transformers")
    from netshrink.prune.sparsegpt import SparseGptConfig, sparsegpt_
    from netshrink.quantize.gptq import GptqConfig, gptq_

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    llama = transformers.LlamaForCausalLM(cfg).eval()
    ids = _hf_batches(128)
    before = llama(ids[0]).logits
    res = gptq_(llama, GptqConfig(bits=4, group_size=32, samples=8, batch_size=4, progress=False), data=ids)
    assert res.report.blocks_path == "model.layers" and len(res.layers) == 2 * 7
    after = llama(ids[0]).logits
    assert torch.isfinite(after).all() and 0 < (after - before).abs().max() < 0.5 * before.abs().max()
    w = llama.model.layers[0].mlp.down_proj.weight
    assert len(torch.unique(w[0, :32])) <= 16  # one group holds at most 2^4 values

    gcfg = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    gpt2 = transformers.GPT2LMHeadModel(gcfg).eval()
    res = sparsegpt_(gpt2, SparseGptConfig(sparsity=0.5, samples=8, batch_size=4, progress=False), data=_hf_batches(128))
    assert res.report.blocks_path == "transformer.h"
    c_fc = gpt2.transformer.h[1].mlp.c_fc.weight  # Conv1D: (in, out)
    assert abs(float((c_fc == 0).float().mean()) - 0.5) < 0.01
    assert torch.isfinite(gpt2(ids[0]).logits).all()
