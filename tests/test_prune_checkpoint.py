"""Sparse checkpoints: compressed N:M and bitmask layers, sparse+4-bit, verified on load by our loader
and by transformers' from_pretrained; a broken pattern is refused."""
import json

import pytest
import torch
from conftest import FAMILIES, tiny_llama, tiny_model, tiny_tokenizer
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import llmsqueeze
from llmsqueeze import CheckpointError, QuantScheme
from llmsqueeze.nn import QuantLinear, SparseLinear, index_bits, pack_bits, unpack_bits
from llmsqueeze.pruning.masks import is_nm


def calib():
    return torch.randint(3, 64, (4, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)])
def test_sparse_linear_nm_roundtrip(nm):
    w = torch.randn(6, 32)
    n, m = nm
    from llmsqueeze.pruning.masks import nm_mask

    w = w * nm_mask(w.abs(), n, m)
    w[0, :m] = 0  # a group with fewer nonzeros than n still stores n (zero) values
    layer = SparseLinear.from_dense(w, torch.randn(6), nm)
    assert layer.values.shape == (6, 32 // m * n) and layer.indices.dtype == torch.int32
    assert layer.indices.numel() * 32 == 6 * 32 * index_bits(m)  # one padded word row per 32 kept values
    assert layer.verify() is None and torch.equal(layer.to_dense(), w)
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer(x), x @ w.t() + layer.bias)
    with pytest.raises(ValueError, match="not 1:4"):
        SparseLinear.from_dense(torch.ones(2, 8), None, (1, 4))


def test_sparse_linear_bitmask_roundtrip():
    w = torch.randn(5, 13) * (torch.rand(5, 13) > 0.6)
    layer = SparseLinear.from_dense(w, None)
    assert layer.bitmask.shape == (5, 2) and layer.values.numel() == int((w != 0).sum())
    assert layer.verify() is None and torch.equal(layer.to_dense(), w)
    keep = torch.rand(3, 21) > 0.5
    assert torch.equal(unpack_bits(pack_bits(keep), 21), keep)


@pytest.mark.parametrize("target", ["2:4", 0.6])
def test_pruned_checkpoint_loads_both_ways(tmp_path, target):
    model = tiny_llama()
    kw = {"pattern": target} if isinstance(target, str) else {"sparsity": target}
    llmsqueeze.prune(model, "sparsegpt", data=calib(), progress=False, **kw)
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        ref = model(ids).logits
    out = llmsqueeze.save_quantized(model, tmp_path / "p", tokenizer=tiny_tokenizer())
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format_version"] == 2 and qc["scheme"] is None
    assert qc["sparsity"]["format"] == ("nm" if isinstance(target, str) else "bitmask")
    tensors = load_file(out / "model.safetensors")
    name = "model.layers.0.mlp.down_proj"
    assert f"{name}.weight" not in tensors and f"{name}.values" in tensors
    for loaded in (llmsqueeze.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out)):
        layer = loaded.get_submodule(name)
        assert isinstance(layer, SparseLinear)
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, ref)
        if isinstance(target, str):
            assert is_nm(layer.to_dense(), 2, 4)


def test_broken_pattern_refused(tmp_path):
    model = tiny_llama()
    llmsqueeze.prune(model, "magnitude", pattern="2:4", progress=False)
    out = llmsqueeze.save_quantized(model, tmp_path / "p")
    f = out / "model.safetensors"
    tensors = load_file(f)
    key = "model.layers.1.self_attn.o_proj.indices"
    tensors[key][0, 0] = 0  # the first 16 kept values all at position 0 of their group: repeated
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="o_proj.*repeated or unordered index"):
        llmsqueeze.from_pretrained(out)
    with pytest.raises(CheckpointError, match="not 2:4"):
        AutoModelForCausalLM.from_pretrained(out)


