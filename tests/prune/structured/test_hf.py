"""Head-wise and MLP-unit structured pruning of transformers models (GPT-2, Llama with GQA, BERT, ViT)
built from tiny configs: the pruned model runs under the library's own forward (and generate), equals
its masked twin, and rebuilds from its config (+ ``apply_pruned_shapes``)."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from benchmarks._archs import HF_ARCHS, llama  # noqa: E402
from netshrink.errors import ConfigError, ModelError  # noqa: E402
from netshrink.prune import prune_  # noqa: E402
from netshrink.prune.structured import ChannelConfig, channel_prune  # noqa: E402
from netshrink.prune.structured.hf import PRUNED_ATTR, apply_pruned_shapes, find_blocks  # noqa: E402
from netshrink.task import output_tensor, resolve_task  # noqa: E402


def _run(model, inputs):
    with torch.no_grad():
        return output_tensor(inputs.call(model))


def _setup(name):
    arch = HF_ARCHS[name]
    model, data = arch.build()
    task = resolve_task(arch.task)
    return arch, model, data, task, task.example(data, 4)


@pytest.mark.parametrize("name", sorted(HF_ARCHS))
@pytest.mark.parametrize("criterion", ["l1", "taylor"])
def test_pruned_equals_masked_twin_and_runs_the_library_forward(name, criterion):
    arch, model, data, task, x = _setup(name)
    dense = _run(model, x)
    twin = copy.deepcopy(model)
    n_params = sum(p.numel() for p in model.parameters())
    cfg = dict(ratio=0.5, criterion=criterion, batches=2, batch_size=16)
    res = channel_prune(model, ChannelConfig(**cfg), data=data, task=task)
    channel_prune(twin, ChannelConfig(mode="zero", **cfg), data=data, task=task)
    attn, mlp, _ = find_blocks(model)
    assert len(attn) == 2 and len(mlp) == 2
    assert all(b.heads == 2 for b in attn) and all(b.hidden * 2 in (48, 128) for b in mlp)
    assert sum(p.numel() for p in model.parameters()) < 0.8 * n_params
    assert {k for k in res.channels if k.endswith("[heads]")} == {f"{b.path}[heads]" for b in attn}
    pruned = _run(model, x)
    assert pruned.shape == dense.shape
    assert (pruned - _run(twin, x)).abs().max() < 1e-5  # the twin: heads and units zeroed, shapes kept
    assert (pruned - dense).abs().max() > 1e-4  # and pruning did change the function
    if arch.causal_lm:
        ids = x.kwargs["input_ids"][:2, :5]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        ref = twin.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        assert out.shape == (2, 11) and torch.equal(out, ref)


@pytest.mark.parametrize("name", sorted(HF_ARCHS))
def test_pruned_model_rebuilds_from_its_config(name):
    _, model, data, task, x = _setup(name)
    prune_(model, ChannelConfig(ratio=0.25, head_ratio=0.5))
    record = getattr(model.config, PRUNED_ATTR)
    assert len(record) == 4 and all(v.get("heads", 2) == 2 for v in record.values())
    fresh = type(model)(copy.deepcopy(model.config))
    apply_pruned_shapes(fresh)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    assert torch.equal(_run(fresh, x), _run(model, x))
    if name in ("hf_llama", "hf_vit"):  # the standard config fields alone describe the pruned shapes
        plain = type(model)(copy.deepcopy(model.config))
        plain.load_state_dict(model.state_dict())
        assert model.config.num_attention_heads == 2 and model.config.intermediate_size == 36


@pytest.mark.parametrize("gqa", ["kv", "query"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_llama_grouped_query_attention_stays_consistent(gqa, impl):
    torch.manual_seed(0)
    model = llama().eval()
    model.config._attn_implementation = impl
    ids = torch.randint(1, 64, (2, 9))
    twin = copy.deepcopy(model)
    prune_(model, ChannelConfig(ratio=0.0, head_ratio=0.5, gqa_heads=gqa))
    prune_(twin, ChannelConfig(ratio=0.0, head_ratio=0.5, gqa_heads=gqa, mode="zero"))
    attn = model.model.layers[0].self_attn
    if gqa == "kv":  # one of the two key/value groups goes, with its two query heads
        assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.num_key_value_groups) == (16, 8, 2)
        assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 1)
    else:  # one query head of each group goes, both key/value heads stay
        assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.num_key_value_groups) == (16, 16, 1)
        assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 2)
    assert model.config.head_dim == 8  # unchanged: rotary embeddings and the scale stay
    with torch.no_grad():
        assert (model(ids).logits - twin(ids).logits).abs().max() < 1e-5
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert torch.equal(out, twin.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False))


def test_gpt2_keeps_tied_embeddings_and_packed_split():
    _, model, data, task, x = _setup("hf_gpt2")
    prune_(model, ChannelConfig(ratio=0.25, head_ratio=0.5), data=data)
    attn = model.transformer.h[0].attn
    assert (attn.num_heads, attn.split_size, attn.c_attn.weight.shape, attn.c_proj.weight.shape) == (2, 16, (32, 48), (16, 32))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.config.n_inner == 96 and model.config.n_head == 4  # n_head stays: it sets head_dim = n_embd / n_head


def test_layer_ratio_and_layers_name_blocks():
    _, model, data, task, x = _setup("hf_bert")
    with pytest.raises(ConfigError, match="layers.bert.encoder.layer.0.nope"):
        prune_(model, ChannelConfig(layers=["bert.encoder.layer.0.nope"]))
    prune_(model, ChannelConfig(ratio=0.5, layers=["bert.encoder.layer.1.attention"]))
    sa0, sa1 = model.bert.encoder.layer[0].attention.self, model.bert.encoder.layer[1].attention.self
    assert (sa0.num_attention_heads, sa1.num_attention_heads, sa1.all_head_size) == (4, 2, 16)
    assert model.bert.encoder.layer[1].intermediate.dense.out_features == 48  # its MLP was not named
    _run(model, x)


def test_unsupported_options_and_too_much_are_clear_errors():
    _, model, data, task, x = _setup("hf_vit")
    with pytest.raises(ConfigError, match="criterion"):
        prune_(model, ChannelConfig(criterion="bn_scale"))
    with pytest.raises(ConfigError, match="scope"):
        prune_(model, ChannelConfig(scope="global"))
    with pytest.raises(ConfigError, match="data"):
        prune_(model, ChannelConfig(criterion="taylor"))
    prune_(model, ChannelConfig(ratio=0.99, head_ratio=0.99))  # at least one head and one unit stay
    attn, mlp, _ = find_blocks(model)
    assert all(b.heads == 1 for b in attn) and all(b.hidden == 1 for b in mlp)
    _run(model, x)
    bad = type(model)(copy.deepcopy(model.config))
    bad.config.netshrink_pruned = {"vit.nowhere": {"hidden": 3}}
    with pytest.raises(ModelError, match="vit.nowhere"):
        apply_pruned_shapes(bad)


@pytest.mark.parametrize("name", ["hf_gpt2", "hf_llama"])
def test_pruned_model_packs_and_loads_into_a_rebuilt_skeleton(name, tmp_path):
    from netshrink.pack import load, pack

    _, model, data, task, x = _setup(name)
    prune_(model, ChannelConfig(ratio=0.5))
    pack(model, tmp_path / "m.nsk")
    skeleton = apply_pruned_shapes(type(model)(copy.deepcopy(model.config)))
    restored = load(tmp_path / "m.nsk", model=skeleton).eval()
    assert torch.equal(_run(restored, x), _run(model, x))
    if name == "hf_gpt2":  # the tie survives the file
        assert restored.lm_head.weight is restored.transformer.wte.weight


@pytest.mark.parametrize("name", sorted(HF_ARCHS))
def test_pruned_model_runs_under_sdpa_attention_too(name):
    _, model, data, task, x = _setup(name)
    model.config._attn_implementation = "sdpa"  # torch's fused kernel reads the (new) head counts too
    twin = copy.deepcopy(model)
    prune_(model, ChannelConfig(ratio=0.5, gqa_heads="query"))
    prune_(twin, ChannelConfig(ratio=0.5, gqa_heads="query", mode="zero"))
    assert (_run(model, x) - _run(twin, x)).abs().max() < 1e-5
