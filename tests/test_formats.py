"""Export to compressed-tensors / GPTQ, import of GPTQ, AWQ and compressed-tensors checkpoints, and
multi-device loading; checked against the real loaders (transformers' compressed-tensors integration,
the compressed-tensors library as writer) and against decoders written here from the formats' specs."""
import json

import pytest
import torch
import transformers
from conftest import tiny_llama, tiny_model, tiny_tokenizer
from packaging.version import Version
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import llmsqueeze
from llmsqueeze import CheckpointError, LlmsqueezeError
from llmsqueeze.cli import main
from llmsqueeze.nn import QuantLinear

ct = pytest.importorskip("compressed_tensors")
IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4]])


def _quantized(tmp_path, name="src", model=None, **scheme):
    """tiny Llama (hidden 96, MLP 160: group 32 divides both) quantized and saved; -> (model, dir)."""
    model = model if model is not None else tiny_llama()
    llmsqueeze.quantize(model, progress=False, **{"bits": 4, "group_size": 32, **scheme})
    return model, llmsqueeze.save_quantized(model, tmp_path / name, tokenizer=tiny_tokenizer())


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _buffers(model):
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales", "g_idx")}


def _listing(d):
    return sorted(p.name for p in d.iterdir())


# ==================================================================== compressed-tensors export
# transformers warns that a passed CompressedTensorsConfig only sets loading attributes (dequantize): intended
@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
@pytest.mark.parametrize("scheme", [
    dict(bits=4, group_size=32),
    dict(bits=4, group_size=-1, sym=True),
    dict(bits=8, group_size=32, sym=True),
    dict(bits=4, group_size=32, scale_dtype="float32"),
    dict(bits=8, group_size=-1, scale_dtype="bfloat16", lm_head=True),
])
def test_ct_export_loads_in_transformers(scheme, tmp_path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    ours, src = _quantized(tmp_path, **scheme)
    out = llmsqueeze.export(src, "compressed-tensors", tmp_path / "ct")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    w = qc["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["symmetric"], w["strategy"]) == (
        scheme["bits"], scheme.get("sym", False), "channel" if scheme["group_size"] == -1 else "group")
    assert ("lm_head" in qc["ignore"]) != scheme.get("lm_head", False)
    assert "tokenizer.json" in _listing(out)
    if not scheme.get("sym") and Version(transformers.__version__) >= Version("5.23"):
        # transformers >= 5.23 sizes weight_zero_point for the compressed layout and refuses a plain load of
        # any asymmetric pack-quantized checkpoint (llm-compressor's too); the README says so
        with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
            AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    # the loads a user makes after that error: run_compressed=False (what the README gives), dequantize=True
    loads = {kw: AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                      quantization_config=CompressedTensorsConfig(**{kw: v}))
             for kw, v in (("run_compressed", False), ("dequantize", True))}
    # Logits: exact weights (float32 scales) leave only matmul summation order, ~1e-6; fp16/bf16
    # scales add one rounding of each weight (relative 2**-11 / 2**-8), which moves these logits
    # (magnitude ~0.1-1) by < 1e-3 / 1e-2.
    tol = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 1e-2}[scheme.get("scale_dtype", "float16")]
    for how, theirs in loads.items():
        # compressed-tensors dequantizes in the scale dtype: fp16((q - zero) * scale); ours is the same
        # product in float32. Each decompressed weight must equal ours rounded that way, bit for bit.
        for name, mod in ours.named_modules():
            if isinstance(mod, QuantLinear):
                q, s, z = mod.unpack()
                sd = mod.scales.dtype
                expect = ((q - z.repeat_interleave(mod.group_size, 1)[:, : q.shape[1]]).to(sd)
                          * mod.scales.t().repeat_interleave(mod.group_size, 1)[:, : q.shape[1]]).float()
                assert torch.equal(theirs.get_submodule(name).weight, expect), (how, name)
                assert torch.allclose(expect, mod.dequantize_weight(), rtol=2**-8 if sd != torch.float32 else 0, atol=0)
        assert torch.allclose(_logits(theirs), _logits(ours), atol=tol, rtol=0), how