def test_broken_bitmask_refused(tmp_path):
    model = tiny_llama()
    llmsqueeze.prune(model, "magnitude", sparsity=0.5, progress=False)
    out = llmsqueeze.save_quantized(model, tmp_path / "p")
    f = out / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.0.mlp.up_proj.bitmask"][0, 0] ^= 1
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="up_proj.*bitmask marks"):
        llmsqueeze.from_pretrained(out)


@pytest.mark.parametrize("group", [32, -1])
def test_sparse_quantized_nm_checkpoint(tmp_path, group):
    """2:4 + 4-bit: the kept codes are stored compressed (half the codes) with 2-bit indices."""
    model = tiny_llama()
    llmsqueeze.prune(model, "wanda", pattern="2:4", data=calib(), scheme=QuantScheme(bits=4, group_size=group),
                     progress=False)
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    dense_w = model.model.layers[0].mlp.gate_proj.dequantize_weight()
    with torch.no_grad():
        ref = model(ids).logits
    out = llmsqueeze.save_quantized(model, tmp_path / "p")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["sparsity"]["format"] == "nm"
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.layers.0.mlp.gate_proj.qvalues.qweight"].shape == (64 * 4 // 32, 160)  # 96 inputs -> 48 codes, padded to 64
    for loaded in (llmsqueeze.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out)):
        layer = loaded.model.layers[0].mlp.gate_proj
        assert isinstance(layer, SparseLinear) and torch.equal(layer.to_dense(), dense_w)
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, ref)


def test_compressed_24_codes_cost_three_bits():
    """At SmolLM2's width (576 = 18 words of 32 kept codes) 2:4 + 4-bit stores 4 bits for half the
    weights plus 2 bits of index for half: exactly 3 bits per weight before scales and zeros."""
    from llmsqueeze.pruning.magnitude import magnitude_prune

    w = torch.randn(64, 576)
    res = magnitude_prune(w, nm=(2, 4), scheme=QuantScheme(bits=4, group_size=64))
    q = QuantLinear.from_quantized(res.q, res.scale, res.zero, 4, 64)
    sp = SparseLinear.from_quant_linear(q, (2, 4))
    bits = 8 * (sp.qvalues.qweight.numel() + sp.indices.numel()) * 4 / w.numel()
    assert bits == 3.0 and q.qweight.numel() * 32 / w.numel() == 4.0
    torch.testing.assert_close(sp.to_dense(), q.dequantize_weight())
    assert torch.equal(sp.to_dense(), res.w)


def test_sparse_quantized_unstructured_checkpoint(tmp_path):
    """Unstructured + 4-bit: packed QuantLinear with q == zero where pruned; the loader counts codes."""
    model = tiny_llama()
    llmsqueeze.prune(model, "sparsegpt", pattern=None, sparsity=0.5, data=calib(), scheme=QuantScheme(bits=4, group_size=32),
                     progress=False)
    out = llmsqueeze.save_quantized(model, tmp_path / "p")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["sparsity"]["format"] == "quant"
    loaded = AutoModelForCausalLM.from_pretrained(out)
    layer = loaded.model.layers[0].mlp.gate_proj
    assert isinstance(layer, QuantLinear) and (layer.dequantize_weight() == 0).float().mean() >= 0.5


def test_group_size_not_multiple_of_m_stays_packed(tmp_path):
    model = tiny_llama()
    llmsqueeze.prune(model, "magnitude", pattern="2:8", scheme=QuantScheme(bits=4, group_size=36), progress=False)
    out = llmsqueeze.save_quantized(model, tmp_path / "p")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["sparsity"]["format"] == "quant"
    # a code moved off zero in a pruned slot breaks 2:8: refused
    f = out / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.0.mlp.up_proj.qweight"][0] = torch.iinfo(torch.int32).max  # 8 inputs, all nonzero codes
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="up_proj.*2:8"):
        llmsqueeze.from_pretrained(out)


