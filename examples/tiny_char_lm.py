"""The small language model the examples train on the CPU in minutes: WikiText-2 as characters
(valid.txt to train, the first 200,000 characters of test.txt to test) and a 2-layer Llama."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext-2"


def char_data(data_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor, int]:
    """-> (train ids, test ids, vocabulary size), one id per character."""
    train_text = (Path(data_dir) / "valid.txt").read_text()
    test_text = (Path(data_dir) / "test.txt").read_text()[:200_000]
    chars = sorted(set(train_text) | set(test_text))
    stoi = {c: i for i, c in enumerate(chars)}
    return torch.tensor([stoi[c] for c in train_text]), torch.tensor([stoi[c] for c in test_text]), len(chars)


def tiny_llama(vocab: int, seq_len: int) -> LlamaForCausalLM:
    """A 2-layer Llama (hidden 128, intermediate 384, 4 heads), initialised from seed 0."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=seq_len)
    return LlamaForCausalLM(cfg)
