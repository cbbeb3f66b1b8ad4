"""Shared fixtures: tiny random Llama and Qwen2 models (no downloads) and a tiny tokenizer-free
calibration set."""
from __future__ import annotations

import pytest
import torch


def tiny_model(model_type: str = "llama", seed: int = 0, layers: int = 2, vocab: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=False)
    if model_type == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif model_type == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(model_type)
    return model.eval()


@pytest.fixture(params=["llama", "qwen2"])
def model_type(request):
    return request.param


@pytest.fixture
def calib_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (8, 32), generator=g)