@pytest.mark.parametrize("score", ["l2", "activation"])
def test_structured_mlp_pruning_plain_checkpoint(tmp_path, score):
    from llmsqueeze.pruning.structured import prune_mlp_channels, save_structured

    model = tiny_llama()
    n0 = sum(p.numel() for p in model.parameters())
    ids = calib()
    prune_mlp_channels(model, 0.5, score=score, data=ids)
    assert model.config.intermediate_size == 80
    assert model.model.layers[1].mlp.down_proj.weight.shape == (96, 80)
    n1 = sum(p.numel() for p in model.parameters())
    assert n0 - n1 == 2 * 3 * 96 * 80  # 2 blocks x 3 matrices x hidden x removed channels
    with torch.no_grad():
        ref = model(ids).logits
    out = save_structured(model, tmp_path / "s", tokenizer=tiny_tokenizer())
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["intermediate_size"] == 80
    loaded = AutoModelForCausalLM.from_pretrained(out)  # plain transformers
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref)


def test_structured_keeps_the_loudest_channels():
    from llmsqueeze.pruning.structured import prune_mlp_channels

    model = tiny_llama(layers=1)
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        mlp.down_proj.weight[:, 7] *= 100  # channel 7 dominates
        mlp.down_proj.weight[:, 3] *= 0  # channel 3 contributes nothing
    up = mlp.up_proj.weight.detach().clone()
    prune_mlp_channels(model, 0.1, score="l2")
    kept_rows = [int(((up - r).abs().sum(1) == 0).nonzero()) for r in model.model.layers[0].mlp.up_proj.weight]
    assert 7 in kept_rows and 3 not in kept_rows and kept_rows == sorted(kept_rows)


@pytest.mark.parametrize("score", ["l2", "activation"])
def test_structured_attention_groups_plain_checkpoint(tmp_path, score):
    from llmsqueeze.pruning.structured import prune_attention_groups, save_structured

    model = tiny_llama()  # 4 heads, 2 key/value groups, head_dim 24
    ids = calib()
    prune_attention_groups(model, 0.5, score=score, data=ids)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (2, 1, 24)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (48, 96) and attn.k_proj.weight.shape == (24, 96)
    assert attn.o_proj.weight.shape == (96, 48)
    with torch.no_grad():
        ref = model(ids).logits
    out = save_structured(model, tmp_path / "a")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref)


def test_structured_attention_group_removal_is_exact():
    """Zeroing a group's o_proj columns makes it dead; pruning that group leaves the outputs unchanged."""
    from llmsqueeze.pruning.structured import prune_attention_groups

    model = tiny_llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, :48] = 0  # group 0 (query heads 0, 1) contributes nothing
        ids = calib()
        ref = model(ids).logits
        prune_attention_groups(model, 0.5, score="l2")
        torch.testing.assert_close(model(ids).logits, ref)
    with pytest.raises(llmsqueeze.LlmsqueezeError, match="keeps no key/value group"):
        prune_attention_groups(tiny_llama(), 0.1, score="l2")


def test_sparse_linear_dtypes_and_3d_inputs():
    w = torch.randn(8, 16)
    from llmsqueeze.pruning.masks import nm_mask

    w = w * nm_mask(w.abs(), 2, 4)
    layer = SparseLinear.from_dense(w, None, (2, 4))
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(layer(x), x @ w.t())
    yb = layer(x.bfloat16())  # the cache is rebuilt for the new dtype
    assert yb.dtype == torch.bfloat16 and yb.shape == (2, 3, 8)
    torch.testing.assert_close(yb.float(), x @ w.t(), rtol=2e-2, atol=5e-2)  # bf16 rounding of x and w


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_save_load_every_family(tmp_path, family):
    model = tiny_model(family)
    llmsqueeze.prune(model, "sparsegpt", pattern="2:4", data=calib(), progress=False)
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        ref = model(ids).logits
    out = llmsqueeze.save_quantized(model, tmp_path / family)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert any(isinstance(m, SparseLinear) for m in loaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref)
