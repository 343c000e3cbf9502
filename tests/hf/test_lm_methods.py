"""The one-shot LLM methods (SparseGPT, Wanda, GPTQ, RTN, AWQ, SmoothQuant, ASVD) on the models users bring:
transformers' LlamaForCausalLM (grouped-query attention, rotary embeddings, SwiGLU) and GPT2LMHeadModel
(Conv1D layers, weight stored ``(in, out)``; tied embeddings), built from tiny configs and trained here for
a few hundred steps on the bytes of netshrink's own source (``tests/lm_helpers.py``).

Every block layer is compressed or listed in ``skipped`` with a reason; sparsity is exactly as asked;
group codes reproduce the weights; held-out perplexity stays within a bound of dense fitted to what these
small models measure (see the constants); ``generate()`` still decodes greedily as the forward pass does;
and the .nsk round trip into a fresh transformers model is exact. Skipped cleanly without transformers.
"""

from __future__ import annotations

import copy
import functools
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lm_helpers import SEQ, _corpus, calib, heldout, perplexity  # noqa: E402

from netshrink.calibrate import find_blocks, is_linear, linear_weight  # noqa: E402
from netshrink.lowrank import AsvdConfig, LowRankLinear, factorize_  # noqa: E402
from netshrink.lowrank.svd import svd_factors  # noqa: E402
from netshrink.pack import load, pack  # noqa: E402
from netshrink.prune import MagnitudeConfig, SparseGptConfig, WandaConfig, prune_  # noqa: E402
from netshrink.prune._mask import get_mask  # noqa: E402
from netshrink.quantize import AwqConfig, GptqConfig, RtnConfig, SmoothQuantConfig, SmoothQuantLinear, quantize_  # noqa: E402

ARCHS = ("llama", "gpt2")
CAL = dict(samples=16, batch_size=8, progress=False)
STEPS = 200


def build(arch: str) -> torch.nn.Module:
    """A tiny transformers LM (byte vocabulary, width 64, 2 blocks), randomly initialised from seed 0."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                          attn_implementation="eager")
        return LlamaForCausalLM(cfg)
    cfg = GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0, attn_implementation="eager")
    return GPT2LMHeadModel(cfg)


@functools.lru_cache(maxsize=None)
def _trained(arch: str) -> torch.nn.Module:
    model = build(arch)
    train, _ = _corpus()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(STEPS):
        starts = torch.randint(0, train.numel() - SEQ - 1, (16,), generator=g)
        x = torch.stack([train[s : s + SEQ] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@functools.lru_cache(maxsize=None)
def dense_ppl(arch: str) -> float:
    return perplexity(_trained(arch), 32)


def trained(arch: str) -> torch.nn.Module:
    return copy.deepcopy(_trained(arch))


#: method -> (entry point, config, perplexity bound as a multiple of dense). The bounds are a margin of about
#: twice the loss or more over what these models measure (Llama / GPT-2: 4-bit and W8A8 <= 1.003x, ASVD 1.008x / 1.001x, SparseGPT 50%
#: 1.020x / 0.999x, 2:4 1.054x / 1.004x, +4-bit 1.031x / 0.998x, Wanda 1.026x / 1.015x, 2:4 1.103x / 1.024x);
#: a transposed GPT-2 weight or a wrong scale gives perplexities far above them.
METHODS = {
    "sparsegpt": (prune_, lambda: SparseGptConfig(sparsity=0.5, **CAL), 1.05),
    "sparsegpt_2_4": (prune_, lambda: SparseGptConfig(n=2, m=4, **CAL), 1.10),
    "sparsegpt_4bit": (prune_, lambda: SparseGptConfig(sparsity=0.5, bits=4, group_size=32, **CAL), 1.07),
    "wanda": (prune_, lambda: WandaConfig(sparsity=0.5, **CAL), 1.06),
    "wanda_2_4": (prune_, lambda: WandaConfig(n=2, m=4, **CAL), 1.20),
    "gptq": (quantize_, lambda: GptqConfig(bits=4, group_size=32, **CAL), 1.02),
    "rtn": (quantize_, lambda: RtnConfig(bits=4, group_size=32), 1.02),
    "awq": (quantize_, lambda: AwqConfig(bits=4, group_size=32, **CAL), 1.02),
    "smoothquant": (quantize_, lambda: SmoothQuantConfig(**CAL), 1.02),
    "asvd": (factorize_, lambda: AsvdConfig(ratio=0.8, **CAL), 1.03),
}


def compress(arch: str, method: str):
    fn, cfg, _ = METHODS[method]
    model = trained(arch)
    return model, fn(model, cfg(), data=calib(16))


def block_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    path, _ = find_blocks(model)
    return {n: m for n, m in model.named_modules() if n.startswith(path + ".") and is_linear(m)}


def greedy_by_forward(model: torch.nn.Module, prompt: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy decoding with a full forward pass per token (no KV cache)."""
    ids = prompt
    with torch.no_grad():
        for _ in range(new):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids


