"""End to end on the real SmolLM2-135M (../shared/README.md): quantize with the CLI, check the size,
load through transformers, generate, and compare perplexity with the dense model on a short slice.

Skipped on a machine without the built model unless LLMSQUEEZE_REQUIRE_REAL_MODEL=1 (CI sets it, and
builds the model first), where a missing model is a failure."""
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import llmsqueeze
from llmsqueeze.cli import main
from llmsqueeze.evaluate import perplexity, tokenize_text

MODEL = Path(os.environ.get("LLMSQUEEZE_SMOLLM2", "~/.cache/llmsqueeze/smollm2-135m")).expanduser()
TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "test.txt"

if not (MODEL / "config.json").is_file():
    if os.environ.get("LLMSQUEEZE_REQUIRE_REAL_MODEL") == "1":
        raise RuntimeError(f"the real model is required but missing at {MODEL}; build it with ../shared/models/smollm2.py")
    pytest.skip(f"real model not built at {MODEL} (see ../shared/README.md)", allow_module_level=True)


@pytest.fixture(scope="module")
def q4(tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "q4"
    assert main(["quantize", str(MODEL), "--bits", "4", "--group-size", "128", "--out", str(out)]) == 0
    return out


def test_size_of_4bit_group_128(q4, capsys):
    capsys.readouterr()
    assert main(["info", str(q4), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["quantized_layers"] == 30 * 7
    # hidden 576 = 4 groups of 128 + a last group of 64; scales fp16 + 4-bit zeros included
    assert info["bits_per_quantized_weight"] <= 4.3
    assert info["bytes_on_disk"] < 0.5 * info["dense_bytes"]


def test_load_generate_and_perplexity(q4):
    tok = AutoTokenizer.from_pretrained(q4)
    model = AutoModelForCausalLM.from_pretrained(q4, dtype=torch.float32).eval()
    dense = llmsqueeze.load_dense(str(MODEL), dtype=torch.float32).eval()

    prompt = tok("The capital of France is", return_tensors="pt")
    gen = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] == prompt.input_ids.shape[1] + 8
    assert tok.decode(gen[0, prompt.input_ids.shape[1]:]).strip()

    text = TEXT.read_text() if TEXT.is_file() else " ".join(["The quick brown fox jumps over the lazy dog."] * 200)
    ids = tokenize_text(tok, text[:20000])
    pq = perplexity(model, ids, seq_len=512, windows=2, progress=False)["ppl"]
    pd = perplexity(dense, ids, seq_len=512, windows=2, progress=False)["ppl"]
    assert pd < pq < 1.5 * pd  # 4-bit costs some perplexity, not the model


def test_bf16_decode_uses_a_decode_kernel(q4):
    model = llmsqueeze.from_pretrained(q4, dtype=torch.bfloat16).eval()
    x = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        out = model(x, use_cache=True)
        assert torch.isfinite(out.logits).all()
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, llmsqueeze.QuantLinear)
    assert layer.cpu_path(x.new_zeros(1, 1536, dtype=torch.bfloat16)) in ("gemv", "int4")  # a decode kernel
