"""Tiny models built from configs and saved to temp dirs, so tests go through the real loading code."""
from __future__ import annotations

import os

# The Triton kernels run on CPU tensors under the interpreter. Triton reads this when a kernel is
# defined (llmsqueeze.kernels imports its kernels lazily, after this), not when triton is imported.
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = "the of and to in a is was for on as with by he at from his an were are which it".split()
TEXT = " ".join(WORDS[(i * 7 + i // 3) % len(WORDS)] for i in range(3000))


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_llama(hidden: int = 96, vocab: int = 64, layers: int = 2, intermediate_size: int = 160, **kw) -> LlamaForCausalLM:
    """hidden 96 is not a multiple of 64: group 64 leaves a shorter last group."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate_size, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A dense tiny Llama with a tokenizer, saved in float32."""
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "test.txt"
    p.write_text(TEXT)
    return p


def tiny_config(family: str):
    """A tiny random config of each architecture family the project supports by name.

    hidden 80 with group 32 leaves a shorter last group (16); widths are multiples of 16 so the CPU
    int4 kernel runs on most layers."""
    import transformers as tf

    common = dict(vocab_size=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    llama_like = dict(
        hidden_size=80, intermediate_size=144, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, **common,
    )
    if family == "llama":
        return tf.LlamaConfig(**llama_like)
    if family == "mistral":
        return tf.MistralConfig(**llama_like, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**llama_like)
    if family == "qwen3":
        return tf.Qwen3Config(**llama_like, head_dim=32)
    if family == "gemma2":
        return tf.Gemma2Config(**llama_like, head_dim=32, query_pre_attn_scalar=32, sliding_window=64)
    if family == "phi3":
        return tf.Phi3Config(**llama_like)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=80, n_layer=2, n_head=4, n_positions=128, vocab_size=64, bos_token_id=1, eos_token_id=2)
    if family == "opt":
        return tf.OPTConfig(
            hidden_size=80, ffn_dim=144, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
            word_embed_proj_dim=80, **common,
        )
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(
            hidden_size=80, intermediate_size=144, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, **common,
        )
    raise KeyError(family)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2", "opt", "gpt_neox"]


def tiny_model(family: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32).eval()


def outlier_llama(gain: float):
    """A tiny Llama whose norms scale input channels 3, 17 and 50 by `gain`: the few large activation
    channels of real LLMs, for the balancing methods (SmoothQuant, AWQ)."""
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[3, 17, 50]] = gain
    return model


def interrupt_after_block(monkeypatch, block: int):
    """Make a lazy run raise KeyboardInterrupt once block `block` is written (as Ctrl-C there would);
    -> a function that undoes it, so the same test can then resume."""
    from llmsqueeze import lazy

    real = lazy.LazyModel.release_block

    def boom(self, i):
        real(self, i)
        if i == block:
            raise KeyboardInterrupt

    monkeypatch.setattr(lazy.LazyModel, "release_block", boom)
    return lambda: monkeypatch.setattr(lazy.LazyModel, "release_block", real)
