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


@pytest.fixture
def tiny_dir(tmp_path):
    """A tiny Llama saved with a real (byte-level) tokenizer trained on the fly: no downloads."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog 0123456789"] * 50,
                            trainers.BpeTrainer(vocab_size=120, special_tokens=["<eos>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    model = tiny_model(vocab=len(fast))
    d = tmp_path / "tiny"
    model.save_pretrained(d)
    fast.save_pretrained(d)
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"Doc {i}: the quick brown fox {i} jumps over the lazy dog {i * 7}." * 3 for i in range(60)))
    return d, text
