"""The adapter names a model's parts; a rank loads only its own tensors, converted as transformers does."""

from __future__ import annotations

import pytest
import torch
from conftest import _tokenizer_source

from nesa_hpc.errors import ConfigError
from nesa_hpc.models.adapter import SUPPORTED_MODEL_TYPES, check_supported
from nesa_hpc.models.weights import build_adapter, load_modules


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    from families import save_family

    return save_family(tmp_path_factory.mktemp("mixtral"), "mixtral", _tokenizer_source())


def test_a_rank_loads_only_its_own_layers_experts_fused_like_transformers(mixtral):
    from transformers import AutoModelForCausalLM

    adapter = build_adapter(mixtral)
    load_modules(adapter, mixtral, [adapter.layer_module(2)])
    model = adapter.model
    ref = AutoModelForCausalLM.from_pretrained(mixtral, dtype=torch.float32)
    loaded = {n for n, p in model.named_parameters() if p.device.type != "meta"}
    assert loaded == {n for n, _ in model.named_parameters() if n.startswith("model.layers.2.")}
    fused = "model.layers.2.mlp.experts.gate_up_proj"
    assert fused in loaded and model.get_parameter(fused).dim() == 3  # the checkpoint has one tensor per expert
    for name in loaded:
        assert torch.equal(model.get_parameter(name), ref.get_parameter(name)), name
        assert not model.get_parameter(name).requires_grad


def test_balanced_partition_counts_the_experts_a_token_uses(mixtral):
    adapter = build_adapter(mixtral)
    layer = adapter.model.get_submodule(adapter.layer_module(0))
    experts = sum(p.numel() for n, p in layer.named_parameters() if ".experts." in f".{n}")
    rest = sum(p.numel() for n, p in layer.named_parameters() if ".experts." not in f".{n}")
    c = adapter.config
    assert experts > 0 and c.num_experts_per_tok < c.num_local_experts
    active = rest + experts * c.num_experts_per_tok / c.num_local_experts
    assert adapter._numel((adapter.layer_module(0),), active=True) == pytest.approx(active)
    head = sum(p.numel() for p in adapter.model.lm_head.parameters())
    assert adapter.head_cost("generate") == pytest.approx(head / active)


def test_other_families_are_refused_in_one_line_naming_them():
    from transformers import BloomConfig, T5Config

    for config, arch in ((BloomConfig(), "BloomForCausalLM"), (T5Config(), "T5")):
        with pytest.raises(ConfigError) as err:
            check_supported(config, "/models/x")
        message = str(err.value)
        assert "\n" not in message and arch in message and "docs/models.md" in message
        assert all(t in message for t in SUPPORTED_MODEL_TYPES)


def test_the_kv_cache_of_a_block_is_sized_from_the_block(mixtral):
    """Rank 0 holds layers [0, 1) and a tail [3, 4) in one cache: while the tail runs a decode step, the
    front has already seen it; masks and past lengths come from the running block's own layers."""
    adapter = build_adapter(mixtral)
    cache = adapter.new_cache()
    kv = torch.zeros(1, 2, 5, 8)
    cache.update(kv, kv, 0)
    cache.update(kv[:, :, :4], kv[:, :, :4], 3)
    cache.active = range(3, 4)
    assert cache.get_seq_length() == 4
    assert cache.get_mask_sizes(1, 0)[0] == cache.layers[3].get_mask_sizes(1)[0]
    cache.active = range(0, 1)
    assert cache.get_seq_length() == 5


def test_loading_casts_as_it_reads(tmp_path, monkeypatch):
    """A worker's layers loaded in bfloat16 from a float32 checkpoint never hold its share in float32: the
    tensors the loader holds at once (read and placed, counted while alive) stay within the share in bfloat16
    plus one tensor's float32 block, where reading the whole block first would hold the share in float32.
    (Resident memory is measured on a 1.2B model by scripts/memory_bound.py: docs/scaling.md.)"""
    import weakref

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from nesa_hpc.models import weights

    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    reference = LlamaForCausalLM(config)
    reference.save_pretrained(tmp_path)  # float32
    live, peak = {}, [0]

    def track(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in live:
            live[key] = t.untyped_storage().nbytes()
            weakref.finalize(t, live.pop, key, None)
            peak[0] = max(peak[0], sum(live.values()))
        return t

    read, assign = weights._TensorReader.read, weights._assign
    monkeypatch.setattr(weights._TensorReader, "read", lambda self, *a: track(read(self, *a)))
    monkeypatch.setattr(weights, "_assign", lambda model, full, t: assign(model, full, track(t)))
    adapter = weights.build_adapter(tmp_path)
    layers = [adapter.layer_module(i) for i in range(4)]
    weights.load_modules(adapter, tmp_path, layers, "bfloat16")
    share = sum(p.numel() * 2 for m in layers for p in adapter.model.get_submodule(m).parameters())
    biggest = max(p.numel() * 4 for m in layers for p in adapter.model.get_submodule(m).parameters())
    assert peak[0] <= share + biggest, (peak[0], share)  # reading the block first: 2 x share in float32 alone
    for m in layers:  # and the values are the checkpoint's, cast
        for name, p in adapter.model.get_submodule(m).named_parameters():
            assert p.dtype == torch.bfloat16
            assert torch.equal(p, reference.get_submodule(m).get_parameter(name).detach().to(torch.bfloat16))