# ------------------------------------------------------------------------------------ per-method checks


def _check_sparsity(method: str, model: torch.nn.Module, layers: dict) -> None:
    for name, mod in layers.items():
        w = linear_weight(mod)
        zero = w == 0
        mask = get_mask(mod)
        if method == "sparsegpt_4bit":
            # joint quantization may round a kept weight to 0 as well: the mask holds exactly half
            assert mask is not None or not isinstance(mod, torch.nn.Linear), name
            if mask is not None:
                assert int(mask.sum()) == w.numel() // 2 and not (w[~mask] != 0).any(), name
            assert int(zero.sum()) >= w.numel() // 2, name
            continue
        if mask is not None:  # Linear: the kept mask is a parametrization, the zeros exactly its complement
            assert torch.equal(zero, ~mask), name
        if method.endswith("2_4"):
            assert (zero.reshape(w.shape[0], -1, 4).sum(-1) == 2).all(), name  # exactly 2 zeros in every 4 of a row
        elif method.startswith("wanda"):
            assert (zero.sum(1) == w.shape[1] // 2).all(), name  # Wanda: half of every output row
        else:
            assert int(zero.sum()) == w.numel() // 2, name


def _check_groupq(model: torch.nn.Module, layers: dict, bits: int) -> None:
    for name, mod in layers.items():
        gq = mod.netshrink_groupq
        assert gq.bits == bits and gq.group_size == 32, name
        assert int(gq.q.min()) >= 0 and int(gq.q.max()) < 1 << bits, name
        assert int(gq.zero.max()) < 1 << bits, name
        assert torch.equal(gq.dequantize(), linear_weight(mod)), name


def _check_method(arch: str, method: str, model: torch.nn.Module, res) -> None:
    layers = {n: model.get_submodule(n) for n in (res if isinstance(res, dict) else res.layers)}
    if method.startswith(("sparsegpt", "wanda")):
        _check_sparsity(method, model, layers)
    if method in ("gptq", "rtn", "awq", "sparsegpt_4bit"):
        _check_groupq(model, layers, 4)
        if method == "sparsegpt_4bit":
            for name, mod in layers.items():
                assert len(torch.unique(linear_weight(mod)[0, :32])) <= 16, name
    if method == "smoothquant":
        assert layers and all(isinstance(m, SmoothQuantLinear) for m in layers.values())
        for name, mod in layers.items():
            q = mod.weight / mod.w_step[:, None]
            assert (q - q.round()).abs().max() < 1e-3 and q.abs().max() <= 127 + 1e-3, name
    if method == "asvd":
        lr = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
        assert len(lr) == len(res.layers) and all(lr[n].rank == res.layers[n]["rank"] for n in lr)
        assert sum(r["params_after"] for r in res.layers.values()) <= 0.8 * sum(r["params_before"] for r in res.layers.values())


def _expected_layers(arch: str) -> set[str]:
    return set(block_layers(trained(arch)))


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("arch", ARCHS)
def test_method_compresses_every_block_layer_keeps_perplexity_and_generates(arch, method):
    model, res = compress(arch, method)
    done = set(res) if isinstance(res, dict) else set(res.layers)
    skipped = {} if isinstance(res, dict) else res.skipped
    assert done == _expected_layers(arch), f"compressed {sorted(done)}; skipped {skipped}"
    # every Linear-like layer outside the blocks is said to be skipped, with the reason (RTN returns a
    # plain {layer: facts} dict without a skipped list: the head it leaves alone is not reported there)
    if not isinstance(res, dict):
        outside = {n for n, m in trained(arch).named_modules() if is_linear(m)} - done
        assert outside and outside <= set(skipped) and all(skipped[n] for n in outside), skipped
    assert not set(skipped) & done
    _check_method(arch, method, model, res)

    ppl, dense = perplexity(model, 32), dense_ppl(arch)
    print(f"{arch} {method}: ppl {ppl:.3f} dense {dense:.3f} ({ppl / dense:.3f}x)")
    assert ppl <= METHODS[method][2] * dense

    prompt = heldout(1)[0][:12][None]
    out = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert out.shape == (1, 20) and torch.equal(out[:, :12], prompt)
    assert torch.equal(out, greedy_by_forward(model, prompt, 8))  # the KV-cache path agrees with the forward


def _first_block_inputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The inputs of every layer of the first block of the dense model over the calibration windows."""
    path, blocks = find_blocks(model)
    layers = {n: m for n, m in blocks[0].named_modules() if n and is_linear(m)}
    xs: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    hooks = [m.register_forward_hook(lambda _m, a, _o, n=n: xs[n].append(a[0].detach().reshape(-1, a[0].shape[-1])))
             for n, m in layers.items()]
    with torch.no_grad():
        for i in range(0, 16, 8):
            model(input_ids=torch.stack([calib(16)[j] for j in range(i, i + 8)]))
    for h in hooks:
        h.remove()
    return {f"{path}.0.{n}": torch.cat(v) for n, v in xs.items()}


def _output_error(dense: torch.nn.Module, other: torch.nn.Module, name: str, x: torch.Tensor) -> float:
    w0, w1 = linear_weight(dense.get_submodule(name)), linear_weight(other.get_submodule(name))
    return float((x @ (w0 - w1).t()).pow(2).sum())


@pytest.mark.parametrize("arch", ARCHS)
def test_obs_compensation_beats_magnitude_and_rounding_on_the_layer_outputs(arch):
    """What SparseGPT and GPTQ minimise: the error of each layer's output ||X (W - W_hat)^T||^2 on the
    calibration inputs, smaller than magnitude pruning's at 50% and than rounding's at 3 bits for every layer
    of the first block (whose inputs the dense model fixes). Perplexities of these tiny models move by less
    than their noise, so they are printed, not compared."""
    dense = trained(arch)
    xs = _first_block_inputs(dense)
    path, _ = find_blocks(dense)
    mag = trained(arch)
    prune_(mag, MagnitudeConfig(sparsity=0.5, layers=[path + ".*"]))
    sg, _ = compress(arch, "sparsegpt")
    rtn = trained(arch)
    quantize_(rtn, RtnConfig(bits=3, group_size=32))
    gptq = trained(arch)
    quantize_(gptq, GptqConfig(bits=3, group_size=32, **CAL), data=calib(16))
    print(f"{arch}: dense {dense_ppl(arch):.3f} magnitude-50% {perplexity(mag, 32):.3f} sparsegpt-50% {perplexity(sg, 32):.3f} "
          f"rtn-3 {perplexity(rtn, 32):.3f} gptq-3 {perplexity(gptq, 32):.3f}")
    for name, x in xs.items():
        assert _output_error(dense, sg, name, x) < _output_error(dense, mag, name, x), name
        assert _output_error(dense, gptq, name, x) < _output_error(dense, rtn, name, x), name


@pytest.mark.parametrize("method", ["gptq", "sparsegpt", "sparsegpt_2_4", "smoothquant", "asvd"])
@pytest.mark.parametrize("arch", ARCHS)
def test_nsk_round_trip_into_a_fresh_transformers_model_is_exact(arch, method, tmp_path):
    from netshrink.pack import read_info

    model, _ = compress(arch, method)
    f = tmp_path / "m.nsk"
    stats = pack(model, f)
    back = load(f, build(arch)).eval()
    ids = heldout(2)[0][None]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, back(input_ids=ids).logits)
    enc = {t.name: t.encoding for t in read_info(f).tensors}
    print(f"{arch} {method}: {stats.total_bytes} bytes ({stats.ratio:.2f}x) {sorted(set(enc.values()))}")


#: (arch, method) -> why its block weights are not stored in their compressed form today
STORAGE_GAPS = {
    ("gpt2", "sparsegpt_2_4"): "SparseGPT puts no mask parametrization on a Conv1D, so its 2:4 zeros are stored as "
                               "general sparse, not nm_sparse",
}
STORED_AS = {"gptq": "groupq", "sparsegpt": "sparse", "sparsegpt_2_4": "nm_sparse", "smoothquant": "affine"}


def _storage_cases():
    for arch in ARCHS:
        for method in sorted(STORED_AS):
            gap = STORAGE_GAPS.get((arch, method))
            marks = [pytest.mark.xfail(reason=gap, strict=True)] if gap else []
            yield pytest.param(arch, method, marks=marks, id=f"{arch}-{method}")


@pytest.mark.parametrize("arch,method", list(_storage_cases()))
def test_block_weights_are_stored_in_their_compressed_encoding(arch, method, tmp_path):
    model, res = compress(arch, method)
    enc = {t.name: t.encoding for t in pack(model, tmp_path / "m.nsk").tensors}
    weights = {f"{n}.weight" for n in res.layers}
    assert weights <= set(enc)
    assert {enc[w] for w in weights} == {STORED_AS[method]}, {w: enc[w] for w in weights}
