"""Tiny random models of every supported family, saved as real model folders (``save_pretrained``).

Each has 4 layers, a sliding window shorter than the test rows where the family has one, and more than
one layer type where the family allows it, so that every family-specific piece (masks, rotary per layer
type, embedding scale, logit soft-capping and scaling, ALiBi, learned positions, projections, fused
mixture-of-experts weights) changes the numbers.
"""

from __future__ import annotations

from pathlib import Path

NUM_LAYERS = 4
_WINDOW = 4  # tokens; the test rows are longer
_COMMON = dict(hidden_size=32, num_hidden_layers=NUM_LAYERS, num_attention_heads=4, intermediate_size=48,
               max_position_embeddings=256)
_TWO_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]

DECODERS: dict[str, dict] = {
    "llama": dict(num_key_value_heads=2, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8}),
    "mistral": dict(num_key_value_heads=2, sliding_window=_WINDOW),
    "mixtral": dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, sliding_window=_WINDOW),
    "qwen2": dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=_WINDOW, max_window_layers=2),
    "qwen2_moe": dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=24),
    "qwen3": dict(num_key_value_heads=2, head_dim=8, layer_types=_TWO_TYPES, sliding_window=_WINDOW,
                  use_sliding_window=True),
    "qwen3_moe": dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      head_dim=8),
    "gemma2": dict(num_key_value_heads=2, head_dim=8, sliding_window=_WINDOW, final_logit_softcapping=3.0,
                   attn_logit_softcapping=5.0),
    "gemma3_text": dict(num_key_value_heads=2, head_dim=8, sliding_window=_WINDOW, layer_types=_TWO_TYPES,
                        final_logit_softcapping=3.0),
    "phi3": dict(num_key_value_heads=2),
    "olmo2": dict(num_key_value_heads=2),
    "granite": dict(num_key_value_heads=2, embedding_multiplier=3.0, logits_scaling=4.0, residual_multiplier=0.5,
                    attention_multiplier=0.2),
    "gpt2": dict(n_embd=32, n_layer=NUM_LAYERS, n_head=4, n_positions=256),
    "gpt_neox": dict(rotary_pct=0.5),
    "falcon": dict(new_decoder_architecture=False, alibi=True, multi_query=True),
    "opt": dict(ffn_dim=48, word_embed_proj_dim=16),
}
ENCODERS: dict[str, dict] = {
    "bert": {}, "roberta": {}, "xlm-roberta": {}, "electra": dict(embedding_size=16),
}


def save_family(folder: Path, family: str, tokenizer_folder: Path) -> Path:
    """A tiny random ``family`` model with the MiniLM tokenizer, saved into ``folder``."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_folder)
    encoder = family in ENCODERS
    kwargs = {**_COMMON, **(ENCODERS if encoder else DECODERS)[family]}
    config = AutoConfig.for_model(family, vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id,
                                  bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, **kwargs)
    torch.manual_seed(0)
    model = (AutoModel if encoder else AutoModelForCausalLM).from_config(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
