"""Tiny random causal LMs and examples for fast tests (no tokenizer needed)."""

from __future__ import annotations

import random

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from sempa_dist.data.tokenize import TokenizedExample

VOCAB = 97


def tiny_model(arch: str = "llama", attn: str = "sdpa", seed: int = 0, vocab: int = VOCAB):
    cfg_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    cfg = cfg_cls(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32)
    return model.eval()


def random_examples(n: int, k: int = 1, seed: int = 0, vocab: int = VOCAB,
                    prompt_range=(3, 30), response_range=(1, 12)) -> list[TokenizedExample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(1, vocab) for _ in range(rng.randint(*prompt_range))]
        responses = [[rng.randrange(1, vocab) for _ in range(rng.randint(*response_range))] for _ in range(1 + k)]
        out.append(TokenizedExample(prompt, responses, i))
    return out
