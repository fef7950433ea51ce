"""Every named architecture: quantize -> save -> load both ways, exact logits, generate."""
import copy

import pytest
import torch
from conftest import FAMILIES, tiny_model
from transformers import AutoModelForCausalLM

import llmsqueeze
from llmsqueeze.models import ARCHS, get_arch, quantizable_modules
from llmsqueeze.nn import QuantLinear, is_linear

IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45]])


def _block_linears(model):
    arch = get_arch(model)
    return [n for n, m in model.named_modules() if n.startswith(arch.blocks + ".") and is_linear(m)]


@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_save_load_generate(family, tmp_path):
    model = tiny_model(family)
    assert family in ARCHS and get_arch(model) is ARCHS[family]
    with torch.no_grad():
        dense = model(IDS).logits
    names = _block_linears(model)
    assert len(names) >= 8  # at least 4 matmuls per block, 2 blocks

    simulated = copy.deepcopy(model)
    llmsqueeze.quantize(model, bits=4, group_size=32, progress=False)
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert quantized == set(names)  # every Linear (Conv1D) in the blocks, nothing else
    with torch.no_grad():
        ref = model(IDS).logits
        # the packed model computes what the simulated (fake-quant) dense model computes
        for n in names:
            layer, w = simulated.get_submodule(n), model.get_submodule(n).dequantize_weight()
            layer.weight.copy_(w if isinstance(layer, torch.nn.Linear) else w.t())
        torch.testing.assert_close(ref, simulated(IDS).logits, rtol=1e-4, atol=1e-5)
    assert not torch.equal(ref, dense)

    out = llmsqueeze.save_quantized(model, tmp_path / "q")
    for loaded in (llmsqueeze.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out)):
        assert {n for n, m in loaded.named_modules() if isinstance(m, QuantLinear)} == quantized
        with torch.no_grad():
            got = loaded(IDS).logits
        assert torch.equal(got, ref)
        gen = loaded.generate(IDS[:, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert gen.shape == (1, 9)
        assert torch.equal(gen, model.generate(IDS[:, :4], max_new_tokens=5, do_sample=False, pad_token_id=0))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bf16_decode_runs_int4_kernel_and_matches_after_reload(family, tmp_path):
    model = tiny_model(family)
    llmsqueeze.quantize(model, bits=4, group_size=32, progress=False)
    out = llmsqueeze.save_quantized(model, tmp_path / "q")
    model.to(torch.bfloat16)
    loaded = llmsqueeze.from_pretrained(out, dtype=torch.bfloat16)
    q = next(m for m in loaded.modules() if isinstance(m, QuantLinear))
    assert q.scales.dtype == torch.float16  # stored dtype kept
    with torch.no_grad():
        a = model(IDS[:, :1]).logits
        b = loaded(IDS[:, :1]).logits
    assert q.cpu_path(torch.zeros(1, q.in_features, dtype=torch.bfloat16)) in ("gemv", "int4")  # a decode kernel
    assert torch.equal(a, b)
    gen = loaded.generate(IDS[:, :4], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 8)


def test_lm_head_with_tied_embeddings(tmp_path):
    model = tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    emb = model.model.embed_tokens.weight.detach().clone()
    llmsqueeze.quantize(model, bits=8, group_size=32, lm_head=True, progress=False)
    assert isinstance(model.lm_head, QuantLinear)
    assert torch.equal(model.model.embed_tokens.weight, emb)  # embeddings stay dense
    with torch.no_grad():
        ref = model(IDS).logits
    out = llmsqueeze.save_quantized(model, tmp_path / "q")
    loaded = llmsqueeze.from_pretrained(out)
    assert isinstance(loaded.lm_head, QuantLinear)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, ref)


def test_include_exclude():
    model = tiny_model("llama")
    s = llmsqueeze.QuantScheme(include=[r"mlp\."], exclude=[r"down_proj"])
    names = quantizable_modules(model, s)
    assert names and all("mlp" in n and "down_proj" not in n for n in names)
    llmsqueeze.quantize(model, s, progress=False)
    kept = model.config.quantization_config["modules_to_not_convert"]
    assert "model.layers.0.self_attn.q_proj" in kept and "lm_head" in kept


def test_generic_fallback_finds_blocks():
    from llmsqueeze.models import generic_arch

    model = tiny_model("llama")
    arch = generic_arch(model)
    assert arch.blocks == "model.layers" and arch.embeddings == ("model.embed_tokens",)


def test_device_map_auto_and_dtype(tmp_path):
    model = tiny_model("qwen2")
    llmsqueeze.quantize(model, bits=4, group_size=32, progress=False)
    out = llmsqueeze.save_quantized(model, tmp_path / "q")
    loaded = AutoModelForCausalLM.from_pretrained(out, device_map="auto", dtype=torch.bfloat16)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.model.layers[0].self_attn.q_proj.qweight.device.type == "cpu"
    gen = loaded.generate(IDS[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 7)
