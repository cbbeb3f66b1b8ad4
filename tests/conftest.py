"""Shared fixtures: tiny random Llama and Qwen2 models (no downloads) and a tiny tokenizer-free
calibration set."""
from __future__ import annotations

import json

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


def tiny_tokenizer(vocab: int = 128):
    """A word-level fast tokenizer over ``t0 .. t{vocab-1}`` (for exports that need one saved)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="t0", eos_token="t1", pad_token="t2")


@pytest.fixture(params=["llama", "qwen2"])
def model_type(request):
    return request.param


@pytest.fixture
def calib_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (8, 32), generator=g)


def make_tiny_dir(root, seed: int = 0):
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
    model = tiny_model(seed=seed, vocab=len(fast))
    d = root / "tiny"
    model.save_pretrained(d)
    fast.save_pretrained(d)
    text = root / "corpus.txt"
    text.write_text("\n\n".join(f"Doc {i}: the quick brown fox {i} jumps over the lazy dog {i * 7}." * 3 for i in range(60)))
    return d, text


@pytest.fixture
def tiny_dir(tmp_path):
    return make_tiny_dir(tmp_path)


def task_data(tmp_path):
    """Tiny MMLU (dev/val CSVs, two subjects) and GSM8k (train.jsonl) in their public layouts."""
    d = tmp_path / "data"
    for split in ("dev", "val"):
        (d / "mmlu" / split).mkdir(parents=True)
        rows = [f'"the fox {i} jumps over the dog",the,quick,brown,lazy,{"ABCD"[i % 4]}' for i in range(16)]
        (d / "mmlu" / split / f"high_school_physics_{split}.csv").write_text("\n".join(rows) + "\n")
        (d / "mmlu" / split / f"philosophy_{split}.csv").write_text("\n".join(rows[:8]) + "\n")
    (d / "gsm8k").mkdir()
    lines = [json.dumps({"question": f"the fox has {i} dogs and {i + 3} foxes. how many?",
                         "answer": f"the fox has {i} + {i + 3} = {2 * i + 3}\n#### {2 * i + 3}"}) for i in range(24)]
    (d / "gsm8k" / "train.jsonl").write_text("\n".join(lines) + "\n")
    return d
