"""Export of pruned checkpoints to compressed-tensors: sparse-24-bitmask (2:4), sparse-bitmask (any
other pattern), and sparse + 4-bit as pack-quantized with a "dense" sparsity_config.

compressed-tensors 0.20 ships no sparse compressor, so the sparse formats are checked here by a
decoder written from the format's description (below), against the pruned weights; the real
decompressors of compressed-tensors 0.10.2 are run by eval/sparse_export_check.py in a virtualenv of
their own (eval/results/sparse_export_check.json). The sparse + 4-bit exports load with transformers'
own compressed-tensors integration here."""
import json

import numpy as np
import pytest
import torch
from conftest import tiny_llama, tiny_model, tiny_tokenizer
from safetensors.torch import load_file

import llmsqueeze
from llmsqueeze import LlmsqueezeError, QuantScheme
from llmsqueeze.cli import main
from llmsqueeze.nn import QuantLinear, SparseLinear

pytest.importorskip("compressed_tensors")
IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4]])


def calib():
    return torch.randint(3, 64, (4, 32), generator=torch.Generator().manual_seed(0))


def _pruned(tmp_path, model=None, method="sparsegpt", **kw):
    """tiny Llama pruned and saved; -> (its dense weights {layer: W} and parameters before saving, dir)."""
    model = model if model is not None else tiny_llama(hidden=100, head_dim=24)  # K = 100: half a bitmask byte
    llmsqueeze.prune(model, method, data=None if method == "magnitude" else calib(), progress=False, **kw)
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    params = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        logits = model(IDS).logits
    return weights, params, logits, model, llmsqueeze.save_quantized(model, tmp_path / "src", tokenizer=tiny_tokenizer())