def test_ct_export_of_static_act_order_gptq(tmp_path):
    model = tiny_llama()
    data = torch.randint(3, 64, (4, 24), generator=torch.Generator().manual_seed(0))
    llmsqueeze.quantize(model, bits=4, group_size=32, method="gptq", data=data, progress=False)  # static act-order
    src = llmsqueeze.save_quantized(model, tmp_path / "src")
    out = llmsqueeze.export(src, "compressed-tensors", tmp_path / "ct")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["actorder"] == "weight"
    assert torch.equal(_logits(llmsqueeze.from_pretrained(out)), _logits(model))


# ==================================================================== compressed-tensors import
def _ct_library_checkpoint(path, bits, sym, group_size):
    """A checkpoint written by the compressed-tensors library itself (the path llm-compressor takes to
    save): scales from its calculate_qparams on min/max, packed by its ModelCompressor. Returns the
    logits of the in-memory fake-quantized model, which is what the checkpoint means."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    model = tiny_llama()
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="group" if group_size else "channel",
                            group_size=group_size)
    cfg = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                             ignore=["lm_head"])
    apply_quantization_config(model, cfg)
    for mod in model.modules():
        if hasattr(mod, "weight_scale"):
            w = mod.weight.detach()
            wg = w.view(w.shape[0], -1, group_size or w.shape[1])
            scale, zero = calculate_qparams(wg.amin(-1), wg.amax(-1), args)
            mod.weight_scale.data.copy_(scale.view_as(mod.weight_scale))
            if not sym:
                mod.weight_zero_point.data.copy_(zero.view_as(mod.weight_zero_point))
    ref = _logits(model)
    compressor = ModelCompressor.from_pretrained_model(model, "pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(path)
    return ref


@pytest.mark.parametrize("bits,sym,group_size", [(4, False, 32), (4, True, None), (8, True, 32), (8, False, None)])
def test_ct_library_checkpoint_imports(bits, sym, group_size, tmp_path):
    ref = _ct_library_checkpoint(tmp_path / "ct", bits, sym, group_size)
    assert json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
    model = llmsqueeze.from_pretrained(tmp_path / "ct")
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)
    # float32 scales: our (q - zero) * scale is the library's product bit for bit; only the matmul
    # kernel (x @ W^T on [K, N] vs F.linear) may order the sums differently.
    assert torch.allclose(_logits(model), ref, atol=1e-5, rtol=0)
    # imported, then saved: a plain llmsqueeze checkpoint that loads back the same
    again = llmsqueeze.save_quantized(model, tmp_path / "ours")
    qc = json.loads((again / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "llmsqueeze" and "source" not in qc
    assert torch.equal(_logits(llmsqueeze.from_pretrained(again)), _logits(model))


def test_ct_import_refuses_what_it_cannot_read(tmp_path):
    _ct_library_checkpoint(tmp_path / "ct", 4, False, 32)
    cfg_file = tmp_path / "ct" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8, "type": "int"}
    cfg["quantization_config"]["format"] = "int-quantized"
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="fields llmsqueeze does not read: format='int-quantized'.*activation"):
        llmsqueeze.from_pretrained(tmp_path / "ct")


# ==================================================================== GPTQ export / import
def _bits_stream(words: list[int], bits: int, count: int) -> list[int]:
    """Values 0..count-1 of a little-endian bit stream made of 32-bit words (the GPTQ packing)."""
    stream = sum((w & 0xFFFFFFFF) << (32 * i) for i, w in enumerate(words))
    return [(stream >> (bits * j)) & (2**bits - 1) for j in range(count)]


def gptq_reference_weight(f, prefix: str, bits: int, k: int, n: int, v1: bool) -> torch.Tensor:
    """W [N, K] decoded from a GPTQ layer as the format describes it, with Python integers:
    qweight [K*b/32, N] packs each column's K values along K; qzeros [K/G, N*b/32] packs each
    group's N zeros along N and stores zero - 1 (v1); w = (q - zero[g_idx[k]]) * scale[g_idx[k]]."""
    qweight, qzeros = f.get_tensor(f"{prefix}.qweight").tolist(), f.get_tensor(f"{prefix}.qzeros").tolist()
    scales, g_idx = f.get_tensor(f"{prefix}.scales").float(), f.get_tensor(f"{prefix}.g_idx").tolist()
    q = [_bits_stream([row[c] for row in qweight], bits, k) for c in range(n)]  # q[n][k]
    zeros = [[(z + (1 if v1 else 0)) for z in _bits_stream(row, bits, n)] for row in qzeros]  # [g][n]
    w = torch.empty(n, k)
    for c in range(n):
        for j in range(k):
            g = g_idx[j]
            w[c, j] = (q[c][j] - zeros[g][c]) * scales[g, c].item()
    return w


