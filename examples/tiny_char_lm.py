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


def make_train_step(train: torch.Tensor, seq_len: int, batch: int, generator: torch.Generator):
    """-> train_step(model, optimizer, step) -> loss: one optimizer step of the next-character loss on
    `batch` windows of `seq_len` characters of `train`, at random starts drawn from `generator`."""

    def train_step(model, opt, step):
        starts = torch.randint(0, train.numel() - seq_len, (batch,), generator=generator)
        ids = torch.stack([train[s : s + seq_len] for s in starts.tolist()])
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    return train_step