# --------------------------------------------------------------------------- decoder from the format
def decode_bitmask(bitmask: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [N, ceil(K/8)] -> bool [N, K]: input j of a row is bit j % 8 of byte j // 8, least
    significant bit first (numpy's little bit order)."""
    bits = np.unpackbits(bitmask.numpy(), axis=1, bitorder="little")
    return torch.from_numpy(bits[:, :k].astype(bool))


def decode_layer(t: dict, prefix: str, fmt: str) -> torch.Tensor:
    """A sparse layer of a compressed-tensors checkpoint -> its dense weight [N, K]."""
    shape = t[f"{prefix}.shape"]
    assert shape.dtype == torch.int64
    n, k = shape.flatten().tolist()
    mask = decode_bitmask(t[f"{prefix}.bitmask"], k)
    assert t[f"{prefix}.bitmask"].dtype == torch.uint8 and t[f"{prefix}.bitmask"].shape == (n, -(-k // 8))
    values = t[f"{prefix}.compressed"]
    if fmt == "sparse-24-bitmask":
        assert shape.shape == (2, 1) and values.shape == (n, k // 2)
        assert (mask.view(n, k // 4, 4).sum(-1) == 2).all()  # exactly 2 of every 4
    else:
        assert shape.shape == (2,) and values.dim() == 1 and values.numel() == int(mask.sum())
        counts = mask.sum(1)
        assert torch.equal(t[f"{prefix}.row_offsets"], torch.cumsum(counts, 0) - counts)
    w = torch.zeros(n, k, dtype=values.dtype)
    w[mask] = values.flatten()  # row-major: the i-th set bit takes the i-th value
    return w


def expected_block(fmt, structure, params, ignore=("lm_head",)):
    """The sparsity_config llm-compressor writes: global_sparsity = zero parameters / parameters."""
    zeros = sum(int((p == 0).sum()) for p in params)
    return {"format": fmt, "sparsity_structure": structure, "targets": ["Linear"], "ignore": list(ignore),
            "global_sparsity": zeros / sum(p.numel() for p in params), "registry_requires_subclass": False}


# --------------------------------------------------------------------------- sparse only
@pytest.mark.parametrize("case", ["2:4 sparsegpt", "2:4 magnitude bf16", "unstructured wanda", "1:4 sparsegpt",
                                  "bitmask bf16"])
def test_sparse_export_decodes_to_the_pruned_weights(case, tmp_path):
    model = tiny_llama(hidden=100, head_dim=24)
    if "bf16" in case:
        model = model.to(torch.bfloat16)
    method = case.split()[1]
    target = {"pattern": "2:4"} if case.startswith("2:4") else {"pattern": "1:4"} if case.startswith("1:4") \
        else {"sparsity": 0.6}
    weights, params, _, _, src = _pruned(tmp_path, model, method if method != "bf16" else "magnitude", **target)
    out = llmsqueeze.export(src, "compressed-tensors", tmp_path / "ct")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    fmt = "sparse-24-bitmask" if case.startswith("2:4") else "sparse-bitmask"
    assert set(qc) == {"quant_method", "version", "sparsity_config"} and qc["quant_method"] == "compressed-tensors"
    assert qc["sparsity_config"] == expected_block(fmt, "2:4" if fmt == "sparse-24-bitmask" else "unstructured", params)
    assert "tokenizer.json" in {p.name for p in out.iterdir()}
    t = load_file(out / "model.safetensors")
    for name, w in weights.items():
        if name == "lm_head":  # ignored: stored dense as it was
            assert torch.equal(t["lm_head.weight"], w)
            continue
        assert f"{name}.weight" not in t
        # exact in value: the pruned model holds -0.0 where a negative weight was multiplied by the
        # mask; the format (like our checkpoint) stores no sign for a pruned weight
        assert torch.equal(decode_layer(t, name, fmt), w), name
    embed = "model.embed_tokens.weight"
    assert torch.equal(t[embed], load_file(src / "model.safetensors")[embed])
    with pytest.raises(llmsqueeze.CheckpointError, match=f"sparsity_config format '{fmt}' is not imported"):
        llmsqueeze.from_pretrained(out)


def test_bitmask_export_keeps_our_bitmask_bytes(tmp_path):
    """Our unstructured storage is already the format's bitmask: the bytes are copied as they are."""
    *_, src = _pruned(tmp_path, method="magnitude", sparsity=0.5)
    out = llmsqueeze.export(src, "compressed-tensors", tmp_path / "ct")
    ours, theirs = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    p = "model.layers.1.self_attn.q_proj"
    assert torch.equal(ours[f"{p}.bitmask"], theirs[f"{p}.bitmask"])
    assert torch.equal(ours[f"{p}.values"], theirs[f"{p}.compressed"])


# --------------------------------------------------------------------------- sparse + 4-bit
# transformers warns that a passed CompressedTensorsConfig only sets loading attributes (dequantize): intended
@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
@pytest.mark.parametrize("case", [
    dict(pattern="2:4", group_size=32),
    dict(pattern="2:4", group_size=-1, sym=True, scale_dtype="float32"),
    dict(pattern=None, sparsity=0.5, group_size=32, scale_dtype="float32"),  # unstructured: packed QuantLinear
])
def test_sparse_quantized_export_loads_in_transformers(case, tmp_path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    case = dict(case)
    scale_dtype = case.pop("scale_dtype", None)
    scheme = QuantScheme(bits=4, group_size=case.pop("group_size"), sym=case.pop("sym", False))
    model = tiny_llama()  # hidden 96, MLP 160: group 32 divides both
    *_, logits, model, src = _pruned(tmp_path, model, "wanda", scheme=scheme, **case)
    stored = json.loads((src / "config.json").read_text())["quantization_config"]["sparsity"]["format"]
    assert stored == ("nm" if case["pattern"] else "quant")
    ours = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (SparseLinear, QuantLinear)) and not name.endswith("qvalues"):
            ours[name] = mod.to_dense() if isinstance(mod, SparseLinear) else mod.dequantize_weight()
    params = [w for w in ours.values()] + [p for p in model.parameters()]
    out = llmsqueeze.export(src, "compressed-tensors", tmp_path / "ct", scale_dtype=scale_dtype)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["ignore"] == ["lm_head"]
    assert qc["sparsity_config"] == expected_block("dense", "2:4" if case["pattern"] else "unstructured", params)
    theirs = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))
    for name, w in ours.items():
        got = theirs.get_submodule(name).weight
        if scale_dtype == "float32":
            assert torch.equal(got, w), name  # it dequantizes in the scales' dtype: exact in float32
        else:  # fp16((q - zero) * scale): one rounding of each weight, zeros stay exactly zero
            assert torch.equal(got == 0, w == 0) and torch.allclose(got, w, rtol=2**-10, atol=0), name
    # float32 scales: only summation order differs (~1e-6); fp16 scales move logits of magnitude ~1 by < 1e-3
    tol = 1e-5 if scale_dtype == "float32" else 1e-3
    with torch.no_grad():
        assert torch.allclose(theirs(IDS).logits, logits, atol=tol, rtol=0)
        # and our importer reads it back (a packed QuantLinear with zero codes where pruned)
        assert torch.allclose(llmsqueeze.from_pretrained(out, dtype=torch.float32)(IDS).logits, logits,
                              atol=tol, rtol=0)


# --------------------------------------------------------------------------- refused
def test_what_the_formats_cannot_express_is_refused_in_one_line(tmp_path, capsys):
    *_, pruned = _pruned(tmp_path / "a", method="magnitude", pattern="2:4")
    with pytest.raises(LlmsqueezeError, match="cannot export to gptq: .* pruned but not quantized .*compressed-tensors"):
        llmsqueeze.export(pruned, "gptq", tmp_path / "out")
    with pytest.raises(LlmsqueezeError, match="--scale-dtype float32: .* pruned, not quantized"):
        llmsqueeze.export(pruned, "compressed-tensors", tmp_path / "out", scale_dtype="float32")
    *_, q3 = _pruned(tmp_path / "b", tiny_llama(), "magnitude", pattern="2:4", scheme=QuantScheme(bits=3, group_size=32))
    with pytest.raises(LlmsqueezeError, match="compressed-tensors: bits=3"):
        llmsqueeze.export(q3, "compressed-tensors", tmp_path / "out")
    with pytest.raises(LlmsqueezeError, match="gptq: .*sparsity.format 'nm'"):
        llmsqueeze.export(q3, "gptq", tmp_path / "out")
    gpt2 = tiny_model("gpt2")
    llmsqueeze.prune(gpt2, "magnitude", pattern="2:4", progress=False)
    conv = llmsqueeze.save_quantized(gpt2, tmp_path / "gpt2")
    with pytest.raises(LlmsqueezeError, match="Conv1D layers"):
        llmsqueeze.export(conv, "compressed-tensors", tmp_path / "out")
    capsys.readouterr()
    assert main(["export", str(pruned), "--format", "gptq", "--out", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pruned but not quantized" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cli").exists()


def test_cli_exports_a_pruned_checkpoint(tmp_path, capsys):
    *_, src = _pruned(tmp_path, method="magnitude", pattern="2:4")
    assert main(["export", str(src), "--format", "compressed-tensors", "--out", str(tmp_path / "c")]) == 0
    qc = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    assert qc["sparsity_config"]["format"] == "sparse-24-bitmask"
