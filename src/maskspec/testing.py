"""Tiny random models of several architectures, built in memory (tests, examples, smoke runs)."""

from __future__ import annotations

import torch
from transformers import (AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, PreTrainedModel,
                          Qwen2Config, Qwen3Config)

TINY_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "gemma3")


def tiny_config(arch: str, vocab_size: int = 128, **overrides):
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    if arch == "llama":
        cfg = LlamaConfig(**common)
    elif arch == "qwen2":
        cfg = Qwen2Config(**common)
    elif arch == "qwen3":
        cfg = Qwen3Config(head_dim=8, **common)
    elif arch == "mistral":
        # A window shorter than the test sequences, so that getting it wrong shows.
        cfg = MistralConfig(sliding_window=6, **common)
    elif arch == "gemma3":
        common["num_hidden_layers"] = 3
        cfg = Gemma3TextConfig(head_dim=8, sliding_window=5, query_pre_attn_scalar=8,
                               layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                               final_logit_softcapping=30.0, **common)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {TINY_ARCHITECTURES}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(arch: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0,
               attn_implementation: str = "sdpa", **overrides) -> PreTrainedModel:
    torch.manual_seed(seed)
    cfg = tiny_config(arch, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn_implementation)
    # Random init of these tiny models is nearly uniform; sharper weights give varied, non-degenerate greedy text.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    model.config.name_or_path = f"tiny-{arch}"
    model.generation_config.eos_token_id = cfg.eos_token_id
    model.generation_config.pad_token_id = cfg.pad_token_id
    return model.eval()