@pytest.mark.parametrize("scheme", [
    dict(bits=4, group_size=32), dict(bits=4, group_size=32, sym=True), dict(bits=8, group_size=-1),
    dict(bits=2, group_size=32), dict(bits=3, group_size=32, sym=True), dict(bits=4, group_size=32, scale_dtype="bfloat16"),
])
def test_gptq_export_matches_the_format_and_round_trips(scheme, tmp_path):
    # 3-bit packs 32 values in 3 words, so GPTQ needs widths that are multiples of 32 (hidden 128)
    ours, src = _quantized(tmp_path, model=tiny_llama(hidden=128) if scheme["bits"] == 3 else None, **scheme)
    out = llmsqueeze.export(src, "gptq", tmp_path / "gptq")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq" and qc["desc_act"] is False
    assert (qc["bits"], qc["group_size"], qc["sym"]) == (scheme["bits"], scheme["group_size"], scheme.get("sym", False))
    bits = scheme["bits"]
    layer = ours.model.layers[1].mlp.down_proj  # K = 160, N = 96
    k, n = layer.in_features, layer.out_features
    g = k if scheme["group_size"] == -1 else scheme["group_size"]
    with safe_open(out / "model.safetensors", "pt") as f:
        p = "model.layers.1.mlp.down_proj"
        assert f.get_slice(f"{p}.qweight").get_shape() == [k * bits // 32, n]
        assert f.get_slice(f"{p}.qzeros").get_shape() == [k // g, n * bits // 32]
        assert f.get_tensor(f"{p}.scales").dtype == torch.float16
        assert f.get_tensor(f"{p}.g_idx").tolist() == [j // g for j in range(k)]
        assert torch.equal(gptq_reference_weight(f, p, bits, k, n, v1=True), layer.dequantize_weight())
        if scheme.get("sym"):  # symmetric: every stored zero is 2**(b-1) - 1, e.g. 0x77777777 at 4 bits
            assert set(_bits_stream(f.get_tensor(f"{p}.qzeros")[0].tolist(), bits, n)) == {2 ** (bits - 1) - 1}
    back = llmsqueeze.from_pretrained(out)
    theirs, mine = _buffers(back), _buffers(ours)
    assert theirs.keys() == mine.keys()
    for key in mine:  # bit-exact: the same packed words (scales compared by value: bf16 -> fp16 exact)
        assert torch.equal(theirs[key].to(mine[key].dtype), mine[key]), key
    assert torch.equal(_logits(back), _logits(ours))


def test_gptq_act_order_with_g_idx(tmp_path):
    model = tiny_model("llama")  # hidden 80, MLP 144: group 16 divides both
    data = torch.randint(3, 64, (4, 24), generator=torch.Generator().manual_seed(0))
    llmsqueeze.quantize(model, bits=4, group_size=16, method="gptq", data=data, progress=False, static_groups=False)
    src = llmsqueeze.save_quantized(model, tmp_path / "src")
    out = llmsqueeze.export(src, "gptq", tmp_path / "gptq")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["desc_act"] is True
    layer = model.model.layers[0].mlp.down_proj
    with safe_open(out / "model.safetensors", "pt") as f:
        p = "model.layers.0.mlp.down_proj"
        assert torch.equal(f.get_tensor(f"{p}.g_idx"), layer.g_idx)
        assert torch.equal(gptq_reference_weight(f, p, 4, 144, 80, v1=True), layer.dequantize_weight())
    back = llmsqueeze.from_pretrained(out)
    assert back.model.layers[0].mlp.down_proj.g_idx is not None
    assert torch.equal(_logits(back), _logits(model))
    with pytest.raises(LlmsqueezeError, match="act_order with g_idx.*--format gptq"):
        llmsqueeze.export(src, "compressed-tensors", tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_g_idx_imports_from_gptq_without_desc_act_and_from_ct(tmp_path):
    """A stored g_idx that is not arange(K)//G is honoured even where the config says no desc_act,
    and compressed-tensors' weight_g_idx (actorder "group", written by older versions) imports."""
    from llmsqueeze.formats.compressed_tensors import pack_layer

    model = tiny_model("llama")
    data = torch.randint(3, 64, (4, 24), generator=torch.Generator().manual_seed(0))
    llmsqueeze.quantize(model, bits=4, group_size=16, method="gptq", data=data, progress=False, static_groups=False)
    src = llmsqueeze.save_quantized(model, tmp_path / "src")
    out = llmsqueeze.export(src, "gptq", tmp_path / "gptq")
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["desc_act"] = False
    (out / "config.json").write_text(json.dumps(cfg))
    assert torch.equal(_logits(llmsqueeze.from_pretrained(out)), _logits(model))

    plain = llmsqueeze.quantize(tiny_model("llama"), bits=4, group_size=16, progress=False)  # same shapes, no g_idx
    ct_dir = llmsqueeze.export(llmsqueeze.save_quantized(plain, tmp_path / "plain"), "compressed-tensors", tmp_path / "ct")
    sd = load_file(ct_dir / "model.safetensors")
    for name, mod in model.named_modules():  # the g_idx model's layers, in compressed-tensors' layout
        if isinstance(mod, QuantLinear):
            sd.update(pack_layer(name, mod, False, None))
            sd[f"{name}.weight_g_idx"] = mod.g_idx
    save_file(sd, ct_dir / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((ct_dir / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] = "group"
    (ct_dir / "config.json").write_text(json.dumps(cfg))
    back = llmsqueeze.from_pretrained(ct_dir)
    assert torch.equal(back.model.layers[1].mlp.up_proj.g_idx, model.model.layers[1].mlp.up_proj.g_idx)
    assert torch.equal(_logits(back), _logits(model))


def test_gptq_zero_point_zero_needs_v2(tmp_path):
    model = tiny_llama()
    with torch.no_grad():  # an all-positive group: its zero point is 0, which v1 (zero - 1) cannot store
        model.model.layers[0].self_attn.q_proj.weight[0, :32] = torch.linspace(0.01, 0.1, 32)
    ours, src = _quantized(tmp_path, model=model)
    with pytest.raises(LlmsqueezeError, match="q_proj has 1 group zero point.*gptq_v2"):
        llmsqueeze.export(src, "gptq", tmp_path / "v1")
    assert _listing(tmp_path) == ["src"]
    out = llmsqueeze.export(src, "gptq", tmp_path / "v2", checkpoint_format="gptq_v2")
    with safe_open(out / "model.safetensors", "pt") as f:
        p = "model.layers.0.self_attn.q_proj"
        assert _bits_stream(f.get_tensor(f"{p}.qzeros")[0].tolist(), 4, 1) == [0]  # v2 stores the zero itself
        assert torch.equal(gptq_reference_weight(f, p, 4, 96, 96, v1=False),
                           ours.model.layers[0].self_attn.q_proj.dequantize_weight())
    assert torch.equal(_logits(llmsqueeze.from_pretrained(out)), _logits(ours))


# ==================================================================== AWQ import
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # column offset held by nibble i of each int32


def _awq_pack(values: torch.Tensor) -> torch.Tensor:
    """[R, C] ints in [0, 15] -> int32 [R, C/8]: AutoAWQ's GEMM packing, written from its description."""
    r, c = values.shape
    out = torch.zeros(r, c // 8, dtype=torch.int64)
    for word in range(c // 8):
        for i in range(8):
            out[:, word] |= values[:, 8 * word + AWQ_ORDER[i]].long() << (4 * i)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def test_awq_gemm_checkpoint_imports(tmp_path):
    ours, src = _quantized(tmp_path)
    sd = load_file(src / "model.safetensors")
    for name, mod in ours.named_modules():
        if isinstance(mod, QuantLinear):  # rewrite each layer as AWQ: qweight [K, N/8], qzeros [K/G, N/8]
            q, _, zero = mod.unpack()
            sd[f"{name}.qweight"] = _awq_pack(q.t())
            sd[f"{name}.qzeros"] = _awq_pack(zero.t())
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                                  "version": "gemm", "modules_to_not_convert": None}
    (src / "config.json").write_text(json.dumps(cfg))
    back = llmsqueeze.from_pretrained(src)
    for key, value in _buffers(ours).items():
        assert torch.equal(_buffers(back)[key], value), key
    assert torch.equal(_logits(back), _logits(ours))
    cfg["quantization_config"]["version"] = "gemv"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="version='gemv' \\(read: gemm\\)"):
        llmsqueeze.from_pretrained(src)


def test_sharded_checkpoint_exports_shard_by_shard(tmp_path):
    model = tiny_llama()
    llmsqueeze.quantize(model, bits=4, group_size=32, progress=False)
    src = llmsqueeze.save_quantized(model, tmp_path / "src", max_shard_size="40KB")  # a layer's tensors may straddle shards
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert len(shards) > 2
    for fmt in ("gptq", "compressed-tensors"):
        out = llmsqueeze.export(src, fmt, tmp_path / fmt)
        assert sorted(p.name for p in out.glob("*.safetensors")) == shards
        index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        assert all((out / f).is_file() for f in index.values())
        assert torch.equal(_logits(llmsqueeze.from_pretrained(out)), _logits(model))


# ==================================================================== refusals, CLI, info
def test_unexpressible_schemes_are_one_line_errors(tmp_path, capsys):
    _, short = _quantized(tmp_path, "short", group_size=64)  # K = 96: a last group of 32
    for fmt in ("gptq", "compressed-tensors"):
        with pytest.raises(LlmsqueezeError, match="group_size=64 does not divide in_features=(96|160) .*--group-size 32"):
            llmsqueeze.export(short, fmt, tmp_path / "out")
    _, three = _quantized(tmp_path, "three", bits=3)
    with pytest.raises(LlmsqueezeError, match="compressed-tensors: bits=3"):
        llmsqueeze.export(three, "compressed-tensors", tmp_path / "out")
    _, f32 = _quantized(tmp_path, "f32", scale_dtype="float32")
    with pytest.raises(LlmsqueezeError, match="scale_dtype=float32 scales .* not exactly float16"):
        llmsqueeze.export(f32, "gptq", tmp_path / "out")
    _, part = _quantized(tmp_path, "part", exclude=["down_proj"])
    with pytest.raises(LlmsqueezeError, match="modules_to_not_convert has layers inside the decoder blocks"):
        llmsqueeze.export(part, "gptq", tmp_path / "out")
    out = llmsqueeze.export(part, "compressed-tensors", tmp_path / "out")  # an ignore list expresses it
    assert "model.layers.0.mlp.down_proj" in json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    capsys.readouterr()
    assert main(["export", str(short), "--format", "gptq", "--out", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not divide" in err
    assert main(["export", str(short), "--format", "awq", "--out", str(tmp_path / "cli")]) == 2
    assert "not an export format" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_compressed_tensors_reader_rejects_a_shorter_last_group():
    """Why export refuses K % G != 0: compressed-tensors (0.20) sizes scales ceil(K/G) but its
    dequantize, which transformers' loader runs, raises on such a weight."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=64)
    with pytest.raises(ValueError, match="group_size 64 but got 96"):
        dequantize(torch.zeros(8, 96, dtype=torch.int8), torch.ones(8, 2), None, args)


def test_export_refuses_foreign_and_corrupt_input(tmp_path, capsys):
    _, src = _quantized(tmp_path)
    ct_dir = llmsqueeze.export(src, "compressed-tensors", tmp_path / "ct")
    with pytest.raises(LlmsqueezeError, match="is a compressed-tensors checkpoint; export reads llmsqueeze"):
        llmsqueeze.export(ct_dir, "gptq", tmp_path / "again")
    assert main(["export", str(tmp_path / "missing"), "--format", "gptq", "--out", str(tmp_path / "o")]) == 2
    assert "no such directory" in capsys.readouterr().err
    sd = load_file(ct_dir / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight_scale"]
    save_file(sd, ct_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="layer model.layers.1.mlp.up_proj lacks weight_scale"):
        llmsqueeze.from_pretrained(ct_dir)


def test_cli_export_and_info(tmp_path, capsys):
    _, src = _quantized(tmp_path)
    assert main(["export", str(src), "--format", "gptq", "--out", str(tmp_path / "g")]) == 0
    assert main(["info", str(tmp_path / "g")]) == 0
    text = capsys.readouterr().out
    assert "gptq checkpoint (checkpoint_format gptq), imported" in text and "14 layers" in text
    assert main(["export", str(src), "--format", "compressed-tensors", "--out", str(tmp_path / "c")]) == 0
    assert main(["info", str(tmp_path / "c"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert info["format"].startswith("compressed-tensors") and info["quantized_layers"] == 14
    assert 4 < info["bits_per_quantized_weight"] < 5.5


# ==================================================================== multi-device
def test_device_map_auto_with_disk_offload(tmp_path):
    model = tiny_llama(layers=4)
    with torch.no_grad():  # larger weights so greedy decoding does not just repeat one token
        for p in model.parameters():
            p.mul_(8)
    ours, src = _quantized(tmp_path, model=model)
    plain = llmsqueeze.from_pretrained(src)
    # ~100 KB of CPU for a ~230 KB checkpoint: accelerate puts the first blocks on the CPU and the
    # rest on disk, and its hooks bring QuantLinear buffers back for each forward
    split = llmsqueeze.from_pretrained(src, device_map="auto", max_memory={"cpu": 100_000}, offload_folder=tmp_path / "off")
    assert {"cpu", "disk"} <= set(split.hf_device_map.values())
    assert torch.equal(_logits(split), _logits(plain))
    want = plain.generate(IDS, max_new_tokens=12, do_sample=False)
    assert len(set(want[0, IDS.shape[1]:].tolist())) > 1
    assert torch.equal(split.generate(IDS, max_new_tokens=12, do_sample=False), want)
    for fmt in ("gptq", "compressed-tensors"):  # imported checkpoints too: converted as they stream in
        out = llmsqueeze.export(src, fmt, tmp_path / fmt)
        imported = llmsqueeze.from_pretrained(out, device_map="auto", max_memory={"cpu": 100_000},
                                              offload_folder=tmp_path / f"off-{fmt}")
        assert "disk" in set(imported.hf_device_map.values())
        assert torch.equal(imported.generate(IDS, max_new_tokens=12, do_sample=False), want)
